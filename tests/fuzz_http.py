"""Fuzzing the HTTP listeners: the daemon's KServe v2 REST API (inference and control
listeners, api/http.py) and the control plane's dashboard (controlplane/dashboard.py). Driven by
benchmarks/fuzz.py.

- Paths: every route with random model names and versions (quoted and raw), Triton's routes
  this agent does not serve (shared memory, trace, logging, generate), odd ones (dot segments,
  NUL, bad percent escapes, overlong, absolute URLs), query strings.
- Methods: the usual seven and random tokens.
- Bodies: random JSON; valid infer requests for the test repository's models with hypothesis'
  changes (datatype, shape, data, parameters, outputs); the binary tensor extension with
  `Inference-Header-Content-Length` right, wrong, huge, negative or not a number and
  binary_data_size that does not add up; load / unload bodies (config, file:, parameters).
- The wire: truncated bodies (Content-Length above what is sent, then a half-close), malformed
  request lines and headers, chunked bodies with bad chunks (raw sockets).
- Dashboard: every page, random paths, query strings (fragment, after), headers (Bearer right,
  wrong, empty; cookies; methods), the login form with random fields.
"""

from __future__ import annotations

import base64
import json
import random
import struct
import urllib.parse
from typing import Any

from fuzzing import (
    Http,
    Tally,
    Targets,
    deep_json,
    hypothesis_settings,
    mutate_bytes,
    mutate_json,
)
from hypothesis import given
from hypothesis import strategies as st

MODELS = ["digits", "alltypes", "text", "echo", "fixed", "int8", "broken", "no-such", ""]
SACRIFICIAL = ["echo", "fixed", "int8", "broken", "no-such", "mismatch", "evil"]
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
DATATYPES += ["FP16", "FP32", "FP64", "BYTES", "BF16"]
METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]
HEADER = "Inference-Header-Content-Length"
UNSERVED = [
    "/v2/systemsharedmemory/status",
    "/v2/systemsharedmemory/region/r1/status",
    "/v2/systemsharedmemory/region/r1/register",
    "/v2/systemsharedmemory/region/r1/unregister",
    "/v2/systemsharedmemory/unregister",
    "/v2/cudasharedmemory/status",
    "/v2/cudasharedmemory/region/r1/register",
    "/v2/trace/setting",
    "/v2/logging",
    "/v2/models/digits/generate",
    "/v2/models/digits/generate_stream",
    "/metrics",
]
ODD_PATHS = [
    "",
    "/",
    "*",
    "//v2//models//digits",
    "/v2/models/../models/digits",
    "/v2/models/%2e%2e/infer",
    "/v2/models/a%00b/ready",
    "/v2/models/%zz/ready",
    "/v2/models/%F0%9F%98%80",
    "/v2/../../etc",
    "http://evil.example/v2",
    "/v2?" + "&" * 100,
    "/v2/models/digits/versions/-1",
    "/v2/models/digits/versions/99999999999999999999999",
    "/v2/models/digits/versions/%C2%B2",
    "/v2/models/" + "a" * 9000,
    "/" + "x" * 70000,
    "/v2/health/live?x=" + "%" * 10,
    "/v2/repository/models/%2E%2E%2F%2E%2E/load",
    "/v2/repository/models//load",
]


def routes(model: str, version: str) -> list[str]:
    base = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
    return [
        "/v2/health/live",
        "/v2/health/ready",
        "/v2",
        "/v2/models/stats",
        base,
        base + "/ready",
        base + "/config",
        base + "/stats",
        base + "/infer",
        "/v2/repository/index",
        f"/v2/repository/models/{model}/load",
        f"/v2/repository/models/{model}/unload",
    ]


names = st.sampled_from(MODELS) | st.text(max_size=12)
versions = st.sampled_from(["", "1", "2", "0", "-1", "99", "x", "²"]) | st.text(max_size=6)


@st.composite
def paths(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.sampled_from(UNSERVED + ODD_PATHS))
    if kind == 1:
        return "/" + draw(st.text(max_size=40))  # raw: anything, control characters included
    model, version = draw(names), draw(versions)
    if draw(st.booleans()):
        model, version = urllib.parse.quote(model, safe=""), urllib.parse.quote(version, safe="")
    path = draw(st.sampled_from(routes(model, version)))
    if kind == 4:
        path += "?" + draw(st.text(max_size=30))
    return path


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
dims = st.integers(0, 4) | st.sampled_from([-1, 2**31, 2**63, 2**64, 10**30]) | json_values


