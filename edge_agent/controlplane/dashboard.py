"""The fleet dashboard (`control-plane serve --dashboard-address HOST:PORT`): read-only pages on
the control plane's registry, for the people who run the fleet.

- Pages: overview (counts, database and blob store sizes), devices (group, versions served,
  last report, the last day's requests, p99, memory and free disk as sparklines; devices not
  seen for ten minutes highlighted), rollouts (per state, the canary cohort, paused with the
  reason, each canary beside its baseline with the verdict), health (per model version and
  group, the last day's requests, error rate and p99), learning (validation accuracy per global
  version as a plot; updates received / dropped / refused).
  Server-rendered HTML, no build step; each page refreshes its content in place every few
  seconds (a fetch of the same page's fragment); usable on a phone (one column, wide tables
  scroll).
- Credentials: the publisher token, as `Authorization: Bearer TOKEN` (scripts) or through the
  login form, which sets an HttpOnly, SameSite=Strict session cookie (browsers; a random session
  id, never the token). Without them: 401. Login attempts are rate-limited per address. With
  the control plane's TLS settings the dashboard is HTTPS (mTLS with a client CA).
- Nothing changes state: GET only (and POST /login), anything else answers 405. No token, hash
  or credential is ever written into a page.
"""

from __future__ import annotations

import asyncio
import html
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from aiohttp import web

from edge_agent.controlplane.health import Counters, p99_ms
from edge_agent.controlplane.registry import PAUSED, Device, LearningTaskRow, Rollout, VersionRow
from edge_agent.controlplane.registry.health import Point
from edge_agent.fleet import auth
from edge_agent.observability.logging import get_logger

log = get_logger(__name__)

COOKIE = "ea_session"
SESSION_SECONDS = 8 * 3600
MAX_SESSIONS = 1000
LOGIN_ATTEMPTS_PER_MINUTE = 10
PAGE_DEVICES = 1000
REFRESH_MS = 5000

Db = Callable[..., Awaitable[Any]]


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def ago(at: float, now: float) -> str:
    if not at:
        return "never"
    seconds = max(0, int(now - at))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str) -> str:
    """Cells are HTML already (escaped by the caller)."""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        return f"<p class=empty>{esc(empty)}</p>"
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    return (
        f"<div class=scroll><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table></div>"
    )


def accuracy_plot(versions: Sequence[VersionRow], base: float, width: int = 480) -> str:
    """Validation accuracy per global version, as inline SVG (accepted: filled; gated out:
    hollow; the dashed line is the base's accuracy)."""
    if not versions:
        return "<p class=empty>no global version yet</p>"
    height, pad = 160, 28
    values = [v.accuracy for v in versions] + [base]
    low, high = min(values), max(values)
    if high - low < 0.02:
        low, high = max(0.0, low - 0.01), min(1.0, high + 0.01)
    last = max(1, versions[-1].version)

    def x(version: int) -> float:
        return pad + (width - 2 * pad) * version / last

    def y(value: float) -> float:
        return height - pad - (height - 2 * pad) * (value - low) / (high - low or 1)

    accepted = [v for v in versions if v.accepted]
    line = " ".join(f"{x(v.version):.1f},{y(v.accuracy):.1f}" for v in accepted)
    dots = "".join(
        f'<circle cx="{x(v.version):.1f}" cy="{y(v.accuracy):.1f}" r="4" '
        f'class="{"ok" if v.accepted else "out"}"><title>v{v.version}: '
        f"{v.accuracy:.4f}{'' if v.accepted else ' (gated out)'}</title></circle>"
        for v in versions
    )
    return (
        f'<svg class=plot viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="validation accuracy per global version">'
        f'<line x1="{pad}" x2="{width - pad}" y1="{y(base):.1f}" y2="{y(base):.1f}" '
        f"class=base><title>base {base:.4f}</title></line>"
        f'<polyline points="{line}" class=line />{dots}'
        f'<text x="{pad}" y="14">{high:.3f}</text>'
        f'<text x="{pad}" y="{height - 6}">{low:.3f}</text>'
        f'<text x="{width - pad}" y="{height - 6}" text-anchor="end">global v{last}</text>'
        "</svg>"
    )


