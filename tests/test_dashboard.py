"""The control plane's fleet dashboard: in a real browser (Debian's Chromium, headless, driven
by Selenium through chromedriver), over a test control plane with two devices and a rollout
paused by their failures; a screenshot of every page; and the rules: credentials or 401, GET
only, no secret in any page."""

from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_sync import Fleet

from conftest import Daemon, wait_for
from edge_agent._proto import fleet_pb2 as pb
from edge_agent._proto import fleet_pb2_grpc as pb_grpc
from edge_agent.controlplane.dashboard import accuracy_plot, learning_html
from edge_agent.controlplane.registry import LearningTaskRow, VersionRow
from edge_agent.fleet import auth

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / ".artifacts" / "dashboard"  # kept after the run (ignored by git)


def report(
    fleet: Fleet,
    device: str,
    token: Path,
    state: str,
    serving: int,
    target: int,
    requests: int = 0,
) -> None:
    """What an agent's long-poll carries: one report (and, with `requests`, its health: that
    many served by `serving`, 2% failed, all within 2 ms), answered at once."""
    stub = pb_grpc.FleetServiceStub(grpc.insecure_channel(fleet.address))
    meta = auth.metadata(auth.read_token(token), device)
    r = pb.ModelReport(
        model="mlp",
        installed_version=serving,
        serving_version=serving,
        target_version=target,
        state=state,
        error="signature: not signed by a trusted key" if state == "failed" else "",
    )
    health = None
    if requests:
        buckets = [0] * 25  # the agent's latency buckets: the 4th ends at 2 ms
        buckets[3] = requests
        version = pb.VersionHealth(
            model="mlp", version=serving, requests=requests, failures=requests // 50,
            latency_us=requests * 1500, latency_buckets=buckets,
        )  # fmt: skip
        health = pb.DeviceHealth(
            boot=f"boot-{device}", uptime_seconds=600, rss_bytes=120 << 20,
            disk_free_bytes=5 << 30, versions=[version],
        )  # fmt: skip
    request = pb.WatchRequest(wait_ms=0, reports=[r], health=health)
    stub.WatchDesiredState(request, metadata=meta, timeout=10)


@pytest.fixture
def fleet(tmp_path: Path, start_daemon: Callable[..., Daemon]) -> Fleet:
    fleet = Fleet(tmp_path, start_daemon, "--dashboard-address", "127.0.0.1:0")
    tokens = {d: fleet.add_device(d, group) for d, group in (("edge-1", "lab"), ("edge-2", ""))}
    fleet.publish(fleet.mlp(1), 1)
    report(fleet, "edge-1", tokens["edge-1"], "serving", 1, 1)
    report(fleet, "edge-2", tokens["edge-2"], "serving", 1, 1)
    fleet.publish(fleet.mlp(2), 2)
    report(fleet, "edge-1", tokens["edge-1"], "serving", 2, 2, requests=500)
    report(fleet, "edge-2", tokens["edge-2"], "failed", 1, 2)  # 1 of 2 > 20%: auto-paused
    fleet.tokens = tokens  # type: ignore[attr-defined]
    return fleet


def base_url(fleet: Fleet) -> str:
    return f"http://127.0.0.1:{fleet.cp.named('controlplane.started')[0]['dashboard_port']}"


def fetch(
    url: str, method: str = "GET", token: str | None = None, data: bytes | None = None
) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, data=data)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def secrets_of(fleet: Fleet) -> list[str]:
    tokens = [auth.read_token(fleet.token_file)]
    tokens += [auth.read_token(t) for t in fleet.tokens.values()]  # type: ignore[attr-defined]
    return tokens + [auth.token_hash(t) for t in tokens]


def test_the_dashboard_refuses_without_credentials_and_changes_nothing(fleet: Fleet) -> None:
    url = base_url(fleet)
    publisher = auth.read_token(fleet.token_file)
    for path in ("/", "/devices", "/rollouts", "/learning"):
        assert fetch(url + path)[0] == 401
        assert fetch(url + path, token="not-the-token")[0] == 401
        status, body = fetch(url + path, token=publisher)
        assert status == 200 and "edge-agent fleet" in body
        assert not [s for s in secrets_of(fleet) if s in body]
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert fetch(url + "/rollouts", method, publisher, b"x")[0] == 405
    # The login form: a wrong token is refused, and guessing is rate-limited.
    wrong = urllib.parse.urlencode({"token": "guess"}).encode()
    codes = [fetch(url + "/login", "POST", data=wrong)[0] for _ in range(12)]
    assert codes[0] == 401 and codes[-1] == 429
    # Fragments (the in-place refresh) need credentials too.
    assert fetch(url + "/devices?fragment=1")[0] == 401


