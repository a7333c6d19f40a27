"""Opening a store: URLs, SQLite settings, schema versions, and errors people can act on.

A store is any SQLAlchemy URL; a plain path means an SQLite file. SQLite runs in WAL mode with
foreign keys on and a busy timeout, so readers never block the writer and two writers wait for
each other instead of failing. The schema is versioned with Alembic (``store/migrations``): a
new store is created at the newest version, an older one is refused with the command that
upgrades it. Creating or upgrading the schema is one transaction under a lock, so processes
that open a new store at once create it once, and a writer killed meanwhile leaves no half
schema.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DatabaseError,
    IntegrityError,
    NoSuchModuleError,
    OperationalError,
)

from lm_eval_cola.errors import ColaError

MIGRATIONS = Path(__file__).parent / "migrations"
#: Alembic's revision table, named so that Optuna's own (``alembic_version``) can share the
#: database: search baselines keep their studies in the store's database.
VERSION_TABLE = "cola_schema_version"
#: Seconds a writer waits for another writer's lock before giving up.
BUSY_TIMEOUT_S = 60
#: PostgreSQL advisory lock held while a schema is created or upgraded (any fixed number).
SCHEMA_LOCK = 0x636F6C61


class StoreError(ColaError, RuntimeError):
    """Something about the store prevents the operation; the message says what to do."""


class StoreLocked(StoreError):
    pass


class StoreCorrupt(StoreError):
    pass


class StoreReadOnly(StoreError):
    pass


class StoreOutdated(StoreError):
    pass


def normalise_url(store: str) -> str:
    """A SQLAlchemy URL for ``store``; a plain path becomes an SQLite file URL."""
    if "://" in store:
        try:
            make_url(store)
        except ArgumentError as err:
            raise StoreError(f"'{store}' is not a database URL: {err}") from None
        return store
    path = str(Path(store).expanduser().resolve())
    return URL.create("sqlite", database=path).render_as_string(hide_password=False)


def sqlite_file(store: str) -> Path | None:
    """The file of an SQLite store; ``None`` for other databases."""
    url = make_url(normalise_url(store))
    if url.get_backend_name() != "sqlite" or not url.database:
        return None
    return Path(url.database)


def check_usable(store: str) -> None:
    """Refuse a store that cannot be written (locked, corrupt, outdated, no such folder) without
    creating a new one, so that a command that fails later, before its first write, leaves no
    empty store behind."""
    path = sqlite_file(store)
    if path is not None and not path.exists():
        if not path.parent.is_dir():
            raise StoreError(f"folder of store '{path}' does not exist")
        return
    with translated(store):
        engine = create(store)
        try:
            ensure_schema(engine, store, create_missing=False)
        finally:
            engine.dispose()


def display(url: str) -> str:
    """The URL without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def create(url: str, read_only: bool = False) -> Engine:
    """An engine for ``url``; ``read_only`` connections refuse every write."""
    url = normalise_url(url)
    if make_url(url).get_backend_name() != "sqlite":
        args = {"options": _read_only_options(url)} if read_only else {}
        return create_engine(url, pool_pre_ping=True, connect_args=args)
    path = make_url(url).database
    if read_only:
        if not path or not Path(path).is_file():
            raise StoreError(f"store '{path}' does not exist")
        uri = f"file:{quote(path)}?mode=ro"
        engine = create_engine(
            "sqlite://",
            creator=lambda: sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S),
        )
    else:
        if path and not Path(path).parent.is_dir():
            raise StoreError(f"folder of store '{path}' does not exist")
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})
    event.listen(engine, "connect", _sqlite_pragmas(read_only))
    event.listen(engine, "begin", _sqlite_begin(read_only))
    return engine


def _read_only_options(url: str) -> str:
    """libpq ``options`` that make every transaction read-only, keeping the URL's own
    (``connect_args`` replace the URL's, and a ``search_path`` there picks the store)."""
    own = make_url(url).query.get("options", "")
    return " ".join(filter(None, [own, "-c default_transaction_read_only=on"]))


def _sqlite_begin(read_only: bool):
    """Emit BEGIN ourselves: Python's sqlite3 commits DDL statement by statement (a killed
    migration would leave half a schema) and starts no transaction for SELECTs. A writer's
    transactions take the write lock at BEGIN (IMMEDIATE), so one that reads and then writes
    waits for another writer under the busy timeout instead of failing on a stale snapshot."""
    statement = "BEGIN" if read_only else "BEGIN IMMEDIATE"

    def on_begin(connection: Connection) -> None:
        connection.exec_driver_sql(statement)

    return on_begin


def _sqlite_pragmas(read_only: bool):
    def on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # transactions are ours: see _sqlite_begin
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        if read_only:
            cursor.execute("PRAGMA query_only = ON")
        else:
            _use_wal(cursor)
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    return on_connect


