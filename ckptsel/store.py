"""The result store: every measurement ckptsel makes, in one SQLite file in a cache directory.

Why SQLite: runs must resume after ``kill -9`` and never recompute what is stored, several
processes may share a cache, and the standard library has it. Design:

* **Where.** ``<cache dir>/results.sqlite3``; the cache dir is ``--cache-dir``, else
  ``$CKPTSEL_CACHE``, else the user's cache dir (:func:`default_cache_dir`). Never inside a
  checkpoint folder: ckptsel does not write to users' checkpoints.
* **Keys.** A *series* is one checkpoint (content fingerprint) measured one way
  (settings key: ``Recipe.measurement_key()`` plus engine settings) for one *kind* of
  measurement (``"score"``, ``"sample"``, ``"alt"``, ``"perturb:0"``, ``"router"``, ...).
  Series get a small integer id, so the long key strings are stored once, not per row.
  A result row is (series, example uid) -> :class:`Record`.
* **Rows.** The hot per-example numbers are typed REAL/INTEGER columns (nll, n_tokens,
  entropy, acc, copy_rate); the k sampled completions are a JSON list (alternative-solution
  harvesting reads the correct ones later); ``data`` is any JSON; ``array`` is a numpy array
  as raw bytes behind a one-line dtype/shape header (router weights: float32
  (layers, experts) is ~3x smaller and ~5x faster to write than JSON). A rowid table with a
  UNIQUE (series, uid) index rather than WITHOUT ROWID: multi-kB rows overflow a WITHOUT
  ROWID b-tree early (2x the disk for sampled rows), and the index alone answers "what is
  missing" without reading rows.
* **Crash safety.** WAL journal, ``synchronous=NORMAL``: a committed transaction survives a
  killed process (WAL+NORMAL can lose the last commits only on power loss, and never
  corrupts). :meth:`Store.put_many` writes one batch in one transaction, so ``kill -9`` loses
  at most the batch in flight. Writes take the write lock up front (``BEGIN IMMEDIATE``), and
  every operation -- the first open of a brand-new store (journal-mode switch, schema) included --
  waits up to ``timeout`` seconds for another process, through SQLite's busy handler and a retry
  of its own for the cases that handler does not cover, so processes sharing a cache queue
  instead of failing. The wait is ``$CKPTSEL_STORE_TIMEOUT`` seconds (default 60); a lock held
  longer than that is a :class:`StoreError` naming the store file and the time really waited (exit 2), as is
  any other SQLite failure (disk full, read-only folder, a damaged file): one line, never a
  ``sqlite3`` traceback.
* **Versioned.** ``schema_version`` holds the layout version; a store written by a newer
  ckptsel is refused with one line rather than misread, and an older layout is brought up to date
  in place on first open (version 2 added ``peak_nll``, each target's costliest-token NLL: rows
  stored before it read NULL there and are re-scored only when a rule needs it).

Besides results the store keeps the checkpoint registry (fingerprint -> last path, step,
time seen), a JSON key-value table (rendered rows, alternative-solution sets, verify results, merge
comparisons; its keys are made in :mod:`ckptsel.store_keys`) and the
fingerprint cache ((path, size, mtime_ns) -> fingerprint) so repeat runs do not re-hash.
SQL NULL and NaN are the same thing here: a NaN float reads back as None.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptsel.errors import CkptselError
from ckptsel.formats.converted import default_cache_dir

SCHEMA_VERSION = 2
STORE_FILENAME = "results.sqlite3"
_CHUNK = 500  # uids per "IN (...)" query, well below SQLite's bound-variable limit
DEFAULT_TIMEOUT = 60.0  # seconds a write waits for another process's transaction
TIMEOUT_ENV = "CKPTSEL_STORE_TIMEOUT"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    settings TEXT NOT NULL,
    kind TEXT NOT NULL,
    UNIQUE (fingerprint, settings, kind)
);
CREATE TABLE IF NOT EXISTS results (
    series INTEGER NOT NULL REFERENCES series(id),
    uid TEXT NOT NULL,
    nll REAL, n_tokens INTEGER, entropy REAL, acc REAL, copy_rate REAL,
    samples TEXT, data TEXT, array BLOB, peak_nll REAL,
    UNIQUE (series, uid)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    fingerprint TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    step INTEGER,
    seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS fingerprints (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    fingerprint TEXT NOT NULL
);
"""
_COLUMNS = "uid, nll, n_tokens, entropy, acc, copy_rate, samples, data, array, peak_nll"
_NUMERIC = ("nll", "n_tokens", "entropy", "acc", "copy_rate", "peak_nll")
# Version n -> n + 1, run in the transaction that records the new version.
_MIGRATIONS = {1: ("ALTER TABLE results ADD COLUMN peak_nll REAL",)}


