"""The SQLite store: tasks, models, items, sqlite-vec indexes, reindex locks.

Everything the workers share lives in one SQLite file (WAL mode), so several
worker processes on one machine see one truth. Writers use ``BEGIN
IMMEDIATE``: SQLite runs them one at a time, which is what the reindex lock
and the forwarding rely on across processes.

Layout:

- ``tasks(id, kind, model, payload, status, attempts, error, ...)``: the work.
- ``models(name, embedder, dim, slot, generation)``: one vector index per
  model; ``generation`` names the live one.
- ``generations(model, gen, state)``: live, staging (a reindex builds it) or
  abandoned (garbage, dropped by `Store.gc`).
- ``items(id, model, gen, item_id, text, version, deleted)``: the texts of
  each generation; ``id`` is the rowid of the item's vector in the
  generation's vec0 table ``vec_{slot}_{gen}``. ``version`` orders writes
  (a counter bumped by every write transaction); ``deleted`` marks
  tombstones, which only staging generations hold.
- ``reindex_locks(model, owner, source, dest, staging_gen, expires_at)``: a
  row per model a reindex holds (its source and its destination).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from types import ModuleType
from typing import Any

import sqlite_vec

from .embedders import Embedder, get_embedder

__all__ = [
    "Busy",
    "Hit",
    "LockRow",
    "ModelInfo",
    "Store",
    "Task",
    "UnknownModel",
    "sqlite_module",
]

TERMINAL = frozenset({"done", "failed", "refused"})
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def sqlite_module() -> ModuleType:
    """A DB-API sqlite module that can load extensions (sqlite-vec).

    The standard library's when it can (most Pythons); else ``pysqlite3``
    (``pip install pysqlite3-binary``), for Pythons built without loadable
    extensions, such as pyenv's default build.
    """
    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return sqlite3
    try:
        import pysqlite3.dbapi2 as module  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:  # pragma: no cover - depends on the Python build
        raise RuntimeError(
            "this Python's sqlite3 cannot load extensions and pysqlite3 is not"
            " installed: pip install pysqlite3-binary"
        ) from exc
    return module  # type: ignore[no-any-return]


class UnknownModel(LookupError):
    """The task names a model that was never created."""

    def __init__(self, model: str) -> None:
        super().__init__(f"unknown model {model!r}")
        self.model = model


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    embedder: str
    dim: int
    slot: int
    generation: int

    def table(self, gen: int | None = None) -> str:
        return f"vec_{self.slot}_{self.generation if gen is None else gen}"


@dataclasses.dataclass(frozen=True)
class Task:
    id: int
    kind: str
    model: str
    payload: dict[str, Any]
    status: str
    attempts: int
    error: str | None
    parent: int | None
    note: str | None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclasses.dataclass(frozen=True)
class LockRow:
    model: str
    owner: int
    source: str
    dest: str
    staging_gen: int
    expires_at: float


@dataclasses.dataclass(frozen=True)
class Busy:
    """A reindex could not take its lock: ``model`` is held by ``owner``."""

    model: str
    owner: int

    def __str__(self) -> str:
        return f"model {self.model!r} is locked by reindex #{self.owner}"


@dataclasses.dataclass(frozen=True)
class Hit:
    item_id: str
    text: str
    distance: float


def _pack(vector: Sequence[float]) -> bytes:
    return struct.pack(f"{len(vector)}f", *vector)


def _unpack(blob: bytes) -> tuple[float, ...]:
    return struct.unpack(f"{len(blob) // 4}f", blob)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL
        CHECK (kind IN ('upsert', 'delete', 'reindex', 'reindex_chunk')),
    model TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'waiting', 'running', 'done', 'failed', 'refused')),
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    parent INTEGER REFERENCES tasks(id),
    note TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_parent ON tasks(parent, status);
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    embedder TEXT NOT NULL,
    dim INTEGER NOT NULL,
    slot INTEGER NOT NULL UNIQUE,
    generation INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS generations (
    model TEXT NOT NULL REFERENCES models(name),
    gen INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('live', 'staging', 'abandoned', 'retired')),
    PRIMARY KEY (model, gen)
);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    gen INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    text TEXT NOT NULL,
    version INTEGER NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    UNIQUE (model, gen, item_id)
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('version', 0);
CREATE TABLE IF NOT EXISTS reindex_locks (
    model TEXT PRIMARY KEY,
    owner INTEGER NOT NULL,
    source TEXT NOT NULL,
    dest TEXT NOT NULL,
    staging_gen INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
"""


