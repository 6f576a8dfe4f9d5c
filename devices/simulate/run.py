"""`edgelearn simulate`: one process runs a broker (or uses one), the coordinator and a simulated fleet."""

from __future__ import annotations

import logging
import math
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.optim import ServerOptConfig, default_server_opt
from coordinator.release import release_builder, warm_up
from coordinator.selection import Eligibility
from coordinator.server import Coordinator, CoordinatorConfig, RoundSummary
from devices.simulate.data import device_shards
from devices.simulate.fleet import Fleet, Outage, make_devices
from devices.simulate.report import RoundRecord, write_report
from devices.simulate.sites import start_sites
from devices.simulate.speakers import check_text, lm_shards
from edgelearn.broker import check_broker, start_broker
from edgelearn.bundle import verify_bundle
from edgelearn.mqtt import use_shared_loop
from edgelearn.protocol import LocalConfig
from export.pipeline import ExportConfig, export_bundle, rebuild_bundle
from models.digits import load_digits

log = logging.getLogger(__name__)


# Local recipe per model when none is given. char-lm: plain SGD (20 steps at lr 0.1) barely moved held-out
# accuracy and SGD at lr 0.1 made a trained release worse; AdamW with a warm-up, cosine decay and clipping, and
# more local work per round, learns (bench/lm_learning.py; docs/benchmarks.md).
LOCAL_DEFAULTS = {
    "digits-mlp": LocalConfig(steps=10, batch_size=16, lr=0.2),
    "char-lm": LocalConfig(50, 16, 1e-3, "adamw", warmup_steps=5, schedule="cosine", clip_norm=1.0),
}


@dataclass(frozen=True)
class SimConfig:
    devices: int = 20
    profiles: tuple[tuple[str, float], ...] = (("rpi4", 0.5), ("rpi5", 0.3), ("jetson-orin-nano", 0.2))
    rounds: int = 5
    broker: str = "embedded"  # embedded | mosquitto | mqtt://host:port
    out: Path = Path("sim-out")
    bundle: Path | None = None  # an exported bundle of `model`; None: export one into out/bundle
    model: str = "digits-mlp"  # digits-mlp | char-lm
    text: Path | None = None  # char-lm: NAME:/lines blocks (Tiny Shakespeare format); None: the shipped corpus
    online: int | None = None  # devices online per round, a seeded random cohort (None: all, for the whole run)
    participants: int | None = None  # the coordinator invites ⌈1.3·K⌉ eligible online devices (None: all online)
    eligibility: tuple[Eligibility, ...] = ()  # coordinator rules on device status, e.g. temp_c<75
    clip_to_median: float | None = 3.0  # the coordinator's --clip-to-median (None: off)
    min_updates: int | None = None  # None: 60 % of the participants (or of the online devices)
    alpha: float | None = None  # Dirichlet α of the class mix; None: label skew (4 classes per device)
    samples_per_device: int | None = None  # digits: None → label skew partitions the pool (see device_shards);
    # char-lm: at most this many windows per device (None: all of its speaker's)
    local: LocalConfig | None = None  # None: LOCAL_DEFAULTS[model]
    server_opt: ServerOptConfig | None = None  # None: the model's (coordinator.optim.default_server_opt)
    export_minutes: float | None = None  # release 1's training budget when exporting (None: the model's default)
    round_timeout_s: float = 60.0
    outages: tuple[Outage, ...] = ()
    outage_rate: float = 0.02  # chance that a participant goes offline after queueing its update
    outage_s: float = 3.0
    hot: tuple[str, ...] = ()  # device ids in an enclosure hotter than their profile's limit
    battery_fraction: float = 0.2
    max_link_delay_s: float = 0.5
    ambient_spread_c: float = 28.0  # enclosures are 0 … this much warmer than the board's usual ambient
    server_fraction: float = 0.05  # digits-mlp only (char-lm: see devices/simulate/speakers.py)
    fleet: str = "sim"
    seed: int = 0
    sites: int = 0  # ≥ 1: devices behind this many site brokers bridged to the core one, a relay each (v1.4)

    def __post_init__(self) -> None:
        if self.model not in LOCAL_DEFAULTS:
            raise ValueError(f"model {self.model!r}: simulate supports {', '.join(LOCAL_DEFAULTS)}")
        if self.local is None:
            object.__setattr__(self, "local", LOCAL_DEFAULTS[self.model])
        if self.devices < 1 or self.rounds < 1:
            raise ValueError("devices and rounds must be >= 1")
        if self.online is not None and not 1 <= self.online <= self.devices:
            raise ValueError(f"online must be in [1, {self.devices}], got {self.online}")
        if self.participants is not None and not 1 <= self.participants <= self.cohort:
            raise ValueError(f"participants must be in [1, {self.cohort}] (online devices), got {self.participants}")
        if self.text is not None and self.model != "char-lm":
            raise ValueError(f"text {self.text}: only char-lm trains on text (model is {self.model})")
        if self.alpha is not None and self.model == "char-lm":
            raise ValueError("alpha: char-lm devices hold one speaker each, there is no class mix to draw")
        self._check_devices_named()
        check_broker(self.broker)
        if self.sites and (self.broker != "mosquitto" or self.participants is not None or self.sites > self.devices):
            raise ValueError("sites: needs --broker mosquitto (bridges), no --participants (the coordinator sees "
                             "no device behind a relay to select) and at most one site per device")  # fmt: skip
        if self.bundle is not None:
            self._check_bundle()
        if self.model == "char-lm":
            check_text(self.text, self.devices, self.bundle)

    def _check_devices_named(self) -> None:
        """Scripted outages and hot enclosures must name devices of this fleet (sim0000 …) and its rounds."""
        known = {f"sim{k:04d}" for k in range(self.devices)}
        for dev in [o.device_id for o in self.outages] + list(self.hot):
            if dev not in known:
                raise ValueError(f"device {dev!r} is not in this fleet (sim0000 … sim{self.devices - 1:04d})")
        for o in self.outages:
            if not 1 <= o.round <= self.rounds:
                raise ValueError(f"outage of {o.device_id} in round {o.round}: rounds are 1 … {self.rounds}")

    def _check_bundle(self) -> None:
        """The bundle holds `model`; a digits bundle was exported with this seed (the test split depends on the
        seed alone: another seed's test split would overlap the devices' data)."""
        import json

        assert self.bundle is not None
        held = verify_bundle(self.bundle).model_id  # BundleError is a ValueError
        if held != self.model:
            raise ValueError(f"bundle {self.bundle} holds {held}, not {self.model}: give --model {held}")
        if self.model == "digits-mlp":
            made = json.loads((self.bundle / "export.json").read_bytes())
            if made.get("seed") != self.seed:
                raise ValueError(f"bundle {self.bundle} was exported with seed {made.get('seed')}: its test split "
                                 f"would overlap the devices' data; give --seed {made.get('seed')} or export with "
                                 f"--seed {self.seed}")  # fmt: skip

    @property
    def cohort(self) -> int:
        """Devices online per round."""
        return self.online or self.devices

    @property
    def quorum(self) -> int:
        """min_updates, default ⌈0.6 · participants⌉ (participants default: the online devices)."""
        return self.min_updates or max(1, math.ceil(0.6 * (self.participants or self.cohort)))


