"""gRPC ingress as Ray Serve's gRPC guide uses it: ``serve.start(grpc_options=...)`` with the
``add_..._to_server`` functions grpcio-tools generates, requests routed by the ``application``
metadata key, unary and server-streaming methods, ``RayServegRPCContext``, errors as status
codes, Ray Serve's health and list-applications service, and ``grpc_options`` in config files.

The .proto is compiled here with grpcio-tools into a temporary directory put on ``sys.path``
(the proxy and the replicas find it through the driver's code path, as Ray Serve's note in
the guide asks for "the same directory"), and every call goes through a real grpcio client
on a real channel.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_tools import protoc

import serval as serve
from chaos.harness import free_port
from conftest import poll, scrape, total
from serval.config import gRPCOptions
from serval.grpc_util import RayServegRPCContext

PROTO = """
syntax = "proto3";
package servaltest;

message UserDefinedMessage {
  string name = 1;
  string origin = 2;
  int64 num = 3;
}

message UserDefinedResponse {
  string greeting = 1;
  int64 num = 2;
}

service UserDefinedService {
  rpc __call__(UserDefinedMessage) returns (UserDefinedResponse);
  rpc Streaming(UserDefinedMessage) returns (stream UserDefinedResponse);
  rpc Slow(UserDefinedMessage) returns (UserDefinedResponse);
}
"""

MODULE = "servaltest_protos"  # -> servaltest_protos_pb2, servaltest_protos_pb2_grpc
SERVICER = f"{MODULE}_pb2_grpc.add_UserDefinedServiceServicer_to_server"

# A servicer function as older grpcio-tools wrote them: a generic handler only, no methods
# registered by name.
GENERIC_ONLY = """
import grpc
import servaltest_protos_pb2 as pb2


def add_GenericOnlyServicer_to_server(servicer, server):
    handlers = {
        "__call__": grpc.unary_unary_rpc_method_handler(
            servicer.__call__,
            request_deserializer=pb2.UserDefinedMessage.FromString,
            response_serializer=pb2.UserDefinedResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("servaltest.GenericOnly", handlers),)
    )
"""


def compile_protos(directory: Path) -> None:
    (directory / f"{MODULE}.proto").write_text(PROTO)
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{directory}",
            f"--python_out={directory}",
            f"--grpc_python_out={directory}",
            str(directory / f"{MODULE}.proto"),
        ]
    )
    assert status == 0, "protoc failed"


@pytest.fixture(scope="module")
def protos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The compiled protos, importable here (and so in the proxy and the replicas)."""
    directory = tmp_path_factory.mktemp("protos")
    compile_protos(directory)
    (directory / "servaltest_generic_only.py").write_text(GENERIC_ONLY)
    sys.path.insert(0, str(directory))
    try:
        import servaltest_protos_pb2 as pb2

        yield pb2
    finally:
        sys.path.remove(str(directory))


@pytest.fixture(scope="module")
def grpc_port(protos: Any) -> Iterator[int]:
    """One cluster for the module: HTTP and gRPC on free ports; shut down after."""
    port = free_port()
    http_port[0] = free_port()
    serve.start(
        http_options={"port": http_port[0]},
        grpc_options={
            "port": port,
            "grpc_servicer_functions": [
                SERVICER,
                "servaltest_generic_only.add_GenericOnlyServicer_to_server",
            ],
            "request_timeout_s": 3,
        },
    )
    yield port
    serve.shutdown()


http_port = [0]


@pytest.fixture
def stub(grpc_port: int, protos: Any) -> Iterator[Any]:
    """A client stub on a fresh channel; every app a test deploys is deleted after it."""
    import servaltest_protos_pb2_grpc as pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        yield pb2_grpc.UserDefinedServiceStub(channel)
    finally:
        channel.close()
        for name in list(serve.status().applications):
            serve.delete(name)


# -- deployments, written as the guide writes them --------------------------------------------


