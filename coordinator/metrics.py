"""Prometheus metrics (text format over HTTP) of one coordinator, in its own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from edgelearn.protocol import reason_kind


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds = Counter("edgelearn_rounds", "Aggregations (rounds or FedBuff buffers) closed", registry=r)
        self.updates = Counter(
            "edgelearn_updates", "Updates received, by outcome and rejection reason", ["status", "reason"], registry=r
        )
        self.update_bytes = Counter(
            "edgelearn_update_bytes",
            "Update payload bytes received, by sender: device, or relay (a site's combined updates)",
            ["via"],
            registry=r,
        )
        self.aggregation_seconds = Histogram(
            "edgelearn_aggregation_seconds", "Seconds to aggregate and rebuild a release", registry=r
        )
        self.dropped = Counter(
            "edgelearn_messages_dropped", "Messages dropped unanswered, by cause", ["cause"], registry=r
        )
        self.devices_online = Gauge("edgelearn_devices_online", "Devices whose retained status is online", registry=r)
        self.version = Gauge("edgelearn_model_version", "Current release version", registry=r)
        self.round_accepted = Gauge("edgelearn_round_accepted", "Accepted updates in the open round", registry=r)
        self.round_waiting = Gauge(
            "edgelearn_round_waiting_devices",
            "Eligible online devices still missing before the next round opens (0: open)",
            registry=r,
        )
        self.dp_noise_multiplier = Gauge(
            "edgelearn_dp_noise_multiplier", "Central DP noise multiplier σ (0: DP off)", registry=r
        )

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)

    def update(self, status: str, reason: str | None) -> None:
        self.updates.labels(status, reason_kind(reason) if reason else "").inc()