def pick_cohort(ids: list[str], k: int, rnd: int, seed: int, always: tuple[str, ...] = ()) -> list[str]:
    """k devices for round `rnd` (seeded by it), always including `always` (scripted devices)."""
    rng = np.random.default_rng([seed, rnd])
    rest = [i for i in ids if i not in always]
    picked = list(rng.choice(rest, size=max(0, min(k - len(always), len(rest))), replace=False))
    return sorted(set(always) | set(picked))


def prepare(cfg: SimConfig, say: Callable[[str], None]) -> tuple[Path, list]:
    """The bundle (exported unless given) and the devices (profiles, data shards, bodies)."""
    bundle = cfg.bundle or cfg.out / "bundle"
    if cfg.model == "char-lm":
        text_file, shards = lm_shards(cfg.text, cfg.devices, cfg.out, cfg.samples_per_device)
        export = ExportConfig(model_id="char-lm", text=str(text_file), compare=False, seed=cfg.seed,
                              train_minutes=cfg.export_minutes)  # fmt: skip
        say(f"[sim] char-lm: {len(shards)} devices, one speaker each, from {cfg.text or 'the shipped corpus'}")
    else:
        pool = load_digits(cfg.server_fraction, seed=cfg.seed).pool
        shards = device_shards(pool, cfg.devices, cfg.samples_per_device, cfg.alpha, seed=cfg.seed)
        export = ExportConfig(server_fraction=cfg.server_fraction, compare=False, seed=cfg.seed)  # same test split
    if cfg.bundle is None:
        say(f"[sim] exporting {cfg.model}: release 1 (training, int8 XNNPACK .pte, train.pte)")
        export_bundle(export, bundle)
    devices = make_devices(shards, list(cfg.profiles), set(cfg.hot), cfg.battery_fraction, cfg.max_link_delay_s,
                           cfg.seed, cfg.ambient_spread_c)  # fmt: skip
    return bundle, devices


