"""Prometheus metrics: what Switchboard is doing, for Grafana (docs/metrics.md lists them).

One `Metrics` per server, with its own registry (several apps in one process stay apart). Counters and
histograms are fed by observers where things happen: the job runner (each streamed job's end: surface,
model, outcome, tokens, time to first token, tokens/s, wait before generation), the resource manager
(loads, unloads and switches with their durations, and how far a load's memory was from what was
expected), and the HTTP error renderer (requests refused before a job existed). Gauges that describe
the present (queue depth, streams in flight, resident models and their bytes) are read from the
services at scrape time, so they can never drift.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.errors import SwitchboardError
from core.types import ModelId

log = logging.getLogger(__name__)

NS = "switchboard"
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATE_BUCKETS = (1, 2, 5, 10, 20, 40, 60, 80, 100, 150, 200, 300, 500)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The metric objects and the observer callbacks that feed them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{NS}_requests",
            "Streamed requests that ended, by API surface, kind, model and outcome (stop, length, cancelled, error).",
            ["surface", "kind", "model", "outcome"],
            registry=r,
        )
        self.tokens = Counter(
            f"{NS}_tokens", "Tokens in (prompt) and out (completion).", ["surface", "model", "direction"], registry=r
        )
        self.ttft = Histogram(
            f"{NS}_time_to_first_token_seconds",
            "Generation start to the first piece of the answer.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rate = Histogram(
            f"{NS}_tokens_per_second",
            "Decode speed of each answer (after its first token).",
            ["model"],
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self.wait = Histogram(
            f"{NS}_queue_wait_seconds",
            "Accepted to generation started: the model's queue, the prompt and any load or switch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            f"{NS}_errors", "Errors shown to clients, by surface and code.", ["surface", "code"], registry=r
        )
        self.engine_events = Counter(
            f"{NS}_engine_events",
            "Loads and unloads of local engines, by model and reason.",
            ["action", "model", "reason"],
            registry=r,
        )
        self.engine_seconds = Histogram(
            f"{NS}_engine_event_seconds",
            "How long loads and unloads took.",
            ["action"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.switches = Counter(f"{NS}_model_switches", "Changes of the model being served.", registry=r)
        self.switch_seconds = Histogram(
            f"{NS}_model_switch_seconds",
            "How long a switch took (freeing memory and loading).",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.memory_error = Gauge(
            f"{NS}_memory_prediction_error_bytes",
            "Last load: measured bytes minus the bytes expected before it "
            "(the engine's earlier measurement, or its files' size).",
            ["model"],
            registry=r,
        )
        self._seen: weakref.WeakSet[SwitchboardError] = weakref.WeakSet()

    # -- observers ---------------------------------------------------------------------------------
    def count_error(self, surface: str, error: SwitchboardError) -> None:
        """Count an error once, however many layers render or re-raise it."""
        if error in self._seen:
            return
        self._seen.add(error)
        self.errors.labels(surface, error.code).inc()

    def job_ended(self, job: Any, error: SwitchboardError | None) -> None:
        """The job runner's observer: one streamed job has sent its final event."""
        model, surface = job.admission_key, job.surface
        outcome = "error" if error is not None else job.result.finish_reason
        self.requests.labels(surface, job.kind, model, outcome).inc()
        if error is not None:
            self.count_error(surface, error)
        usage = job.result.usage
        self.tokens.labels(surface, model, "in").inc(usage.prompt_tokens)
        self.tokens.labels(surface, model, "out").inc(usage.completion_tokens)
        t = job.timings
        if t.started:
            self.wait.labels(model).observe(max(t.started - t.received, 0.0))
        if t.started and t.first:
            self.ttft.labels(model).observe(max(t.first - t.started, 0.0))
        rate = t.public(usage.completion_tokens)["tokens_per_s"]
        if rate:
            self.rate.labels(model).observe(rate)

    def resource_event(self, action: str, info: dict[str, Any]) -> None:
        """The resource manager's observer: `load`, `unload` or `switch` with what it measured."""
        seconds = float(info.get("seconds") or 0.0)
        if action == "switch":
            self.switches.inc()
            self.switch_seconds.observe(seconds)
            return
        self.engine_events.labels(action, info.get("model") or "?", info.get("reason") or "").inc()
        self.engine_seconds.labels(action).observe(seconds)
        if action == "load" and info.get("expected"):
            self.memory_error.labels(info.get("model") or "?").set(int(info["measured"]) - int(info["expected"]))

    def add_live(self, read: Callable[[], Iterator[Metric]]) -> None:
        """Gauges read from the services at each scrape."""
        self.registry.register(_Live(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live(Collector):
    def __init__(self, read: Callable[[], Iterator[Metric]]) -> None:
        self.read = read

    def describe(self) -> list:
        return []  # described at collect time: the label values come from live state

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self.read()
        except Exception:  # a scrape must never fail because one source did
            log.exception("event=metrics_live_failed")


def live_gauges(services: Any) -> Iterator[Metric]:
    """Queue depth, streams in flight, resident models and pool members, read from the services now."""
    depth = GaugeMetricFamily(f"{NS}_queue_depth", "Requests waiting for a turn on a model.", labels=["model"])
    running = GaugeMetricFamily(f"{NS}_streams_in_flight", "Streamed jobs running or queued now.", labels=["kind"])
    resident = GaugeMetricFamily(
        f"{NS}_resident_bytes",
        "Memory held by each resident model, by runtime (local engines; other runtimes "
        "such as Ollama as they report it).",
        labels=["runtime", "model"],
    )
    count = GaugeMetricFamily(f"{NS}_resident_models", "Models resident now, by runtime.", labels=["runtime"])
    for model, waiting in services.runner.admission.depths().items():
        depth.add_metric([model], waiting)
    kinds: dict[str, int] = {}
    for kind, _ in list(services.runner.active):
        kinds[kind] = kinds.get(kind, 0) + 1
    for kind in sorted({"chat", "translate", *kinds}):
        running.add_metric([kind], kinds.get(kind, 0))
    status = services.resources.status()
    per_runtime: dict[str, int] = {}
    for engine in status["engines"]:
        if engine["state"] != "loaded":
            continue
        runtime = engine.get("runtime") or "local"
        per_runtime[runtime] = per_runtime.get(runtime, 0) + 1
        resident.add_metric([runtime, str(ModelId.local(engine["model"]))], engine["bytes"] or 0)
    for key, runtime in status["runtimes"].items():
        for held in runtime.get("loaded", []):
            per_runtime[key] = per_runtime.get(key, 0) + 1
            resident.add_metric([key, str(ModelId(key, held["name"]))], int(held.get("size") or 0))
    for runtime, n in sorted(per_runtime.items()):
        count.add_metric([runtime], n)
    yield from (depth, running, resident, count)
    yield from pool_metrics(status.get("pools", {}))


def pool_metrics(pools: dict[str, dict]) -> Iterator[Metric]:
    """Each pool member's health, load and request counts, from the pools' own status (no credentials)."""
    labels = ["pool", "member"]
    healthy = GaugeMetricFamily(
        f"{NS}_pool_member_healthy", "1 when a pool member takes requests, 0 while cooling down.", labels=labels
    )
    in_flight = GaugeMetricFamily(
        f"{NS}_pool_member_in_flight", "Requests a pool member is serving now.", labels=labels
    )
    handled = CounterMetricFamily(
        f"{NS}_pool_member_requests",
        "Requests each pool member started answering (served), and its server faults (failed: refused, "
        "timed out or broke off; each cooled it down, and one before the first token was retried elsewhere).",
        labels=[*labels, "outcome"],
    )
    for key, pool in sorted(pools.items()):
        for member in pool["members"]:
            where = [key, member["url"]]
            healthy.add_metric(where, 1 if member["healthy"] else 0)
            in_flight.add_metric(where, member["in_flight"])
            handled.add_metric([*where, "served"], member["served"])
            handled.add_metric([*where, "failed"], member["failures"])
    yield from (healthy, in_flight, handled)
