"""The fleet dashboard in a real headless Chromium, over the state of a coordinator that is running a simulated
fleet through mosquitto: the page renders while rounds close, and its numbers are the coordinator's."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from coordinator.dashboard import read_snapshot, serve_dashboard
from devices.simulate.run import SimConfig, simulate
from edgelearn.protocol import LocalConfig

pytestmark = pytest.mark.slow
PNG = b"\x89PNG\r\n\x1a\n"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def chromium(profile: Path, *args: str) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; `make test` installs it as root)")
    out = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                         text=True, timeout=90)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def cell_texts(dom: str, row_id: str) -> list[str]:
    row = re.search(rf'<tr id="{row_id}">(.*?)</tr>', dom, re.S)
    assert row, f"no row {row_id} in the page"
    return re.findall(r"<td>(.*?)</td>", row.group(1), re.S)


def test_the_dashboard_shows_a_live_coordinators_rounds_devices_and_releases(mosquitto, bundle_dir, fleet, tmp_path):
    # Prepare: a 4-device fleet running 3 rounds in a thread; the dashboard on its coordinator's state
    cfg = SimConfig(
        devices=4, profiles=(("x86-dev", 1.0),), rounds=3, broker=mosquitto.url, out=tmp_path / "out",
        bundle=bundle_dir, local=LocalConfig(steps=4, batch_size=16, lr=0.2), min_updates=4, round_timeout_s=60,
        outage_rate=0.0, battery_fraction=0.0, ambient_spread_c=0.0, fleet=fleet + "-dash",
    )  # fmt: skip
    reports: list[dict] = []
    sim = threading.Thread(target=lambda: reports.append(simulate(cfg, say=lambda s: None)))
    sim.start()
    state = cfg.out / "state" / "coordinator"
    end = time.monotonic() + 120
    while not (state / "state.sqlite").exists() or read_snapshot(state)["version"] < 2:
        assert time.monotonic() < end and sim.is_alive(), "the coordinator never closed a round"
        time.sleep(0.2)
    server = serve_dashboard(state, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        # Execute + Assert (live): the page renders while the fleet runs
        live = chromium(tmp_path / "profile", "--dump-dom", "--virtual-time-budget=2000", url)
        assert "<h1>edgelearn fleet</h1>" in live and int(re.search(r'id="version">v(\d+)<', live).group(1)) >= 2
        sim.join(180)
        assert reports and len(reports[0]["rounds"]) == 3
        # Execute + Assert (done): every number the page shows is the coordinator's
        dom = chromium(tmp_path / "profile", "--dump-dom", "--virtual-time-budget=2000", url)
        snap = read_snapshot(state)
        assert f'id="version">v{snap["version"]}<' in dom and snap["version"] == 4
        assert re.search(r'id="devices">4<', dom)
        for r in reports[0]["rounds"]:
            cells = cell_texts(dom, f"round-{r['round']}")
            assert cells[2] == str(r["version"]) and cells[3] == str(r["accepted"])
            assert f"{r['accuracy']:.3f}" in cells[7]  # the report's accuracy is one of the release's metrics
        for d in snap["devices"]:
            assert cell_texts(dom, f"device-{d['device_id']}")[2] == str(d["version"])
        assert "<svg" in dom and "edgelearn coordinator rollback --state" in dom and "--to 3" in dom
        shot = tmp_path / "dashboard.png"
        chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,1000", url)
        assert shot.read_bytes()[:8] == PNG
    finally:
        server.shutdown()
        sim.join(60)
