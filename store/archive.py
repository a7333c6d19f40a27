"""A chain store as one gzipped file, and back: how a long search outlives its machine.

The snapshot is taken with SQLite's online backup API, which copies a consistent state of the
database even while a search writes to it (WAL mode). The archive holds that snapshot as SQL
text (``iterdump``: the schema, then every row as an INSERT), which gzip packs to about half the
size of the database file itself (index pages and page slack are rebuilt on restore, not
stored), and which is byte-for-byte the same for the same store, so an unchanged store changes
nothing in git. Archives of earlier releases (the gzipped database file) restore as before.

The restore checks that the result is a chain store (its schema revision) before it appears
under the requested path, so a failed or foreign restore leaves nothing behind and never replaces
an existing store (nor meets the journal files a deleted one left, which SQLite would replay into
it). An archive's SQL may not attach other databases, so it writes nowhere but the new store.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

from lm_eval_cola.store import engine as engines

DATABASE_HEADER = b"SQLite format 3\x00"  # the start of an earlier release's archive


def sqlite_path(store: str) -> Path:
    """The file of an SQLite store; other databases have their own dump tools."""
    path = engines.sqlite_file(store)
    if path is None:
        raise engines.StoreError(
            f"{engines.display(engines.normalise_url(store))} is not an SQLite file: back up a "
            "PostgreSQL store with pg_dump"
        )
    return path


def write(store: str, output: Path) -> int:
    """Snapshot ``store`` into gzipped ``output``; returns the archive's size in bytes."""
    source = sqlite_path(store)
    if not source.is_file():
        raise engines.StoreError(f"no store at {source}")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as folder:
        snapshot = Path(folder) / "snapshot.db"
        _snapshot(source, snapshot)
        url = engines.normalise_url(str(snapshot))
        with engines.translated(url):
            engines.is_current(url)  # refuses what is not a chain store
        partial = Path(folder) / "archive.gz"
        _dump(snapshot, partial)
        os.replace(partial, output)
    return output.stat().st_size


def _snapshot(source: Path, snapshot: Path) -> None:
    """A consistent copy of ``source``, even while a search writes to it."""
    try:
        reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        writer = sqlite3.connect(snapshot)
        try:
            reader.backup(writer)
        finally:
            writer.close()
            reader.close()
    except sqlite3.Error as err:
        raise engines.StoreError(f"store {source} cannot be read: {err}") from None


def _dump(database: Path, output: Path) -> None:
    """``database`` as gzipped SQL; no name or time in the gzip header, so the same store gives
    the same bytes."""
    reader = sqlite3.connect(database)
    try:
        with (
            output.open("wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as packed,
            io.TextIOWrapper(packed, encoding="utf-8", newline="\n") as text,
        ):
            for statement in reader.iterdump():
                text.write(statement + "\n")
    finally:
        reader.close()


def restore(archive: Path, store: str) -> None:
    """Unpack ``archive`` into a new SQLite store at ``store``, upgraded to this release."""
    target = sqlite_path(store)
    if target.exists():
        raise engines.StoreError(
            f"{target} exists: restore into a new path (a restore never overwrites a store)"
        )
    leftovers = _sidecars(target)
    if leftovers:
        raise engines.StoreError(
            f"{leftovers[0]} is left from a removed store at {target}, and SQLite would replay it "
            f"into the restored one: delete {' and '.join(map(str, leftovers))}, then restore"
        )
    if not archive.is_file():
        raise engines.StoreError(f"no archive at {archive}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:
        unpacked = Path(folder) / "restored.db"
        _unpack(archive, unpacked)
        url = engines.normalise_url(str(unpacked))
        with engines.translated(url):
            if not _holds_a_store(url, archive):
                engines.upgrade_store(url)
        os.replace(unpacked, target)


def _holds_a_store(url: str, archive: Path) -> bool:
    """:func:`engines.is_current` of a restored store, its refusal naming the archive rather
    than the temporary file."""
    try:
        return engines.is_current(url)
    except engines.StoreError as err:
        reason = str(err).replace(engines.display(url), "it")
        raise engines.StoreError(f"{archive} does not hold a chain store: {reason}") from None


def _unpack(archive: Path, database: Path) -> None:
    """Write ``archive``'s store into the new file ``database``, from either archive format."""
    try:
        with gzip.open(archive, "rb") as packed:
            head = packed.read(len(DATABASE_HEADER))
            if head == DATABASE_HEADER:
                with database.open("wb") as raw:
                    raw.write(head)
                    shutil.copyfileobj(packed, raw)
                return
            script = (head + packed.read()).decode("utf-8")
    except (OSError, EOFError) as err:
        raise engines.StoreError(f"{archive} is not a gzipped store: {err}") from None
    except UnicodeDecodeError:
        raise engines.StoreError(f"{archive} is neither a store nor its SQL text") from None
    _load(script, database, archive)


def _load(script: str, database: Path, archive: Path) -> None:
    """Run an archive's SQL into the new ``database``, refusing to attach any other file."""
    writer = sqlite3.connect(database)
    writer.set_authorizer(_only_this_database)
    try:
        writer.executescript(script)
    except sqlite3.Error as err:
        raise engines.StoreError(f"{archive} is not a store's SQL: {err}") from None
    finally:
        writer.close()


def _only_this_database(action: int, *_: object) -> int:
    """SQLite authorizer: an archive's SQL may build and fill tables, never reach other files."""
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _sidecars(database: Path) -> list[Path]:
    """The journal files SQLite keeps beside a database (write-ahead log, its index, rollback
    journal): left behind when a store's file alone is deleted."""
    names = (f"{database.name}{suffix}" for suffix in ("-wal", "-shm", "-journal"))
    return [database.with_name(name) for name in names if database.with_name(name).exists()]