@st.composite
def input_entries(draw: st.DrawFn) -> dict[str, Any]:
    """One input: a plausible one for the test repository's models, then changed."""
    name = draw(st.sampled_from(["input", "x", "in_FP32", "in_BYTES", "in_INT8", "in_BOOL"]))
    datatype = draw(st.sampled_from(DATATYPES) | json_values)
    shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3) | st.lists(dims, max_size=4))
    count = 1
    for d in shape:
        count *= d if isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 8 else 1
    values = st.floats(width=32) | st.integers(-300, 300) | st.booleans() | st.text(max_size=4)
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if draw(st.booleans()):
        entry["data"] = draw(st.lists(values, min_size=count, max_size=count) | json_values)
    if draw(st.integers(0, 3)) == 0:
        entry["parameters"] = draw(
            st.dictionaries(
                st.sampled_from(["binary_data_size", "shared_memory_region", "x"]), json_values
            )
        )
    return entry


DIGITS_INPUT = {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}
TEMPLATES: list[dict[str, Any]] = [
    {"inputs": [DIGITS_INPUT]},
    {"id": "a", "inputs": [DIGITS_INPUT], "outputs": [{"name": "label"}]},
    {"inputs": [DIGITS_INPUT], "parameters": {"binary_data_output": True}},
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]},
    {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "bc"]}]},
    {"inputs": [{"name": "in_INT8", "datatype": "INT8", "shape": [1, 1], "data": [1]}]},
]
TEMPLATE_MODELS = ["digits", "digits", "digits", "echo", "text", "alltypes"]


def binary_body(document: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, int]:
    header = json.dumps(document).encode()
    return header + b"".join(blobs), len(header)


