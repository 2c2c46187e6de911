"""Job state in SQLite: files, batches and each finished request, so a job resumes after a crash or a restart.

A request is recorded only once its images are stored; only then is its output line written (``batches.py``).
So after a crash, every line in an output file is in the database, and a rerun skips exactly those.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

RECORDS_AT_ONCE = 8  # records read in one query when an output is rewritten (one may hold several images)

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, path TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, object TEXT NOT NULL  -- the batch object as JSON (OpenAI's fields)
);
CREATE TABLE IF NOT EXISTS items (
    batch_id TEXT NOT NULL, custom_id TEXT NOT NULL, line INTEGER NOT NULL,
    ok INTEGER NOT NULL, retryable INTEGER NOT NULL, latency_s REAL, record TEXT NOT NULL,
    PRIMARY KEY (batch_id, custom_id)
);
CREATE INDEX IF NOT EXISTS items_by_line ON items (batch_id, line);
"""


# Characters str.splitlines() (and so many JSONL readers) take for line ends that JSON text may hold unescaped:
# the C0 ones are always escaped by json.dumps, these three only with ensure_ascii.
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def dumps(obj) -> str:
    """One output line's JSON text: compact and ASCII (non-ASCII as \\u escapes), so that it is one line under any
    reader's idea of a line end (U+2028, U+0085 in a custom_id or a prompt would split it for str.splitlines()),
    and a string that is not Unicode text (a lone surrogate) can still be written."""
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"))


def one_line(text: str) -> str:
    """A stored line's JSON text with the line breaks ``dumps`` escapes escaped: lines recorded before it did (they
    kept non-ASCII as is). Those characters can only be inside JSON strings, where the escape means the same."""
    if "\x85" in text or "\u2028" in text or "\u2029" in text:
        return text.translate(_LINE_BREAKS)
    return text


