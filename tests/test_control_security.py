"""Security of a local cluster: its runtime directory is private (0700, ours) and holds the
control channel as Unix sockets; no process of the cluster listens anywhere else, except the
HTTP proxy on 127.0.0.1 (and not even that when HTTP is disabled). Another Unix user cannot
reach it, and is told "permission denied", not that there is no cluster."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import serval as serve
from conftest import free_port, serval_processes
from serval import cli
from serval._private.caller import runtime
from serval._private.process.cluster import make_private_dir
from serval.exceptions import ServalError

TCP_LISTEN = "0A"
UDP_UNCONNECTED = "07"
SO_ACCEPTCON = 0x10000


@serve.deployment(num_replicas=2)
class Hello:
    def __call__(self, request: Any = None) -> str:
        return "hello"


@serve.deployment
class Caller:
    def __init__(self, hello: Any) -> None:
        self.hello = hello

    async def __call__(self, request: Any = None) -> str:
        return await self.hello.remote()


def cluster_pids() -> list[int]:
    address = runtime.address()
    assert address is not None
    pids = [pid for pid, _ in serval_processes(address)]
    assert pids
    return pids


def socket_inodes(pids: list[int]) -> dict[int, int]:
    """socket inode -> pid, for every socket the given processes hold open."""
    out = {}
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                out[int(target[8:-1])] = pid
    return out


def _decode_addr(hex_addr: str) -> tuple[str, int]:
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, struct.pack("<I", int(host, 16)))
    else:  # IPv6: four little-endian 32-bit words
        words = struct.unpack(">4I", raw)
        ip = socket.inet_ntop(socket.AF_INET6, struct.pack("<4I", *words))
    return ip, int(port, 16)


def inet_sockets(inodes: dict[int, int]) -> list[tuple[str, str, int, int]]:
    """(protocol, ip, port, pid) of every TCP socket listening and every UDP socket bound by one
    of ``inodes``."""
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if inode not in inodes:
                continue
            if proto.startswith("tcp") and state != TCP_LISTEN:
                continue
            if proto.startswith("udp") and state != UDP_UNCONNECTED:
                continue
            ip, port = _decode_addr(local)
            found.append((proto, ip, port, inodes[inode]))
    return found


def listening_unix_sockets(inodes: dict[int, int]) -> list[tuple[str, int]]:
    """(path, pid) of every listening Unix socket among ``inodes`` ('@...' = abstract, '' =
    unnamed)."""
    found = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        flags, inode = int(fields[3], 16), int(fields[6])
        if inode in inodes and flags & SO_ACCEPTCON:
            found.append((fields[7] if len(fields) > 7 else "", inodes[inode]))
    return found


def _deploy_something() -> None:
    serve.run(Caller.bind(Hello.bind()), route_prefix="/hello")
    assert serve.get_app_handle("default").remote().result(timeout_s=10) == "hello"


def test_runtime_dir_is_private_and_holds_only_unix_sockets(serve_instance: Any) -> None:
    _deploy_something()
    address = runtime.address()
    assert address is not None
    info = os.lstat(address)
    assert stat.S_ISDIR(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o700, oct(info.st_mode)
    assert info.st_uid == os.getuid()

    sockets = []
    for root, dirs, files in os.walk(address):
        for d in dirs:
            sub = os.lstat(os.path.join(root, d))
            assert sub.st_uid == os.getuid()
            assert not stat.S_IMODE(sub.st_mode) & 0o022, (d, oct(sub.st_mode))
        for name in files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            assert st.st_uid == os.getuid(), path
            assert stat.S_ISSOCK(st.st_mode) or stat.S_ISREG(st.st_mode), path
            assert not stat.S_IMODE(st.st_mode) & 0o022, (path, oct(st.st_mode))
            if stat.S_ISSOCK(st.st_mode):
                sockets.append(path)
    # The controller's socket and one per replica (3) at least.
    assert len(sockets) >= 4, sockets

    # Every listening Unix socket of the cluster is a file in that directory: none in the
    # abstract namespace (which file permissions do not protect) and none elsewhere.
    listening = listening_unix_sockets(socket_inodes(cluster_pids()))
    assert listening
    for path, pid in listening:
        assert path.startswith(address + os.sep), (path, pid)
    assert {p for p, _ in listening} <= set(sockets)


def test_only_tcp_listeners_are_the_http_proxy_and_the_dashboard_on_localhost() -> None:
    port, dashboard = free_port(), free_port()
    serve.start(http_options={"port": port}, dashboard_options={"port": dashboard})
    try:
        _deploy_something()
        address = runtime.address()
        assert address is not None
        proxies = [pid for pid, cmd in serval_processes(address) if "serval::proxy " in cmd]
        boards = [pid for pid, cmd in serval_processes(address) if "serval::dashboard " in cmd]
        assert len(proxies) == 1 and len(boards) == 1

        # (the dashboard's listener: every request to it needs the token, test_dashboard_api)
        found = sorted(inet_sockets(socket_inodes(cluster_pids())), key=lambda f: f[2] != port)
        listening = [(proto, ip, p) for proto, ip, p, _ in found]
        assert listening == [("tcp", "127.0.0.1", port), ("tcp", "127.0.0.1", dashboard)], found
        assert [pid for *_, pid in found] == [proxies[0], boards[0]]
        assert httpx.get(f"http://127.0.0.1:{port}/hello", timeout=10).text == "hello"
    finally:
        serve.shutdown()


def test_nothing_listens_on_tcp_when_http_and_the_dashboard_are_disabled() -> None:
    serve.start(http_options={"enabled": False, "port": free_port()}, dashboard_options={"port": 0})
    try:
        _deploy_something()
        address = runtime.address()
        assert address is not None
        assert not [c for _, c in serval_processes(address) if "serval::proxy " in c]
        found = inet_sockets(socket_inodes(cluster_pids()))
        assert found == [], found
    finally:
        serve.shutdown()


def test_an_existing_runtime_dir_that_is_not_private_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(ServalError, match="not private"):
        make_private_dir(str(shared))
    link = tmp_path / "link"
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    link.symlink_to(private)
    with pytest.raises(ServalError):
        make_private_dir(str(link))
    assert make_private_dir(str(private)) == str(private)
    fresh = tmp_path / "fresh"
    assert make_private_dir(str(fresh)) == str(fresh)
    assert stat.S_IMODE(os.lstat(fresh).st_mode) == 0o700


# -- another Unix user ---------------------------------------------------------------------------


@pytest.fixture
def other_user() -> Iterator[str]:
    """A throwaway Unix user, deleted afterwards (needs root and useradd)."""
    if os.geteuid() != 0:
        pytest.skip("creating a throwaway user needs root")
    if not (shutil.which("useradd") and shutil.which("userdel")):
        pytest.skip("creating a throwaway user needs useradd and userdel")
    name = f"svt{os.getpid()}{secrets.token_hex(3)}"
    for _ in range(20):  # /etc/passwd is locked while another useradd runs
        made = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/bin/false", name],
            capture_output=True,
            text=True,
        )
        if made.returncode == 0:
            break
        time.sleep(0.2)
    else:
        pytest.skip(f"useradd failed: {made.stderr.strip()}")
    try:
        yield name
    finally:
        for _ in range(20):
            if subprocess.run(["userdel", name], capture_output=True).returncode in (0, 6):
                break  # (6: no such user)
            time.sleep(0.2)


def _as_user(user: str, fn: Callable[[], int]) -> tuple[int, str]:
    """Run ``fn`` as ``user`` in a forked child (the interpreter, under /root, may not be
    this user's to start); its exit code and output."""
    import pwd

    entry = pwd.getpwnam(user)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become the user, run, leave without any clean-up of the parent's
        code = 99
        try:
            os.close(read_end)
            sys.stdout = sys.stderr = os.fdopen(write_end, "w")
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            code = fn()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(write_end)
    output = b""
    deadline = time.monotonic() + 30
    with os.fdopen(read_end, "rb") as f:
        while time.monotonic() < deadline and (chunk := f.read1(65536)):
            output += chunk
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def _cli_status(address: str) -> Callable[[], int]:
    return lambda: cli.main(["status", "--address", address])


def _api_start(address: str) -> int:
    runtime.set_address(None)  # the parent's cluster, in this child's copy of its memory
    try:
        serve.start(address=address)
    except ServalError as exc:
        print(f"ServalError {exc}")
        return 1
    return 0


def test_another_users_cluster_is_permission_denied_not_absent(
    serve_instance: Any, other_user: str
) -> None:
    _deploy_something()
    address = runtime.address()
    assert address is not None
    socket_path = os.path.join(address, "controller.sock")

    code, output = _as_user(other_user, _cli_status(address))
    assert code == 1, output
    assert "permission denied" in output and socket_path in output, output
    assert "no serval cluster" not in output and "Traceback" not in output, output

    code, output = _as_user(other_user, lambda: _api_start(address))
    assert code == 1 and output.startswith("ServalError permission denied: "), output
    assert socket_path in output

    # Where the other user can see the directory (a `serval start` cluster under /tmp), the
    # error names its owner.
    base = tempfile.mkdtemp(prefix="sec-", dir="/tmp")
    os.chmod(base, 0o755)
    cluster = os.path.join(base, "c")
    command = [sys.executable, "-m", "serval"]
    port = str(free_port())
    started = subprocess.run(
        [*command, "start", "--address", cluster, "--port", port], capture_output=True, text=True
    )
    try:
        assert started.returncode == 0, started.stderr
        code, output = _as_user(other_user, _cli_status(cluster))
        assert code == 1 and "permission denied" in output, output
        assert "belongs to user 'root' (uid 0)" in output, output
    finally:
        subprocess.run(
            [*command, "shutdown", "-y", "--address", cluster], capture_output=True, timeout=60
        )
        shutil.rmtree(base, ignore_errors=True)