@st.composite
def infer_bodies(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """(model, body, headers): JSON or the binary extension, valid or changed."""
    kind = draw(st.integers(0, 3))
    headers = {
        "Content-Type": draw(
            st.sampled_from(
                [
                    "application/json",
                    "application/octet-stream",
                    "text/plain",
                    "",
                    "application/json; charset=latin-1",
                ]
            )
        )
    }
    encoding = draw(st.sampled_from([None, None, "identity", "gzip", "br", "x"]))
    if encoding is not None:  # anything but identity is refused: bodies are not decompressed
        headers["Content-Encoding"] = encoding
    if kind == 0:  # a valid template, with hypothesis' changes to its JSON
        i = draw(st.integers(0, len(TEMPLATES) - 1))
        changed = mutate_json(draw(st.randoms(use_true_random=False)), TEMPLATES[i])
        return TEMPLATE_MODELS[i], json.dumps(changed).encode(), headers
    if kind == 1:  # generated inputs
        document: Any = {"inputs": draw(st.lists(input_entries(), max_size=3))}
        if draw(st.booleans()):
            document["outputs"] = draw(
                st.lists(
                    st.fixed_dictionaries(
                        {"name": st.sampled_from(["label", "probabilities", "y", "zzz"])},
                        optional={"parameters": json_values},
                    ),
                    max_size=2,
                )
            )
        if draw(st.booleans()):
            document["parameters"] = draw(
                st.dictionaries(
                    st.sampled_from(["binary_data_output", "priority", "timeout", "x"])
                    | st.text(max_size=5),
                    json_values,
                    max_size=3,
                )
            )
        return draw(st.sampled_from(MODELS)), json.dumps(document).encode(), headers
    if kind == 2:  # the binary extension: sizes and the header length right or wrong
        rows = draw(st.integers(0, 3))
        blob = draw(st.binary(min_size=0, max_size=512) | st.just(b"\x00" * (256 * max(rows, 1))))
        size = draw(st.sampled_from([len(blob), 0, len(blob) + 1, -1, 2**40]) | json_values)
        entry = {
            "name": "input",
            "datatype": "FP32",
            "shape": [rows, 64],
            "parameters": {"binary_data_size": size},
        }
        body, length = binary_body({"inputs": [entry]}, [blob])
        headers[HEADER] = draw(
            st.sampled_from(
                [
                    str(length),
                    str(length + 1),
                    str(length - 1),
                    "0",
                    "-1",
                    "-0",
                    str(len(body)),
                    str(len(body) + 1),
                    "99999999999999999999999",
                    "1e3",
                    " 12 ",
                    "0x10",
                    "",
                    "nan",
                    "\N{FULLWIDTH DIGIT ONE}\N{FULLWIDTH DIGIT TWO}",
                    "٣",
                ]
            )
            | st.integers(-(2**70), 2**70).map(str)
        )
        return "digits", body, headers
    body = draw(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
    if draw(st.booleans()):
        headers[HEADER] = draw(st.integers(-5, 400).map(str) | st.text(max_size=6))
    return draw(st.sampled_from(MODELS)), body, headers


load_parameters = st.dictionaries(
    st.sampled_from(
        [
            "config",
            "file:1/model.onnx",
            "file:²/model.onnx",
            "file:1/../x",
            "file:1/.hidden",
            "rollback",
            "unload_dependents",
            "x",
        ]
    )
    | st.text(max_size=10),
    json_values | st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    max_size=3,
)


def known_bug(path: str, body: bytes | None) -> str | None:
    """The entry of fuzzing.KNOWN_BUGS this request triggers, if any: none of this listener's
    are open now (a Unicode-digit version and a too-deep config were fixed; the fuzzing replays
    them as regressions)."""
    return None


PROTECTED = {"digits", "alltypes", "text"}  # what the other fuzzers infer on: never unloaded


class DaemonHttp(Http):
    """The daemon's HTTP listeners: known bugs recognised, the protected models never loaded
    or unloaded (another name is sent instead)."""

    def request(
        self,
        listener: str,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        known: str | None = None,
    ) -> tuple[int | str, bytes]:
        parts = path.split("/")
        if (
            len(parts) > 4
            and parts[2] == "repository"
            and urllib.parse.unquote(parts[4]) in PROTECTED
        ):
            parts[4] += "-not"
            path = "/".join(parts)
        return super().request(
            listener, method, path, body, headers, known or known_bug(path, body)
        )


def daemon_fuzzers(targets: Targets, tally: Tally, examples: int, seed: int) -> list[Any]:
    """Hypothesis searches of the daemon's two HTTP listeners."""
    inference = DaemonHttp(targets.daemon_http, tally)
    control = DaemonHttp(targets.daemon_http_control, tally)
    run = hypothesis_settings(examples, seed)

    @run
    @given(
        st.sampled_from(METHODS) | st.text(min_size=1, max_size=8),
        paths(),
        st.none() | st.binary(max_size=200),
        st.booleans(),
    )
    def anything(method: str, path: str, body: bytes | None, on_control: bool) -> None:
        (control if on_control else inference).request(
            "http.control" if on_control else "http.inference", method, path, body
        )

    @run
    @given(infer_bodies(), versions, st.booleans())
    def infer(case: tuple[str, bytes, dict[str, str]], version: str, on_control: bool) -> None:
        model, body, headers = case
        path = f"/v2/models/{urllib.parse.quote(model, safe='')}"
        if version and version.isascii() and version.isalnum():
            path += f"/versions/{version}"
        listener = "http.control" if on_control else "http.inference"
        (control if on_control else inference).request(
            listener, "POST", path + "/infer", body, headers
        )

    @run
    @given(
        st.sampled_from(["load", "unload", "index"]),
        st.sampled_from(SACRIFICIAL) | st.text(max_size=10),
        st.none() | load_parameters.map(lambda p: {"parameters": p}) | json_values,
        st.sampled_from([None, "", "Bearer x", "Basic abc", "Bearer"]),
        st.booleans(),
    )
    def repository(
        action: str, model: str, document: Any, auth: str | None, on_inference: bool
    ) -> None:
        if action == "index":
            path = "/v2/repository/index"
        else:
            path = f"/v2/repository/models/{urllib.parse.quote(model, safe='')}/{action}"
        headers = {"Authorization": auth} if auth is not None else {}
        body = b"" if document is None else json.dumps(document).encode()
        if on_inference:
            inference.request("http.inference", "POST", path, body, headers)
        else:
            control.request("http.control", "POST", path, body, headers)

    @run
    @given(st.integers(0, 5), st.binary(max_size=64), st.integers(1, 5000), st.booleans())
    def wire(kind: int, junk: bytes, declared: int, on_control: bool) -> None:
        client, listener = (
            (control, "http.control") if on_control else (inference, "http.inference")
        )
        client.raw(listener, raw_case(kind, junk, declared), cut=kind in (0, 3, 4))

    return [anything, infer, repository, wire]


def raw_case(kind: int, junk: bytes, declared: int) -> bytes:
    """What http.client will not send: cut bodies, bad request lines, bad chunks."""
    if kind == 0:  # Content-Length above what comes, then the half-close
        head = (
            f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n"
            f"Content-Type: application/json\r\n\r\n"
        ).encode()
        return head + json.dumps(TEMPLATES[0]).encode()[: max(0, declared - 1)] + junk[:0]
    if kind == 1:  # a request line of junk (empty lines before one are skipped: RFC 9112)
        return (junk.strip(b"\r\n") or b"x") + b"\r\n\r\n"
    if kind == 2:  # a header of junk
        return b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-" + junk + b": 1\r\n\r\n"
    if kind == 3:  # chunked with bad chunk sizes
        return (
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + f"{declared:x}\r\n".encode()
            + junk
            + b"\r\n0\r\n\r\n"
        )
    if kind == 4:  # the binary extension cut short
        body, length = binary_body(
            {
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": [1, 64],
                        "parameters": {"binary_data_size": 256},
                    }
                ]
            },
            [b"\x00" * 256],
        )
        head = (
            f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            f"{HEADER}: {length}\r\n\r\n"
        ).encode()
        return head + body[: declared % len(body)]
    return b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n" + junk


