"""Routing keys to workers: the default router and its key validation."""

from __future__ import annotations

from collections.abc import Hashable

import mmh3

__all__ = ["worker_for_key"]


def worker_for_key(key: str | bytes, workers: int) -> int:
    """Return the index of the worker that owns `key`: mmh3 modulo `workers`.

    The hash is MurmurHash3 x86 32-bit, unsigned, seed 0, over the UTF-8 bytes of
    a str key or over a bytes key as it is, so `"k"` and `b"k"` share a worker.
    It is stable across processes, machines and Python versions: a load balancer
    can route with the same function.

    Args:
        key: A str or bytes key.
        workers: The number of workers, at least 1.

    Raises:
        TypeError: `key` is neither str nor bytes.
        ValueError: `key` is a str that is not UTF-8 encodable (a lone
            surrogate), or `workers` is less than 1.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers!r}")
    return _route(key, workers)


def _route(key: Hashable, workers: int) -> int:
    # The processor's hot path: no check of `workers`, which was validated once.
    if type(key) is str:
        try:
            data = key.encode()
        except UnicodeEncodeError as exc:
            # Encoding here, not in mmh3: mmh3 5.x crashes the interpreter on a
            # str holding a lone surrogate.
            raise ValueError(f"key {key[:40]!r} is not UTF-8 encodable") from exc
        return mmh3.hash(data, 0, False) % workers
    if type(key) is bytes:
        return mmh3.hash(key, 0, False) % workers
    if isinstance(key, str):
        return _route(str(key), workers)
    if isinstance(key, bytes):
        return _route(bytes(key), workers)
    raise TypeError(
        f"keys must be str or bytes with the default router, got {type(key).__name__};"
        " pass worker_for_key= to open_processor to use other keys"
    )
