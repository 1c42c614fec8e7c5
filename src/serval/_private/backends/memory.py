"""The in-memory backend: replica and proxy hosts as objects in the test's process, so that the
real controller's reconciliation, rolling updates, health checks, drains and autoscaling run
in-process and deterministically (the way httpx ships a mock transport).

A host behaves towards the controller as a replica process does: it dials the controller,
registers (``rpc_register``), runs its "constructor", reports ready (``rpc_replica_ready``) and
then answers the controller's calls (``ReplicaCalls``: ``check_health``, ``reconfigure``,
``metrics``, ``export_metrics``, ``drain``) on an in-process control connection
(``MemoryPeer``, which the controller uses as it does an ``RpcPeer``: it cannot tell). What a
host does is scripted (``Script``): it may take long to start, fail in its constructor, die
while starting, never register, fail or hang its health checks, ignore a drain, report a load.
The test changes a host's script while it runs, or ends it (``crash``).

Time: a host's delays are slept on the clock given to the backend (the controller's
``FakeClock`` in tests), so they pass only when the test advances it.

The backend object stands for the machine: hosts outlive the controller that started them. To
restart the controller, ``detach`` the old one (its connections break, as when its process
dies) and ``attach`` the new one: running hosts reattach to it (``rpc_reattach``), as replicas
do, and ``adopt`` finds them by their ``ref``.

Nothing is served to callers: a replica's ``replica_address`` names it but cannot be dialled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import pickle
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import cloudpickle

from serval._private.backends.base import Backend, Exit, HostRef, ReplicaHost
from serval._private.wire import protocol
from serval._private.wire.control import ControllerCalls
from serval._private.wire.messages import Push, view
from serval._private.wire.rpc import PushHandler
from serval._private.wire.tasks import TaskOwner
from serval._private.wire.types import ReplicaInit
from serval.config import DeploymentConfig

__all__ = [
    "MemoryBackend",
    "MemoryPeer",
    "MemoryProxy",
    "MemoryReplica",
    "ProxyScript",
    "Script",
]

# How long a replica that lost the controller waits between attempts to reattach (as a
# replica process does).
REATTACH_DELAY_S = 0.1

Health = Literal["ok", "fail", "hang"]
Phase = Literal["booting", "starting", "running", "failed", "draining", "ended"]


class Sleeper(Protocol):
    """What the backend needs of a clock (``controller.clock.Clock`` is one)."""

    async def sleep(self, seconds: float) -> None: ...


class _AsyncioSleeper:
    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# -- an in-process control connection -------------------------------------------------------------


def _copy(value: Any) -> Any:
    """``value`` as the other side of a socket would get it: a copy, through pickle."""
    return pickle.loads(cloudpickle.dumps(value, protocol=5))


def _decode_push(pieces: list[bytes | memoryview]) -> Any:
    """A frame encoded for sockets (``protocol.encode``), decoded as a transport would."""
    frame = memoryview(b"".join(pieces))
    meta_len, nbufs, _ = protocol.HEADER.unpack_from(frame, 0)
    lens_at = protocol.HEADER.size
    buf_lens = [
        protocol.BUFLEN.unpack_from(frame, lens_at + protocol.BUFLEN.size * i)[0]
        for i in range(nbufs)
    ]
    header_len = lens_at + protocol.BUFLEN.size * nbufs
    return view(protocol.loads(frame, header_len, meta_len, buf_lens))


class MemoryPeer:
    """One end of an in-process control connection, what ``wire.rpc.RpcPeer`` is over a
    socket. ``call`` runs ``rpc_<method>(peer=<the far end>, **kwargs)`` of the far end's
    handler as a task of that end's; arguments and results cross as copies (through pickle),
    so neither side shares a mutable object with the other. Closing either end breaks both:
    calls in flight fail with ``ConnectionResetError``, calls being served are cancelled."""

    def __init__(self, handler: object | None, on_push: PushHandler | None = None) -> None:
        self._handler = handler
        self._on_push = on_push
        self.other: MemoryPeer | None = None
        self.info: dict[str, Any] = {}
        self.on_close: Callable[[MemoryPeer], None] | None = None
        self._closed = False
        self._pending: set[asyncio.Future[Any]] = set()
        self.tasks = TaskOwner("an in-memory control connection")  # the calls it serves

    @classmethod
    def pair(
        cls,
        a: object | None,
        b: object | None,
        a_on_push: PushHandler | None = None,
        b_on_push: PushHandler | None = None,
    ) -> tuple[MemoryPeer, MemoryPeer]:
        """Two connected ends: ``a``'s (serving ``a``'s handler) and ``b``'s."""
        end_a, end_b = cls(a, a_on_push), cls(b, b_on_push)
        end_a.other, end_b.other = end_b, end_a
        return end_a, end_b

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def conn(self) -> MemoryPeer | None:
        """Where pushes are sent (``send_pieces``), as ``RpcPeer.conn``."""
        return None if self._closed else self

    def send_pieces(self, pieces: list[bytes | memoryview]) -> None:
        """Push an encoded frame to the far end: decoded there on a later turn of the loop,
        as a socket would deliver it."""
        if self._closed or self.other is None:
            raise ConnectionResetError("connection is closed")
        message = _decode_push(pieces)
        asyncio.get_running_loop().call_soon(self.other._deliver, message)

    async def call(self, method: str, **kwargs: Any) -> Any:
        if self._closed or self.other is None:
            raise ConnectionResetError(f"control connection closed (calling {method})")
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.add(reply)
        try:
            self.other._serve(method, _copy(kwargs), reply)
            return await reply
        finally:
            self._pending.discard(reply)

    def close(self) -> None:
        self._lose()
        if self.other is not None:
            self.other._lose()

    def _serve(self, method: str, kwargs: dict[str, Any], reply: asyncio.Future[Any]) -> None:
        if self._closed:
            reply.set_exception(ConnectionResetError("control connection lost"))
            return

        def done(task: asyncio.Task[None]) -> None:
            if not reply.done():  # cancelled with its connection
                reply.set_exception(ConnectionResetError("control connection lost"))

        self.tasks.spawn(self._run(method, kwargs, reply)).add_done_callback(done)

    async def _run(self, method: str, kwargs: dict[str, Any], reply: asyncio.Future[Any]) -> None:
        try:
            fn = getattr(self._handler, f"rpc_{method}")
            value = fn(peer=self, **kwargs)
            if inspect.isawaitable(value):
                value = await value
            value = _copy(value)
        except Exception as exc:  # (one that does not pickle is the caller's error, as there)
            if not reply.done():
                reply.set_exception(exc)
            return
        if not reply.done():
            reply.set_result(value)

    def _deliver(self, message: Any) -> None:
        if not self._closed and type(message) is Push and self._on_push is not None:
            self._on_push(message.topic, message.value)

    def _lose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for reply in self._pending:
            if not reply.done():
                reply.set_exception(ConnectionResetError("control connection lost"))
        self.tasks.cancel()
        if self.on_close is not None:
            self.on_close(self)


