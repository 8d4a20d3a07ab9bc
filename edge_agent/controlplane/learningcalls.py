"""The learning RPCs over the parameter server (controlplane/learning/): the publisher starts,
stops and reads tasks; a device uploads its update.

An update arrives as a client stream: a header (its task, id, base version, size and sha256)
and the payload in chunks, bounded in size (MAX_UPDATE_BYTES) and in time like any upload. It is
handed on only whole and matching its declared size and digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import grpc

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.controlplane.learning import ParameterServer
from edge_agent.controlplane.shared import FleetCore
from edge_agent.errors import InvalidArgument
from edge_agent.rpc.status import answers

MAX_UPDATE_BYTES = 256 << 20


class LearningCalls:
    RPCS = ("StartLearning", "StopLearning", "LearningStatus", "UploadUpdate")

    def __init__(self, core: FleetCore, learning: ParameterServer) -> None:
        self._core = core
        self._learning = learning

    @answers
    async def StartLearning(
        self, request: pb.StartLearningRequest, context: grpc.aio.ServicerContext
    ) -> pb.LearningTask:
        await self._core.callers.publisher(context)
        task_id, notice = await self._learning.start(request.spec)
        task = (await self._learning.status(task_id))[0]
        task.notice = notice
        return task

    @answers
    async def StopLearning(
        self, request: pb.StopLearningRequest, context: grpc.aio.ServicerContext
    ) -> pb.LearningTask:
        await self._core.callers.publisher(context)
        await self._learning.stop(request.task_id)
        return (await self._learning.status(request.task_id))[0]

    @answers
    async def LearningStatus(
        self, request: pb.LearningStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.LearningStatusResponse:
        await self._core.callers.publisher(context)
        return pb.LearningStatusResponse(tasks=await self._learning.status(request.task_id))

    @answers
    async def UploadUpdate(
        self,
        request_iterator: AsyncIterator[pb.UpdateChunk],
        context: grpc.aio.ServicerContext,
    ) -> pb.UpdateAck:
        device = await self._core.callers.device(context)
        header, payload = await self._received(request_iterator)
        return await self._learning.receive(device, header, payload)

    async def _received(
        self, request_iterator: AsyncIterator[pb.UpdateChunk]
    ) -> tuple[pb.UpdateChunk, bytes]:
        """The update's header (its first message) and whole payload, checked against the
        header's size and sha256."""
        header: pb.UpdateChunk | None = None
        parts: list[bytes] = []
        received = 0
        async for message in self._core.uploaded(request_iterator):
            if header is None:
                header = message
                if not 0 < header.size <= MAX_UPDATE_BYTES:
                    raise InvalidArgument(
                        f"update of {header.size} bytes: must be 1..{MAX_UPDATE_BYTES}"
                    )
            received += len(message.data)
            if received > header.size:
                raise InvalidArgument(f"more than the declared {header.size} bytes")
            parts.append(message.data)
        if header is None:
            raise InvalidArgument("empty update")
        payload = b"".join(parts)
        if len(payload) != header.size or hashlib.sha256(payload).hexdigest() != header.sha256:
            raise InvalidArgument("the update's bytes do not match its declared size and sha256")
        return header, payload
