"""Prometheus metrics of one server (own registry, so several apps can live in one process).

images/s is `rate(compinv_images_total[1m])`; batch occupancy is items per batch / --max-batch.
With step-level batching, compinv_queue_wait_seconds is the wait for a place in the loop and
compinv_step_* describe each denoising step (occupancy = images in the step / --max-batch);
compinv_batch_* then count only whole batches (backward guidance, attention heatmaps).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120)


class ServeMetrics:
    def __init__(self, max_batch: int):
        self.registry = r = CollectorRegistry()
        self.max_batch = max_batch
        self.queue_depth = Gauge("compinv_queue_depth", "Images waiting for a batch.", registry=r)
        self.in_flight = Gauge("compinv_requests_in_flight", "Requests being served.", registry=r)
        self.requests = Counter("compinv_requests_total", "Requests by endpoint and status code.",
                                ["endpoint", "code"], registry=r)
        self.latency = Histogram("compinv_request_seconds", "Generate latency, queueing included.",
                                 buckets=_LATENCY, registry=r)
        self.queue_wait = Histogram("compinv_queue_wait_seconds", "Time an image waited for its batch.",
                                    buckets=_LATENCY, registry=r)
        self.batch_seconds = Histogram("compinv_batch_seconds", "Run time of one UNet batch.",
                                       buckets=_LATENCY, registry=r)
        self.batch_size = Histogram("compinv_batch_size", "Images per UNet batch.",
                                    buckets=list(range(1, max_batch + 1)), registry=r)
        self.occupancy = Histogram("compinv_batch_occupancy", "Images per batch / --max-batch.",
                                   buckets=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0),
                                   registry=r)
        self.images = Counter("compinv_images_total", "Images generated (rate() = images/s).",
                              registry=r)
        self.batch_errors = Counter("compinv_batch_errors_total", "Batches that raised.", registry=r)
        self.cancelled = Counter("compinv_cancelled_images_total",
                                 "Images dropped because their client left or timed out.", registry=r)
        self.rejected = Counter("compinv_rejected_total", "Requests refused with 503 (queue full).",
                                registry=r)
        self.concepts = Gauge("compinv_concepts", "Concepts served.", registry=r)
        # Step-level batching: every denoising step of the loop is one UNet call.
        self.step_size = Histogram("compinv_step_batch_size", "Images in one denoising step's UNet call.",
                                   buckets=list(range(1, max_batch + 1)), registry=r)
        self.step_occupancy = Histogram("compinv_step_occupancy",
                                        "Images per denoising step / --max-batch.",
                                        buckets=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0),
                                        registry=r)
        self.step_seconds = Histogram("compinv_step_seconds", "Run time of one denoising step.",
                                      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                      registry=r)

    def on_batch(self, stats) -> None:
        self.batch_size.observe(stats.size)
        self.occupancy.observe(stats.size / self.max_batch)
        self.batch_seconds.observe(stats.seconds)
        for w in stats.waited:
            self.queue_wait.observe(w)
        if stats.error == "cancelled":
            return
        if stats.error:
            self.batch_errors.inc()
        else:
            self.images.inc(stats.size)

    def on_step(self, stats) -> None:
        self.step_size.observe(stats.size)
        self.step_occupancy.observe(stats.size / self.max_batch)
        self.step_seconds.observe(stats.seconds)
        self.images.inc(stats.finished)
