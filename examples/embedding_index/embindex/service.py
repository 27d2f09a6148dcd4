"""What the four actors do, on one keybatch processor per worker process.

`IndexService` holds the process's processor (keyed by model) and runs the
actors' bodies. It is independent of Dramatiq: the actors (`embindex.app`)
call it, and the tests call it directly. Outgoing messages (reschedules,
reindex subtasks) go through the ``dispatch`` callable it is given.

Where keybatch does the work:

- Upserts and deletes of one model go through ``processor.run(model, op, ...)``:
  one ``load`` (the model's row), every task's operation applied to a
  `ModelBatch` in call order (a later upsert of an item wins, a delete after
  an upsert cancels it), one ``save`` that embeds all the batch's new texts in
  one call and writes them, and marks the tasks done, in one transaction.
- A reindex takes its models with ``processor.exclusive(source, dest)`` while
  it takes the database lock and splits the work, and again while its last
  subtask swaps the destination in: the operations on those models called
  before finish first (their saves see no lock, or see it and forward), and
  those called meanwhile wait and run after, against the new state.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio

import keybatch

from .embedders import Embedder, get_embedder
from .settings import Settings
from .store import Busy, LockRow, Store, Task, UnknownModel

__all__ = [
    "BadTask",
    "Dispatch",
    "IndexService",
    "ModelBatch",
    "ReindexRefused",
    "delete_op",
    "parse_deletes",
    "parse_upserts",
    "upsert_op",
]

log = logging.getLogger("embindex")

# dispatch(actor_name, task_id, route_key, delay_seconds_or_None)
Dispatch = Callable[[str, int, str, "float | None"], None]


class ReindexRefused(Exception):
    """A reindex met a lock while waiting is off: the task is marked refused."""

    def __init__(self, task_id: int, reason: str) -> None:
        super().__init__(f"reindex #{task_id} refused: {reason}")
        self.task_id = task_id
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.task_id, self.reason))


class BadTask(ValueError):
    """The task's payload is invalid; the message says what is wrong."""


@dataclasses.dataclass
class ModelBatch:
    """The resource of one batch of one model: the net effect of its tasks.

    ``ops`` maps item id to its new text, or None for a delete, in the order
    the items were first touched; applying operations in call order makes a
    later upsert win and a delete after an upsert cancel it.
    """

    model: str
    ops: dict[str, str | None] = dataclasses.field(default_factory=dict)
    tasks: list[tuple[int, str]] = dataclasses.field(default_factory=list)


def parse_upserts(payload: dict[str, Any], settings: Settings) -> list[tuple[str, str]]:
    """Validate an upsert payload ``{"items": [{"id": ..., "text": ...}]}``."""
    items = payload.get("items")
    if not isinstance(items, list) or not items:
        raise BadTask("payload needs a non-empty list 'items'")
    if len(items) > settings.max_items_per_task:
        raise BadTask(
            f"oversized batch: {len(items)} items, at most"
            f" {settings.max_items_per_task} per task"
        )
    parsed = []
    for number, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadTask(f"item {number} is not an object")
        item_id, text = item.get("id"), item.get("text")
        if not isinstance(item_id, str) or not item_id or len(item_id) > 256:
            raise BadTask(f"item {number}: 'id' must be a string of 1 to 256 chars")
        if not isinstance(text, str) or not text.strip():
            raise BadTask(f"item {item_id!r}: empty text")
        if len(text) > settings.max_text_chars:
            raise BadTask(
                f"item {item_id!r}: text of {len(text)} chars, at most"
                f" {settings.max_text_chars}"
            )
        parsed.append((item_id, text))
    return parsed


def parse_deletes(payload: dict[str, Any], settings: Settings) -> list[str]:
    """Validate a delete payload ``{"ids": [...]}``."""
    ids = payload.get("ids")
    if not isinstance(ids, list) or not ids:
        raise BadTask("payload needs a non-empty list 'ids'")
    if len(ids) > settings.max_items_per_task:
        raise BadTask(
            f"oversized batch: {len(ids)} ids, at most"
            f" {settings.max_items_per_task} per task"
        )
    for item_id in ids:
        if not isinstance(item_id, str) or not item_id:
            raise BadTask(f"bad item id {item_id!r}")
    return list(ids)