class StoreError(CkptselError):
    """The result store cannot be opened or used (path, version, permissions, a lock held too long)."""


def store_timeout() -> float:
    """Seconds to wait for another process's lock: ``$CKPTSEL_STORE_TIMEOUT``, else 60."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise StoreError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds (>= 0)")
    return value


def _sqlite_message(path: Path, waited: float, exc: sqlite3.Error) -> str:
    """One line for a SQLite failure on the store at ``path`` after ``waited`` seconds of retrying."""
    text = str(exc)
    if _is_busy(exc):
        return (f"result store {path} is locked by another process (waited {waited:.1f} s; "
                f"set {TIMEOUT_ENV} to wait longer, or use another --cache-dir)")
    if "disk is full" in text or "disk full" in text:
        return f"result store {path}: disk full (free space, or use another --cache-dir)"
    if "readonly" in text or "read-only" in text:
        return f"result store {path}: cannot write (read-only; use another --cache-dir)"
    return f"result store {path}: {text}"


def _is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED in any of their forms (busy recovery, busy snapshot, ...)."""
    text = str(exc)
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def _sqlite_errors(method):
    """Run a :class:`Store` method under the store's wait: a busy or locked store is retried until
    ``timeout`` seconds have passed, then (like any other SQLite failure) a one-line :class:`StoreError`.

    SQLite's own busy handler does not cover every case: a connection that finds the WAL index
    being rebuilt, a read transaction whose snapshot went stale, or the journal-mode switch of a
    brand-new file can return SQLITE_BUSY at once. The whole method is retried, which is safe
    because every write is one transaction that is rolled back when it fails.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return self._retrying(lambda: method(self, *args, **kwargs))

    return wrapper


def ensure_outside(cache_dir: Path, checkpoint_dirs: Iterable[Path]) -> None:
    """Refuse a cache dir inside a checkpoint folder (ckptsel never writes into checkpoints)."""
    cache = Path(cache_dir).expanduser().resolve()
    for ckpt in checkpoint_dirs:
        ckpt = Path(ckpt).expanduser().resolve()
        if cache == ckpt or ckpt in cache.parents:
            raise StoreError(f"cache dir {cache} is inside checkpoint folder {ckpt}; choose another --cache-dir")


@dataclass(frozen=True)
class Record:
    """One example's measurement of one kind on one checkpoint; unset fields are None."""

    nll: float | None = None
    n_tokens: int | None = None
    entropy: float | None = None
    acc: float | None = None
    copy_rate: float | None = None
    samples: tuple[str, ...] | None = None
    data: Any = None
    array: Any = None  # numpy.ndarray; numpy is imported only when one is stored or read
    peak_nll: float | None = None  # the costliest target token's NLL (target scores)


@dataclass(frozen=True)
class CheckpointEntry:
    fingerprint: str
    path: str
    step: int | None
    seen: float  # unix time


def _encode(uid: str, rec: Record) -> tuple:
    return (
        uid,
        rec.nll,
        rec.n_tokens,
        rec.entropy,
        rec.acc,
        rec.copy_rate,
        None if rec.samples is None else json.dumps(list(rec.samples), ensure_ascii=False),
        None if rec.data is None else json.dumps(rec.data),
        None if rec.array is None else _array_bytes(rec.array),
        rec.peak_nll,
    )