def simulate(cfg: SimConfig, say: Callable[[str], None] = print) -> dict:
    """Run the fleet for `cfg.rounds` rounds; write the report to `cfg.out` (also after Ctrl-C or an error,
    with the rounds done so far); return it."""
    t0 = time.monotonic()
    use_shared_loop()  # hundreds of MQTT clients in this process: one epoll thread, not a select() thread each
    cfg.out.mkdir(parents=True, exist_ok=True)
    bundle, devices = prepare(cfg, say)
    work = cfg.out / "state"  # the last run's coordinator and device state (the next run replaces it)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    records: list[RoundRecord] = []
    brk = fleet = sites = None
    try:
        brk, url, v311 = start_broker(cfg.broker, work)
        fleet = Fleet(devices, url, cfg.fleet, work / "devices", v311)
        if cfg.sites:
            sites = start_sites(cfg.sites, url, cfg.fleet, work)
            fleet.urls = {d.device_id: sites.url_of(k) for k, d in enumerate(devices)}
            say(f"[sim] {cfg.sites} site brokers bridged to the core broker {url}, a relay each")
        _serve(cfg, bundle, fleet, (url, v311), work, records, say)
    finally:
        if fleet is not None:
            fleet.close()
        if sites is not None:
            sites.stop()
        if brk is not None:
            brk.stop()
        if fleet is not None:
            report = write_report(cfg, records, fleet, time.monotonic() - t0)
            used = report["totals"]["work_used_share"]
            share = "" if used is None else f"; {100 * used:.0f} % of the updates sent were used"
            say(f"[sim] {len(records)} rounds in {report['seconds']:.1f}s{share}; report in {cfg.out}")
    return report


def _serve(cfg: SimConfig, bundle: Path, fleet: Fleet, broker: tuple[str, bool], work: Path, records: list,
           say: Callable[[str], None]) -> None:  # fmt: skip
    """The coordinator on this thread, the round driver on another, until the rounds are done or one fails."""
    url, v311 = broker
    closed: queue.Queue[RoundSummary | BaseException] = queue.Queue()
    ccfg = CoordinatorConfig(
        url, cfg.fleet, bundle, work / "coordinator", min_updates=cfg.quorum, round_timeout_s=cfg.round_timeout_s,
        local=cfg.local or LOCAL_DEFAULTS[cfg.model], max_rounds=cfg.rounds, mqtt_v311=v311,
        server_opt=cfg.server_opt or default_server_opt(cfg.model),
        target_participants=cfg.participants, eligibility=cfg.eligibility, selection_grace_s=5.0,
        clip_to_median=cfg.clip_to_median,
    )  # fmt: skip
    coord = Coordinator(ccfg, release_builder(rebuild_bundle, fleet=cfg.fleet), closed.put)
    warm_up(coord.rounds.release_dir(coord.rounds.version), coord.rounds.manifest.model_id)
    invited = f", {cfg.participants} (×1.3) invited" if cfg.participants else ""
    say(f"[sim] {cfg.devices} devices ({', '.join(f'{p}:{w:g}' for p, w in cfg.profiles)}), {cfg.cohort} online "
        f"per round{invited}, quorum {cfg.quorum}, broker {url}")  # fmt: skip
    stop = threading.Event()
    received = coord.metrics.registry.get_sample_value  # updates' bytes into the coordinator (relayed or not)
    core_in = lambda: sum(received("edgelearn_update_bytes_total", {"via": v}) or 0.0 for v in ("device", "relay"))  # noqa: E731
    progress = (lambda: coord.rounds.count, say, core_in)  # accepted so far (an int read from the driver thread)
    driver = threading.Thread(target=_drive, args=(cfg, fleet, closed, records, stop, progress), daemon=True)
    try:
        if cfg.online is None:  # all online before the coordinator's first selection
            _start_all(fleet, sorted(fleet.devices), say)
        driver.start()
        coord.run(stop)
    finally:
        stop.set()
        if driver.is_alive():
            driver.join(timeout=60)  # it appends the last record: the report must not race it


Progress = tuple[Callable[[], int], Callable[[str], None], Callable[[], float]]  # accepted, say, core bytes in


