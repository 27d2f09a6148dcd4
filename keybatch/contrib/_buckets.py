"""Histogram buckets shared by the OpenTelemetry and Prometheus integrations."""

from __future__ import annotations

__all__ = ["DURATION_BUCKETS", "SIZE_BUCKETS"]

#: Seconds: from 1 ms (an in-memory store) to 10 s (a deadline far past).
DURATION_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: Operations per batch: from one (no batching happens) to ten thousand.
SIZE_BUCKETS: tuple[float, ...] = (
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1000,
    2000,
    5000,
    10000,
)