class Store:
    """The database of one deployment; safe to share between threads.

    Each thread gets its own connection (SQLite connections are not shared
    across threads here). Every method is synchronous: the async workers call
    them through ``anyio.to_thread.run_sync``.
    """

    def __init__(self, path: str, synchronous: str = "NORMAL") -> None:
        self.path = path
        self.synchronous = synchronous.upper()
        self._sqlite = sqlite_module()
        self._local = threading.local()
        self._all: list[Any] = []
        self._all_lock = threading.Lock()

    # -- connections and transactions ------------------------------------------

    def conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._sqlite.connect(
                self.path, timeout=60.0, isolation_level=None, check_same_thread=False
            )
            conn.enable_load_extension(True)
            sqlite_vec.load(conn)
            conn.enable_load_extension(False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA busy_timeout=60000")
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        """Close every connection this store opened (all threads)."""
        with self._all_lock:
            for conn in self._all:
                with suppress(Exception):
                    conn.close()
            self._all.clear()
        self._local = threading.local()

    @contextmanager
    def write(self) -> Iterator[Any]:
        """A write transaction (``BEGIN IMMEDIATE``): commits or rolls back."""
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[Any]:
        """A read transaction: one consistent snapshot."""
        conn = self.conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def init(self) -> None:
        """Create the tables (idempotent)."""
        conn = self.conn()
        conn.executescript(_SCHEMA)

    # -- models -------------------------------------------------------------------

    def create_model(self, name: str, embedder: str) -> ModelInfo:
        """Create model ``name`` with an empty index (idempotent for one spec)."""
        if not _MODEL_NAME.match(name):
            raise ValueError(f"bad model name {name!r}: letters, digits, _ . - only")
        dim = get_embedder(embedder).dim
        with self.write() as conn:
            found = self._model(conn, name)
            if found is not None:
                if found.embedder != embedder:
                    raise ValueError(
                        f"model {name!r} exists with embedder {found.embedder!r}"
                    )
                return found
            (slot,) = conn.execute(
                "SELECT coalesce(max(slot), 0) + 1 FROM models"
            ).fetchone()
            info = ModelInfo(name, embedder, dim, slot, 1)
            conn.execute(
                "INSERT INTO models VALUES (?, ?, ?, ?, ?)",
                (name, embedder, dim, slot, 1),
            )
            conn.execute("INSERT INTO generations VALUES (?, 1, 'live')", (name,))
            self._create_vec(conn, info, 1)
            return info

    @staticmethod
    def _create_vec(conn: Any, info: ModelInfo, gen: int) -> None:
        conn.execute(
            f"CREATE VIRTUAL TABLE {info.table(gen)} USING"
            f" vec0(embedding float[{info.dim}] distance_metric=cosine)"
        )

    @staticmethod
    def _model(conn: Any, name: str) -> ModelInfo | None:
        row = conn.execute(
            "SELECT name, embedder, dim, slot, generation FROM models WHERE name = ?",
            (name,),
        ).fetchone()
        return None if row is None else ModelInfo(*row)

    def model(self, name: str) -> ModelInfo:
        """The model's row; raises `UnknownModel`."""
        info = self._model(self.conn(), name)
        if info is None:
            raise UnknownModel(name)
        return info

    def models(self) -> list[ModelInfo]:
        rows = self.conn().execute(
            "SELECT name, embedder, dim, slot, generation FROM models ORDER BY slot"
        )
        return [ModelInfo(*row) for row in rows]

    # -- tasks --------------------------------------------------------------------

    def create_tasks(
        self, specs: Iterable[tuple[str, str, dict[str, Any]]]
    ) -> list[int]:
        """Insert ``(kind, model, payload)`` tasks in one transaction; their ids."""
        now = time.time()
        ids = []
        with self.write() as conn:
            for kind, model, payload in specs:
                cursor = conn.execute(
                    "INSERT INTO tasks (kind, model, payload, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (kind, model, json.dumps(payload), now, now),
                )
                ids.append(int(cursor.lastrowid))
        return ids

    def task(self, task_id: int) -> Task | None:
        return self._task(self.conn(), task_id)

    @staticmethod
    def _task(conn: Any, task_id: int) -> Task | None:
        row = conn.execute(
            "SELECT id, kind, model, payload, status, attempts, error, parent, note"
            " FROM tasks WHERE id = ?",
            (task_id,),
        ).fetchone()
        if row is None:
            return None
        try:
            payload = json.loads(row[3])
        except ValueError:
            payload = {"unparsable": row[3]}
        if not isinstance(payload, dict):
            payload = {"value": payload}
        return Task(row[0], row[1], row[2], payload, *row[4:])

    def tasks(self, ids: Iterable[int] | None = None) -> list[Task]:
        conn = self.conn()
        if ids is None:
            found = [r[0] for r in conn.execute("SELECT id FROM tasks ORDER BY id")]
        else:
            found = list(ids)
        return [t for t in (self._task(conn, i) for i in found) if t is not None]

    def status_counts(self) -> dict[str, int]:
        rows = self.conn().execute("SELECT status, count(*) FROM tasks GROUP BY status")
        return dict(rows.fetchall())

    def finish_task(
        self,
        task_id: int,
        status: str,
        *,
        error: str | None = None,
        note: str | None = None,
        only_if_open: bool = True,
    ) -> bool:
        """Record a task's outcome (counts an attempt); False if already final."""
        with self.write() as conn:
            return self._finish(conn, task_id, status, error, note, only_if_open)

    @staticmethod
    def _finish(
        conn: Any,
        task_id: int,
        status: str,
        error: str | None,
        note: str | None,
        only_if_open: bool = True,
    ) -> bool:
        sql = (
            "UPDATE tasks SET status = ?, error = ?, note = coalesce(?, note),"
            " attempts = attempts + 1, updated_at = ? WHERE id = ?"
        )
        if only_if_open:
            sql += " AND status NOT IN ('done', 'failed', 'refused')"
        cursor = conn.execute(sql, (status, error, note, time.time(), task_id))
        return bool(cursor.rowcount)

    def reschedule_task(self, task_id: int, note: str) -> int:
        """Mark a task waiting and count the attempt; returns attempts so far."""
        with self.write() as conn:
            conn.execute(
                "UPDATE tasks SET status = 'waiting', note = ?,"
                " attempts = attempts + 1, updated_at = ? WHERE id = ?",
                (note, time.time(), task_id),
            )
            row = conn.execute(
                "SELECT attempts FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
        return int(row[0])

    # -- locks --------------------------------------------------------------------

    def lock_of(self, model: str) -> LockRow | None:
        """The reindex lock row on ``model``, expired or not."""
        return self._lock_of(self.conn(), model)

    @staticmethod
    def _lock_of(conn: Any, model: str) -> LockRow | None:
        row = conn.execute(
            "SELECT model, owner, source, dest, staging_gen, expires_at"
            " FROM reindex_locks WHERE model = ?",
            (model,),
        ).fetchone()
        return None if row is None else LockRow(*row)

    def task_and_lock(self, task_id: int) -> tuple[Task | None, LockRow | None]:
        """A task and the live lock on its model (one trip to a thread)."""
        task = self.task(task_id)
        if task is None or task.terminal:
            return task, None
        return task, self.live_lock(task.model)

    def live_lock(self, model: str) -> LockRow | None:
        """The unexpired lock on ``model``; an expired one is broken first.

        Breaking a lock fails its reindex (its holder is presumed crashed)
        and abandons the staging generation it was building.
        """
        lock = self.lock_of(model)
        if lock is None or lock.expires_at > time.time():
            return lock
        with self.write() as conn:
            lock = self._lock_of(conn, model)
            if lock is None or lock.expires_at > time.time():
                return lock
            self._break(conn, lock.owner, "reindex lock expired (holder presumed dead)")
        self.gc()
        return None

    def _break(self, conn: Any, owner: int, reason: str) -> None:
        for row in conn.execute(
            "SELECT dest, staging_gen FROM reindex_locks WHERE owner = ? LIMIT 1",
            (owner,),
        ).fetchall():
            conn.execute(
                "UPDATE generations SET state = 'abandoned'"
                " WHERE model = ? AND gen = ? AND state = 'staging'",
                row,
            )
        conn.execute("DELETE FROM reindex_locks WHERE owner = ?", (owner,))
        self._finish(conn, owner, "failed", reason, None)
        for (chunk,) in conn.execute(
            "SELECT id FROM tasks WHERE parent = ?"
            " AND status NOT IN ('done', 'failed', 'refused')",
            (owner,),
        ).fetchall():
            self._finish(
                conn, chunk, "failed", f"reindex #{owner} failed: {reason}", None
            )

    # -- the live write path (one transaction per batch) --------------------------

    def write_batch(
        self,
        model: str,
        ops: dict[str, str | None],
        tasks: Sequence[tuple[int, str]],
        *,
        embed: Callable[[Embedder, list[str]], list[list[float]]] | None = None,
    ) -> dict[str, Any]:
        """Apply one batch of a model: embed all new texts in one call, one commit.

        ``ops`` maps item id to its new text, or None to delete it: the net
        effect of the batch's operations in call order. ``tasks`` are
        ``(task_id, note)`` to mark done in the same transaction.

        If a reindex holds the model, the same effects are forwarded into the
        reindex's staging generation (embedded by the destination's embedder),
        stamped with this write's version so a reindex chunk that read the
        item earlier cannot overwrite them.
        """
        embed = embed or (lambda embedder, texts: embedder.embed(texts))
        info = self.model(model)
        texts = [t for t in ops.values() if t is not None]
        vectors = embed(get_embedder(info.embedder), texts) if texts else []
        lock = self.lock_of(model)
        dest_vectors: list[list[float]] | None = None
        dest: ModelInfo | None = None
        if lock is not None and texts:
            dest = self.model(lock.dest)
            dest_vectors = (
                vectors
                if dest.embedder == info.embedder
                else embed(get_embedder(dest.embedder), texts)
            )
        with self.write() as conn:
            info = self._model(conn, model) or info  # the live generation now
            version = conn.execute(
                "UPDATE counters SET value = value + 1 WHERE name = 'version'"
                " RETURNING value"
            ).fetchone()[0]
            self._apply(conn, info, info.generation, ops, texts, vectors, version)
            forwarded = None
            now_lock = self._lock_of(conn, model)
            if now_lock is not None:
                if (
                    dest is None
                    or lock is None
                    or (now_lock.owner, now_lock.dest)
                    != (
                        lock.owner,
                        lock.dest,
                    )
                ):
                    dest = self._model(conn, now_lock.dest)
                    assert dest is not None
                    dest_vectors = (
                        embed(get_embedder(dest.embedder), texts) if texts else []
                    )
                self._apply(
                    conn,
                    dest,
                    now_lock.staging_gen,
                    ops,
                    texts,
                    dest_vectors or [],
                    version,
                    staging=True,
                )
                forwarded = now_lock.owner
            for task_id, note in tasks:
                if forwarded is not None:
                    note = f"{note}; forwarded to reindex #{forwarded}"
                self._finish(conn, task_id, "done", None, note)
        return {"version": version, "forwarded": forwarded}

    @staticmethod
    def _apply(
        conn: Any,
        info: ModelInfo,
        gen: int,
        ops: dict[str, str | None],
        texts: list[str],
        vectors: Sequence[Sequence[float]],
        version: int,
        *,
        staging: bool = False,
    ) -> None:
        table = info.table(gen)
        by_text = iter(vectors)
        for item_id, text in ops.items():
            vector = next(by_text) if text is not None else None
            row = conn.execute(
                "SELECT id, version FROM items"
                " WHERE model = ? AND gen = ? AND item_id = ?",
                (info.name, gen, item_id),
            ).fetchone()
            if staging and row is not None and row[1] > version:
                continue  # a newer write already landed in the staging index
            if text is None:
                if row is None:
                    if staging:  # a tombstone: an older chunk read must not revive it
                        conn.execute(
                            "INSERT INTO items (model, gen, item_id, text, version,"
                            " deleted) VALUES (?, ?, ?, '', ?, 1)",
                            (info.name, gen, item_id, version),
                        )
                    continue
                conn.execute(f"DELETE FROM {table} WHERE rowid = ?", (row[0],))
                if staging:
                    conn.execute(
                        "UPDATE items SET deleted = 1, text = '', version = ?"
                        " WHERE id = ?",
                        (version, row[0]),
                    )
                else:
                    conn.execute("DELETE FROM items WHERE id = ?", (row[0],))
                continue
            assert vector is not None
            if row is None:
                rowid = conn.execute(
                    "INSERT INTO items (model, gen, item_id, text, version)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (info.name, gen, item_id, text, version),
                ).lastrowid
            else:
                rowid = row[0]
                conn.execute(
                    "UPDATE items SET text = ?, version = ?, deleted = 0 WHERE id = ?",
                    (text, version, rowid),
                )
                conn.execute(f"DELETE FROM {table} WHERE rowid = ?", (rowid,))
            conn.execute(
                f"INSERT INTO {table} (rowid, embedding) VALUES (?, ?)",
                (rowid, _pack(vector)),
            )
        del texts

    # -- reindex ------------------------------------------------------------------

    def begin_reindex(
        self, task_id: int, source: str, dest: str, chunk_size: int, ttl: float
    ) -> Busy | list[int]:
        """Take the lock on ``source`` and ``dest`` and split the work.

        In one transaction: break expired locks, check both models are free
        (or already ours: a redelivered task), create the staging generation
        of ``dest``, snapshot the source's item rowids into chunk subtasks.
        Returns the chunk task ids still to run, or `Busy`.
        """
        now = time.time()
        broke = False
        with self.write() as conn:
            for model in (source, dest):
                lock = self._lock_of(conn, model)
                if (
                    lock is not None
                    and lock.owner != task_id
                    and lock.expires_at <= now
                ):
                    self._break(
                        conn, lock.owner, "reindex lock expired (holder presumed dead)"
                    )
                    broke = True
            for model in (source, dest):
                lock = self._lock_of(conn, model)
                if lock is not None and lock.owner != task_id:
                    return Busy(model, lock.owner)
            mine = self._lock_of(conn, source)
            if mine is not None:  # redelivered: the split happened already
                return [
                    r[0]
                    for r in conn.execute(
                        "SELECT id FROM tasks WHERE parent = ?"
                        " AND status NOT IN ('done', 'failed', 'refused') ORDER BY id",
                        (task_id,),
                    )
                ]
            src = self._model(conn, source)
            dst = self._model(conn, dest)
            if src is None or dst is None:
                raise UnknownModel(source if src is None else dest)
            (gen,) = conn.execute(
                "SELECT max(gen) + 1 FROM generations WHERE model = ?", (dest,)
            ).fetchone()
            conn.execute(
                "INSERT INTO generations VALUES (?, ?, 'staging')", (dest, gen)
            )
            self._create_vec(conn, dst, gen)
            for model in dict.fromkeys((source, dest)):
                conn.execute(
                    "INSERT INTO reindex_locks VALUES (?, ?, ?, ?, ?, ?)",
                    (model, task_id, source, dest, gen, now + ttl),
                )
            rowids = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM items WHERE model = ? AND gen = ? ORDER BY id",
                    (source, src.generation),
                )
            ]
            chunks = [
                rowids[i : i + chunk_size] for i in range(0, len(rowids), chunk_size)
            ]
            ids = []
            for index, chunk in enumerate(chunks):
                payload = {
                    "reindex": task_id,
                    "dest": dest,
                    "index": index,
                    "lo": chunk[0],
                    "hi": chunk[-1],
                }
                cursor = conn.execute(
                    "INSERT INTO tasks (kind, model, payload, parent, created_at,"
                    " updated_at) VALUES ('reindex_chunk', ?, ?, ?, ?, ?)",
                    (source, json.dumps(payload), task_id, now, now),
                )
                ids.append(int(cursor.lastrowid))
            conn.execute(
                "UPDATE tasks SET status = 'running', attempts = attempts + 1,"
                " note = ?, updated_at = ? WHERE id = ?",
                (
                    f"{len(rowids)} items of {source!r} into {dest!r} generation {gen}"
                    f" in {len(ids)} chunks",
                    now,
                    task_id,
                ),
            )
        if broke:
            self.gc()
        return ids

    def chunk_rows(
        self, chunk: Task
    ) -> tuple[LockRow | None, list[tuple[str, str, int]]]:
        """Read a chunk's source items (item id, text, version) and the lock."""
        reindex = int(chunk.payload["reindex"])
        with self.read() as conn:
            lock = self._lock_of(conn, chunk.model)
            if lock is None or lock.owner != reindex:
                return None, []
            src = self._model(conn, chunk.model)
            assert src is not None
            rows = conn.execute(
                "SELECT item_id, text, version FROM items WHERE model = ? AND gen = ?"
                " AND id BETWEEN ? AND ? AND deleted = 0 ORDER BY id",
                (chunk.model, src.generation, chunk.payload["lo"], chunk.payload["hi"]),
            ).fetchall()
        return lock, rows

    def write_chunk(
        self,
        chunk: Task,
        rows: Sequence[tuple[str, str, int]],
        vectors: Sequence[Sequence[float]],
        ttl: float,
    ) -> int | str:
        """Write a chunk into the staging generation and renew the lock.

        Returns the number of the reindex's chunks still open, or a reason
        string when the lock is no longer the reindex's (the chunk and its
        reindex are failed then).
        """
        reindex = int(chunk.payload["reindex"])
        with self.write() as conn:
            lock = self._lock_of(conn, chunk.model)
            if lock is None or lock.owner != reindex:
                reason = "reindex lock lost (expired and broken, or released)"
                self._finish(conn, chunk.id, "failed", reason, None)
                self._finish(conn, reindex, "failed", reason, None)
                return reason
            conn.execute(
                "UPDATE reindex_locks SET expires_at = ? WHERE owner = ?",
                (time.time() + ttl, reindex),
            )
            dest = self._model(conn, lock.dest)
            assert dest is not None
            table = dest.table(lock.staging_gen)
            for (item_id, text, version), vector in zip(rows, vectors, strict=True):
                row = conn.execute(
                    "SELECT id, version FROM items WHERE model = ? AND gen = ?"
                    " AND item_id = ?",
                    (dest.name, lock.staging_gen, item_id),
                ).fetchone()
                if row is not None and row[1] >= version:
                    continue  # forwarded already, newer or the same
                if row is None:
                    rowid = conn.execute(
                        "INSERT INTO items (model, gen, item_id, text, version)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (dest.name, lock.staging_gen, item_id, text, version),
                    ).lastrowid
                else:
                    rowid = row[0]
                    conn.execute(
                        "UPDATE items SET text = ?, version = ?, deleted = 0"
                        " WHERE id = ?",
                        (text, version, rowid),
                    )
                    conn.execute(f"DELETE FROM {table} WHERE rowid = ?", (rowid,))
                conn.execute(
                    f"INSERT INTO {table} (rowid, embedding) VALUES (?, ?)",
                    (rowid, _pack(vector)),
                )
            self._finish(
                conn, chunk.id, "done", None, f"{len(rows)} items", only_if_open=False
            )
            (open_chunks,) = conn.execute(
                "SELECT count(*) FROM tasks WHERE parent = ? AND status != 'done'",
                (reindex,),
            ).fetchone()
        return int(open_chunks)

    def finish_reindex(self, reindex: int) -> str | None:
        """Swap the destination's staging generation in and release the lock.

        One transaction: the destination's live generation becomes the staging
        one (tombstones dropped), the old one is retired, the lock rows go,
        the reindex task is done. Returns its note, or None when it was
        finished already (or failed). Run `gc` afterwards.
        """
        with self.write() as conn:
            task = self._task(conn, reindex)
            if task is None or task.status != "running":
                return None
            (open_chunks,) = conn.execute(
                "SELECT count(*) FROM tasks WHERE parent = ? AND status != 'done'",
                (reindex,),
            ).fetchone()
            locks = conn.execute(
                "SELECT dest, staging_gen FROM reindex_locks WHERE owner = ?",
                (reindex,),
            ).fetchall()
            if open_chunks or not locks:
                return None
            dest, gen = locks[0]
            old = self._model(conn, dest)
            assert old is not None
            conn.execute(
                "DELETE FROM items WHERE model = ? AND gen = ? AND deleted = 1",
                (dest, gen),
            )
            conn.execute("UPDATE models SET generation = ? WHERE name = ?", (gen, dest))
            conn.execute(
                "UPDATE generations SET state = 'retired' WHERE model = ? AND gen = ?",
                (dest, old.generation),
            )
            conn.execute(
                "UPDATE generations SET state = 'live' WHERE model = ? AND gen = ?",
                (dest, gen),
            )
            conn.execute("DELETE FROM reindex_locks WHERE owner = ?", (reindex,))
            (count,) = conn.execute(
                "SELECT count(*) FROM items WHERE model = ? AND gen = ?", (dest, gen)
            ).fetchone()
            note = f"{dest!r} now serves generation {gen}: {count} items"
            self._finish(conn, reindex, "done", None, note)
        return note

    def fail_reindex(self, reindex: int, reason: str) -> None:
        """Fail a reindex: its open chunks, its lock, its staging generation."""
        with self.write() as conn:
            if self._lock_of_owner(conn, reindex):
                self._break(conn, reindex, reason)
            else:
                self._finish(conn, reindex, "failed", reason, None)
        self.gc()

    @staticmethod
    def _lock_of_owner(conn: Any, owner: int) -> bool:
        row = conn.execute(
            "SELECT 1 FROM reindex_locks WHERE owner = ?", (owner,)
        ).fetchone()
        return row is not None

    def gc(self) -> list[str]:
        """Drop generations that are neither live nor being built.

        What a finished reindex leaves behind (the retired generation) and
        what a failed or expired one leaves (its abandoned staging).
        Returns the vec tables dropped.
        """
        dropped = []
        with self.write() as conn:
            rows = conn.execute(
                "SELECT g.model, g.gen, m.slot FROM generations g"
                " JOIN models m ON m.name = g.model"
                " WHERE g.state IN ('retired', 'abandoned')"
            ).fetchall()
            for model, gen, slot in rows:
                table = f"vec_{slot}_{gen}"
                conn.execute(f"DROP TABLE IF EXISTS {table}")
                conn.execute(
                    "DELETE FROM items WHERE model = ? AND gen = ?", (model, gen)
                )
                conn.execute(
                    "DELETE FROM generations WHERE model = ? AND gen = ?", (model, gen)
                )
                dropped.append(table)
        return dropped

    # -- queries ------------------------------------------------------------------

    def nearest(self, model: str, text: str, k: int = 5) -> list[Hit]:
        """The ``k`` items of ``model``'s live index nearest to ``text`` (cosine)."""
        info = self.model(model)
        (query,) = get_embedder(info.embedder).embed([text])
        return self.nearest_vector(model, query, k)

    def nearest_vector(
        self, model: str, vector: Sequence[float], k: int = 5
    ) -> list[Hit]:
        with self.read() as conn:
            info = self._model(conn, model)
            if info is None:
                raise UnknownModel(model)
            rows = conn.execute(
                f"SELECT i.item_id, i.text, v.distance FROM {info.table()} v"
                " JOIN items i ON i.id = v.rowid"
                " WHERE v.embedding MATCH ? AND k = ? ORDER BY v.distance",
                (_pack(vector), k),
            ).fetchall()
        return [Hit(*row) for row in rows]

    def contents(self, model: str) -> dict[str, tuple[str, tuple[float, ...]]]:
        """Item id -> (text, stored vector) of the model's live index."""
        with self.read() as conn:
            info = self._model(conn, model)
            if info is None:
                raise UnknownModel(model)
            rows = conn.execute(
                f"SELECT i.item_id, i.text, v.embedding FROM items i"
                f" LEFT JOIN {info.table()} v ON v.rowid = i.id"
                " WHERE i.model = ? AND i.gen = ?",
                (model, info.generation),
            ).fetchall()
        return {
            item_id: (text, _unpack(blob) if blob is not None else ())
            for item_id, text, blob in rows
        }

    def vec_tables(self) -> list[str]:
        rows = self.conn().execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            " AND sql LIKE 'CREATE VIRTUAL TABLE%' ORDER BY name"
        )
        return [r[0] for r in rows]