def _decode(row: tuple) -> Record:
    _, nll, n_tokens, entropy, acc, copies, samples, data, array, peak_nll = row
    return Record(
        nll=nll,
        n_tokens=n_tokens,
        entropy=entropy,
        acc=acc,
        copy_rate=copies,
        samples=None if samples is None else tuple(json.loads(samples)),
        data=None if data is None else json.loads(data),
        array=None if array is None else _bytes_array(array),
        peak_nll=peak_nll,
    )


def _array_bytes(array) -> bytes:
    """A numeric array as ``b"<dtype> <d0>,<d1>,...\\n"`` + raw C-order bytes.

    Hand-rolled rather than ``np.save`` because reading a ``.npy`` header costs ~0.2 ms,
    which dominates reading thousands of router-weight rows; object dtypes are refused.
    """
    import numpy as np

    array = np.asarray(array)
    if array.dtype.hasobject:
        raise TypeError("only numeric arrays can be stored")
    header = f"{array.dtype.str} {','.join(map(str, array.shape))}\n".encode()
    return header + array.tobytes(order="C")


def _bytes_array(blob: bytes):
    import numpy as np

    header, _, data = bytes(blob).partition(b"\n")
    dtype, _, shape = header.decode().partition(" ")
    dims = tuple(int(d) for d in shape.split(",") if d)
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(dims).copy()