# -- hosts ----------------------------------------------------------------------------------------


@dataclass
class Script:
    """What a replica host does. Each host gets its own copy when it starts; the test may
    change a running host's (``host.script.health = "fail"``)."""

    boot_s: float = 0.0  # from start to registering (the process starting)
    registers: bool = True  # False: it never registers (stays booting until killed)
    init_s: float = 0.0  # its constructor: from registering to reporting ready
    init_error: str | None = None  # the constructor raised: ready reports this
    exits_while_starting: int | None = None  # exits with this code instead of reporting ready
    health: Health = "ok"  # its health checks pass, fail, or never answer
    ongoing: int = 0  # requests running and queued there, as metrics() reports them
    drain_s: float = 0.0  # from a drain to its exit
    ignores_drain: bool = False  # a drain changes nothing: it must be killed
    reconfigure_error: str | None = None  # reconfigure() raises this
    # Runs a custom autoscaling policy (ReplicaCalls.autoscale): called with the call's
    # arguments, may be async; e.g. replica.autoscaling.PolicyRunner().run, or a stand-in.
    # None: the call fails.
    autoscale: Callable[..., Any] | None = None
    autoscaling_stats: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass
class ProxyScript:
    """What a proxy host does (a copy per host, as ``Script``)."""

    exits_while_starting: int | None = None  # exits with this code before it reports ready
    listen_error: str | None = None  # reports this (cannot listen), then exits with code 1
    ignores_drain: bool = False