STYLE = """
svg.spark{width:6em;height:1.2em;vertical-align:middle}
svg.spark polyline{fill:none;stroke:#2f6fd0;stroke-width:1.5;vector-effect:non-scaling-stroke}
body{font:15px/1.4 system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
header{background:#1b1f24;color:#fff;padding:.6em 1em;display:flex;flex-wrap:wrap;gap:1em;
align-items:center}header a{color:#cfe3ff;text-decoration:none}header b{margin-right:auto}
main{padding:1em;max-width:1100px;margin:auto}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:.6em}
.card{background:#fff;border-radius:8px;padding:.7em;box-shadow:0 1px 2px #0002}
.card b{display:block;font-size:1.5em}.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;background:#fff}th,td{padding:.35em .6em;
border-bottom:1px solid #e3e6ea;text-align:left;white-space:nowrap}th{background:#eef1f4}
.paused{color:#a15c00;font-weight:600}.failed{color:#b00020}.empty{color:#667}
.plot{width:100%;max-width:480px;background:#fff;border-radius:8px}.plot .line{fill:none;
stroke:#2563eb;stroke-width:2}.plot .ok{fill:#2563eb}.plot .out{fill:#fff;stroke:#b00020;
stroke-width:2}.plot .base{stroke:#667;stroke-dasharray:4 3}.plot text{font-size:11px;fill:#667}
form{max-width:360px;margin:3em auto;background:#fff;padding:1.2em;border-radius:8px}
input{width:100%;box-sizing:border-box;padding:.5em;margin:.4em 0}
button{padding:.5em 1em}small{color:#667}
"""

SCRIPT = (
    "setInterval(async () => {"
    " try {"
    " const answer = await fetch(location.pathname + location.search +"
    " (location.search ? '&' : '?') + 'fragment=1', {credentials: 'same-origin'});"
    " if (answer.ok) document.getElementById('content').innerHTML = await answer.text();"
    " } catch (e) {}"
    f" }}, {REFRESH_MS});"
)


def page(title: str, content: str, now: float) -> str:
    nav = "".join(
        f'<a href="{path}">{name}</a>'
        for path, name in (
            ("/", "Overview"),
            ("/devices", "Devices"),
            ("/rollouts", "Rollouts"),
            ("/health", "Health"),
            ("/learning", "Learning"),
        )
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)} · edge-agent fleet</title><style>{STYLE}</style></head><body>"
        f"<header><b>edge-agent fleet</b>{nav}</header><main><h1>{esc(title)}</h1>"
        f"<div id=content>{content}</div></main><script>{SCRIPT}</script></body></html>"
    )


def stamp(now: float) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    return f"<p><small>as of {esc(when)}</small></p>"


def rollout_state(r: Rollout) -> str:
    if r.state == PAUSED:
        return f"<span class=paused>paused</span> <small>{esc(r.reason)}</small>"
    return esc(r.state)


def scope(r: Rollout) -> str:
    if r.scope == "group":
        return f"group {esc(r.group)}"
    if r.scope == "canary":
        return f"canary {r.canary_percent:g}% (cohort of {len(r.devices)})"
    return "fleet"


def counts(states: dict[str, int] | Any) -> str:
    return ", ".join(f"{esc(k)} {v}" for k, v in sorted(dict(states).items())) or "—"


STALE_S = 600  # a device not seen for this long is highlighted


