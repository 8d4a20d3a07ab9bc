"""The publisher's enrollment RPCs: enroll devices in bulk (or give them new tokens), revoke one.

A token is made here and returned once; the registry keeps only its hash, and no log line
carries it. Enrolling, rotating or revoking drops the cached token hash on every replica (their
change notices), and a revoked device's live long-poll ends at once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import grpc

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.controlplane.shared import FleetCore
from edge_agent.errors import InvalidArgument
from edge_agent.fleet import auth
from edge_agent.observability.logging import get_logger
from edge_agent.rpc.status import answers

log = get_logger(__name__)

MAX_ENROLL = 10_000
GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_device_id(device_id: str) -> None:
    if not device_id or len(device_id) > 128 or not device_id.isprintable():
        raise InvalidArgument(f"device id {device_id!r}: use 1-128 printable characters")


def check_enrollment(devices: Sequence[pb.DeviceEnrollment]) -> None:
    """Refuse a batch that is empty or too big, names a device twice or a bad id or group."""
    if not 0 < len(devices) <= MAX_ENROLL:
        raise InvalidArgument(f"enroll 1..{MAX_ENROLL} devices per call")
    ids = [d.device_id for d in devices]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise InvalidArgument(f"device ids given twice: {duplicates[:5]}")
    for d in devices:
        check_device_id(d.device_id)
        if d.group and not GROUP_NAME.match(d.group):
            raise InvalidArgument(f"group {d.group!r}: use letters, digits, '.', '_', '-'")


class Enrollment:
    RPCS = ("EnrollDevices", "RevokeDevice")

    def __init__(self, core: FleetCore) -> None:
        self._core = core

    @answers
    async def EnrollDevices(
        self, request: pb.EnrollDevicesRequest, context: grpc.aio.ServicerContext
    ) -> pb.EnrollDevicesResponse:
        await self._core.callers.publisher(context)
        check_enrollment(request.devices)
        tokens = {d.device_id: auth.new_token() for d in request.devices}
        rows = [
            (d.device_id, d.group, auth.token_hash(tokens[d.device_id])) for d in request.devices
        ]
        await self._core.db(self._core.registry.enroll, rows, request.rotate)
        log.info("devices.enrolled", count=len(rows), rotated=request.rotate)  # never the tokens
        self._core.notify(tokens)
        return pb.EnrollDevicesResponse(
            tokens=[pb.DeviceToken(device_id=i, token=t) for i, t in tokens.items()]
        )

    @answers
    async def RevokeDevice(
        self, request: pb.RevokeDeviceRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeDeviceResponse:
        await self._core.callers.publisher(context)
        await self._core.db(self._core.registry.revoke, request.device_id)
        log.info("device.revoked", device=request.device_id)
        self._core.end_poll(request.device_id)
        self._core.notify([request.device_id])  # and on the other replicas: its desired state is {}
        return pb.RevokeDeviceResponse()
