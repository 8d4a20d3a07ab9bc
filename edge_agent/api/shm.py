"""Triton's system shared memory extension: co-located clients pass tensors through POSIX
shared memory instead of the gRPC message.

A client creates a region (shm_open + mmap; tritonclient.utils.shared_memory does it), registers
it (SystemSharedMemoryRegister: name, key, offset, byte_size), and names it in a request:
per input or requested output the parameters `shared_memory_region` (string),
`shared_memory_offset` and `shared_memory_byte_size` (int64). Inputs are read as zero-copy views
into the mapping; outputs are written into the client's region, and the response carries their
name, datatype and shape with an empty raw_output_contents entry (indices stay aligned).

Triton's answers: a name registered twice ALREADY_EXISTS; a region beyond its object, an offset
or size beyond the region, an output region too small (the message names the size needed)
INVALID_ARGUMENT; an unknown region NOT_FOUND. Unregistering a region that requests are using
defers the unmap until the last one finishes. Off unless `allow_shared_memory`; registration is
accepted only from a peer on this host (loopback or a unix socket).

CUDA regions (api/cuda_shm.py) share the one table of names, as in Triton: a request names
either kind the same way; each kind has its own Status / Unregister.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import threading
from pathlib import Path
from typing import Any

from edge_agent.api.cuda_shm import CudaRegion, CudaRuntime, check_registration
from edge_agent.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from edge_agent.rpc.connections import parse_peer

SHM_ROOT = Path("/dev/shm")
REGION, OFFSET, SIZE = "shared_memory_region", "shared_memory_offset", "shared_memory_byte_size"


@dataclasses.dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    mapping: mmap.mmap
    users: int = 0
    unregistered: bool = False


def is_local_peer(peer: str) -> bool:
    """A unix socket, or a loopback address."""
    if peer.startswith("unix:") or peer.startswith("unix-abstract:"):
        return True
    parsed = parse_peer(peer)
    if parsed is None:
        return False
    import ipaddress

    return ipaddress.ip_address(parsed[0]).is_loopback


@dataclasses.dataclass
class Staged:
    """A request's host copy of part of a CUDA region; an output's goes back on release."""

    region: CudaRegion
    offset: int
    output: bool


Held = tuple[Region | Staged, memoryview]  # what a request holds until its response is built


class SharedMemory:
    def __init__(self, enabled: bool, root: Path = SHM_ROOT) -> None:
        self.enabled = enabled
        self._root = root
        self._regions: dict[str, Region | CudaRegion] = {}
        self._lock = threading.Lock()

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise FailedPrecondition(
                "system shared memory is off on this agent (allow_shared_memory)"
            )

    def register(self, peer: str, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_enabled()
        if not is_local_peer(peer):
            raise PermissionDenied("shared memory is registered from this host only")
        if not name:
            raise InvalidArgument("a shared memory region needs a name")
        if not key.startswith("/") or "/" in key[1:] or key in ("/", "/.", "/..") or "\0" in key:
            raise InvalidArgument(f"shared memory key {key!r} is not a POSIX name like /region")
        with self._lock:
            if name in self._regions:
                raise AlreadyExists(f"shared memory region '{name}' is already registered")
        path = self._root / key[1:]
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise InvalidArgument(f"shared memory key {key!r}: {exc.strerror}") from exc
        try:
            size = os.fstat(fd).st_size
            if offset < 0 or byte_size <= 0 or offset + byte_size > size:
                raise InvalidArgument(
                    f"region '{name}': offset {offset} + byte_size {byte_size} lies beyond the "
                    f"{size} bytes of {key!r}"
                )
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        with self._lock:
            if name in self._regions:
                mapping.close()
                raise AlreadyExists(f"shared memory region '{name}' is already registered")
            self._regions[name] = Region(name, key, offset, byte_size, mapping)

    def register_cuda(
        self, peer: str, name: str, raw_handle: bytes, device_id: int, byte_size: int
    ) -> None:
        self._check_enabled()
        if not is_local_peer(peer):
            raise PermissionDenied("shared memory is registered from this host only")
        if not name:
            raise InvalidArgument("a shared memory region needs a name")
        check_registration(raw_handle, device_id, byte_size)
        with self._lock:
            if name in self._regions:
                raise AlreadyExists(f"shared memory region '{name}' is already registered")
        runtime = CudaRuntime.get()
        pointer = runtime.open(raw_handle, device_id)
        with self._lock:
            if name in self._regions:
                runtime.close(pointer)
                raise AlreadyExists(f"shared memory region '{name}' is already registered")
            self._regions[name] = CudaRegion(name, device_id, byte_size, pointer, runtime)

    def status(self, name: str, kind: type = Region) -> list[Any]:
        """Registered regions of one kind (Region: system; CudaRegion), or the one named."""
        self._check_enabled()
        with self._lock:
            if name:
                region = self._regions.get(name)
                if not isinstance(region, kind):
                    raise NotFound(f"no shared memory region '{name}'")
                return [region]
            return [r for r in self._regions.values() if isinstance(r, kind)]

    def unregister(self, name: str, kind: type = Region) -> None:
        """One region of this kind ("" = all of them). A region in use is released when its
        last request ends."""
        self._check_enabled()
        with self._lock:
            if name and not isinstance(self._regions.get(name), kind):
                raise NotFound(f"no shared memory region '{name}'")
            names = [name] if name else [n for n, r in self._regions.items() if isinstance(r, kind)]
            for each in names:
                region = self._regions.pop(each)
                region.unregistered = True
                if region.users == 0:
                    _close_region(region)

    def acquire(
        self, parameters: Any, what: str, output: bool = False
    ) -> tuple[Region | Staged, memoryview]:
        """The region a tensor's parameters name, held until `release`, and its bytes (for a
        CUDA region, a host copy; an output's is copied back at release)."""
        self._check_enabled()
        name = parameters[REGION].string_param
        offset = _int(parameters, OFFSET, 0)
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise NotFound(f"{what}: no shared memory region '{name}'")
            size = _int(parameters, SIZE, region.byte_size - offset)
            if offset < 0 or size < 0 or offset + size > region.byte_size:
                raise InvalidArgument(
                    f"{what}: offset {offset} + byte_size {size} lies beyond region '{name}' "
                    f"({region.byte_size} bytes)"
                )
            region.users += 1
        if isinstance(region, CudaRegion):
            try:
                return Staged(region, offset, output), region.read(offset, size)
            except BaseException:
                self.release([(Staged(region, offset, False), memoryview(b""))])
                raise
        start = region.offset + offset
        return region, memoryview(region.mapping)[start : start + size]

    def release(self, held: list[Held]) -> None:
        """Give back what a request held; CUDA outputs are copied to the device first (an error
        there fails the request)."""
        failure: BaseException | None = None
        for handle, view in held:
            region: Region | CudaRegion
            if isinstance(handle, Staged):
                region = handle.region
                if handle.output and failure is None:
                    try:
                        region.write_back(handle.offset, view)
                    except BaseException as exc:
                        failure = exc
            else:
                region = handle
            with contextlib.suppress(BufferError):  # arrays made from it may outlive this call
                view.release()
            with self._lock:
                region.users -= 1
                if region.unregistered and region.users == 0:
                    _close_region(region)
        if failure is not None:
            raise failure


def _close_region(region: Region | CudaRegion) -> None:
    if isinstance(region, CudaRegion):
        region.close()
    else:
        _close(region.mapping)


def _close(mapping: mmap.mmap) -> None:
    # Arrays still viewing it: it is unmapped when the last of them is collected.
    with contextlib.suppress(BufferError):
        mapping.close()


def uses_shared_memory(parameters: Any) -> bool:
    return REGION in parameters


def _int(parameters: Any, key: str, default: int) -> int:
    if key not in parameters:
        return default
    parameter = parameters[key]
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"parameter '{key}' must be an integer")
    return int(getattr(parameter, kind))