def devices_html(
    devices: Sequence[Device], now: float, health: dict[str, list[Point]] | None = None
) -> str:
    rows = []
    for d in devices:
        serving = ", ".join(
            f"{esc(r.model)} v{r.serving_version}" + (f" ({esc(r.variant)})" if r.variant else "")
            for r in d.reports
        )
        states = ", ".join(
            f"{esc(r.model)}: {esc(r.state)}"
            + (f" → v{r.target_version}" if r.target_version != r.serving_version else "")
            for r in d.reports
        )
        error = f"<span class=failed>{esc(d.last_error)}</span>" if d.last_error else ""
        seen = esc(ago(d.last_seen, now))
        if now - d.last_seen > STALE_S:
            seen = f"<span class=failed>{seen}</span>"
        rows.append(
            [esc(d.device_id), esc(d.group or "—"), serving or "—", states or "—", seen,
             device_health_html((health or {}).get(d.device_id, []), now), error]
        )  # fmt: skip
    return table(
        ["device", "group", "serving", "last report", "last seen", "health (24 h)",
         "last error"],
        rows,
        "no device enrolled",
    )  # fmt: skip


def rollouts_html(rollouts: Sequence[Rollout], empty: str = "no rollout yet") -> str:
    rows = [
        [str(r.id), esc(r.model), f"v{r.version}", scope(r), rollout_state(r),
         str(len(r.devices)), counts(r.device_states), str(r.failed), verdict_html(r)]
        for r in reversed(rollouts)
    ]  # fmt: skip
    return table(
        ["id", "model", "version", "reaches", "state", "devices", "per state", "failed",
         "canary verdict"],
        rows,
        empty,
    )  # fmt: skip


def verdict_html(r: Rollout) -> str:
    verdict = dict(r.verdict)
    if not verdict:
        return "—"
    word = str(verdict.get("verdict", ""))
    css = "failed" if word == "regressed" else ""
    return f"<span class={css or 'ok'}>{esc(word)}</span>: {esc(verdict.get('reason', ''))}"


def canaries_html(rollouts: Sequence[Rollout]) -> str:
    """Each judged canary beside its baseline: the figures its verdict came from."""
    rows = []
    for r in reversed(rollouts):
        verdict = dict(r.verdict)
        if not verdict:
            continue
        for side in ("canary", "baseline"):
            c = dict(verdict.get(side, {}))
            rows.append(
                [str(r.id) if side == "canary" else "", esc(r.model), esc(side),
                 f"v{c.get('version', 0)}", str(c.get("requests", 0)),
                 f"{float(c.get('error_rate', 0)):.2%}", f"{float(c.get('p99_ms', 0)):.1f} ms",
                 human_bytes(int(c.get("mean_rss_bytes", 0))),
                 verdict_html(r) if side == "canary" else ""]
            )  # fmt: skip
    return table(
        ["rollout", "model", "cohort", "version", "requests", "error rate", "p99",
         "mean memory", "verdict"],
        rows,
        "no canary judged yet",
    )  # fmt: skip


def sparkline(values: Sequence[float], label: str) -> str:
    """An inline SVG line of `values` (oldest first), with its last value as text."""
    if not values:
        return "—"
    top = max(values) or 1.0
    step = 100 / max(len(values) - 1, 1)
    points = " ".join(f"{i * step:.1f},{20 - 18 * v / top:.1f}" for i, v in enumerate(values))
    return (
        f'<svg class=spark viewBox="0 0 100 20" preserveAspectRatio=none role=img '
        f'aria-label="{esc(label)}"><polyline points="{points}"/></svg> {esc(label)}'
    )


def health_html(series: dict[tuple[str, int, str], list[Point]], now: float) -> str:
    """Per model version and group, the last day by the hour: requests, error rate, p99."""
    rows = []
    fleet: dict[int, Point] = {}  # every version and group together, by hour
    for points in series.values():
        for p in points:
            was = fleet.get(p.start, Point(p.start, Counters(), 0.0, 0))
            counters = was.counters.plus(p.counters)
            fleet[p.start] = Point(
                p.start, counters, was.rss_sum + p.rss_sum, was.reports + p.reports
            )
    if fleet:
        series = {("the whole fleet", 0, ""): sorted(fleet.values(), key=lambda p: p.start),
                  **series}  # fmt: skip
    for (model, version, group), points in series.items():
        hourly = _hourly(points, now)
        requests = [p.counters.requests for p in hourly]
        errors = [_error_rate(p) for p in hourly]
        p99 = [p99_ms(p.counters.buckets) for p in hourly]
        last = points[-1]  # the labels: the latest hour reported
        rows.append(
            [esc(model), f"v{version}" if version else "all", esc(group or "—"),
             sparkline(requests, f"{last.counters.requests}/h"),
             sparkline(errors, f"{_error_rate(last):.2%}"),
             sparkline(p99, f"{p99_ms(last.counters.buckets):.1f} ms")]
        )  # fmt: skip
    return table(
        ["model", "version", "group", "requests (24 h)", "error rate", "p99"],
        rows,
        "no health reported yet",
    )


