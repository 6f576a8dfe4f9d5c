"""The fleet dashboard (`edgelearn dashboard --state DIR`): one server-rendered page over a coordinator's state
folder, read-only, while the coordinator runs (SQLite WAL readers do not block it).

    GET /            the page: rounds, the release metric curve (inline SVG), devices, releases; refreshes itself
    GET /api/fleet   the same snapshot as JSON

No build step, no CDN, no script library: HTML from Python's string formatting, ~20 lines of inline JavaScript
that re-fetch the page every `REFRESH_S` and swap its body.
"""

from __future__ import annotations

import html
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from coordinator.sites import read_relays
from coordinator.state import StateLayout
from coordinator.store import Store

log = logging.getLogger(__name__)
REFRESH_S = 3
ROUNDS_SHOWN = 50
STALE_S = 120  # a device not heard from for this long is shown as silent


def read_snapshot(state_dir: Path) -> dict:
    """What the page shows, through a read-only `Store`: FileNotFoundError if there is no coordinator state."""
    db_path = StateLayout(state_dir).sqlite
    if not db_path.exists():
        raise FileNotFoundError(f"{state_dir}: no state.sqlite (not a coordinator state folder)")
    store = Store(db_path, read_only=True)
    try:
        version, rnd = store.get("version"), store.get("round")
        rounds, devices, releases = store.rounds(ROUNDS_SHOWN), store.devices(), store.releases()[-20:][::-1]
        relays = read_relays(store)
    finally:
        store.close()
    for r in rounds:
        r["rejected"], r["metrics"] = json.loads(r["rejected"] or "{}"), json.loads(r["metrics"] or "{}")
    return {
        "state_dir": str(state_dir), "version": int(version or 0), "round": int(rnd or 0), "rounds": rounds,
        "devices": [_device(d) for d in devices], "now": time.time(),
        "releases": [{"version": v, "created": c, "note": n} for v, c, n in releases],
        "relays": [{"relay": k, **v} for k, v in sorted(relays.items())],
    }  # fmt: skip


def _device(d: dict) -> dict:
    status = d["status"]
    decision = (status.get("budget") or {}).get("decision") or {}
    job = status.get("job") or {}
    return {"device_id": d["device_id"], "state": d["state"], "version": d["version"], "last_seen": d["last_seen"],
            "budget": decision.get("action", "-"), "reasons": decision.get("reasons", []),
            "last_round": status.get("round"), "job": f"{job.get('steps_done')}/{job.get('steps')}" if job else "-",
            "outbox": status.get("outbox", 0)}  # fmt: skip


