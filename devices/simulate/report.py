"""The simulation report: one record per round, written as report.json and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgelearn.atomic import write_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundRecord:
    round: int
    version: int
    accuracy: float | None  # held-out accuracy of the release the round produced (.pte)
    online: int  # devices brought online for the round
    accepted: int
    participants: tuple[str, ...]
    rejected: dict[str, int]  # by reason
    duplicates: int
    paused: dict[str, int]  # online devices whose budget paused training, by reason
    bytes: dict[str, int]  # up_update, up_status, down_release, down_current, down_ack …
    seconds: float
    perplexity: float | None = None  # language models: held-out next-token perplexity of the release (.pte)
    core_in_bytes: int = 0  # update bytes the coordinator received (behind relays: their combined updates)

    @staticmethod
    def of(summary: Any, online: int, paused: dict[str, int], counts: dict[str, int], seconds: float,
           core_in_bytes: int = 0) -> RoundRecord:  # fmt: skip
        acc, ppl = summary.metrics.get("accuracy_pte"), summary.metrics.get("perplexity_pte")
        return RoundRecord(
            summary.round, summary.version, None if acc is None else float(acc), online, summary.accepted,
            tuple(summary.participants), dict(summary.rejected), summary.duplicates, paused, dict(counts),
            round(seconds, 2), None if ppl is None else float(ppl), core_in_bytes,
        )  # fmt: skip

    @property
    def metric(self) -> str:
        """What `accuracy` measures: next-token accuracy for a language model (one with a perplexity)."""
        return "accuracy" if self.perplexity is None else "next-token accuracy"

    def line(self) -> str:
        rej = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "0"
        paused = ", ".join(f"{k} {v}" for k, v in sorted(self.paused.items())) or "0"
        acc = "n/a" if self.accuracy is None else f"{self.accuracy:.3f}"
        acc += "" if self.perplexity is None else f", perplexity {self.perplexity:.2f}"
        up = self.bytes.get("up_update", 0) / 1e6
        core = self.core_in_bytes / 1e6
        who = f" ({', '.join(self.participants)})" if len(self.participants) <= 8 else ""
        return (
            f"[sim] round {self.round}: online {self.online} · accepted {self.accepted}{who} · rejected {rej} · "
            f"paused {paused} · updates {up:.2f} MB ({core:.2f} MB into the coordinator) · release v{self.version} "
            f"held-out {self.metric} {acc} "
            f"({self.seconds:.1f}s)"
        )


def totals(records: list[RoundRecord]) -> dict[str, Any]:
    """Sums over rounds: accepted, duplicates, rejected and paused by reason, bytes by kind."""
    out: dict[str, Any] = {"accepted": 0, "duplicates": 0, "rejected": {}, "paused": {}, "bytes": {}}
    for r in records:
        out["accepted"] += r.accepted
        out["duplicates"] += r.duplicates
        for key in ("rejected", "paused", "bytes"):
            for k, v in getattr(r, key).items():
                out[key][k] = out[key].get(k, 0) + v
    out["work_used_share"] = work_used_share(out["accepted"], out["rejected"])
    return out


def work_used_share(accepted: int, rejected: dict[str, int]) -> float | None:
    """Share of the updates devices computed and sent that went into a release: A / (A + R), R = rejections
    of every reason (duplicates are re-sends of an update already counted)."""
    sent = accepted + sum(rejected.values())
    return round(accepted / sent, 4) if sent else None


def write_report(cfg: Any, records: list[RoundRecord], fleet: Any, seconds: float) -> dict[str, Any]:
    """report.json (config, rounds, totals, per-device events) and the plots, in `cfg.out`."""
    devices = {d.device_id: {"profile": d.profile.name, "events": d.events} for d in fleet.devices.values() if d.events}
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "seconds": round(seconds, 2),
        "rounds": [asdict(r) for r in records],
        "totals": totals(records),
        "profiles": _count(d.profile.name for d in fleet.devices.values()),
        "devices": devices,
        "plots": [],
    }
    try:
        report["plots"] = plot(records, cfg.out)
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'edgelearn[sim]'): no plots")
    write_bytes(cfg.out / "report.json", json.dumps(report, indent=1, default=str).encode())
    return report


def _count(names: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return out


def plot(records: list[RoundRecord], out: Path) -> list[str]:
    """accuracy.png, participation.png, rejected.png, bytes.png (+ perplexity.png for a language model);
    returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r.round for r in records]
    files = []

    def save(name: str, title: str, ylabel: str, draw: Any) -> None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        draw(ax)
        ax.set(title=title, xlabel="round", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(name)

    metric = records[0].metric if records else "accuracy"
    save("accuracy.png", f"held-out {metric} of each release", metric,
         lambda ax: ax.plot(rounds, [r.accuracy or 0.0 for r in records], marker="o"))  # fmt: skip
    if any(r.perplexity is not None for r in records):
        save("perplexity.png", "held-out next-token perplexity of each release", "perplexity",
             lambda ax: ax.plot(rounds, [r.perplexity or float("nan") for r in records], marker="o"))  # fmt: skip

    def participation(ax: Any) -> None:
        ax.plot(rounds, [r.online for r in records], marker="o", label="online")
        ax.plot(rounds, [r.accepted for r in records], marker="o", label="accepted")
        ax.plot(rounds, [sum(r.paused.values()) for r in records], marker="o", label="paused by budget")

    save("participation.png", "participation", "devices", participation)
    save("rejected.png", "rejected updates by reason", "updates", lambda ax: _stack(ax, rounds, records, "rejected"))
    save("bytes.png", "bytes on the wire by kind", "MB", lambda ax: _stack(ax, rounds, records, "bytes", 1e6))
    return files


def _stack(ax: Any, rounds: list[int], records: list[RoundRecord], key: str, scale: float = 1.0) -> None:
    kinds = sorted({k for r in records for k in getattr(r, key)})
    bottom = [0.0] * len(records)
    for k in kinds:
        vals = [getattr(r, key).get(k, 0) / scale for r in records]
        ax.bar(rounds, vals, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