class _MemoryHost(ReplicaHost):
    """What replica and proxy hosts share: a life that ends once, the tasks it owns, and the
    end of its control connection."""

    def __init__(self, backend: MemoryBackend, number: int, host_id: str) -> None:
        self.host_id = host_id
        self.number = number
        self.phase: Phase = "booting"
        self.exit: Exit | None = None
        self.calls: list[str] = []  # the control calls it got, in order
        self._backend = backend
        self._done: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
        self.tasks = TaskOwner(f"in-memory host {host_id}")  # its life, drain, reattach
        self.peer: MemoryPeer | None = None  # its end towards the controller

    @property
    def ref(self) -> HostRef:
        return {"memory": self.number}

    @property
    def ended(self) -> bool:
        return self.exit is not None

    def kill(self) -> None:
        self._end(Exit(-9, "killed by SIGKILL"))

    def crash(self, code: int = 1) -> None:
        """End it now, as a process that exits with ``code`` on its own."""
        self._end(Exit(code, f"exit code {code}"))

    async def wait(self) -> Exit:
        return await asyncio.shield(self._done)

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            await self._backend.clock.sleep(seconds)

    def _end(self, ended: Exit) -> None:
        if self.exit is not None:
            return
        self.exit = ended
        self.phase = "ended"
        if self.peer is not None:
            self.peer.close()
        self.tasks.cancel()  # (the one ending it, if one does, ends as it returns)
        self._done.set_result(ended)

    async def _close(self) -> None:
        self.kill()
        await self.tasks.close()


class MemoryReplica(_MemoryHost):
    """A replica host: registers, starts, and answers the controller's ``ReplicaCalls``."""

    def __init__(
        self,
        backend: MemoryBackend,
        number: int,
        replica_id: str,
        label: str,
        env: dict[str, str],
        script: Script,
    ) -> None:
        super().__init__(backend, number, replica_id)
        self.label = label
        self.env = env
        self.script = script
        self.init: ReplicaInit | None = None  # what registering returned
        self.user_config: Any = None  # as last applied (at start, or by reconfigure)
        self.tasks.spawn(self._run())

    @property
    def replica_id(self) -> str:
        return self.host_id

    async def _run(self) -> None:
        script = self.script
        await self._sleep(script.boot_s)
        if not script.registers:
            return  # stays booting: nothing more happens until it is killed
        peer = self.peer = self._backend._dial(self)
        if peer is None:
            self.crash(1)  # no controller to register with
            return
        calls = ControllerCalls(peer.call)
        try:
            self.init = await calls.register(self.replica_id)
            self.user_config = self.init.config.user_config
            self.phase = "starting"
            await self._sleep(script.init_s)
            if script.exits_while_starting is not None:
                self.crash(script.exits_while_starting)
                return
            await calls.replica_ready(self.replica_id, script.init_error)
        except (LookupError, ConnectionError):
            self.crash(1)  # the controller does not know it, or went away: start over
            return
        self.phase = "failed" if script.init_error is not None else "running"
        peer.on_close = self._controller_lost

    def _controller_lost(self, peer: MemoryPeer) -> None:
        if self.phase == "running":
            self.tasks.spawn(self._reattach())

    async def _reattach(self) -> None:
        """Keep serving; reconnect to the controller once there is one again."""
        while self.phase == "running":
            await self._sleep(REATTACH_DELAY_S)
            peer = self._backend._dial(self)
            if peer is None:
                continue
            try:
                await ControllerCalls(peer.call).reattach(self.replica_id)
            except ConnectionError:
                continue
            except LookupError:  # the restarted controller does not know it: exit
                self.crash(1)
                return
            self.peer = peer
            peer.on_close = self._controller_lost
            return

    # -- the calls of ReplicaCalls -----------------------------------------------------------------

    async def rpc_check_health(self, peer: MemoryPeer) -> None:
        self.calls.append("check_health")
        if self.script.health == "fail":
            raise RuntimeError(f"replica {self.replica_id} is unhealthy (scripted)")
        if self.script.health == "hang":
            await asyncio.get_running_loop().create_future()  # cancelled when it ends

    async def rpc_reconfigure(self, peer: MemoryPeer, user_config: Any) -> None:
        self.calls.append("reconfigure")
        if self.script.reconfigure_error is not None:
            raise ValueError(self.script.reconfigure_error)
        self.user_config = user_config

    def rpc_metrics(self, peer: MemoryPeer) -> int:
        self.calls.append("metrics")
        return self.script.ongoing

    def rpc_export_metrics(self, peer: MemoryPeer) -> list[Any]:
        self.calls.append("export_metrics")
        return []  # (an empty metrics snapshot)

    async def rpc_autoscale(
        self, peer: MemoryPeer, policy: Any, contexts: list[Any], state: bytes, app_level: bool
    ) -> Any:
        self.calls.append("autoscale")
        if self.script.autoscale is None:
            raise RuntimeError(f"replica {self.replica_id} runs no policy (scripted)")
        answer = self.script.autoscale(
            policy=policy, contexts=contexts, state=state, app_level=app_level
        )
        return await answer if inspect.isawaitable(answer) else answer

    def rpc_autoscaling_stats(self, peer: MemoryPeer) -> dict[str, float]:
        self.calls.append("autoscaling_stats")
        return dict(self.script.autoscaling_stats)

    def rpc_routing_stats(self, peer: MemoryPeer) -> dict[str, Any]:
        self.calls.append("routing_stats")
        return {}  # (no user object: nothing to report to a request router)

    def rpc_drain(self, peer: MemoryPeer) -> None:
        self.calls.append("drain")
        if self.script.ignores_drain or self.phase in ("draining", "ended"):
            return
        self.phase = "draining"
        self.tasks.spawn(self._drain())

    async def _drain(self) -> None:
        await self._sleep(self.script.drain_s)
        self.crash(0)