@serve.deployment
class GrpcDeployment:
    def __init__(self, word: str = "Hello") -> None:
        self.word = word

    def __call__(self, user_message: Any) -> Any:
        from servaltest_protos_pb2 import UserDefinedResponse

        if user_message.name == "boom":
            raise ValueError(f"no greeting for {user_message.name}")
        return UserDefinedResponse(
            greeting=f"{self.word} {user_message.name} from {user_message.origin}",
            num=user_message.num * 2,
        )

    def Streaming(self, user_message: Any) -> Iterator[Any]:
        from servaltest_protos_pb2 import UserDefinedResponse

        for i in range(5):
            yield UserDefinedResponse(greeting=f"{i}: {self.word} {user_message.name}", num=i)

    async def Slow(self, user_message: Any) -> Any:
        from servaltest_protos_pb2 import UserDefinedResponse

        if user_message.name == "hold":  # until the file named by origin exists
            gate = Path(user_message.origin)
            await asyncio.to_thread(hold_until, gate)
            return UserDefinedResponse(greeting="released")
        if user_message.name == "forever":  # until cancelled: says so in <origin>.cancelled
            touch(f"{user_message.origin}.started")
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                touch(f"{user_message.origin}.cancelled")
                raise
        await asyncio.sleep(user_message.num / 10)
        return UserDefinedResponse(greeting="slept", num=user_message.num)


@serve.deployment
class AsyncStreamer:
    async def Streaming(self, user_message: Any) -> Any:
        from servaltest_protos_pb2 import UserDefinedResponse

        for i in range(3):
            await asyncio.sleep(0)
            yield UserDefinedResponse(greeting=f"async {i}", num=user_message.num + i)
        if user_message.name == "fail-late":
            raise RuntimeError("the stream broke")


@serve.deployment
class ContextDeployment:
    """The guide's "Use gRPC context" example."""

    def __init__(self) -> None:
        self.nums: dict[str, int] = {}

    def num_lookup(self, name: str) -> tuple[int, grpc.StatusCode, str]:
        if name not in self.nums:
            self.nums[name] = len(self.nums)
            code = grpc.StatusCode.INVALID_ARGUMENT
            message = f"{name} not found, adding to nums."
        else:
            code = grpc.StatusCode.OK
            message = f"{name} found."
        return self.nums[name], code, message

    def __call__(self, user_message: Any, grpc_context: RayServegRPCContext) -> Any:
        from servaltest_protos_pb2 import UserDefinedResponse

        if user_message.name == "denied":
            grpc_context.set_code(grpc.StatusCode.PERMISSION_DENIED)
            grpc_context.set_details("not for you")
            raise PermissionError("denied")
        greeting = f"Hello {user_message.name} from {user_message.origin}"
        num, code, message = self.num_lookup(user_message.name)
        grpc_context.set_code(code)
        grpc_context.set_details(message)
        grpc_context.set_trailing_metadata([("num", str(num))])
        grpc_context.set_compression(grpc.Compression.Gzip)
        sent = dict(grpc_context.invocation_metadata())
        return UserDefinedResponse(greeting=f"{greeting} ({sent.get('x-tag', '')})", num=num)

    async def Streaming(self, user_message: Any, grpc_context: RayServegRPCContext) -> Any:
        from servaltest_protos_pb2 import UserDefinedResponse

        yield UserDefinedResponse(greeting="one")
        grpc_context.set_trailing_metadata([("streamed", "1")])
        # (too late for this stream, whose first item went: the stream still ends well)
        grpc_context.set_compression(grpc.Compression.Gzip)
        yield UserDefinedResponse(greeting="two")


@serve.deployment
class Multiplexed:
    """The guide's Multiplexing example (on the __call__ method of this test's proto)."""

    @serve.multiplexed(max_num_models_per_replica=1)
    async def get_model(self, model_id: str) -> str:
        return f"loading model: {model_id}"

    async def __call__(self, user_message: Any) -> Any:
        from servaltest_protos_pb2 import UserDefinedResponse

        model = await self.get_model(serve.get_multiplexed_model_id())
        return UserDefinedResponse(greeting=f"Method2 called model, {model}")


@serve.deployment
def http_app(request: Any) -> str:
    return "over HTTP"


def touch(path: str) -> None:
    Path(path).touch()


def hold_until(gate: Path) -> None:
    """Say the request started (``<gate>.started``), then wait until ``gate`` exists."""
    Path(f"{gate}.started").touch()
    while not gate.exists():
        time.sleep(0.01)


def message(pb2: Any, name: str = "foo", num: int = 30) -> Any:
    return pb2.UserDefinedMessage(name=name, num=num, origin="bar")


def pb2_message(pb2: Any, **fields: Any) -> Any:
    return pb2.UserDefinedMessage(**fields)


def app(name: str) -> tuple[tuple[str, str], ...]:
    return (("application", name),)


