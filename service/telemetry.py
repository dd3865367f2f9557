"""Prometheus telemetry, in a registry the app owns (no process-global collectors). It is also the
engine's observer (:class:`faithlens.engine.EngineObserver`): the engine reports, this counts."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class Telemetry:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "faithlens_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "faithlens_request_latency_seconds",
            "End-to-end request latency.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter("faithlens_generated_tokens", "Tokens generated.", registry=r)
        self.prompt_tokens = Counter("faithlens_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.queue_depth = Gauge("faithlens_queue_depth", "Requests waiting for the engine.", registry=r)
        self.batch_size = Histogram(
            "faithlens_batch_size",
            "Sequences per decode step.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
            registry=r,
        )
        self.analysis_seconds = Histogram(
            "faithlens_analysis_seconds",
            "Time spent annotating one response.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cancelled = Counter(
            "faithlens_cancelled", "Requests dropped because the client went away.", registry=r
        )
        self.timeouts = Counter(
            "faithlens_analysis_timeouts", "Analyses dropped at their deadline.", registry=r
        )
        self.rejected = Counter("faithlens_rejected", "Requests refused with 503 overloaded.", registry=r)
        self.adapter_loads = Counter(
            "faithlens_adapter_loads",
            "Adapter loads by source and outcome.",
            ["source", "outcome"],
            registry=r,
        )

    # -- EngineObserver ------------------------------------------------------------------------------------
    def on_step(self, batch_size: int) -> None:
        self.batch_size.observe(batch_size)

    def on_prompt(self, tokens: int) -> None:
        self.prompt_tokens.inc(tokens)

    def on_generated(self, tokens: int) -> None:
        self.generated_tokens.inc(tokens)

    def on_queue(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def on_analysis(self, seconds: float) -> None:
        self.analysis_seconds.observe(seconds)

    def on_cancelled(self) -> None:
        self.cancelled.inc()

    def on_rejected(self) -> None:
        self.rejected.inc()

    def on_timeout(self) -> None:
        self.timeouts.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