class MemoryProxy(_MemoryHost):
    """A proxy host: subscribes to the table, acknowledges each version, reports ready."""

    def __init__(
        self, backend: MemoryBackend, number: int, script: ProxyScript, node: str = ""
    ) -> None:
        super().__init__(backend, number, "serval::proxy")
        self.script = script
        self.node = node
        self.versions: list[int] = []  # the table versions it acknowledged
        self.tasks.spawn(self._run())

    async def _run(self) -> None:
        script = self.script
        if script.exits_while_starting is not None:
            self.crash(script.exits_while_starting)
            return
        peer = self.peer = self._backend._dial(self, self._on_push)
        if peer is None:
            self.crash(1)
            return
        calls = ControllerCalls(peer.call)
        try:
            if script.listen_error is not None:
                await calls.proxy_ready(script.listen_error, self.node)
                self.crash(1)
                return
            version, _, _ = await calls.subscribe()
            await self._ack(version)
            await calls.proxy_ready(None, self.node)
        except ConnectionError:
            self.crash(1)
            return
        self.phase = "running"

    def _on_push(self, topic: str, value: Any) -> None:
        if topic == "table":
            self.tasks.spawn(self._ack(value[0]))

    async def _ack(self, version: int) -> None:
        if self.peer is None or self.peer.closed:
            return
        self.versions.append(version)
        with contextlib.suppress(ConnectionError):
            await ControllerCalls(self.peer.call).proxy_ack(version, self.node)

    def rpc_drain(self, peer: MemoryPeer) -> None:
        self.calls.append("drain")
        if not self.script.ignores_drain:
            self.crash(0)


# -- the backend ----------------------------------------------------------------------------------