# -- tests that start a cluster of their own (before the module's cluster starts) -------------


def test_no_grpc_server_without_servicer_functions(protos: Any) -> None:
    """As in Ray Serve: grpc_servicer_functions empty, no gRPC server is started."""
    port = free_port()
    serve.start(http_options={"port": free_port()}, grpc_options=gRPCOptions(port=port))
    try:
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing listens there
    finally:
        serve.shutdown()


def test_a_servicer_function_that_does_not_import_is_an_error_at_start(protos: Any) -> None:
    with pytest.raises(ImportError, match="no_such_module_pb2_grpc"):
        serve.start(
            http_options={"port": free_port()},
            grpc_options={
                "port": free_port(),
                "grpc_servicer_functions": ["no_such_module_pb2_grpc.add_XServicer_to_server"],
            },
        )
    serve.shutdown()


def test_a_grpc_port_in_use_fails_start(protos: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(serve.exceptions.ServalError, match=f"gRPC proxy on 127.0.0.1:{port}"):
            serve.start(
                http_options={"port": free_port()},
                grpc_options={"port": port, "grpc_servicer_functions": [SERVICER]},
            )
    serve.shutdown()


# -- the module's cluster ------------------------------------------------------------------------


def test_unary_routed_by_application_metadata(stub: Any, protos: Any) -> None:
    serve.run(GrpcDeployment.bind("Hello"), name="app1", route_prefix="/app1")
    serve.run(GrpcDeployment.bind("Bonjour"), name="app2", route_prefix="/app2")

    response, call = stub.__call__.with_call(request=message(protos), metadata=app("app1"))
    assert call.code() == grpc.StatusCode.OK
    assert (response.greeting, response.num) == ("Hello foo from bar", 60)
    assert any(key == "request_id" for key, _ in call.trailing_metadata())

    response = stub.__call__(message(protos), metadata=app("app2"))
    assert response.greeting == "Bonjour foo from bar"

    # The client's request id comes back in the trailing metadata (the guide's metadata part).
    _, call = stub.__call__.with_call(
        message(protos), metadata=(("application", "app1"), ("request_id", "123"))
    )
    assert ("request_id", "123") in [(m.key, m.value) for m in call.trailing_metadata()]

    # Two apps and no `application` key: NOT_FOUND, as the guide's "Handle errors" shows.
    with pytest.raises(grpc.RpcError) as missing:
        stub.__call__(message(protos))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert missing.value.details().startswith("Application metadata not set.")

    with pytest.raises(grpc.RpcError) as unknown:
        stub.__call__(message(protos), metadata=app("app3"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert "Application 'app3' not found" in unknown.value.details()
    assert "/ray.serve.RayServeAPIService/ListApplications" in unknown.value.details()


def test_one_app_needs_no_application_metadata(stub: Any, protos: Any) -> None:
    serve.run(GrpcDeployment.bind(), name="only", route_prefix="/only")
    assert stub.__call__(message(protos, "solo")).greeting == "Hello solo from bar"
    with pytest.raises(grpc.RpcError) as unknown:  # a name that is not it still is not
        stub.__call__(message(protos), metadata=app("other"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_server_streaming(stub: Any, protos: Any) -> None:
    serve.run(GrpcDeployment.bind(), name="sync", route_prefix="/sync")
    serve.run(AsyncStreamer.bind(), name="async", route_prefix="/async")

    responses = list(stub.Streaming(message(protos), metadata=app("sync")))
    assert [r.greeting for r in responses] == [f"{i}: Hello foo" for i in range(5)]
    assert [r.num for r in responses] == list(range(5))

    got = [(r.greeting, r.num) for r in stub.Streaming(message(protos), metadata=app("async"))]
    assert got == [("async 0", 30), ("async 1", 31), ("async 2", 32)]

    # A stream that raises after some items: the client has them, then the error's status.
    stream = stub.Streaming(message(protos, "fail-late"), metadata=app("async"))
    received = []
    with pytest.raises(grpc.RpcError) as broke:
        for response in stream:
            received.append(response.greeting)
    assert received == ["async 0", "async 1", "async 2"]
    assert broke.value.code() == grpc.StatusCode.INTERNAL
    assert broke.value.details() == "RuntimeError: the stream broke"


def test_metadata_request_id_and_multiplexed_model_id(stub: Any, protos: Any) -> None:
    """The guide's "Work with gRPC metadata" example."""
    serve.run(Multiplexed.bind(), name="app1", route_prefix="/app1")
    metadata = (
        ("application", "app1"),
        ("request_id", "123"),
        ("multiplexed_model_id", "999"),
    )
    response, call = stub.__call__.with_call(request=message(protos), metadata=metadata)
    assert response.greeting == "Method2 called model, loading model: 999"
    assert ("request_id", "123") in [(m.key, m.value) for m in call.trailing_metadata()]


def test_grpc_context_code_details_and_trailing_metadata(stub: Any, protos: Any) -> None:
    """The guide's gRPC context example, client side as the guide writes it."""
    serve.run(ContextDeployment.bind(), name="app1", route_prefix="/app1")
    metadata = (("application", "app1"), ("x-tag", "seen"))

    # First call: a miss, INVALID_ARGUMENT with the method's details and trailing metadata.
    with pytest.raises(grpc.RpcError) as rpc_error:
        stub.__call__.with_call(request=message(protos), metadata=metadata)
    assert rpc_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error.value.details() == "foo not found, adding to nums."
    trailing = [(m.key, m.value) for m in rpc_error.value.trailing_metadata()]
    assert ("num", "0") in trailing
    assert any(key == "request_id" for key, _ in trailing)

    # Second call: a hit, OK.
    response, call = stub.__call__.with_call(request=message(protos), metadata=metadata)
    assert call.code() == grpc.StatusCode.OK
    # (the guide also reads call.details() == "foo found." here; grpc itself, 1.85 at least,
    # delivers no details with an OK status, from any server: not a thing a proxy can change)
    assert ("num", "0") in [(m.key, m.value) for m in call.trailing_metadata()]
    assert any(m.key == "request_id" for m in call.trailing_metadata())
    # The method saw the client's metadata.
    assert response.greeting == "Hello foo from bar (seen)"

    # A code set before raising is the answer (not INTERNAL), with the details set.
    with pytest.raises(grpc.RpcError) as denied:
        stub.__call__(message(protos, "denied"), metadata=metadata)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denied.value.details() == "not for you"

    # A streaming method's context reaches the end of its stream.
    stream = stub.Streaming(message(protos), metadata=metadata)
    assert [r.greeting for r in stream] == ["one", "two"]
    assert stream.code() == grpc.StatusCode.OK
    assert ("streamed", "1") in [(m.key, m.value) for m in stream.trailing_metadata()]


def test_user_exception_is_internal_with_its_message_and_no_traceback(
    stub: Any, protos: Any
) -> None:
    serve.run(GrpcDeployment.bind(), name="app1", route_prefix="/app1")
    with pytest.raises(grpc.RpcError) as failed:
        stub.__call__(message(protos, "boom"), metadata=app("app1"))
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert failed.value.details() == "ValueError: no greeting for boom"
    assert "Traceback" not in failed.value.details()
    # The replica and the proxy are still there for the next request.
    assert stub.__call__(message(protos), metadata=app("app1")).num == 60


def test_method_the_deployment_lacks_and_unknown_rpc(
    stub: Any, protos: Any, grpc_port: int
) -> None:
    serve.run(AsyncStreamer.bind(), name="app1", route_prefix="/app1")
    with pytest.raises(grpc.RpcError) as lacking:  # no __call__ on AsyncStreamer
        stub.__call__(message(protos), metadata=app("app1"))
    assert lacking.value.code() == grpc.StatusCode.INTERNAL
    assert "has no method '__call__'" in lacking.value.details()

    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        with pytest.raises(grpc.RpcError) as unknown:
            channel.unary_unary("/servaltest.Nope/Missing")(b"", metadata=app("app1"))
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        channel.close()


def test_a_servicer_function_with_a_generic_handler_only(
    stub: Any, protos: Any, grpc_port: int
) -> None:
    serve.run(GrpcDeployment.bind(), name="app1", route_prefix="/app1")
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        call = channel.unary_unary(
            "/servaltest.GenericOnly/__call__",
            request_serializer=protos.UserDefinedMessage.SerializeToString,
            response_deserializer=protos.UserDefinedResponse.FromString,
        )
        assert call(message(protos, "old")).greeting == "Hello old from bar"
    finally:
        channel.close()


def test_request_timeout_is_deadline_exceeded(stub: Any, protos: Any) -> None:
    """grpc_options.request_timeout_s (3 s for this module's cluster)."""
    serve.run(GrpcDeployment.bind(), name="app1", route_prefix="/app1")
    assert stub.Slow(message(protos, num=1), metadata=app("app1")).greeting == "slept"
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as late:
        stub.Slow(message(protos, num=100), metadata=app("app1"))  # 10 s
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert late.value.details() == "Request timed out after 3.0s."
    assert time.monotonic() - started < 8


def test_a_client_that_gives_up_cancels_the_call(stub: Any, protos: Any, tmp_path: Path) -> None:
    serve.run(GrpcDeployment.bind(), name="app1", route_prefix="/app1")
    mark = tmp_path / "call"
    forever = pb2_message(protos, name="forever", origin=str(mark))
    with pytest.raises(grpc.RpcError) as gave_up:
        stub.Slow(forever, metadata=app("app1"), timeout=1)
    assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert Path(f"{mark}.started").exists()
    poll(lambda: Path(f"{mark}.cancelled").exists(), 10, "the replica's call to be cancelled")


def test_back_pressure_is_resource_exhausted(stub: Any, protos: Any, tmp_path: Path) -> None:
    limited = GrpcDeployment.options(max_ongoing_requests=1, max_queued_requests=0)
    serve.run(limited.bind(), name="app1", route_prefix="/app1")
    gate = tmp_path / "gate"
    held = pb2_message(protos, name="hold", origin=str(gate))
    running = stub.Slow.future(held, metadata=app("app1"))
    poll(lambda: Path(f"{gate}.started").exists(), 10, "the first request to run")
    # The replica has its one request; nothing may wait: the next is shed.
    with pytest.raises(grpc.RpcError) as refused:
        stub.Slow(message(protos, num=0), metadata=app("app1"), timeout=5)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queued_requests" in refused.value.details()
    gate.touch()
    assert running.result(timeout=10).greeting == "released"


def test_health_and_list_applications(stub: Any, protos: Any, grpc_port: int) -> None:
    """The guide's "Check proxy health", with serval's stub of Ray Serve's service."""
    from serval.generated.serve_pb2 import HealthzRequest, ListApplicationsRequest
    from serval.generated.serve_pb2_grpc import RayServeAPIServiceStub

    serve.run(GrpcDeployment.bind(), name="app1", route_prefix="/app1")
    serve.run(AsyncStreamer.bind(), name="app2", route_prefix="/app2")
    serve.run(GrpcDeployment.bind(), name="unrouted", route_prefix=None)  # no ingress route
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        api = RayServeAPIServiceStub(channel)
        response = api.ListApplications(request=ListApplicationsRequest())
        assert list(response.application_names) == ["app1", "app2"]
        assert api.Healthz(request=HealthzRequest()).message == "success"
    finally:
        channel.close()


def test_http_proxy_serves_alongside(stub: Any, protos: Any) -> None:
    serve.run(http_app.bind(), name="web", route_prefix="/web")
    serve.run(GrpcDeployment.bind(), name="app1", route_prefix="/app1")
    url = f"http://127.0.0.1:{http_port[0]}/web"
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.read() == b"over HTTP"
    assert stub.__call__(message(protos), metadata=app("app1")).num == 60
    # Requests on both at once.
    errors: list[BaseException] = []

    def grpc_calls() -> None:
        try:
            for i in range(20):
                assert stub.__call__(message(protos, num=i), metadata=app("app1")).num == 2 * i
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=grpc_calls)
    thread.start()
    for _ in range(20):
        with urllib.request.urlopen(url, timeout=5) as reply:
            assert reply.read() == b"over HTTP"
    thread.join(timeout=30)
    assert not thread.is_alive() and errors == []


def test_grpc_requests_errors_and_latency_in_the_metrics(stub: Any, protos: Any) -> None:
    """Ray Serve's gRPC metrics at the HTTP proxy's /-/metrics: route and application the
    app, method the service method's path, status_code the gRPC code's name."""
    serve.run(GrpcDeployment.bind(), name="metered", route_prefix="/metered")
    url = f"http://127.0.0.1:{http_port[0]}"
    unary = "/servaltest.UserDefinedService/__call__"
    streaming = "/servaltest.UserDefinedService/Streaming"
    before = scrape(url, timeout=10)  # (the module's other tests count on route "" too)
    for _ in range(2):
        assert stub.__call__(message(protos), metadata=app("metered")).num == 60
    with pytest.raises(grpc.RpcError) as failed:
        stub.__call__(message(protos, "boom"), metadata=app("metered"))
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    with pytest.raises(grpc.RpcError) as missing:
        stub.__call__(message(protos), metadata=app("nowhere"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(list(stub.Streaming(message(protos), metadata=app("metered")))) == 5

    samples = scrape(url, timeout=10)
    metered = {"route": "metered", "application": "metered"}
    requests = "serve_num_grpc_requests_total"
    assert total(samples, requests, method=unary, status_code="OK", **metered) == 2
    assert total(samples, requests, method=unary, status_code="INTERNAL", **metered) == 1
    assert total(samples, requests, method=streaming, status_code="OK", **metered) == 1
    not_found = {"route": "", "application": "", "method": unary}

    def added(name: str, **labels: str) -> float:
        return total(samples, name, **labels) - total(before, name, **labels)

    assert added(requests, status_code="NOT_FOUND", **not_found) == 1
    errors = "serve_num_grpc_error_requests_total"
    assert total(samples, errors, method=unary, error_code="INTERNAL", **metered) == 1
    assert total(samples, errors, error_code="OK") == 0
    assert added(errors, error_code="NOT_FOUND", **not_found) == 1
    by_deployment = "serve_num_deployment_grpc_error_requests_total"
    assert total(samples, by_deployment, **metered) == 1
    assert total(samples, by_deployment, deployment="GrpcDeployment", error_code="INTERNAL") >= 1
    latency = "serve_grpc_request_latency_ms"
    assert total(samples, f"{latency}_count", **metered) == 4
    assert total(samples, f"{latency}_bucket", le="+Inf", **metered) == 4
    assert 0 < total(samples, f"{latency}_sum", **metered) < 4 * 3000  # (request_timeout_s 3)


def test_grpc_requests_in_flight_are_a_gauge(stub: Any, protos: Any, tmp_path: Path) -> None:
    serve.run(GrpcDeployment.bind(), name="held", route_prefix="/held")
    url = f"http://127.0.0.1:{http_port[0]}"
    ongoing = "serve_num_ongoing_grpc_requests"
    assert total(scrape(url, timeout=10), ongoing) == 0
    gate = tmp_path / "gate"
    held = stub.Slow.future(
        pb2_message(protos, name="hold", origin=str(gate)), metadata=app("held")
    )
    try:
        poll(lambda: total(scrape(url, timeout=10), ongoing) == 1, 10, "one gRPC call in flight")
        tags = [lbl for n, lbl, _ in scrape(url, timeout=10) if n == ongoing]
        assert tags == [{"node_id": "", "node_ip_address": "127.0.0.1"}]
    finally:
        gate.touch()
    assert held.result(timeout=10).greeting == "released"
    assert total(scrape(url, timeout=10), ongoing) == 0


# -- config files ------------------------------------------------------------------------------

APP_MODULE = """
import serval as serve


@serve.deployment
class Greeter:
    def __call__(self, user_message):
        from servaltest_protos_pb2 import UserDefinedResponse

        return UserDefinedResponse(greeting=f"from the file, {user_message.name}")


g = Greeter.bind()
"""


def test_config_file_with_grpc_options(tmp_path: Path) -> None:
    """``serval run config.yaml`` with the guide's ``grpc_options``, run where the protos
    and the app are (the current directory is on the path, as in Ray Serve)."""
    compile_protos(tmp_path)
    (tmp_path / "grpc_app.py").write_text(APP_MODULE)
    grpc_port, port = free_port(), free_port()
    (tmp_path / "config.yaml").write_text(
        textwrap.dedent(
            f"""
            http_options:
              port: {port}
            grpc_options:
              port: {grpc_port}
              grpc_servicer_functions:
                - {SERVICER}
            applications:
              - name: app1
                route_prefix: /app1
                import_path: grpc_app:g
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "SERVAL_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serval", "run", "config.yaml"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "is running" in line:
                break
        sys.path.insert(0, str(tmp_path))
        try:
            import servaltest_protos_pb2 as pb2
            import servaltest_protos_pb2_grpc as pb2_grpc
        finally:
            sys.path.remove(str(tmp_path))
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb2_grpc.UserDefinedServiceStub(channel)
            response = stub.__call__(pb2.UserDefinedMessage(name="yaml"), timeout=10)
            assert response.greeting == "from the file, yaml"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
