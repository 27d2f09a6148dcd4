"""embindex: embedding-index workers on Dramatiq, batched by keybatch.

An example built on keybatch's public API; not part of keybatch's API.
"""

from .app import App, KeybatchMiddleware, build_app, make_redis_broker, queue_for
from .embedders import Embedder, HashingEmbedder, get_embedder, make_embedder
from .service import BadTask, IndexService, ModelBatch, ReindexRefused
from .settings import Settings
from .store import Hit, Store, UnknownModel

__all__ = [
    "App",
    "BadTask",
    "Embedder",
    "HashingEmbedder",
    "Hit",
    "IndexService",
    "KeybatchMiddleware",
    "ModelBatch",
    "ReindexRefused",
    "Settings",
    "Store",
    "UnknownModel",
    "build_app",
    "get_embedder",
    "make_embedder",
    "make_redis_broker",
    "queue_for",
]
