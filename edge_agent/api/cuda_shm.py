"""Triton's CUDA shared memory extension: a co-located GPU client (a camera pipeline with the
frame already on the GPU) registers device memory by its CUDA IPC handle
(CudaSharedMemoryRegister: name, raw_handle, device_id, byte_size) and names the region in a
request exactly as for system shared memory (api/shm.py: `shared_memory_region`, `_offset`,
`_byte_size`).

The handle is opened with the CUDA runtime (cudaIpcOpenMemHandle, through ctypes: libcudart is
loaded by onnxruntime-gpu's CUDA libraries). A request's input is copied from the region once
(device to host) into the request's staging buffer and an output is copied back into it (host to
device) when the response is built; the scheduler, batching and statistics stay as they are.
(Binding the device pointer straight into IOBinding, without the host copy, is the next step;
docs/performance-history.md "GPU" will tell whether it is worth its complexity.)

Same rules as system shared memory: off unless `allow_shared_memory`, registration only from a
local peer, Triton's errors (ALREADY_EXISTS, NOT_FOUND, INVALID_ARGUMENT). Where no CUDA runtime
or device is present, registration answers FAILED_PRECONDITION saying so; status and unregister
work (perf_analyzer unregisters CUDA regions at exit whatever it used).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import threading
from typing import Any

from edge_agent.errors import FailedPrecondition, InvalidArgument

IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)
_LAZY_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess
_HOST_TO_DEVICE, _DEVICE_TO_HOST = 1, 2  # cudaMemcpyKind


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


class CudaRuntime:
    """The few CUDA runtime calls the extension needs."""

    _lock = threading.Lock()
    _loaded: CudaRuntime | None = None
    _failure: str | None = None

    def __init__(self, library: ctypes.CDLL) -> None:
        self._lib = library
        self._lib.cudaIpcOpenMemHandle.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            _IpcHandle,
            ctypes.c_uint,
        ]
        self._lib.cudaMemcpy.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
        ]
        self._lib.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
        self._lib.cudaSetDevice.argtypes = [ctypes.c_int]
        self._lib.cudaGetErrorString.restype = ctypes.c_char_p

    @classmethod
    def get(cls) -> CudaRuntime:
        """The process's CUDA runtime; FailedPrecondition (with why) where there is none."""
        with cls._lock:
            if cls._loaded is None and cls._failure is None:
                cls._loaded, cls._failure = cls._load()
            if cls._loaded is None:
                raise FailedPrecondition(
                    f"CUDA shared memory needs a CUDA device and runtime: {cls._failure}"
                )
            return cls._loaded

    @classmethod
    def _load(cls) -> tuple[CudaRuntime | None, str | None]:
        from edge_agent.runtime.session import cuda_known_unavailable

        known = cuda_known_unavailable()
        if known is not None:
            return None, known
        names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
        found = ctypes.util.find_library("cudart")
        if found:
            names.append(found)
        for name in names:
            try:
                return cls(ctypes.CDLL(name)), None
            except OSError:
                continue
        return None, "the CUDA runtime library (libcudart) cannot be loaded"

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            message = self._lib.cudaGetErrorString(status)
            text = message.decode() if message else f"error {status}"
            raise InvalidArgument(f"{what}: {text}")

    def open(self, handle: bytes, device_id: int) -> int:
        self._check(self._lib.cudaSetDevice(device_id), f"CUDA device {device_id}")
        pointer = ctypes.c_void_p()
        raw = _IpcHandle()
        ctypes.memmove(ctypes.addressof(raw), handle, IPC_HANDLE_BYTES)
        self._check(
            self._lib.cudaIpcOpenMemHandle(ctypes.byref(pointer), raw, _LAZY_PEER_ACCESS),
            "cudaIpcOpenMemHandle",
        )
        return int(pointer.value or 0)

    def close(self, pointer: int) -> None:
        self._lib.cudaIpcCloseMemHandle(ctypes.c_void_p(pointer))

    def to_host(self, pointer: int, size: int) -> bytearray:
        buffer = bytearray(size)
        if size:
            target = (ctypes.c_char * size).from_buffer(buffer)
            self._check(
                self._lib.cudaMemcpy(target, ctypes.c_void_p(pointer), size, _DEVICE_TO_HOST),
                "copy from CUDA shared memory",
            )
        return buffer

    def to_device(self, pointer: int, data: bytes | bytearray | memoryview) -> None:
        size = len(data)
        if size:
            source = bytes(data)
            self._check(
                self._lib.cudaMemcpy(ctypes.c_void_p(pointer), source, size, _HOST_TO_DEVICE),
                "copy into CUDA shared memory",
            )


@dataclasses.dataclass
class CudaRegion:
    """A registered CUDA region. `staged` are the host buffers handed to requests (output ones
    are copied back to the device when released)."""

    name: str
    device_id: int
    byte_size: int
    pointer: int
    runtime: Any
    users: int = 0
    unregistered: bool = False

    def read(self, offset: int, size: int) -> memoryview:
        return memoryview(self.runtime.to_host(self.pointer + offset, size))

    def write_back(self, offset: int, data: memoryview) -> None:
        self.runtime.to_device(self.pointer + offset, data)

    def close(self) -> None:
        self.runtime.close(self.pointer)


def check_registration(raw_handle: bytes, device_id: int, byte_size: int) -> None:
    if len(raw_handle) != IPC_HANDLE_BYTES:
        raise InvalidArgument(
            f"raw_handle must be a CUDA IPC handle of {IPC_HANDLE_BYTES} bytes, got "
            f"{len(raw_handle)}"
        )
    if device_id < 0:
        raise InvalidArgument(f"device_id must not be negative, got {device_id}")
    if byte_size <= 0:
        raise InvalidArgument("byte_size must be positive")