class Store:
    """A connection to the result store. Use as a context manager, or call :meth:`close`.

    One ``Store`` per process (or thread); any number of processes may open the same file.
    """

    def __init__(self, path: str | Path, timeout: float | None = None):
        self.path = Path(path)
        self.timeout = timeout = store_timeout() if timeout is None else timeout
        self._series_ids: dict[tuple[str, str, str], int] = {}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; we issue BEGIN IMMEDIATE ourselves.
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"result store {self.path}: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            self._retrying(self._prepare)
        except BaseException:
            self._db.close()
            raise

    def _prepare(self) -> None:
        """Settings and schema of a freshly opened connection (retried as a whole when busy)."""
        self._set_busy_timeout(self.timeout)
        if self._db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._init_schema()

    def _set_busy_timeout(self, seconds: float) -> None:
        self._db.execute(f"PRAGMA busy_timeout = {max(1, int(seconds * 1000))}")

    def _retrying(self, attempt):
        """``attempt()``, retried while the store is busy, for up to ``timeout`` seconds in all."""
        started = time.monotonic()
        pause = 0.005
        retried = False
        try:
            while True:
                try:
                    return attempt()
                except sqlite3.Error as exc:
                    if self._db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    waited = time.monotonic() - started
                    if not _is_busy(exc) or waited >= self.timeout:
                        raise StoreError(_sqlite_message(self.path, waited, exc)) from None
                # Sleep a little (with jitter, so processes that collided do not collide again),
                # then let SQLite's own handler wait at most for what is left of the budget.
                left = self.timeout - (time.monotonic() - started)
                time.sleep(min(pause * (0.5 + random.random()), max(left, 0.0)))
                pause = min(pause * 2, 0.1)
                self._set_busy_timeout(self.timeout - (time.monotonic() - started))
                retried = True
        finally:
            if retried:
                with contextlib.suppress(sqlite3.Error):
                    self._set_busy_timeout(self.timeout)

    @classmethod
    def open(cls, cache_dir: str | Path | None = None, timeout: float | None = None) -> Store:
        """Open (creating if needed) ``results.sqlite3`` in ``cache_dir`` or the default cache dir;
        ``timeout`` (seconds a write waits for another process) defaults to :func:`store_timeout`."""
        directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        return cls(directory / STORE_FILENAME, timeout=timeout)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the write lock from the start (no upgrade deadlock)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            if self._db.in_transaction:  # SQLite may already have rolled back (disk full, I/O error)
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _init_schema(self) -> None:
        """Check the version; create the tables on first use, bring an older layout up to date (:data:`_MIGRATIONS`).

        The common case (an existing, current store) takes no write lock, so opening a store
        never waits behind another process's batch.
        """
        try:
            found = self._db.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        except sqlite3.OperationalError:  # no such table: a new store
            found = None
        self._check_version(found)
        if found == SCHEMA_VERSION:
            return
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            found = db.execute("SELECT max(version) FROM schema_version").fetchone()[0]
            self._check_version(found)  # another process may have created it meanwhile
            if found is None:
                for statement in _SCHEMA.split(";"):  # executescript would commit our transaction
                    if statement.strip():
                        db.execute(statement)
            else:
                for version in range(found, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[version]:
                        db.execute(statement)
            if found != SCHEMA_VERSION:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    def _check_version(self, found: int | None) -> None:
        if found is not None and found > SCHEMA_VERSION:
            raise StoreError(
                f"result store {self.path} has schema version {found}, newer than this ckptsel reads "
                f"({SCHEMA_VERSION}); upgrade ckptsel or use another --cache-dir"
            )

    # -- results ------------------------------------------------------------------

    def _series(self, fingerprint: str, settings: str, kind: str, create: bool) -> int | None:
        key = (fingerprint, settings, kind)
        if key in self._series_ids:
            return self._series_ids[key]
        query = "SELECT id FROM series WHERE fingerprint = ? AND settings = ? AND kind = ?"
        row = self._db.execute(query, key).fetchone()
        if row is None and create:
            insert = "INSERT INTO series (fingerprint, settings, kind) VALUES (?, ?, ?)"
            row = (self._db.execute(insert, key).lastrowid,)
        if row is None:
            return None
        # An id created inside put_many's transaction is dropped from the cache on rollback.
        self._series_ids[key] = row[0]
        return row[0]

    @_sqlite_errors
    def put_many(
        self,
        fingerprint: str,
        settings: str,
        kind: str,
        records: Mapping[str, Record] | Iterable[tuple[str, Record]],
    ) -> int:
        """Store one batch of results in one transaction; returns the number of rows written.

        A uid already stored for this series is replaced. ``records`` may be a generator:
        it is consumed inside the transaction, and if it raises nothing of the batch is kept.
        """
        items = records.items() if isinstance(records, Mapping) else records
        try:
            with self._write() as db:
                series = self._series(fingerprint, settings, kind, create=True)
                cursor = db.executemany(
                    f"INSERT OR REPLACE INTO results (series, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    ((series, *_encode(uid, rec)) for uid, rec in items),
                )
                return cursor.rowcount
        except BaseException:
            self._series_ids.pop((fingerprint, settings, kind), None)
            raise

    @_sqlite_errors
    def get_many(self, fingerprint: str, settings: str, kind: str, uids: Iterable[str]) -> dict[str, Record]:
        """The stored records among ``uids`` (absent uids are simply not in the dict)."""
        series = self._series(fingerprint, settings, kind, create=False)
        if series is None:
            return {}
        found: dict[str, Record] = {}
        for chunk in _chunks(list(uids)):
            marks = ",".join("?" * len(chunk))
            query = f"SELECT {_COLUMNS} FROM results WHERE series = ? AND uid IN ({marks})"
            for row in self._db.execute(query, (series, *chunk)):
                found[row[0]] = _decode(row)
        return found

    @_sqlite_errors
    def missing(
        self, fingerprint: str, settings: str, kind: str, uids: Iterable[str], *, with_array: bool = False,
        with_field: str | None = None,
    ) -> list[str]:
        """The uids with no stored record, in the order given: what a resumed run must still do.

        ``with_array``: a record without an array counts as missing too (MoE target scores
        stored before routing weights were captured with them). ``with_field``: likewise a record
        whose numeric field of that name is NULL (target scores stored before ``peak_nll``).
        """
        uids = list(uids)
        series = self._series(fingerprint, settings, kind, create=False)
        if series is None:
            return uids
        done: set[str] = set()
        if with_field is not None and with_field not in _NUMERIC:
            raise ValueError(f"with_field must be one of {', '.join(_NUMERIC)}; got {with_field!r}")
        having = (" AND array IS NOT NULL" if with_array else "") + (
            f" AND {with_field} IS NOT NULL" if with_field else "")
        for chunk in _chunks(uids):
            marks = ",".join("?" * len(chunk))
            query = f"SELECT uid FROM results WHERE series = ? AND uid IN ({marks}){having}"
            done.update(row[0] for row in self._db.execute(query, (series, *chunk)))
        return [uid for uid in uids if uid not in done]

    @_sqlite_errors
    def matrix(self, fingerprints: list[str], settings: str, kind: str, uids: list[str], field: str):
        """One numeric field as a ``(checkpoints, examples)`` float array, NaN where not stored.

        The layout ``ckptsel.metrics`` expects; reads only that column (no JSON decoding).
        """
        import numpy as np

        if field not in _NUMERIC:
            raise ValueError(f"field must be one of {', '.join(_NUMERIC)}; got {field!r}")
        position = {uid: i for i, uid in enumerate(uids)}
        out = np.full((len(fingerprints), len(uids)), np.nan)
        for row, fingerprint in enumerate(fingerprints):
            series = self._series(fingerprint, settings, kind, create=False)
            if series is None:
                continue
            for chunk in _chunks(uids):
                marks = ",".join("?" * len(chunk))
                query = f"SELECT uid, {field} FROM results WHERE series = ? AND uid IN ({marks})"
                for uid, value in self._db.execute(query, (series, *chunk)):
                    if value is not None:
                        out[row, position[uid]] = value
        return out

    @_sqlite_errors
    def count(self, fingerprint: str, settings: str, kind: str) -> int:
        """How many examples this series holds."""
        series = self._series(fingerprint, settings, kind, create=False)
        if series is None:
            return 0
        return self._db.execute("SELECT count(*) FROM results WHERE series = ?", (series,)).fetchone()[0]

    # -- checkpoint registry ----------------------------------------------------------

    @_sqlite_errors
    def register_checkpoint(self, fingerprint: str, path: str | Path, step: int | None = None) -> None:
        """Record that this fingerprint was seen at ``path`` (the latest path wins)."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints (fingerprint, path, step, seen) VALUES (?, ?, ?, ?)",
                (fingerprint, str(path), step, time.time()),
            )

    @_sqlite_errors
    def checkpoint(self, fingerprint: str) -> CheckpointEntry | None:
        row = self._db.execute(
            "SELECT fingerprint, path, step, seen FROM checkpoints WHERE fingerprint = ?", (fingerprint,)
        ).fetchone()
        return None if row is None else CheckpointEntry(*row)

    @_sqlite_errors
    def checkpoints(self) -> list[CheckpointEntry]:
        """Every registered checkpoint, most recently seen first."""
        rows = self._db.execute("SELECT fingerprint, path, step, seen FROM checkpoints ORDER BY seen DESC")
        return [CheckpointEntry(*row) for row in rows]

    # -- key-value (keys: ckptsel.store_keys) ------------------------------------------

    @_sqlite_errors
    def put_value(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable value under ``key`` (replacing any previous one)."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO kv (key, value, updated) VALUES (?, ?, ?)",
                (key, json.dumps(value), time.time()),
            )

    @_sqlite_errors
    def get_value(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    # -- fingerprint cache ------------------------------------------------------------

    @_sqlite_errors
    def get_fingerprint(self, path: str | Path, size: int, mtime_ns: int) -> str | None:
        """The cached fingerprint for ``path`` if its size and mtime are unchanged; else None."""
        row = self._db.execute(
            "SELECT fingerprint FROM fingerprints WHERE path = ? AND size = ? AND mtime_ns = ?",
            (str(path), size, mtime_ns),
        ).fetchone()
        return None if row is None else row[0]

    @_sqlite_errors
    def put_fingerprint(self, path: str | Path, size: int, mtime_ns: int, fingerprint: str) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO fingerprints (path, size, mtime_ns, fingerprint) VALUES (?, ?, ?, ?)",
                (str(path), size, mtime_ns, fingerprint),
            )


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]