class JobDB:
    """One SQLite file, shared by the event loop and a running job's writer thread (``batches.py``) under a lock;
    ``record`` does not commit: the caller commits a group of records with ``commit``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level="DEFERRED")
        self._lock = threading.RLock()
        with self._lock:
            # WAL: readers (GET /v1/batches) never wait on the job's writes; NORMAL keeps a commit to one fsync of
            # the log, and a power cut loses at most the last commits, which the rerun regenerates.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.commit()
            self._db.close()

    # ---- files -------------------------------------------------------------------------------------------
    def add_file(self, obj: dict, path: Path) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                             (obj["id"], obj["filename"], obj["purpose"], obj["bytes"], obj["created_at"], str(path)))
            self._db.commit()

    def file(self, file_id: str) -> tuple[dict, Path] | None:
        with self._lock:
            row = self._db.execute("SELECT id, filename, purpose, bytes, created_at, path FROM files WHERE id = ?",
                                   (file_id,)).fetchone()
        if row is None:
            return None
        return ({"id": row[0], "object": "file", "bytes": row[3], "created_at": row[4], "filename": row[1],
                 "purpose": row[2]}, Path(row[5]))

    def files(self, purpose: str | None = None) -> list[dict]:
        """Every file object (or those of one purpose), newest first."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM files" + (" WHERE purpose = ?" if purpose else ""),
                                    (purpose,) if purpose else ()).fetchall()
        found = [self.file(r[0])[0] for r in rows]
        return sorted(found, key=lambda f: (f["created_at"], f["id"]), reverse=True)

    def stored_bytes(self, purpose: str) -> int:
        """The bytes the files of one purpose hold, as recorded when each was stored."""
        with self._lock:
            row = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM files WHERE purpose = ?",
                                   (purpose,)).fetchone()
        return int(row[0])

    def delete_file(self, file_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))
            self._db.commit()

    # ---- batches -----------------------------------------------------------------------------------------
    def put_batch(self, obj: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO batches VALUES (?, ?)", (obj["id"], json.dumps(obj)))
            self._db.commit()

    def batch(self, batch_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT object FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return None if row is None else _loaded(batch_id, row[0])

    def batches(self) -> list[dict]:
        """Every batch, newest first; a row that cannot be read is left out (and logged), not the listing."""
        with self._lock:
            rows = self._db.execute("SELECT id, object FROM batches").fetchall()
        found = [b for b in (_loaded(i, text) for i, text in rows) if b is not None]
        return sorted(found, key=creation_order, reverse=True)

    # ---- finished requests -------------------------------------------------------------------------------
    def record(self, batch_id: str, custom_id: str, line: int, ok: bool, retryable: bool, latency_s: float | None,
               record: dict | str) -> None:
        """``record``: the output line, or its JSON text (``dumps``) already made."""
        text = record if isinstance(record, str) else dumps(record)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (batch_id, custom_id, line, int(ok), int(retryable), latency_s, text))

    def commit(self) -> None:
        with self._lock:
            self._db.commit()

    def finished(self, batch_id: str) -> dict[str, tuple[bool, bool]]:
        """custom_id -> (ok, retryable) of every recorded request."""
        with self._lock:
            rows = self._db.execute("SELECT custom_id, ok, retryable FROM items WHERE batch_id = ?",
                                    (batch_id,)).fetchall()
        return {cid: (bool(ok), bool(retryable)) for cid, ok, retryable in rows}

    def forget_retryable(self, batch_id: str) -> int:
        """Drop failures that may succeed when run again (a lost replica, a timeout): a rerun tries them again."""
        with self._lock:
            n = self._db.execute("DELETE FROM items WHERE batch_id = ? AND ok = 0 AND retryable = 1",
                                 (batch_id,)).rowcount
            self._db.commit()
        return n

    def records(self, batch_id: str, ok: bool | None = None) -> Iterator[str]:
        """The output lines (JSON text) in input order; ``ok`` selects successes or failures only. Read
        ``RECORDS_AT_ONCE`` at a time, each read a query of its own under the lock: a job's output can be gigabytes
        of base64, never all in memory, and the writer thread is never held up for the whole of it."""
        query = ("SELECT line, record FROM items WHERE batch_id = ? AND line > ?" + ("" if ok is None else
                 " AND ok = ?") + " ORDER BY line LIMIT ?")
        after = 0  # lines are numbered from 1, one custom_id each: a line number is a cursor into the records
        while True:
            args = (batch_id, after, *(() if ok is None else (int(ok),)), RECORDS_AT_ONCE)
            with self._lock:
                rows = self._db.execute(query, args).fetchall()
            for _, text in rows:
                yield text
            if len(rows) < RECORDS_AT_ONCE:
                return
            after = rows[-1][0]

    def write_records(self, batch_id: str, path: Path, ok: bool | None = None) -> None:
        """``path`` rewritten whole from ``records``: an output file as the database has it (lines written by an
        interrupted run that never reached a commit are dropped: they run again), so each custom_id appears once."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(one_line(text) + "\n" for text in self.records(batch_id, ok))
        os.replace(tmp, path)

    def counts(self, batch_id: str) -> tuple[int, int]:
        """(completed, failed) requests recorded."""
        with self._lock:
            row = self._db.execute("SELECT COALESCE(SUM(ok), 0), COUNT(*) - COALESCE(SUM(ok), 0) FROM items "
                                   "WHERE batch_id = ?", (batch_id,)).fetchone()
        return int(row[0]), int(row[1])

    def slowest(self, batch_id: str, n: int = 5) -> list[tuple[str, float]]:
        with self._lock:
            rows = self._db.execute("SELECT custom_id, latency_s FROM items WHERE batch_id = ? AND ok = 1 "
                                    "AND latency_s IS NOT NULL ORDER BY latency_s DESC LIMIT ?",
                                    (batch_id, n)).fetchall()
        return [(c, float(t)) for c, t in rows]


def creation_order(b: dict) -> tuple:
    """Jobs in the order they were created: ``created_at`` is whole seconds (OpenAI's field), ``created_ns`` orders
    the jobs of one second (jobs stored before it had one come first within their second)."""
    return b["created_at"], b.get("created_ns", 0), b["id"]


def _loaded(batch_id: str, text: str) -> dict | None:
    """A stored batch object, or None (logged) for a row that is not one: written by hand or by another version."""
    try:
        b = json.loads(text)
    except (ValueError, RecursionError):
        b = None
    if isinstance(b, dict) and isinstance(b.get("id"), str) and isinstance(b.get("created_at"), int):
        return b
    log.error("batch %r: its stored object is not readable; it is left out", batch_id)
    return None