def _drive(cfg: SimConfig, fleet: Fleet, closed: queue.Queue, records: list, stop: threading.Event,
           progress: Progress) -> None:  # fmt: skip
    """Per round: bring the cohort online (or keep everyone online), wait for the coordinator to close the
    round, take the cohort offline. Whatever ends it (the last round, a failure) stops the coordinator too."""
    try:
        _drive_rounds(cfg, fleet, closed, records, stop, progress)
    finally:
        stop.set()


def _drive_rounds(cfg: SimConfig, fleet: Fleet, closed: queue.Queue, records: list, stop: threading.Event,
                  progress: Progress) -> None:  # fmt: skip
    ids, (accepted, say, core_in) = sorted(fleet.devices), progress
    core_seen = 0.0
    always_on = cfg.online is None  # every device was started before the coordinator (simulate)
    for rnd in range(1, cfg.rounds + 1):
        fleet.meter.round = rnd
        cohort = ids if always_on else pick_cohort(ids, cfg.cohort, rnd, cfg.seed, _scripted(cfg))
        _plan_outages(cfg, fleet, cohort, rnd)
        t0 = time.monotonic()
        if always_on:
            fleet.arm_outages(rnd)
        else:
            with fleet.lock:
                fleet.wanted = set(cohort)
            for dev in cohort:
                fleet.start(dev, rnd)
        tell = lambda s, r=rnd: say(f"[sim] round {r}: {accepted()}/{cfg.quorum} updates accepted ({s:.0f}s)")  # noqa: E731
        summary = _wait(closed, stop, 3 * cfg.round_timeout_s, tell)
        if summary is None:
            say(f"[sim] round {rnd} did not close within {3 * cfg.round_timeout_s:.0f}s; stopping")
            stop.set()
            return
        paused = fleet.paused_since(t0)
        if not always_on:
            fleet.end_round(rnd, cohort)
        core_bytes, core_seen = int(core_in() - core_seen), core_in()
        rec = RoundRecord.of(summary, len(cohort), paused, fleet.meter.of_round(rnd), time.monotonic() - t0, core_bytes)
        records.append(rec)
        say(rec.line())


def _scripted(cfg: SimConfig) -> tuple[str, ...]:
    """Devices with a scripted outage or a hot enclosure: always in the online cohort."""
    return tuple(sorted({o.device_id for o in cfg.outages} | set(cfg.hot)))


def _plan_outages(cfg: SimConfig, fleet: Fleet, cohort: list[str], rnd: int) -> None:
    """The scripted outages of round `rnd`, plus each online device with chance `outage_rate` (seeded)."""
    rng = np.random.default_rng([cfg.seed + 2, rnd])
    with fleet.lock:
        for o in cfg.outages:
            if o.round == rnd:
                fleet.outages[(o.device_id, rnd)] = o
        for dev, u in zip(cohort, rng.random(len(cohort)), strict=True):
            if (dev, rnd) not in fleet.outages and u < cfg.outage_rate:
                fleet.outages[(dev, rnd)] = Outage(dev, rnd, cfg.outage_s)


def _start_all(fleet: Fleet, ids: list[str], say: Callable[[str], None], limit_s: float = 300.0) -> None:
    """Bring every device online and wait until each is connected (its status is then retained), so the
    coordinator's first selection sees the whole fleet."""
    t0 = time.monotonic()
    for k, dev in enumerate(ids, 1):
        fleet.start(dev, 1)
        if k % 200 == 0 and k < len(ids):
            say(f"[sim] {k}/{len(ids)} devices started ({time.monotonic() - t0:.0f}s)")
    next_say = time.monotonic() + 5.0
    while (n := fleet.connected()) < len(ids) and time.monotonic() < t0 + limit_s:
        if time.monotonic() >= next_say:
            say(f"[sim] {n}/{len(ids)} devices connected ({time.monotonic() - t0:.0f}s)")
            next_say += 5.0
        time.sleep(0.2)
    say(f"[sim] {fleet.connected()}/{len(ids)} devices online ({time.monotonic() - t0:.0f}s)")


def _wait(closed: queue.Queue, stop: threading.Event, limit_s: float, tell: Callable[[float], None],
          every_s: float = 10.0) -> RoundSummary | None:  # fmt: skip
    """The next closed round, or None when stopped or after `limit_s` seconds; `tell(elapsed_s)` every
    `every_s` seconds meanwhile (the live progress line)."""
    t0 = time.monotonic()
    next_tell = t0 + every_s
    while not stop.is_set() and time.monotonic() < t0 + limit_s:
        try:
            return closed.get(timeout=0.5)
        except queue.Empty:
            if time.monotonic() >= next_tell:
                tell(time.monotonic() - t0)
                next_tell += every_s
    return None