def device_health_html(points: list[Point], now: float) -> str:
    if not points:
        return "—"
    hourly = _hourly(points, now)
    requests = [p.counters.requests for p in hourly]
    errors = [_error_rate(p) for p in hourly]
    p99 = [p99_ms(p.counters.buckets) for p in hourly]
    memory = [p.rss_sum / p.reports if p.reports else 0.0 for p in hourly]
    last = points[-1]  # the labels: the latest hour reported
    return "<br>".join(
        (sparkline(requests, f"{last.counters.requests} requests/h"),
         sparkline(errors, f"{_error_rate(last):.2%} failed"),
         sparkline(p99, f"p99 {p99_ms(last.counters.buckets):.1f} ms"),
         sparkline(memory, f"{human_bytes(int(last.rss_sum / max(last.reports, 1)))} memory"),
         f"{human_bytes(int(last.disk_free))} free")
    )  # fmt: skip


def filter_form(wanted: dict[str, str]) -> str:
    """The devices page's filters (a GET form: the query string is the filter)."""
    fields = "".join(
        f'<label>{esc(name)} <input name={name} value="{esc(value)}" size=10 '
        f'placeholder="{esc(hint)}"></label> '
        for (name, value), hint in zip(
            wanted.items(), ("any", "any", "serving, failed, stale…"), strict=True
        )
    )
    return f"<form method=get action=/devices class=filters>{fields}<button>filter</button></form>"


def _matches(device: Device, wanted: dict[str, str], now: float) -> bool:
    """Whether a device passes the filters: its group, a version it serves, and a state of
    one of its reports ("stale": not seen for STALE_S)."""
    group, version, state = wanted["group"], wanted["version"], wanted["state"]
    if group and device.group != group:
        return False
    if version and not any(str(r.serving_version) == version.lstrip("v") for r in device.reports):
        return False
    if state == "stale":
        return now - device.last_seen > STALE_S
    return not state or any(r.state == state for r in device.reports)


def _error_rate(point: Point) -> float:
    c = point.counters
    return c.failures / c.requests if c.requests else 0.0