def upsert_op(batch: ModelBatch, task_id: int, items: list[tuple[str, str]]) -> int:
    """keybatch operation: stage a task's upserts in the batch (call order)."""
    for item_id, text in items:
        batch.ops.pop(item_id, None)
        batch.ops[item_id] = text
    batch.tasks.append((task_id, f"{len(items)} upserted"))
    return len(items)


def delete_op(batch: ModelBatch, task_id: int, ids: list[str]) -> int:
    """keybatch operation: stage a task's deletes (cancels earlier upserts)."""
    for item_id in ids:
        batch.ops.pop(item_id, None)
        batch.ops[item_id] = None
    batch.tasks.append((task_id, f"{len(ids)} deleted"))
    return len(ids)


def describe(exc: BaseException) -> str:
    """A task's error text: what went wrong, without a traceback."""
    if isinstance(exc, keybatch.LoadError) and exc.__cause__ is not None:
        return describe(exc.__cause__)
    if isinstance(exc, keybatch.SaveError):
        cause = exc.__cause__
        landed = getattr(exc, "may_have_landed", True)
        return (
            f"save failed (may have landed: {landed}): {type(cause).__name__}: {cause}"
        )
    if isinstance(exc, (BadTask, UnknownModel)):
        return str(exc.args[0]) if exc.args else type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


