"""Triton's system shared memory extension against the real daemon, with tritonclient's own
shared memory utilities."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from conftest import ROOT, Daemon
from edge_agent.api.shm import is_local_peer

DIGITS = ROOT / "models" / "digits" / "1" / "model.onnx"


def code_of(call: Callable[[], Any]) -> str:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as failed:
        call()
    return f"{failed.value.status()}: {failed.value.message()}"


def test_system_shared_memory(start_daemon: Callable[..., Daemon]) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm

    agent = start_daemon(
        "--model-repository", str(ROOT / "models"), "--execution-providers", "cpu",
        "--allow-shared-memory",
    ).wait_started()  # fmt: skip
    x = np.load(ROOT / "models" / "digits" / "sample.npy").astype(np.float32).reshape(1, 64)
    expected = ort.InferenceSession(str(DIGITS)).run(["probabilities"], {"input": x})[0]
    tag = os.getpid()
    inputs = shm.create_shared_memory_region("in", f"/ea_in_{tag}", 256)
    outputs = shm.create_shared_memory_region("out", f"/ea_out_{tag}", 64)
    try:
        shm.set_shared_memory_region(inputs, [x])
        with grpcclient.InferenceServerClient(agent.url) as client:
            assert "system_shared_memory" in client.get_server_metadata().extensions
            client.register_system_shared_memory("in", f"/ea_in_{tag}", 256)
            client.register_system_shared_memory("out", f"/ea_out_{tag}", 64)
            status = client.get_system_shared_memory_status()
            assert set(status.regions) == {"in", "out"}
            tensor = grpcclient.InferInput("input", [1, 64], "FP32")
            tensor.set_shared_memory("in", 256)
            wanted = grpcclient.InferRequestedOutput("probabilities")
            wanted.set_shared_memory("out", 40)
            label = grpcclient.InferRequestedOutput("label")  # this one in the message
            result = client.infer("digits", [tensor], outputs=[wanted, label])
            answer = result.get_output("probabilities")
            assert answer.datatype == "FP32" and list(answer.shape) == [1, 10]
            written = shm.get_contents_as_numpy(outputs, np.float32, [1, 10])
            assert np.allclose(written, expected, atol=1e-6)
            assert result.as_numpy("label")[0] == 7

            # Triton's error semantics.
            assert "ALREADY_EXISTS" in code_of(
                lambda: client.register_system_shared_memory("in", f"/ea_in_{tag}", 256)
            )
            assert "INVALID_ARGUMENT" in code_of(
                lambda: client.register_system_shared_memory("big", f"/ea_in_{tag}", 4096)
            )
            beyond = grpcclient.InferInput("input", [1, 64], "FP32")
            beyond.set_shared_memory("in", 256, offset=128)
            assert "INVALID_ARGUMENT" in code_of(lambda: client.infer("digits", [beyond]))
            small = grpcclient.InferRequestedOutput("probabilities")
            small.set_shared_memory("out", 16)
            message = code_of(lambda: client.infer("digits", [tensor], outputs=[small]))
            assert "needs 40 bytes" in message
            unknown = grpcclient.InferInput("input", [1, 64], "FP32")
            unknown.set_shared_memory("nowhere", 256)
            assert "NOT_FOUND" in code_of(lambda: client.infer("digits", [unknown]))
            client.unregister_system_shared_memory("in")
            assert "NOT_FOUND" in code_of(lambda: client.infer("digits", [tensor]))
            client.unregister_system_shared_memory()  # all
            assert not client.get_system_shared_memory_status().regions
    finally:
        shm.destroy_shared_memory_region(inputs)
        shm.destroy_shared_memory_region(outputs)


def test_shared_memory_is_off_by_default(start_daemon: Callable[..., Daemon]) -> None:
    import tritonclient.grpc as grpcclient

    agent = start_daemon(
        "--model-repository", str(ROOT / "models"), "--execution-providers", "cpu"
    ).wait_started()
    with grpcclient.InferenceServerClient(agent.url) as client:
        assert "system_shared_memory" not in client.get_server_metadata().extensions
        refused = code_of(lambda: client.register_system_shared_memory("r", "/x", 8))
        assert "FAILED_PRECONDITION" in refused and "allow_shared_memory" in refused


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv6:[::1]:5000", True),
        ("unix:/run/edge-agent/grpc.sock", True),
        ("ipv4:10.1.2.3:5000", False),
        ("ipv6:[2001:db8::1]:5000", False),
    ],
)
def test_only_local_peers_register(peer: str, local: bool) -> None:
    assert is_local_peer(peer) is local


def test_registration_from_the_network_is_refused(tmp_path: Path) -> None:
    from edge_agent.api.shm import SharedMemory
    from edge_agent.errors import PermissionDenied

    with pytest.raises(PermissionDenied):
        SharedMemory(enabled=True, root=tmp_path).register("ipv4:10.0.0.9:1", "r", "/r", 0, 8)


def test_unregister_while_in_use_waits_for_the_last_request(tmp_path: Path) -> None:
    # tritonclient's messages: the same fields as ours, and the ones this process may hold
    # (conftest: the two cannot share a process).
    from tritonclient.grpc import service_pb2 as pb

    from edge_agent.api.shm import SharedMemory

    (tmp_path / "r").write_bytes(bytes(range(16)))
    memory = SharedMemory(enabled=True, root=tmp_path)
    memory.register("unix:/s", "r", "/r", 4, 8)
    parameters = pb.ModelInferRequest.InferInputTensor().parameters
    parameters["shared_memory_region"].string_param = "r"
    parameters["shared_memory_byte_size"].int64_param = 8
    held = [memory.acquire(parameters, "input 'x'")]
    region = held[0][0]
    memory.unregister("r")
    content, in_use = bytes(held[0][1]), not region.mapping.closed
    memory.release(held)
    held.clear()
    closed = region.mapping.closed
    # (no assert before this point: pytest's assertion rewriting keeps views alive)
    assert in_use and content == bytes(range(4, 12)) and closed
    assert not memory.status("")


def test_cuda_shared_memory_rpcs(start_daemon: Callable[..., Daemon]) -> None:
    """Triton's CUDA shared memory RPCs are served: status and unregister everywhere; a
    registration needs a CUDA device, and says so where there is none."""
    import tritonclient.grpc as grpcclient

    agent = start_daemon(
        "--model-repository", str(ROOT / "models"), "--execution-providers", "cpu",
        "--allow-shared-memory",
    ).wait_started()  # fmt: skip
    gpu = Path("/dev/nvidiactl").exists() and "CUDAExecutionProvider" in (
        ort.get_available_providers()
    )
    handle = base64.b64encode(bytes(64))  # tritonclient sends it base64, decodes it to 64 bytes
    with grpcclient.InferenceServerClient(agent.url) as client:
        assert ("cuda_shared_memory" in client.get_server_metadata().extensions) is gpu
        assert client.get_cuda_shared_memory_status().regions == {}
        refused = code_of(lambda: client.register_cuda_shared_memory("c", handle, 0, 256))
        if gpu:  # a zero handle is no real allocation
            assert "INVALID_ARGUMENT" in refused and "cudaIpcOpenMemHandle" in refused
        else:
            assert "FAILED_PRECONDITION" in refused and "needs a CUDA device" in refused
        short = base64.b64encode(bytes(10))
        assert "INVALID_ARGUMENT" in code_of(
            lambda: client.register_cuda_shared_memory("c", short, 0, 256)
        )
        assert "64 bytes" in code_of(lambda: client.register_cuda_shared_memory("c", short, 0, 8))
        # One table of names with system regions, as Triton's.
        key = f"/ea-test-{os.getpid()}"
        path = Path("/dev/shm") / key[1:]
        path.write_bytes(bytes(64))
        try:
            client.register_system_shared_memory("taken", key, 64)
            taken = code_of(lambda: client.register_cuda_shared_memory("taken", handle, 0, 8))
            assert "ALREADY_EXISTS" in taken
            # Each kind's status and unregister see only that kind.
            assert client.get_cuda_shared_memory_status().regions == {}
            assert "NOT_FOUND" in code_of(lambda: client.unregister_cuda_shared_memory("taken"))
            client.unregister_cuda_shared_memory()  # all (of none): what perf_analyzer does
            assert list(client.get_system_shared_memory_status().regions) == ["taken"]
            client.unregister_system_shared_memory()
        finally:
            path.unlink()


class FakeCuda:
    """A CUDA runtime stand-in over host bytes, for the staging rules (the real one is tested
    on a GPU: tests/test_gpu.py)."""

    def __init__(self, size: int) -> None:
        self.device = bytearray(range(size))
        self.closed: list[int] = []

    def to_host(self, pointer: int, size: int) -> bytearray:
        return bytearray(self.device[pointer : pointer + size])

    def to_device(self, pointer: int, data: Any) -> None:
        self.device[pointer : pointer + len(data)] = bytes(data)

    def close(self, pointer: int) -> None:
        self.closed.append(pointer)


def test_cuda_regions_stage_through_host_copies() -> None:
    from tritonclient.grpc import service_pb2 as pb

    from edge_agent.api.cuda_shm import CudaRegion
    from edge_agent.api.shm import SharedMemory

    fake = FakeCuda(32)
    memory = SharedMemory(enabled=True)
    memory._regions["c"] = CudaRegion("c", 0, 32, 0, fake)  # as register_cuda leaves it

    def tensor(offset: int, size: int) -> Any:
        parameters = pb.ModelInferRequest.InferInputTensor().parameters
        parameters["shared_memory_region"].string_param = "c"
        parameters["shared_memory_offset"].int64_param = offset
        parameters["shared_memory_byte_size"].int64_param = size
        return parameters

    held = [memory.acquire(tensor(4, 8), "input 'x'")]
    assert bytes(held[0][1]) == bytes(range(4, 12))  # a copy of the device bytes
    out = memory.acquire(tensor(16, 8), "output 'y'", output=True)
    out[1][:3] = b"abc"  # the response writes its output here...
    held.append(out)
    memory.unregister("c", CudaRegion)  # in use: released when the last request ends
    assert fake.closed == []
    memory.release(held)
    assert fake.device[16:24] == b"abc" + bytes(range(19, 24))  # ...and it reaches the device
    assert fake.device[4:12] == bytes(range(4, 12))  # inputs are never written back
    assert fake.closed == [0]
    with pytest.raises(Exception, match="no shared memory region"):
        memory.acquire(tensor(0, 8), "input 'x'")