# -- the dashboard -----------------------------------------------------------------------------

PAGES = ["/", "/devices", "/rollouts", "/learning", "/login", "/logout"]


def dashboard_fuzzers(targets: Targets, tally: Tally, examples: int, seed: int) -> list[Any]:
    board = Http(targets.dashboard, tally)
    run = hypothesis_settings(examples, seed)
    good = f"Bearer {targets.publisher_token}"
    auth = st.sampled_from(
        [
            good,
            good,
            "",
            "Bearer",
            "Bearer wrong",
            "bearer " + targets.publisher_token,
            "Basic eDp5",
        ]
    ) | st.text(max_size=20)
    queries = st.none() | st.dictionaries(
        st.sampled_from(["fragment", "after", "x", ""]) | st.text(max_size=5),
        st.sampled_from(["1", "", "0", "a" * 300, "'\"<script>", "\x00"]) | st.text(max_size=12),
        max_size=3,
    )

    @run
    @given(
        st.sampled_from(["GET", "GET", "HEAD", "POST", "PUT", "DELETE"])
        | st.text(min_size=1, max_size=6),
        st.sampled_from(PAGES) | paths() | st.text(max_size=20).map(lambda t: "/" + t),
        queries,
        auth,
        st.none() | st.text(max_size=40).map(lambda v: f"ea_session={v}"),
        st.none() | st.binary(max_size=100),
    )
    def pages(
        method: str,
        path: str,
        query: dict[str, str] | None,
        authorization: str,
        cookie: str | None,
        body: bytes | None,
    ) -> None:
        if query is not None:
            path += "?" + urllib.parse.urlencode(query)
        headers = {"Authorization": authorization}
        if cookie is not None:
            headers["Cookie"] = cookie
        board.request("http.dashboard", method, path, body, headers)

    @run
    @given(
        st.dictionaries(
            st.sampled_from(["token", "x", ""]) | st.text(max_size=5),
            st.text(max_size=50) | st.just(targets.publisher_token),
            max_size=3,
        ),
        st.sampled_from(
            [
                "application/x-www-form-urlencoded",
                "multipart/form-data",
                "multipart/form-data; boundary=x",
                "application/json",
                "",
            ]
        ),
        st.booleans(),
        st.binary(max_size=80),
    )
    def login(form: dict[str, str], content_type: str, encoded: bool, junk: bytes) -> None:
        body = urllib.parse.urlencode(form).encode() if encoded else junk
        board.request("http.dashboard", "POST", "/login", body, {"Content-Type": content_type})

    return [pages, login]