def test_the_pages_in_a_real_browser(fleet: Fleet, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.common.by import By

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    assert Path(chromium).exists() and Path(driver_path).exists(), (
        "the dashboard test needs Debian's chromium and chromium-driver (.ci/run installs them)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,900",
    ):  # fmt: skip
        options.add_argument(flag)
    browser = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=driver_path)
    )
    SHOTS.mkdir(parents=True, exist_ok=True)
    url = base_url(fleet)
    try:
        browser.get(url + "/")
        assert "log in" in browser.page_source.lower()  # 401 without a session
        browser.get(url + "/login")
        browser.find_element(By.NAME, "token").send_keys(auth.read_token(fleet.token_file))
        browser.find_element(By.TAG_NAME, "button").click()
        wait_for(lambda: browser.current_url.rstrip("/") == url, "the overview after login")
        # Health is written every 5 s: wait for edge-1's.
        token = auth.read_token(fleet.token_file)
        wait_for(lambda: "500/h" in fetch(url + "/health", token=token)[1], "edge-1's health")
        cookie = browser.get_cookie("ea_session")
        assert cookie is not None and cookie["httpOnly"] and cookie.get("sameSite") == "Strict"
        pages: dict[str, Any] = {
            "overview": ("/", ["devices", "paused"]),
            "devices": (
                "/devices",
                ["edge-1", "edge-2", "lab", "mlp v2", "signature", "500 requests/h", "120.0 MiB"],
            ),
            "rollouts": ("/rollouts", ["paused", "auto-paused: 1 of 2", "fleet"]),
            "health": ("/health", ["mlp", "v2", "lab", "500/h", "2.00%"]),
            "learning": ("/learning", ["no learning task"]),
        }
        for name, (path, words) in pages.items():
            browser.get(url + path)
            text = browser.find_element(By.TAG_NAME, "main").text
            for word in words:
                assert word in text, (name, word, text)
            source = browser.page_source
            assert not [s for s in secrets_of(fleet) if s in source], name
            browser.save_screenshot(str(SHOTS / f"{name}.png"))
            assert (SHOTS / f"{name}.png").stat().st_size > 1000
        # Filters: by group, by a version served, by a report's state.
        for query, present, absent in (
            ("?group=lab", "edge-1", "edge-2"),
            ("?version=1", "edge-2", "edge-1"),
            ("?state=failed", "edge-2", "edge-1"),
        ):
            browser.get(url + "/devices" + query)
            text = browser.find_element(By.ID, "content").text
            assert present in text and absent not in text, (query, text)
        # On a phone: one column, nothing cut off.
        browser.set_window_size(390, 844)
        browser.get(url + "/rollouts")
        browser.save_screenshot(str(SHOTS / "rollouts-phone.png"))
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= 400, width
        # Refreshed in place: a change shows up without the page reloading.
        browser.set_window_size(1280, 900)
        browser.get(url + "/rollouts")
        browser.execute_script("window.notReloaded = true")
        fleet.steer("resume")
        wait_for(
            lambda: "paused" not in browser.find_element(By.ID, "content").text.split("\n")[1],
            "the resumed rollout shown",
            timeout=30,
        )
        assert browser.execute_script("return window.notReloaded") is True
    finally:
        browser.quit()


def test_the_learning_plot() -> None:
    versions = [
        VersionRow(0, "d0", 0.40, True, 1, 0, 0.0),
        VersionRow(1, "d1", 0.62, True, 2, 3, 1.0),
        VersionRow(2, "d2", 0.55, False, 0, 3, 2.0),
        VersionRow(3, "d3", 0.71, True, 3, 3, 3.0),
    ]
    svg = accuracy_plot(versions, 0.40)
    assert svg.count("<circle") == 4 and svg.count('class="out"') == 1
    assert "v2: 0.5500 (gated out)" in svg and "global v3" in svg
    task = LearningTaskRow(
        7, "digits", 1, b"", b"", {}, "running", 3, "d3", 4, 0.40,
        {"received": 9, "dropped_stale": 2, "refused": 1}, ("a", "b"),
    )  # fmt: skip
    page = learning_html([(task, versions)])
    for words in ("task 7: digits from v1", "updates received<b>9</b>", "refused<b>1</b>",
                  "dropped (stale)<b>2</b>", "base 0.4000"):  # fmt: skip
        assert words in page


def test_a_thousand_devices_render_quickly(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    """Recorded, not asserted as a timing: the first page of 1,000 devices."""
    fleet = Fleet(tmp_path, start_daemon, "--dashboard-address", "127.0.0.1:0")
    stub, meta = fleet.stub()
    stub.EnrollDevices(
        pb.EnrollDevicesRequest(
            devices=[pb.DeviceEnrollment(device_id=f"d-{i:04d}", group="g") for i in range(1000)]
        ),
        metadata=meta,
        timeout=60,
    )
    token = auth.read_token(fleet.token_file)
    started = time.perf_counter()
    status, body = fetch(base_url(fleet) + "/devices", token=token)
    took = time.perf_counter() - started
    assert status == 200 and body.count("<tr>") == 1001  # header + 1,000 devices
    print(f"/devices with 1,000 devices: {took * 1000:.0f} ms, {len(body) // 1024} KiB")
