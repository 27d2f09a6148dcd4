"""worker_for_key: stable mmh3 routing, checked against an independent reference."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import keybatch


def murmur3_x86_32(data: bytes, seed: int = 0) -> int:
    """A plain-Python MurmurHash3 x86 32-bit, written from the algorithm's spec."""
    c1, c2, mask = 0xCC9E2D51, 0x1B873593, 0xFFFFFFFF

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & mask

    h = seed
    full = len(data) - len(data) % 4
    for i in range(0, full, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = rotl((k * c1) & mask, 15) * c2 & mask
        h = (rotl(h ^ k, 13) * 5 + 0xE6546B64) & mask
    tail = data[full:]
    if tail:
        k = int.from_bytes(tail, "little")
        h ^= rotl((k * c1) & mask, 15) * c2 & mask
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    return h ^ (h >> 16)


def test_known_vectors_are_stable() -> None:
    # Pinned values: changing them breaks every load balancer routing with them.
    assert murmur3_x86_32(b"") == 0
    assert murmur3_x86_32(b"account:42") == 593819911
    assert keybatch.worker_for_key("account:42", 2**32 - 1) == 593819911
    assert keybatch.worker_for_key("account:42", 32) == 593819911 % 32
    assert keybatch.worker_for_key("", 7) == 0


@given(st.binary(max_size=64), st.integers(1, 1000))
def test_bytes_keys_match_reference(key: bytes, workers: int) -> None:
    assert keybatch.worker_for_key(key, workers) == murmur3_x86_32(key) % workers


@given(st.text(max_size=32), st.integers(1, 1000))
def test_str_keys_hash_their_utf8_bytes(key: str, workers: int) -> None:
    try:
        data = key.encode()
    except UnicodeEncodeError:
        with pytest.raises(ValueError, match="UTF-8"):
            keybatch.worker_for_key(key, workers)
        return
    assert keybatch.worker_for_key(key, workers) == murmur3_x86_32(data) % workers
    assert keybatch.worker_for_key(key, workers) == keybatch.worker_for_key(
        data, workers
    )


def test_lone_surrogate_is_a_value_error_not_a_crash() -> None:
    # mmh3 5.3 crashes the interpreter when handed such a str directly.
    with pytest.raises(ValueError, match="UTF-8") as info:
        keybatch.worker_for_key("a\udc80b", 4)
    assert isinstance(info.value.__cause__, UnicodeEncodeError)


def test_str_and_bytes_subclasses_route_like_their_base() -> None:
    class MyStr(str):
        pass

    class MyBytes(bytes):
        pass

    assert keybatch.worker_for_key(MyStr("k"), 9) == keybatch.worker_for_key("k", 9)
    assert keybatch.worker_for_key(MyBytes(b"k"), 9) == keybatch.worker_for_key(b"k", 9)


@pytest.mark.parametrize(
    "key", [1, 1.5, None, ("a",), bytearray(b"a"), memoryview(b"a")]
)
def test_other_key_types_are_type_errors(key: object) -> None:
    with pytest.raises(TypeError, match="str or bytes"):
        keybatch.worker_for_key(key, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize("workers", [0, -1])
def test_workers_must_be_positive(workers: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        keybatch.worker_for_key("k", workers)


def test_spreads_keys_evenly() -> None:
    counts = [0] * 16
    for i in range(16_000):
        counts[keybatch.worker_for_key(f"user:{i}", 16)] += 1
    assert min(counts) > 850
    assert max(counts) < 1150