# -- the fast loop: mutations of valid requests -------------------------------------------------


def daemon_mutations(targets: Targets, tally: Tally) -> list[tuple[float, Any]]:
    inference = DaemonHttp(targets.daemon_http, tally)
    control = DaemonHttp(targets.daemon_http_control, tally)
    bodies = [json.dumps(t).encode() for t in TEMPLATES]
    digits_binary, digits_length = binary_body(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 64],
                    "parameters": {"binary_data_size": 256},
                }
            ]
        },
        [struct.pack("<64f", *([0.25] * 64))],
    )

    def json_infer(rng: random.Random) -> None:
        i = rng.randrange(len(TEMPLATES))
        document = mutate_json(rng, TEMPLATES[i])
        body = json.dumps(document).encode()
        if rng.random() < 0.3:
            body = mutate_bytes(rng, body, bodies)
        elif rng.random() < 0.03:
            body = deep_json(rng).encode()
        inference.request("http.inference", "POST", f"/v2/models/{TEMPLATE_MODELS[i]}/infer", body)

    def binary_infer(rng: random.Random) -> None:
        body, length = digits_binary, digits_length
        op = rng.randrange(4)
        headers = {HEADER: str(length)}
        if op == 0:
            headers[HEADER] = rng.choice(
                [
                    "-1",
                    "0",
                    str(len(body) + 1),
                    str(2**63),
                    "x",
                    "",
                    str(length + rng.randint(-40, 40)),
                ]
            )
        elif op == 1:
            body = body[: rng.randrange(len(body))]
        elif op == 2:
            body = mutate_bytes(rng, body)
        else:
            head = json.loads(body[:length])
            head = mutate_json(rng, head)
            text = json.dumps(head).encode()
            body, headers[HEADER] = text + body[length:], str(len(text))
        inference.request("http.inference", "POST", "/v2/models/digits/infer", body, headers)

    def reads(rng: random.Random) -> None:
        model = rng.choice([*MODELS, rng.choice(["a" * 500, "%00", "..", "²"])])
        path = rng.choice(
            routes(urllib.parse.quote(model, safe=""), rng.choice(["", "1", "2", "0", "99"]))
        )
        if path.endswith(("/infer", "/load", "/unload", "/index")):
            path = "/v2/health/ready"
        method = rng.choice(["GET", "GET", "GET", "HEAD", "POST", "DELETE", "OPTIONS"])
        client = control if rng.random() < 0.3 else inference
        client.request(
            "http.control" if client is control else "http.inference",
            method,
            path,
            None if method in ("GET", "HEAD") else b"{}",
        )

    def repository(rng: random.Random) -> None:
        model = rng.choice(SACRIFICIAL)
        action = rng.choice(["load", "unload", "unload", "index"])
        path = (
            "/v2/repository/index"
            if action == "index"
            else f"/v2/repository/models/{model}/{action}"
        )
        document = mutate_json(rng, {"parameters": {"config": "{}", "unload_dependents": False}})
        body = json.dumps(document).encode()
        if rng.random() < 0.1:  # nested too deep: the body, or the config it carries
            body = deep_json(rng).encode()
            if action == "load" and rng.random() < 0.5:
                body = json.dumps({"parameters": {"config": deep_json(rng)}}).encode()
        client = control if rng.random() < 0.8 else inference
        listener = "http.control" if client is control else "http.inference"
        client.request(listener, "POST", path, body)

    def odd(rng: random.Random) -> None:
        path = rng.choice(UNSERVED + ODD_PATHS)
        method = rng.choice(METHODS)
        client = control if rng.random() < 0.3 else inference
        client.request("http.control" if client is control else "http.inference", method, path, b"")

    def wire(rng: random.Random) -> None:
        kind = rng.randrange(6)
        client = control if rng.random() < 0.2 else inference
        client.raw(
            "http.control" if client is control else "http.inference",
            raw_case(kind, rng.randbytes(rng.randint(0, 40)), rng.randint(1, 3000)),
            cut=kind in (0, 3, 4),
        )

    return [
        (8.0, json_infer),
        (5.0, binary_infer),
        (4.0, reads),
        (0.3, repository),
        (2.0, odd),
        (0.7, wire),
    ]


