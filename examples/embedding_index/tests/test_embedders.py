"""The embedder interface, the default hashing embedder, plug-ins by spec."""

from __future__ import annotations

import math
import sys
import types

import pytest
from embindex.embedders import Embedder, HashingEmbedder, get_embedder, make_embedder


def test_hashing_is_deterministic_and_normalized() -> None:
    one, two = HashingEmbedder(dim=64), HashingEmbedder(dim=64)
    texts = ["the quick brown fox", "a lazy dog", "!!!"]
    first, second = one.embed(texts), two.embed(texts)
    assert first == second
    for vector in first:
        assert len(vector) == 64
        assert math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-9)
    assert first[0] != first[1]
    assert one.calls == 1
    assert one.texts == 3


def test_shared_words_are_closer() -> None:
    embed = HashingEmbedder(dim=256).embed_one
    fox, fox2, whale = (
        embed("the quick brown fox"),
        embed("quick brown fox jumps"),
        embed("whales sing songs"),
    )

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(fox, fox2) > cosine(fox, whale)


def test_specs() -> None:
    assert make_embedder("hashing").dim == 256
    assert make_embedder("hashing:dim=32,call_ms=0").dim == 32
    assert get_embedder("hashing:dim=48") is get_embedder("hashing:dim=48")
    with pytest.raises(ValueError, match="bad hashing option"):
        make_embedder("hashing:size=3")
    with pytest.raises(ValueError, match="unknown embedder"):
        make_embedder("word2vec")


def test_a_new_model_plugs_in_by_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    class Constant:
        name = "constant"
        dim = 3

        def embed(self, texts: list[str]) -> list[list[float]]:
            return [[1.0, 0.0, 0.0] for _ in texts]

    module = types.ModuleType("my_models")
    module.build = Constant  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "my_models", module)
    embedder = make_embedder("my_models:build")
    assert isinstance(embedder, Embedder)
    assert embedder.embed(["x"]) == [[1.0, 0.0, 0.0]]
