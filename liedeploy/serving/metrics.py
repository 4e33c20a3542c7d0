"""Prometheus metrics of the server (prometheus_client), names prefixed ``liedeploy_``.

Label cardinality stays bounded whatever the number of tasks: no metric is labelled by task;
per-task facts are in the model repository index and model metadata instead.
"""

from __future__ import annotations

from typing import Callable, Optional

__all__ = ["ServerMetrics", "OUTCOMES"]

OUTCOMES = ("ok", "bad_request", "not_found", "too_large", "queue_full", "unavailable", "draining", "client_abort",
            "error")


class ServerMetrics:
    """Counters and histograms the app updates, plus a collector reading the backend's stats at scrape."""

    def __init__(self, stats: Callable[[], dict], queue_depth: Callable[[], int],
                 generation: Callable[[], Optional[dict]] = lambda: None):
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.registry = CollectorRegistry()
        self.requests = Counter("liedeploy_requests", "Infer requests by outcome", ["outcome"], registry=self.registry)
        for o in OUTCOMES:
            self.requests.labels(o)
        lat = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
        self.request_seconds = Histogram("liedeploy_request_seconds", "Infer request latency, end to end",
                                         buckets=lat, registry=self.registry)
        self.queue_seconds = Histogram("liedeploy_queue_seconds", "Time a request waited for its batch",
                                       buckets=lat, registry=self.registry)
        tok = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram("liedeploy_time_to_first_token_seconds", "Generation: request admitted to its first token",
                              buckets=tok, registry=self.registry)
        self.inter_token = Histogram("liedeploy_inter_token_seconds", "Generation: time between a sequence's tokens",
                                     buckets=tok, registry=self.registry)
        self.batch_size = Histogram("liedeploy_batch_size", "Samples per batch run",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)

        class _Backend:
            def collect(self_inner):
                s = stats()
                yield CounterMetricFamily("liedeploy_folds", "Task folds (cold tasks made resident)", value=s["loads"])
                yield CounterMetricFamily("liedeploy_fold_seconds", "Seconds spent folding", value=s["load_seconds"])
                for k in ("hits", "misses", "evictions"):
                    yield CounterMetricFamily(f"liedeploy_cache_{k}", f"Folded-task cache {k}", value=s[k])
                if "not_kept" in s:
                    yield CounterMetricFamily("liedeploy_cache_not_kept", "Folds served once and not cached (the task "
                                              "was used less than the tasks it would have evicted)", value=s["not_kept"])
                yield GaugeMetricFamily("liedeploy_resident_tasks", "Tasks folded and cached", value=s["resident"])
                yield GaugeMetricFamily("liedeploy_resident_bytes", "Bytes of folded tasks", value=s["resident_bytes"])
                yield GaugeMetricFamily("liedeploy_registered_tasks", "Tasks registered", value=s["registered"])
                yield GaugeMetricFamily("liedeploy_queue_depth", "Requests waiting for a batch", value=queue_depth())
                g = generation()
                if g is not None:
                    yield CounterMetricFamily("liedeploy_generated_tokens", "Tokens generated", value=g["tokens"])
                    yield CounterMetricFamily("liedeploy_generated_sequences", "Sequences generated", value=g["sequences"])
                    yield GaugeMetricFamily("liedeploy_generation_running", "Sequences generating now", value=g["running"])
                    yield GaugeMetricFamily("liedeploy_generation_waiting", "Sequences admitted, waiting to join a batch",
                                            value=g["waiting"])
                    yield GaugeMetricFamily("liedeploy_kv_cache_bytes", "Bytes of KV cache held now", value=g["kv_bytes"])
                    yield GaugeMetricFamily("liedeploy_kv_cache_reserved_bytes",
                                            "KV-cache bytes reserved by admitted sequences (bounded by --max-kv-bytes)",
                                            value=g["kv_reserved_bytes"])
                    yield CounterMetricFamily("liedeploy_decode_steps", "Batched decode steps run", value=g["steps"])
                yield GaugeMetricFamily("liedeploy_fold_fused", "1 when folds run the fused (generated) kernel, "
                                        "0 for the blocked eager path", value=s.get("fold_fused", 0.0))
                yield GaugeMetricFamily("liedeploy_packed_convs", "Conv2d layers whose folds are written in oneDNN's "
                                        "blocked layout (torch backend on CPU)", value=s.get("packed_convs", 0))
                if "worker_processes" in s:
                    yield GaugeMetricFamily("liedeploy_worker_processes", "Batch worker processes (--processes)",
                                            value=s["worker_processes"])
                    yield CounterMetricFamily("liedeploy_worker_restarts", "Worker processes started again after they "
                                              "exited", value=s["worker_restarts"])

        self.registry.register(_Backend())

    def on_batch(self, task, samples: int, waits: list, run_seconds: float) -> None:
        self.batch_size.observe(samples)
        for w in waits:
            self.queue_seconds.observe(w)

    def observe_generation(self, kind: str, seconds: float) -> None:
        (self.ttft if kind == "ttft" else self.inter_token).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