def dashboard_mutations(targets: Targets, tally: Tally) -> list[tuple[float, Any]]:
    board = Http(targets.dashboard, tally)
    good = {"Authorization": f"Bearer {targets.publisher_token}"}

    def pages(rng: random.Random) -> None:
        path = rng.choice(PAGES[:4])
        if rng.random() < 0.5:
            path += "?" + rng.choice(
                [
                    "fragment=1",
                    "after=" + rng.choice(["", "edge", "a" * 200, "%00", "%zz", "'"]),
                    "fragment=1&after=z",
                    "x=" + "y" * 1000,
                ]
            )
        headers = dict(good)
        if rng.random() < 0.3:
            headers["Authorization"] = rng.choice(
                ["", "Bearer", "Bearer x", "Bearer " + targets.publisher_token[:-1]]
            )
        if rng.random() < 0.2:
            headers["Cookie"] = f"ea_session={rng.randbytes(8).hex()}"
        method = rng.choice(["GET"] * 8 + ["HEAD", "POST", "PUT"])
        board.request(
            "http.dashboard", method, path, None if method in ("GET", "HEAD") else b"x", headers
        )

    def odd(rng: random.Random) -> None:
        board.request(
            "http.dashboard", rng.choice(METHODS), rng.choice(ODD_PATHS + UNSERVED), None, good
        )

    def login(rng: random.Random) -> None:
        body = mutate_bytes(rng, b"token=" + rng.choice([b"x", targets.publisher_token.encode()]))
        board.request(
            "http.dashboard",
            "POST",
            "/login",
            body,
            {"Content-Type": "application/x-www-form-urlencoded"},
        )

    return [(8.0, pages), (1.0, odd), (0.5, login)]


# -- what this fuzzing found, replayed ---------------------------------------------------------


def regressions(targets: Targets, tally: Tally) -> dict[str, bool]:
    """Each request that once got a 500 (or an error logged with a traceback), and the answer
    it gets since the fix."""
    inference = DaemonHttp(targets.daemon_http, tally)
    board = Http(targets.dashboard, tally)
    digits = "/v2/models/digits/infer"

    def infer(document: Any) -> int | str:
        return inference.request("regression", "POST", digits, json.dumps(document).encode())[0]

    entry = dict(DIGITS_INPUT)
    return {
        "http: a datatype that is not a string": infer({"inputs": [{**entry, "datatype": {}}]})
        == 400,
        "http: a datatype that is a list": infer({"inputs": [{**entry, "datatype": []}]}) == 400,
        "http: a parameter beyond int64": infer(
            {"inputs": [entry], "parameters": {"p": -(2**63) - 1}}
        )
        == 400,
        "http: a dim beyond int64": infer({"inputs": [{**entry, "shape": [2**64, 64]}]}) == 400,
        "http: outputs that are not a list": infer({"inputs": [entry], "outputs": 5}) == 400,
        "http: JSON nested too deep": inference.request(
            "regression", "POST", digits, b"[" * 100_000
        )[0]
        == 400,
        "http: a body cut short (client gone)": inference.raw(
            "regression", raw_case(0, b"", 400), cut=True
        )
        in (400, "no answer"),
        "http: a chunk that does not add up": inference.raw(
            "regression", raw_case(3, b"x", 4000), cut=True
        )
        in (400, "no answer"),
        "http: a body said to be gzip that is not (drained after the refusal)": inference.request(
            "regression",
            "POST",
            digits,
            b"not gzip" * 100,
            {"Content-Encoding": "gzip"},
        )[0]
        == 400,
        "dashboard: a multipart login without its boundary": board.request(
            "regression",
            "POST",
            "/login",
            b"token=x",
            {"Content-Type": "multipart/form-data; boundary=x"},
        )[0]
        == 400,
        "dashboard: a login form that is not UTF-8": board.request(
            "regression",
            "POST",
            "/login",
            b"token=\xc7o\xf0\xd4",
            {"Content-Type": "application/x-www-form-urlencoded"},
        )[0]
        == 400,
    }