def _hourly(points: list[Point], now: float, hours: int = 24) -> list[Point]:
    """The last `hours` hours, an empty point where nothing was reported."""
    by_start = {p.start: p for p in points}
    first = int(now // 3600 * 3600) - (hours - 1) * 3600
    return [by_start.get(first + 3600 * i, Point(first + 3600 * i, Counters(), 0.0, 0))
            for i in range(hours)]  # fmt: skip


def learning_html(tasks: Sequence[tuple[LearningTaskRow, list[VersionRow]]]) -> str:
    if not tasks:
        return "<p class=empty>no learning task</p>"
    parts = []
    for task, versions in tasks:
        c = task.counters
        cards = "".join(
            f"<div class=card>{esc(label)}<b>{value}</b></div>"
            for label, value in (
                ("state", esc(task.state)),
                ("global version", task.global_version),
                ("updates received", c.get("received", 0)),
                ("dropped (stale)", c.get("dropped_stale", 0)),
                ("refused", c.get("refused", 0)),
                ("devices", len(task.devices)),
            )
        )
        parts.append(
            f"<section><h2>task {task.id}: {esc(task.model)} from v{task.base_version}</h2>"
            f"<div class=cards>{cards}</div>"
            f"<p>validation accuracy per global version (base {task.base_accuracy:.4f})</p>"
            f"{accuracy_plot(versions, task.base_accuracy)}</section>"
        )
    return "".join(parts)


class Dashboard:
    def __init__(
        self, db: Db, registry: Any, blobs: Any, publisher_token: str, tls: bool = False
    ) -> None:
        self._db = db
        self._registry = registry
        self._blobs = blobs
        self._token = publisher_token
        self._secure = tls
        self._sessions: dict[str, float] = {}  # session id -> expiry
        self._attempts: dict[str, list[float]] = {}  # address -> recent login attempts
        self._sizes: tuple[float, int, int] = (0.0, 0, 0)  # (when, database, blobs)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 << 10, middlewares=[self._guard])
        app.add_routes(
            [
                web.get("/", self._overview),
                web.get("/devices", self._devices),
                web.get("/rollouts", self._rollouts),
                web.get("/health", self._health),
                web.get("/learning", self._learning),
                web.get("/login", self._login_form),
                web.post("/login", self._login),
                web.get("/logout", self._logout),
            ]
        )
        return app

    # -- who may read ---------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        token = auth.bearer_token(request.headers.get("Authorization", ""))
        if token:
            return auth.same(token, self._token)
        session = request.cookies.get(COOKIE, "")
        expiry = self._sessions.get(session)
        return expiry is not None and expiry > time.time()

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        login = request.path == "/login"
        if request.method not in ("GET", "HEAD") and not (login and request.method == "POST"):
            return web.Response(
                status=405, text="the dashboard is read-only\n", headers={"Allow": "GET"}
            )
        if not login and not self._authorized(request):
            return web.Response(
                status=401,
                content_type="text/html",
                text='<!doctype html><meta name=viewport content="width=device-width">'
                '<p>Sign in with the publisher token: <a href="/login">log in</a></p>',
                headers={"WWW-Authenticate": 'Bearer realm="edge-agent fleet"'},
            )
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status in (301, 302, 303):
                raise
            return web.Response(status=exc.status, text=f"{exc.reason}\n")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
            "connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'"
        )
        return response

    async def _login_form(self, request: web.Request) -> web.Response:
        return self._form("")

    def _form(self, message: str, status: int = 200) -> web.Response:
        note = f"<p class=failed>{esc(message)}</p>" if message else ""
        body = (
            "<!doctype html><html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width,initial-scale=1">'
            f"<title>Log in · edge-agent fleet</title><style>{STYLE}</style></head><body>"
            '<form method=post action="/login"><h1>edge-agent fleet</h1>'
            f"{note}<label>Publisher token<input name=token type=password "
            "autocomplete=current-password required></label><button>Log in</button>"
            "<p><small>The token stays on this control plane; the browser keeps only a "
            "session cookie.</small></p></form></body></html>"
        )
        return web.Response(status=status, content_type="text/html", text=body)

    async def _login(self, request: web.Request) -> web.Response:
        address = request.remote or "?"
        now = time.time()
        recent = [t for t in self._attempts.get(address, []) if now - t < 60]
        if len(recent) >= LOGIN_ATTEMPTS_PER_MINUTE:
            self._attempts[address] = recent
            return self._form("too many attempts; wait a minute", 429)
        recent.append(now)
        self._attempts[address] = recent
        if len(self._attempts) > 10_000:  # bounded: forget the quietest addresses
            self._attempts = {a: t for a, t in self._attempts.items() if now - t[-1] < 60}
        try:
            form = await request.post()
        except ValueError:  # not a form: undecodable, a multipart body without its boundary
            return self._form("the login form could not be read", 400)
        token = str(form.get("token", ""))
        if not auth.same(token.strip(), self._token):
            log.warning("dashboard.login_refused", address=address)
            return self._form("that is not the publisher token", 401)
        session = secrets.token_urlsafe(32)
        self._sessions = {s: e for s, e in self._sessions.items() if e > now}
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.pop(min(self._sessions, key=self._sessions.__getitem__))
        self._sessions[session] = now + SESSION_SECONDS
        log.info("dashboard.login", address=address)
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            COOKIE, session, max_age=SESSION_SECONDS, httponly=True, samesite="Strict",
            secure=self._secure, path="/",
        )  # fmt: skip
        raise response

    async def _logout(self, request: web.Request) -> web.Response:
        self._sessions.pop(request.cookies.get(COOKIE, ""), None)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(COOKIE, path="/")
        raise response

    # -- pages ----------------------------------------------------------------------------

    def _answer(self, request: web.Request, title: str, content: str, now: float) -> web.Response:
        content += stamp(now)
        if request.query.get("fragment"):
            return web.Response(content_type="text/html", text=content)
        return web.Response(content_type="text/html", text=page(title, content, now))

    async def _sizes_now(self) -> tuple[int, int]:
        """Database and blob store sizes, measured at most once a minute (a bucket listing is
        not free)."""
        at, database, blobs = self._sizes
        if time.monotonic() - at > 60 or not at:
            database = await self._db(self._registry.size_bytes)
            blobs = await asyncio.to_thread(self._blobs.total_bytes)
            self._sizes = (time.monotonic(), database, blobs)
        return database, blobs

    async def _overview(self, request: web.Request) -> web.Response:
        now = time.time()
        devices = await self._db(self._registry.devices)
        rollouts = await self._db(self._registry.rollouts)
        tasks = await self._db(self._registry.tasks, 0, False)
        database, blobs = await self._sizes_now()
        recent = sum(1 for d in devices if now - d.last_seen < 120)
        failing = sum(1 for d in devices if any(r.state == "failed" for r in d.reports))
        paused = [r for r in rollouts if r.state == PAUSED]
        cards = "".join(
            f"<div class=card>{esc(label)}<b>{value}</b></div>"
            for label, value in (
                ("devices", len(devices)),
                ("seen in 2 min", recent),
                ("failing an install", failing),
                ("rollouts", len(rollouts)),
                ("paused", len(paused)),
                ("learning tasks", len(tasks)),
                ("database", human_bytes(database)),
                ("blob store", human_bytes(blobs)),
            )
        )
        content = f"<div class=cards>{cards}</div><h2>Paused rollouts</h2>" + rollouts_html(
            paused, "no paused rollout" if rollouts else "no rollout yet"
        )
        return self._answer(request, "Overview", content, now)

    async def _devices(self, request: web.Request) -> web.Response:
        now = time.time()
        after = request.query.get("after", "")[:128]
        devices = await self._db(self._registry.devices, after, PAGE_DEVICES + 1)
        wanted = {k: request.query.get(k, "")[:128].strip() for k in ("group", "version", "state")}
        shown = [d for d in devices[:PAGE_DEVICES] if _matches(d, wanted, now)]
        health = await self._db(
            self._registry.device_series, [d.device_id for d in shown], now - 86400
        )
        content = filter_form(wanted) + devices_html(shown, now, health)
        if len(devices) > PAGE_DEVICES:
            last = devices[PAGE_DEVICES - 1].device_id
            content += f'<p><a href="/devices?after={esc(last)}">next {PAGE_DEVICES}</a></p>'
        return self._answer(request, "Devices", content, now)

    async def _rollouts(self, request: web.Request) -> web.Response:
        now = time.time()
        rollouts = await self._db(self._registry.rollouts)
        content = rollouts_html(rollouts) + "<h2>Canaries against their baselines</h2>"
        content += canaries_html([r for r in rollouts if r.scope == "canary"])
        return self._answer(request, "Rollouts", content, now)

    async def _health(self, request: web.Request) -> web.Response:
        now = time.time()
        series = await self._db(self._registry.health_series, now - 86400)
        return self._answer(request, "Health", health_html(series, now), now)

    async def _learning(self, request: web.Request) -> web.Response:
        now = time.time()

        def read() -> list[tuple[LearningTaskRow, list[VersionRow]]]:
            return [(t, self._registry.versions(t.id)) for t in self._registry.tasks(0, False)]

        return self._answer(request, "Learning", learning_html(await self._db(read)), now)


async def start(app: web.Application, address: str, tls: Any = None) -> tuple[web.AppRunner, int]:
    from edge_agent.rpc.web import serve

    return await serve(app, address, "--dashboard-address", idle_seconds=30, tls=tls)
