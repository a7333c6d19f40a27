"""A chain store as one gzipped file, and back: how a long search outlives its machine.

The snapshot is taken with SQLite's online backup API, which copies a consistent state of the
database even while a search writes to it (WAL mode), and the restore checks that the result is
a chain store (its schema revision) before it appears under the requested path, so a failed or
foreign restore leaves nothing behind and never replaces an existing store (nor meets the
journal files a deleted one left, which SQLite would replay into it).
"""

from __future__ import annotations

import gzip
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

from lm_eval_cola.store import engine as engines


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
        try:
            reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
            writer = sqlite3.connect(snapshot)
            try:
                reader.backup(writer)
                writer.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            finally:
                writer.close()
                reader.close()
        except sqlite3.Error as err:
            raise engines.StoreError(f"store {source} cannot be read: {err}") from None
        url = engines.normalise_url(str(snapshot))
        with engines.translated(url):
            engines.is_current(url)  # refuses what is not a chain store
        partial = Path(folder) / "archive.gz"
        with snapshot.open("rb") as raw, gzip.open(partial, "wb", compresslevel=9) as packed:
            shutil.copyfileobj(raw, packed)
        os.replace(partial, output)
    return output.stat().st_size


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
        try:
            with gzip.open(archive, "rb") as packed, unpacked.open("wb") as raw:
                shutil.copyfileobj(packed, raw)
        except (OSError, EOFError) as err:
            raise engines.StoreError(f"{archive} is not a gzipped store: {err}") from None
        url = engines.normalise_url(str(unpacked))
        with engines.translated(url):
            if not engines.is_current(url):
                engines.upgrade_store(url)
        os.replace(unpacked, target)


def _sidecars(database: Path) -> list[Path]:
    """The journal files SQLite keeps beside a database (write-ahead log, its index, rollback
    journal): left behind when a store's file alone is deleted."""
    names = (f"{database.name}{suffix}" for suffix in ("-wal", "-shm", "-journal"))
    return [database.with_name(name) for name in names if database.with_name(name).exists()]