class IndexService:
    """One worker process's index work: a keybatch processor and the actors' bodies."""

    def __init__(self, settings: Settings, store: Store, dispatch: Dispatch) -> None:
        self.settings = settings
        self.store = store
        self._dispatch = dispatch
        self._processor: keybatch.Processor[ModelBatch] | None = None
        self.stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()

    # -- the processor --------------------------------------------------------------

    @property
    def processor(self) -> keybatch.Processor[ModelBatch]:
        if self._processor is None:
            raise RuntimeError("the index service is not running (no processor)")
        return self._processor

    @asynccontextmanager
    async def running(self) -> AsyncIterator[IndexService]:
        """Open the process's processor; leaving drains it (graceful stop).

        Cancellation: cancelling the block cancels the processor's workers
        (saves in progress finish; operations not applied fail with
        ``ProcessorStopped``).
        """
        s = self.settings
        async with keybatch.open_processor(
            load=self._load,
            save=self._save,
            min_duration=s.window,
            max_duration=max(s.save_timeout, s.window),
            workers=s.processor_workers,
            max_ops=s.max_batch_ops,
            on_batch=self._on_batch,
        ) as processor:
            self._processor = processor
            try:
                yield self
            finally:
                self._processor = None

    async def _load(self, model: str) -> ModelBatch:
        """keybatch load: the model must exist. Cancellation: abandons the wait."""
        await anyio.to_thread.run_sync(self.store.model, model)
        return ModelBatch(model)

    async def _save(self, model: str, batch: ModelBatch) -> None:
        """keybatch save: one embedding call, one transaction.

        Cancellation: the thread finishes its transaction (committed or rolled
        back as a whole); only the wait is abandoned.
        """
        if not batch.ops and not batch.tasks:
            return
        await anyio.to_thread.run_sync(self._write, model, batch.ops, batch.tasks)

    def _write(
        self, model: str, ops: dict[str, str | None], tasks: list[tuple[int, str]]
    ) -> dict[str, Any]:
        return self.store.write_batch(model, ops, tasks, embed=self._embed)

    def _embed(self, embedder: Embedder, texts: list[str]) -> list[list[float]]:
        with self._stats_lock:  # called from threads
            self.stats["embed_calls"] += 1
            self.stats["embedded_texts"] += len(texts)
        return embedder.embed(texts)

    def _on_batch(self, report: keybatch.BatchReport) -> None:
        self.stats["batches"] += 1
        self.stats["batched_tasks"] += report.operations
        self.stats["max_batch"] = max(self.stats["max_batch"], report.operations)

    # -- helpers ----------------------------------------------------------------------

    async def _task(self, task_id: int, kind: str) -> Task | None:
        task, _ = await self._task_and_lock(task_id, kind, lock=False)
        return task

    async def _task_and_lock(
        self, task_id: int, kind: str, *, lock: bool = True
    ) -> tuple[Task | None, LockRow | None]:
        """The open task of that kind (and the live lock on its model), or None."""
        if lock:
            task, held = await anyio.to_thread.run_sync(
                self.store.task_and_lock, task_id
            )
        else:
            task, held = await anyio.to_thread.run_sync(self.store.task, task_id), None
        if task is None:
            log.warning("%s task #%s does not exist: ignored", kind, task_id)
            self.stats["unknown_tasks"] += 1
            return None, None
        if task.kind != kind:
            await self._fail(
                task, f"task #{task_id} is a {task.kind!r} task, not {kind!r}"
            )
            return None, None
        if task.terminal:
            log.info("task #%s is %s already: redelivery ignored", task_id, task.status)
            self.stats["redelivered"] += 1
            return None, None
        return task, held

    async def _fail(self, task: Task, error: str, status: str = "failed") -> None:
        log.info("task #%s %s: %s", task.id, status, error)
        self.stats[status] += 1
        await anyio.to_thread.run_sync(
            lambda: self.store.finish_task(task.id, status, error=error)
        )

    async def _send(
        self, actor: str, task_id: int, route: str, delay: float | None = None
    ) -> None:
        await anyio.to_thread.run_sync(self._dispatch, actor, task_id, route, delay)

    async def _reschedule(
        self, task: Task, actor: str, route: str, reason: str
    ) -> bool:
        """Send the task again after the delay; False (and failed) past the bound."""
        s = self.settings
        if task.attempts >= s.reschedule_attempts:
            await self._fail(
                task, f"gave up after {task.attempts} reschedules: {reason}"
            )
            return False
        note = (
            f"{reason}; retry {task.attempts + 1}/{s.reschedule_attempts}"
            f" in {s.reschedule_delay:g}s"
        )
        await anyio.to_thread.run_sync(self.store.reschedule_task, task.id, note)
        self.stats["rescheduled"] += 1
        await self._send(actor, task.id, route, s.reschedule_delay)
        return True

    # -- upsertion_worker / deletion_worker --------------------------------------------

    async def upsert(self, task_id: int) -> None:
        """upsertion_worker's body. Cancellation: as `processor.run`."""
        task, lock = await self._task_and_lock(task_id, "upsert")
        if task is not None:
            await self._mutate(task, lock, "upsertion_worker", upsert_op, parse_upserts)

    async def delete(self, task_id: int) -> None:
        """deletion_worker's body. Cancellation: as `processor.run`."""
        task, lock = await self._task_and_lock(task_id, "delete")
        if task is not None:
            await self._mutate(task, lock, "deletion_worker", delete_op, parse_deletes)

    async def _mutate(
        self,
        task: Task,
        lock: LockRow | None,
        actor: str,
        op: Callable[[ModelBatch, int, Any], int],
        parse: Callable[[dict[str, Any], Settings], Any],
    ) -> None:
        s = self.settings
        if lock is not None and not s.forwarding:
            reason = f"model {task.model!r} is locked by reindex #{lock.owner}"
            if s.waiting:
                await self._reschedule(task, actor, task.model, reason)
            else:
                await self._fail(
                    task, f"{reason}; forwarding and waiting are off", "refused"
                )
            return
        processor = self.processor  # none: raises, and Dramatiq retries the message
        try:
            args = parse(task.payload, s)
            if s.batching:
                await processor.run(task.model, op, task.id, args)
            else:  # the baseline: one embedding call and one transaction per task
                batch = ModelBatch(task.model)
                op(batch, task.id, args)
                await anyio.to_thread.run_sync(
                    self._write, task.model, batch.ops, batch.tasks
                )
        except keybatch.ProcessorStopped:
            raise  # the worker is going down: Dramatiq retries the message
        except Exception as exc:
            await self._fail(task, describe(exc))
            return
        self.stats["done"] += 1

    # -- reindex_worker -------------------------------------------------------------

    async def reindex(self, task_id: int) -> None:
        """reindex_worker's body: lock, split into subtasks, send them.

        Raises:
            ReindexRefused: A model is locked and waiting is off (the task is
                marked refused first).

        Cancellation: a cancelled wait for the models holds nothing; the lock
        transaction either committed (a redelivery picks the work up) or not.
        """
        s = self.settings
        task = await self._task(task_id, "reindex")
        if task is None:
            return
        source, dest = task.model, task.payload.get("dest")
        if not isinstance(dest, str) or not dest:
            await self._fail(task, "payload needs 'dest', the destination model")
            return
        if dest == source:
            await self._fail(task, f"cannot reindex model {source!r} onto itself")
            return
        try:
            for model in (source, dest):
                await anyio.to_thread.run_sync(self.store.model, model)
        except UnknownModel as exc:
            await self._fail(task, describe(exc))
            return
        outcome: Busy | list[int] | str
        try:
            async with self.processor.exclusive(
                source, dest, timeout=s.exclusive_timeout
            ):
                outcome = await anyio.to_thread.run_sync(
                    self.store.begin_reindex,
                    task.id,
                    source,
                    dest,
                    s.chunk_size,
                    s.lock_ttl,
                )
        except keybatch.KeyBusy as exc:
            outcome = f"models {', '.join(map(repr, exc.keys))} are busy in this worker"
        if not isinstance(outcome, list):
            reason = str(outcome)
            if s.waiting:
                await self._reschedule(task, "reindex_worker", source, reason)
                return
            await self._fail(task, f"{reason}; waiting is off", "refused")
            raise ReindexRefused(task.id, reason)
        self.stats["reindexes_started"] += 1
        if not outcome:
            await self._finish_reindex(task.id, source, dest)
            return
        for chunk_id in outcome:
            await self._send("reindex_subworker", chunk_id, source)

    # -- reindex_subworker ----------------------------------------------------------

    async def reindex_chunk(self, task_id: int) -> None:
        """reindex_subworker's body: embed and write one chunk; the last swaps.

        Cancellation: the chunk's transaction commits or not as a whole; a
        redelivered chunk writes the same rows again (idempotent).
        """
        task = await anyio.to_thread.run_sync(self.store.task, task_id)
        if task is None or task.kind != "reindex_chunk":
            log.warning("reindex chunk #%s does not exist: ignored", task_id)
            self.stats["unknown_tasks"] += 1
            return
        reindex = int(task.payload["reindex"])
        dest = str(task.payload["dest"])
        if task.status == "done":  # redelivered: maybe the swap did not happen
            await self._finish_reindex(reindex, task.model, dest)
            return
        if task.terminal:
            return
        lock, rows = await anyio.to_thread.run_sync(self.store.chunk_rows, task)
        if lock is None:
            reason = "reindex lock lost (expired and broken, or released)"
            await anyio.to_thread.run_sync(self.store.fail_reindex, reindex, reason)
            await self._fail(task, reason)
            return
        dest_info = await anyio.to_thread.run_sync(self.store.model, lock.dest)
        embedder = get_embedder(dest_info.embedder)
        texts = [text for _, text, _ in rows]
        vectors = (
            await anyio.to_thread.run_sync(self._embed, embedder, texts)
            if texts
            else []
        )
        outcome = await anyio.to_thread.run_sync(
            self.store.write_chunk, task, rows, vectors, self.settings.lock_ttl
        )
        if isinstance(outcome, str):
            await anyio.to_thread.run_sync(self.store.fail_reindex, reindex, outcome)
            self.stats["failed"] += 1
            return
        self.stats["chunks_done"] += 1
        if outcome == 0:
            await self._finish_reindex(reindex, task.model, dest)

    async def _finish_reindex(self, reindex: int, source: str, dest: str) -> None:
        """Swap the destination in under ``exclusive``, then collect garbage.

        Cancellation: the swap transaction commits or not as a whole.
        """
        async with self.processor.exclusive(source, dest):
            note = await anyio.to_thread.run_sync(self.store.finish_reindex, reindex)
        if note is None:
            return
        dropped = await anyio.to_thread.run_sync(self.store.gc)
        self.stats["reindexes_done"] += 1
        log.info("reindex #%s done: %s; dropped %s", reindex, note, dropped)