class MemoryBackend(Backend):
    """Hosts in this process (see the module's docstring). ``script`` is what new replica
    hosts do; ``scripts``, if not empty, gives the next ones theirs first (one each)."""

    name = "memory"

    def __init__(self, clock: Sleeper | None = None) -> None:
        self.clock: Sleeper = clock if clock is not None else _AsyncioSleeper()
        self.script = Script()
        self.scripts: deque[Script] = deque()
        self.proxy_script = ProxyScript()
        self.proxy_scripts: deque[ProxyScript] = deque()
        self.replicas: list[MemoryReplica] = []  # every replica host started, in order
        self.proxies: list[MemoryProxy] = []  # every proxy host started, in order
        # Where proxies run (a test may name several places, and change them: set
        # proxy_nodes_change, and the controller follows them every 2 s of its clock).
        self.proxy_places: list[str] = [""]
        self._hosts: dict[int, _MemoryHost] = {}
        self._numbers = itertools.count(1)
        self._controller: object | None = None
        self._links: set[MemoryPeer] = set()  # the controller's ends of its connections
        self._ends: set[MemoryPeer] = set()  # every end still open or serving (close awaits)

    # -- the controller's side ---------------------------------------------------------------------

    def attach(self, controller: object) -> None:
        """Serve ``controller`` (an object with ``rpc_*`` methods): hosts dial it from now on.
        One attached before is detached first."""
        self.detach()
        self._controller = controller

    def detach(self) -> None:
        """The controller is gone (as its process dying): every connection to it breaks."""
        self._controller = None
        for end in list(self._links):
            end.close()
        self._links.clear()

    def client(self, on_push: PushHandler | None = None) -> MemoryPeer:
        """A caller's end of a connection to the controller (``ControllerCalls(end.call)``);
        ``on_push`` gets the tables it pushes once subscribed."""
        end = self._dial(None, on_push)
        if end is None:
            raise ConnectionRefusedError("no controller is attached")
        return end

    def _dial(
        self, handler: object | None, on_push: PushHandler | None = None
    ) -> MemoryPeer | None:
        if self._controller is None:
            return None
        theirs, ours = MemoryPeer.pair(self._controller, handler, b_on_push=on_push)
        self._links.add(theirs)
        theirs.on_close = self._links.discard
        self._ends = {e for e in self._ends if not e.closed or len(e.tasks)}
        self._ends.update((theirs, ours))
        return ours

    # -- Backend -----------------------------------------------------------------------------------

    def replica_address(self, replica_id: str) -> str:
        return f"memory:{replica_id}"

    def start_replica(
        self,
        replica_id: str,
        label: str,
        env: dict[str, str] | None = None,
        config: DeploymentConfig | None = None,
    ) -> ReplicaHost:
        script = self.scripts.popleft() if self.scripts else dataclasses.replace(self.script)
        number = next(self._numbers)
        host = MemoryReplica(self, number, replica_id, label, dict(env or {}), script)
        self._hosts[number] = host
        self.replicas.append(host)
        return host

    def proxy_nodes(self, location: str) -> list[str]:
        return list(self.proxy_places)

    def start_proxy(self, http_options_json: str, node: str = "") -> ReplicaHost:
        script = (
            self.proxy_scripts.popleft()
            if self.proxy_scripts
            else dataclasses.replace(self.proxy_script)
        )
        number = next(self._numbers)
        host = MemoryProxy(self, number, script, node)
        self._hosts[number] = host
        self.proxies.append(host)
        return host

    def adopt(self, host_id: str, ref: HostRef) -> ReplicaHost | None:
        host = self._hosts.get(ref.get("memory", -1))
        if host is None or host.ended or host.host_id != host_id:
            return None
        return host

    def log_location(self) -> str:
        return "the test's log (in-memory backend)"

    # -- for the test ------------------------------------------------------------------------------

    def live(self) -> list[MemoryReplica]:
        """The replica hosts that have not ended, in the order they started."""
        return [h for h in self.replicas if not h.ended]

    def in_phase(self, *phases: Phase) -> list[MemoryReplica]:
        return [h for h in self.replicas if h.phase in phases]

    async def close(self) -> None:
        """Kill every host and wait for their tasks; break every connection."""
        self.detach()
        for host in list(self._hosts.values()):
            await host._close()
        for end in list(self._ends):
            end.close()
            await end.tasks.close()
        self._ends.clear()