def _use_wal(cursor: sqlite3.Cursor) -> None:
    """Switch to WAL, waiting out a process that is creating the same new store: SQLite
    answers "locked" at once there (it skips the busy timeout to avoid a deadlock)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@contextlib.contextmanager
def translated(url: str) -> Iterator[None]:
    """Turn driver errors into :class:`StoreError` s that name the store and the fix."""
    where = display(normalise_url(url))
    try:
        yield
    except IntegrityError:  # a constraint: the caller's business, not the store's health
        raise
    except (OperationalError, DatabaseError) as err:
        raise _translate(where, str(err.orig or err)) from err
    except (NoSuchModuleError, ImportError) as err:  # an unknown dialect, a driver not installed
        raise StoreError(f"store {where}: {err}; install the database driver it names") from err


_ERRORS: list[tuple[str, type[StoreError], str]] = [
    (
        r"database is locked|database table is locked",
        StoreLocked,
        "is locked by another process for over {timeout} s; wait for it or stop it",
    ),
    (
        r"file is not a database|disk image is malformed|not a database",
        StoreCorrupt,
        "is not a readable lm-eval-cola store (corrupt, or another kind of file); restore it "
        "from a copy or point --store at another file",
    ),
    (
        r"readonly database|read-only|read only",
        StoreReadOnly,
        "is read-only; writing needs write access to the file and its folder",
    ),
    (
        r"unable to open database file",
        StoreError,
        "cannot be opened; check that the path exists and is readable",
    ),
]


def _translate(where: str, message: str) -> StoreError:
    for pattern, kind, advice in _ERRORS:
        if re.search(pattern, message, re.IGNORECASE):
            return kind(f"store {where} {advice.format(timeout=BUSY_TIMEOUT_S)} ({message})")
    return StoreError(f"store {where}: {message}")


# -- schema versions -------------------------------------------------------------------------


def _alembic_config(connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return _revision(connection)


def is_current(url: str) -> bool:
    """Whether the store is at this release's schema; an error unless it is an existing store
    at a schema that can be upgraded (checked read-only, so nothing is created or touched)."""
    reader = create(url, read_only=True)
    try:
        ensure_schema(reader, url, create_missing=False)
    except StoreOutdated:
        return False
    finally:
        reader.dispose()
    return True


def upgrade_store(url: str) -> tuple[str | None, str]:
    """:func:`upgrade` the store at ``url``; returns (old revision, new revision)."""
    writer = create(url)
    try:
        return upgrade(writer)
    finally:
        writer.dispose()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Migrate to the newest schema; returns (old revision, new revision)."""
    with engine.begin() as connection:
        _lock_schema(connection)
        before = _revision(connection)
        _upgrade(connection)
    return before, head_revision()


def _upgrade(connection: Connection) -> None:
    """All migrations in the caller's transaction: they commit together or not at all."""
    from alembic import command

    with _quiet_alembic():
        command.upgrade(_alembic_config(connection), "head")


def _revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with _quiet_alembic():
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


@contextlib.contextmanager
def _quiet_alembic() -> Iterator[None]:
    """Alembic's INFO lines (its SQL dialect, each migration it runs) say nothing a store's
    user can act on; they show only where someone has set Alembic's log level."""
    alembic = logging.getLogger("alembic")
    level = alembic.level
    if level == logging.NOTSET:
        alembic.setLevel(logging.WARNING)
    try:
        yield
    finally:
        alembic.setLevel(level)


def _lock_schema(connection: Connection) -> None:
    """Hold the lock under which schemas change until the transaction ends. SQLite writers
    hold the database's write lock from BEGIN IMMEDIATE on; PostgreSQL needs one of its own."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})


def ensure_schema(engine: Engine, url: str, create_missing: bool) -> None:
    """Create an empty store, accept a current one, refuse an outdated or foreign one."""
    with engine.begin() as connection:
        tables = set(inspect(connection).get_table_names())
        if not tables and create_missing:
            _lock_schema(connection)  # then look again: another process may have created it
            tables = set(inspect(connection).get_table_names())
            if not tables:
                _upgrade(connection)
                return
        revision = _revision(connection) if VERSION_TABLE in tables else None
    _check_revision(url, tables, revision)


def _as_given(url: str) -> str:
    """A store as the user wrote it, a URL's password hidden, for commands to copy."""
    return display(url) if "://" in url else url


def _check_revision(url: str, tables: set[str], revision: str | None) -> None:
    head = head_revision()
    if VERSION_TABLE not in tables:
        raise StoreError(
            f"{display(normalise_url(url))} is not an lm-eval-cola store "
            f"(tables: {', '.join(sorted(tables)) or 'none'})"
        )
    if revision == head:
        return
    from alembic.script import ScriptDirectory

    known = {
        s.revision for s in ScriptDirectory.from_config(_alembic_config(None)).walk_revisions()
    }
    if revision in known:
        raise StoreOutdated(
            f"store {display(normalise_url(url))} has schema {revision}, this release needs "
            f"{head}: upgrade it with\n    cola db upgrade --store {_as_given(url)}"
        )
    raise StoreError(
        f"store {display(normalise_url(url))} has schema {revision}, which this release does "
        "not know: it was written by a newer lm-eval-cola; upgrade the package"
    )
