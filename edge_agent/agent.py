"""The composition root: `Agent.run()` = startup -> serve -> shutdown.

startup: load and warm models (by model control mode) -> bind the gRPC and metrics listeners ->
health SERVING -> ready -> the weight sync starts (with a control plane) -> systemd READY=1 and
the watchdog; in poll mode the repository poll starts with the loads.
SIGHUP: RELOADING=1 -> re-read the configuration -> apply what can change live (log level, model
settings: every model reloaded through the hot-swap path), log what needs a restart -> READY=1.
shutdown (SIGTERM/SIGINT; a second signal exits at once with EXIT_FORCED): STOPPING=1, health
NOT_SERVING, not ready -> stop sync and polling -> every listener stops at once (refuses new
calls, lets those in progress finish within the grace) -> schedulers finish what they admitted
within what is left of the grace (a longer run is abandoned) -> metrics listener closes.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from edge_agent.api.dataplane import DataPlane
from edge_agent.api.examples import ExampleServicer
from edge_agent.api.security import ControlGate, ServerTls
from edge_agent.api.server import bind, build_server, connection_limits
from edge_agent.api.servicer import InferenceServicer
from edge_agent.api.shm import SharedMemory
from edge_agent.common.exits import EXIT_FORCED
from edge_agent.errors import ConfigError
from edge_agent.fleet.auth import read_token
from edge_agent.learn.examples import ExampleStore
from edge_agent.learn.participant import torch_available
from edge_agent.observability.logging import get_logger, set_log_level
from edge_agent.observability.metrics import (
    ConnectionCollector,
    ExampleCollector,
    LearningCollector,
    MetricsServer,
    SyncCollector,
)
from edge_agent.repository.lifecycle import ModelManager
from edge_agent.repository.registry import READY, ModelRegistry
from edge_agent.rpc.connections import ConnectionGuard, fit_to_fd_limit
from edge_agent.rpc.listen import check_listen
from edge_agent.rpc.web import serve, ssl_context
from edge_agent.runtime.session import set_runtime_log_level
from edge_agent.service.notify import Notifier
from edge_agent.service.reload import NOT_FOR_MODELS, plan
from edge_agent.settings import Settings, grpc_addresses, repository_source
from edge_agent.sync.syncer import Syncer

log = get_logger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Agent:
    def __init__(self, settings: Settings, reread: Callable[[], Settings] | None = None) -> None:
        """`reread`: loads the settings again (config file, env, flags) on SIGHUP."""
        self.settings = settings
        self._reread = reread
        set_runtime_log_level(settings.log_level)
        self.notifier = Notifier()
        self._watchdog: asyncio.Task[None] | None = None
        self._reloading: asyncio.Task[None] | None = None
        self._reload_asked = False
        self.registry = ModelRegistry()
        self.manager = ModelManager(settings, self.registry)
        self.plane = DataPlane(self.registry, self.manager)
        self.plane.shm = SharedMemory(settings.allow_shared_memory)
        self.servicer = InferenceServicer(self.plane)
        self._apply_limits(settings)
        self.health = health.aio.HealthServicer()
        self.manager.on_change(self._publish_health)
        self._stop = asyncio.Event()
        self.metrics = MetricsServer(
            settings.metrics_address, self.registry.versions, self.registry.entries
        )
        self.guard = ConnectionGuard()
        self.examples = (
            ExampleStore(settings.state_dir / "examples", settings.examples_max_bytes)
            if settings.state_dir is not None
            else None
        )
        if self.examples is not None:
            self.metrics.registry.register(ExampleCollector(self.examples.stats))
        self.metrics.registry.register(ConnectionCollector(self.guard.stats))
        self.port: int | None = None
        self.control_port: int | None = None
        self.metrics_port: int | None = None
        self._tls: ServerTls | None = None
        self.syncer: Syncer | None = None
        self._http: list[Any] = []  # aiohttp runners of the HTTP listeners
        self.http_port: int | None = None
        self.http_control_port: int | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        tls = ServerTls(self.settings) if self.settings.tls_cert is not None else None
        self._tls = tls
        listeners = 2 if self.settings.control_address else 1
        self._limits = fit_to_fd_limit(connection_limits(self.settings), listeners)
        examples = ExampleServicer(self.registry, self.examples, inference_listener=True)
        server: Any
        if self.settings.front_end == "sync":
            from edge_agent.api.sync_front import build_sync_server

            server = build_sync_server(
                self.servicer,
                self.plane,
                self.health,
                self.settings.max_message_bytes,
                self._limits,
                self.guard,
                loop,
                self.settings.front_end_threads,
                deny_control=not self.settings.control_on_inference_listener,
                examples=examples,
            )
        else:
            server = build_server(
                self.servicer,
                self.health,
                self.settings.max_message_bytes,
                self._limits,
                self.guard,
                deny_control=not self.settings.control_on_inference_listener,
                examples=examples,
            )
        control = None
        if self.settings.control_address:
            token_file = self.settings.control_token_file
            token = read_token(token_file) if token_file is not None else None
            control = build_server(
                self.servicer,
                self.health,
                self.settings.max_message_bytes,
                self._limits,
                self.guard,
                [ControlGate(token)],
                examples=ExampleServicer(self.registry, self.examples, inference_listener=False),
            )
        try:
            try:
                await self._startup(server, control, tls, loop)
            except ConfigError as exc:  # logged before the shutdown's agent.stopped
                log.error("agent.start_failed", error=str(exc))
                raise
            await self._stop.wait()
        finally:
            await self._shutdown(server, control)

    async def _startup(
        self,
        server: grpc.aio.Server,
        control: grpc.aio.Server | None,
        tls: ServerTls | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        log.info(
            "agent.starting",
            model_repository=str(self.settings.model_repository),
            repository_source=repository_source(self.settings.model_repository),
        )
        check_before_start(self.settings)
        if self.settings.control_plane:  # its state is read now: a bad one fails the start
            self.syncer = Syncer(self.settings, self.manager, loop, self.examples)
            self.metrics.registry.register(SyncCollector(self.syncer.stats))
            if self.syncer.participant is not None:
                self.metrics.registry.register(LearningCollector(self.syncer.participant.stats))
        # Sessions are built on the loader thread: the event loop stays free meanwhile.
        await self.manager.start()
        await self._listen(server, control, tls)
        self.plane.ready = True
        # Everything built at start lives as long as the agent: keep it out of the cyclic
        # collector's full passes, which otherwise pause the event loop for milliseconds.
        gc.freeze()
        await self._publish_health()
        self._log_started(tls)
        if self.syncer is not None:
            # After the start: serving never waits for the control plane.
            self.syncer.start()
        # Only now: every configured model is warm and the listeners are bound.
        self.notifier.ready(self._status())
        if self.notifier.watchdog_interval is not None:
            self._watchdog = asyncio.create_task(self._keepalive(), name="watchdog")

    async def _listen(
        self, server: grpc.aio.Server, control: grpc.aio.Server | None, tls: ServerTls | None
    ) -> None:
        """Bind and start every listener: gRPC (TCP and unix sockets), control, metrics, HTTP."""
        self.unix_sockets: list[str] = []
        for address in grpc_addresses(self.settings):
            bound = bind(server, address, tls.credentials() if tls else None)
            if address.startswith("unix:"):
                self.unix_sockets.append(address[5:])
            elif self.port is None:
                self.port = bound
        if control is not None:
            self.control_port = bind(
                control,
                self.settings.control_address,
                tls.credentials() if tls else None,
                "control_address",
            )
        self.metrics_port = self.metrics.start()
        await server.start()
        await self._start_http()
        if control is not None:
            await control.start()
        for path in self.unix_sockets:  # co-located clients: who may connect is the file's mode
            os.chmod(path, int(self.settings.unix_socket_mode, 8))
        for watched in (self.port, self.control_port):
            if watched:
                self.guard.watch(watched, self._limits)
        self.guard.start()

    def _log_started(self, tls: ServerTls | None) -> None:
        tcp = [a for a in grpc_addresses(self.settings) if not a.startswith("unix:")]
        host = tcp[0].rpartition(":")[0] if tcp else ""
        log.info(
            "agent.started",
            grpc_address=f"{host}:{self.port}" if tcp else "",
            port=self.port,
            unix_sockets=self.unix_sockets,
            control_port=self.control_port,
            front_end=self.settings.front_end,
            http_port=self.http_port,
            http_control_port=self.http_control_port,
            tls=tls is not None,
            metrics_port=self.metrics_port,
            model_repository=str(self.settings.model_repository),
            pid=os.getpid(),
        )

    def _on_signal(self) -> None:
        if self._stop.is_set():
            log.warning("agent.forced_exit")
            os._exit(EXIT_FORCED)
        log.info("agent.stopping")
        self.notifier.stopping("stopping: draining in-flight requests")
        self._stop.set()

    def _apply_limits(self, settings: Settings) -> None:
        self.plane.max_elements_per_tensor = settings.max_elements_per_tensor
        self.plane.max_elements_per_request = settings.max_elements_per_request

    def _status(self) -> str:
        serving = sum(1 for e in self.registry.entries() if e.ready_versions())
        where = ", ".join(
            f"{a.rpartition(':')[0]}:{self.port}" if not a.startswith("unix:") else a
            for a in grpc_addresses(self.settings)
        )
        sync = f"; syncing from {self.settings.control_plane}" if self.syncer else ""
        models = "model" if serving == 1 else "models"
        return f"serving {serving} {models} on {where}{sync}"

    async def _keepalive(self) -> None:
        """WATCHDOG=1 from the serving loop itself: if the loop stalls, systemd notices."""
        assert self.notifier.watchdog_interval is not None
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(self.notifier.watchdog_interval)

    def _on_reload(self) -> None:
        if self._stop.is_set():
            return
        # A SIGHUP during a reload runs one more after it: the file may have changed after the
        # running one read it.
        self._reload_asked = True
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.create_task(self._reload_while_asked(), name="reload")

    async def _reload_while_asked(self) -> None:
        while self._reload_asked:
            self._reload_asked = False
            await self.reload()

    async def reload(self) -> None:
        """SIGHUP: read the configuration again and apply what can change live (see
        service/reload.py); log what needs a restart. A bad config keeps the running one."""
        self.notifier.reloading()
        try:
            if self._reread is None:
                raise ConfigError("this agent was started without a configuration to re-read")
            new = self._reread()
        except ConfigError as exc:
            log.error("config.reload_failed", error=str(exc))
            self.notifier.ready(self._status())
            return
        applied, live, restart = plan(self.settings, new)
        log.info("config.reloaded", applied=live, needs_restart=restart)
        if restart:
            log.warning("config.needs_restart", keys=restart)
        self.settings = applied
        set_log_level(applied.log_level)
        set_runtime_log_level(applied.log_level)
        self._apply_limits(applied)
        if self._tls is not None:  # new certificate files: new connections get them
            self._tls.reload(applied)
        await self.manager.reconfigure(applied, rebuild=bool(set(live) - NOT_FOR_MODELS))
        self.notifier.ready(self._status())

    async def _publish_health(self) -> None:
        """grpc.health.v1 entries: "" (the agent), "<model>" (any version serves) and
        "<model>/<version>" (that version serves; a failed load shows here as NOT_SERVING)."""
        if self._stop.is_set():
            return
        for entry in self.registry.entries():
            status = SERVING if entry.ready_versions() else NOT_SERVING
            await self.health.set(entry.name, status)
            for state in entry.states():
                status = SERVING if state.state == READY else NOT_SERVING
                await self.health.set(f"{entry.name}/{state.version}", status)
        if self.plane.ready:
            await self.health.set("", SERVING)

    async def _start_http(self) -> None:
        """The HTTP/REST listeners (api/http.py), on this loop, over the same data plane."""
        s = self.settings
        if not s.http_address and not s.http_control_address:
            return
        from edge_agent.api import http

        tls = ssl_context(s.tls_cert, s.tls_key, s.tls_client_ca) if s.tls_cert else None
        token = read_token(s.control_token_file) if s.control_token_file is not None else None
        for address, control in ((s.http_address, False), (s.http_control_address, True)):
            if not address:
                continue
            front = http.HttpFrontEnd(
                self.plane,
                s.max_message_bytes,
                s.max_concurrent_rpcs,
                control=control,
                control_too=s.control_on_inference_listener,
                token=token,
            )
            key = "http_control_address" if control else "http_address"
            try:
                runner, port = await serve(
                    front.app(), address, key, s.connection_idle_seconds,
                    s.shutdown_grace_seconds, tls,
                )  # fmt: skip
            except OSError as exc:
                raise ConfigError(f"{key}: cannot listen on {address}: {exc.strerror}") from exc
            self._http.append(runner)
            if control:
                self.http_control_port = port
            else:
                self.http_port = port

    async def _shutdown(
        self, server: grpc.aio.Server, control: grpc.aio.Server | None = None
    ) -> None:
        # One grace bounds the whole drain: every listener stops at once (new calls refused,
        # calls in progress get what is left of it), then the runs still going get the rest. A
        # run that outlasts it is abandoned (its caller was already cancelled): the stop never
        # waits on a model, whatever it computes.
        loop = asyncio.get_running_loop()
        grace = self.settings.shutdown_grace_seconds
        ends = loop.time() + grace
        self.plane.ready = False
        self.notifier.stopping("stopping: draining in-flight requests")
        for task in (self._watchdog, self._reloading):
            if task is not None:
                task.cancel()
        await self.health.enter_graceful_shutdown()
        if self.syncer is not None:
            await asyncio.to_thread(self.syncer.stop)
        await self.manager.stop()
        left = max(0.0, ends - loop.time())
        stops = [runner.cleanup() for runner in self._http]
        stops += [listener.stop(left) for listener in (control, server) if listener is not None]
        await asyncio.gather(*stops)
        try:
            await asyncio.wait_for(self.registry.close(), max(0.0, ends - loop.time()))
        except TimeoutError:
            running = sum(model.scheduler.busy() for model in self.registry.versions())
            if running:  # a grace of 0 stops without waiting, runs or not
                log.warning("agent.runs_abandoned", running=running, grace_seconds=grace)
        self.guard.stop()
        self.metrics.stop()
        self.notifier.close()
        log.info("agent.stopped")


def check_before_start(settings: Settings) -> None:
    """What can fail the start fails it now, with its reason, before any model is built."""
    listen = [("grpc_address", a) for a in grpc_addresses(settings)]
    listen += [
        (key, getattr(settings, key))
        for key in (
            "control_address",
            "metrics_address",
            "http_address",
            "http_control_address",
        )
    ]
    for key, address in listen:
        if address:
            check_listen(address, key)
    if settings.learn and not torch_available():
        raise ConfigError(
            "learning (--learn / learn = true) needs PyTorch: install the extra with "
            "pip install 'edge-agent[learn]'"
        )
