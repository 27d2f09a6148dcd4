"""Type-checked by mypy --strict and pyright (`nox -s types`); never run.

What a user's type checker infers from keybatch.loader.
"""

from __future__ import annotations

from collections.abc import Hashable

from typing_extensions import assert_type

from keybatch import loader as kl


class User:
    name = ""


async def batch_load(ids: list[int]) -> dict[int, User]:
    return {i: User() for i in ids}


async def main() -> None:
    async with kl.open_loader(
        batch_load, max_wait=0.01, max_batch_size=100, cache=True
    ) as loader:
        assert_type(loader, kl.Loader[int, User])
        assert_type(await loader.load(1), User)
        assert_type(await loader.load_many([1, 2]), list[User])
        assert_type(loader.prime(3, User()), kl.Loader[int, User])
        assert_type(loader.clear(3).prime(3, User()), kl.Loader[int, User])
        assert_type(loader.clear_all(), kl.Loader[int, User])
        assert_type(await loader.load_nowait(1), User)
        stats = loader.statistics()
        assert_type(stats, kl.LoaderStatistics)
        assert_type(stats.loads, int)
        assert_type(stats.cache_hits, int)
        # an id of another type is caught by the checker
        await loader.load("1")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]

    try:
        pass
    except kl.BatchLoadError as exc:
        assert_type(exc.id, Hashable)