def metric_series(rounds: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{metric name: [(release version, value)]} of the closed rounds whose release was evaluated."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rounds:
        for k, v in r["metrics"].items():
            if r["version_out"] and isinstance(v, int | float):
                out.setdefault(k, []).append((int(r["version_out"]), float(v)))
    return out


def svg_chart(points: list[tuple[int, float]], width: int = 520, height: int = 160) -> str:
    """A line chart: x = version, y = value scaled to the points' own range (inline SVG, no library)."""
    if not points:
        return '<p class="muted">no evaluated release yet</p>'
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (width - 60) / max(1, x1 - x0)
    sy = (height - 30) / (y1 - y0 or 1.0)
    pts = " ".join(f"{40 + (x - x0) * sx:.1f},{height - 20 - (y - y0) * sy:.1f}" for x, y in points)
    return (f'<svg width="{width}" height="{height}" role="img"><polyline fill="none" stroke="#2563eb" '
            f'stroke-width="2" points="{pts}"/><text x="2" y="12">{y1:.3f}</text>'
            f'<text x="2" y="{height - 20}">{y0:.3f}</text><text x="40" y="{height - 4}">v{x0}</text>'
            f'<text x="{width - 40}" y="{height - 4}">v{x1}</text></svg>')  # fmt: skip


def _table(head: list[str], rows: list[list[object]], row_ids: list[str] | None = None) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    ids = [f' id="{html.escape(i)}"' for i in row_ids] if row_ids else [""] * len(rows)
    body = "".join(
        f"<tr{ids[i]}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for i, r in enumerate(rows)
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render(s: dict) -> str:
    """The whole page for a snapshot."""
    now = s["now"]
    online = sum(1 for d in s["devices"] if d["state"] != "offline" and now - d["last_seen"] < STALE_S)
    paused = sum(1 for d in s["devices"] if d["budget"] == "pause")
    rounds = _table(["round", "base", "release", "accepted", "rejected", "duplicates", "seconds", "metrics"], [
        [r["round"], r["base_version"], r["version_out"] or ("open" if r["closed"] is None else "—"), r["accepted"],
         ", ".join(f"{k} {v}" for k, v in r["rejected"].items()) or 0,
         r["duplicates"], "-" if r["seconds"] is None else f"{r['seconds']:.1f}",
         ", ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items() if isinstance(v, int | float)) or "-"]
        for r in reversed(s["rounds"])], [f"round-{r['round']}" for r in reversed(s["rounds"])])  # fmt: skip
    devices = _table(["device", "state", "version", "last seen", "budget", "last round", "job", "outbox"], [
        [d["device_id"], d["state"], d["version"] if d["version"] is not None else "-",
         f"{now - d['last_seen']:.0f} s ago", " ".join([d["budget"], *d["reasons"]]), d["last_round"] or "-",
         d["job"], d["outbox"]] for d in s["devices"]], [f"device-{d['device_id']}" for d in s["devices"]])  # fmt: skip
    sites = _table(["site relay", "state", "round", "takes updates", "devices online", "unsent", "parts unacked",
                    "last seen"], [
        [r["relay"], r.get("state", "?"), r.get("round") or "-", "yes" if r.get("accepting") else "no",
         r.get("devices_online", "-"), r.get("unsent", "-"), r.get("unacked_parts", "-"),
         f"{now - r.get('seen', now):.0f} s ago"] for r in s.get("relays", [])],
        [f"relay-{r['relay']}" for r in s.get("relays", [])])  # fmt: skip
    rel = s["releases"]
    releases = _table(["release", "made", "from"], [
        [f"v{r['version']}", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])), r["note"]]
        for r in rel])  # fmt: skip
    hint = (f"Roll back: stop the coordinator, then <code>edgelearn coordinator rollback --state "
            f"{html.escape(s['state_dir'])} --to {rel[1]['version']}</code>" if len(rel) > 1 else "")  # fmt: skip
    charts = "".join(f"<h3>{html.escape(k)}</h3>{svg_chart(v)}" for k, v in metric_series(s["rounds"]).items())
    return PAGE.format(version=s["version"], round=s["round"], online=online, devices=len(s["devices"]),
                       paused=paused, rounds=rounds, charts=charts or svg_chart([]), device_table=devices,
                       releases=releases, hint=hint, refresh_ms=REFRESH_S * 1000,
                       sites=f"<h2>Sites (relays, protocol v1.4)</h2>{sites}" if s.get("relays") else "",
                       updated=time.strftime("%H:%M:%S", time.localtime(now)))  # fmt: skip


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgelearn fleet</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #111; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; }}
th {{ background: #f3f4f6; text-align: left; }} .muted {{ color: #666; }} .kpi span {{ margin-right: 2em; }}
</style></head>
<body>
<h1>edgelearn fleet</h1>
<p class="kpi"><span>release <b id="version">v{version}</b></span><span>round <b id="round">{round}</b></span>
<span>devices online <b id="online">{online}</b> of <b id="devices">{devices}</b></span>
<span>paused by budget <b id="paused">{paused}</b></span>
<span class="muted">updated <span id="updated">{updated}</span></span></p>
<h2>Release metrics (evaluated by the coordinator)</h2>{charts}
<h2>Rounds</h2>{rounds}
<h2>Devices</h2>{device_table}
{sites}
<h2>Releases</h2>{releases}<p>{hint}</p>
<script>
setInterval(async () => {{
  try {{
    const r = await fetch(location.pathname, {{cache: "no-store"}});
    if (!r.ok) return;
    const doc = new DOMParser().parseFromString(await r.text(), "text/html");
    document.body.replaceWith(doc.body);
  }} catch (e) {{ /* the coordinator host may be restarting: try again next time */ }}
}}, {refresh_ms});
</script>
</body></html>
"""


def serve_dashboard(state_dir: Path, host: str, port: int) -> ThreadingHTTPServer:
    """The dashboard on host:port in a daemon thread (port 0: any free one; see `server_address`)."""
    read_snapshot(state_dir)  # fails now, with its reason, if this is no coordinator state folder

    def page() -> tuple[int, bytes, str]:
        return 200, render(read_snapshot(state_dir)).encode(), "text/html; charset=utf-8"

    def api() -> tuple[int, bytes, str]:
        return 200, json.dumps(read_snapshot(state_dir)).encode(), "application/json"

    routes: dict[str, Callable[[], tuple[int, bytes, str]]] = {"/": page, "/api/fleet": api}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.split("?", 1)[0])
            try:
                status, body, ctype = route() if route else (404, b"not found", "text/plain")
            except (sqlite3.Error, OSError) as e:  # a coordinator mid-write or moved away: say so, keep serving
                status, body, ctype = 503, f"state unreadable: {e}".encode(), "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug(format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="edgelearn-dashboard", daemon=True).start()
    return server
