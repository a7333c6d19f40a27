"""``cola data import``: fill the Hugging Face *datasets* cache from local JSONL files.

ARC-Easy ships with the package (``lm_eval_cola/data``, CC BY-SA 4.0, see its README), so
``cola data import --tasks arc_easy`` needs no files at all; other data sets come from a
``--data_dir``.

Why: a stock lm-eval task calls ``datasets.load_dataset(dataset_path, dataset_name)``. Without
the hub, datasets (4 and later) falls back only to its own Arrow cache,
``$HF_DATASETS_CACHE/<org>___<name>/<config>/<version>/<hash>/``; a file placed in the hub cache
is not used. Building exactly that folder from local files lets ``lm_eval --tasks arc_easy`` run
unchanged with ``HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1``, on the same documents as online.

This module imports nothing heavy at load time: ``cola`` imports it to build its parser.
"""

from __future__ import annotations

import argparse
import difflib
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lm_eval_cola.cli import add_command
from lm_eval_cola.errors import ColaError

EPILOG = """examples (on a machine without hub access):
  cola data import --tasks arc_easy      (the copy that ships with the package)
  cola data import --tasks arc_challenge --data_dir ../shared/data/arc_challenge
  HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf --tasks arc_easy ...

DATA_DIR holds one <split>.jsonl (or <split>.jsonl.gz) per split (train, validation, test, ...),
one JSON object a line, with the columns of the hub data set; all of them are imported, in file
order. Re-running replaces the previous import of the same data set and config.
"""

#: Data sets that ship with the package (hub id, config): imported without --data_dir, for
#: every task that loads them (arc_easy, arc_easy_gen, ...).
PACKAGED = {("allenai/ai2_arc", "ARC-Easy"): Path(__file__).parent / "data" / "arc_easy"}

VERSION = "0.0.0"  # the version folder that datasets writes for hub data sets without a script
TMP_PREFIX = ".cola-import-"  # dot-named, so datasets' cache lookup (a glob of "*") skips it
IGNORED_KWARGS = {"trust_remote_code"}  # lm-eval drops it itself on datasets >= 4


class DataImportError(ColaError, RuntimeError):
    """The import cannot be done as asked; the message says what to change."""


@dataclass(frozen=True)
class DatasetRef:
    """What a task passes to ``datasets.load_dataset``: ``path`` and ``name`` (the config)."""

    path: str
    name: str | None

    @property
    def config(self) -> str:
        """The config folder name: datasets calls an unnamed config ``default``."""
        return self.name or "default"

    def __str__(self) -> str:
        return f"{self.path}:{self.config}"


@dataclass(frozen=True)
class SplitDigest:
    """Row count and a hash of the rows, to compare an import with its source files."""

    rows: int
    sha256: str


def task_dataset(task: str, include_path: str | None = None) -> DatasetRef:
    """The data set a task loads, read from lm-eval's task index: building the task would try to
    download its data, which is what this command exists to avoid."""
    from lm_eval.tasks._index import Kind

    from lm_eval_cola.tasks import task_index

    manager = task_index(include_path)
    entry = manager.task_index.get(task)
    if entry is None:
        close = difflib.get_close_matches(task, manager.all_subtasks, n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise DataImportError(f"Unknown lm-eval task {task!r}.{hint} See `lm_eval ls tasks`.")
    if entry.kind not in (Kind.TASK, Kind.PY_TASK):
        members = f" ({', '.join(sorted(entry.tags))})" if entry.tags else ""
        raise DataImportError(
            f"{task!r} is a {entry.kind.name.lower()}{members}, not a task: import its tasks one "
            "at a time, each with its own --data_dir."
        )
    return dataset_of(task, entry.cfg or {})


def dataset_of(task: str, cfg: dict) -> DatasetRef:
    """The hub data set in a task config; refuse configs whose data this import cannot stand
    in for (local builders, extra ``load_dataset`` arguments)."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    path = cfg.get("dataset_path")
    hub_id = isinstance(path, str) and path.count("/") <= 1
    if not hub_id or path in _PACKAGED_DATASETS_MODULES or Path(path).exists():
        raise DataImportError(f"Task {task!r} does not load a hub data set ({path=}).")
    extra = set(cfg.get("dataset_kwargs") or {}) - IGNORED_KWARGS
    if extra:
        raise DataImportError(
            f"Task {task!r} passes {sorted(extra)} to load_dataset; only plain "
            "(dataset_path, dataset_name) tasks can be imported."
        )
    return DatasetRef(path, cfg.get("dataset_name"))


def data_dir_of(task: str, ref: DatasetRef, data_dir: Path | None) -> Path:
    """``data_dir``, or the copy of the task's data set that ships with the package."""
    if data_dir is not None:
        return data_dir
    packaged = PACKAGED.get((ref.path, ref.name))
    if packaged is not None:
        return packaged
    shipped = ", ".join(f"{path}:{name}" for path, name in PACKAGED)
    raise DataImportError(
        f"No copy of {ref}, which '{task}' loads, ships with lm-eval-cola (only {shipped}): "
        "pass --data_dir DIR, where DIR holds <split>.jsonl files (train.jsonl, test.jsonl, ...)."
    )


def find_splits(data_dir: Path) -> dict[str, Path]:
    """``<split>.jsonl`` (or ``.jsonl.gz``) files of ``data_dir``, keyed by split name."""
    if not data_dir.is_dir():
        raise DataImportError(
            f"Data directory {data_dir} does not exist: pass --data_dir DIR, where DIR holds "
            "<split>.jsonl files (train.jsonl, validation.jsonl, test.jsonl, ...)."
        )
    files = sorted([*data_dir.glob("*.jsonl"), *data_dir.glob("*.jsonl.gz")])
    splits = {path.name.split(".")[0]: path for path in files}
    if len(splits) < len(files):
        raise DataImportError(f"{data_dir} holds a split both as .jsonl and .jsonl.gz: keep one")
    if not splits:
        raise DataImportError(
            f"No *.jsonl file in {data_dir}: put one <split>.jsonl per split there "
            "(e.g. train.jsonl, validation.jsonl, test.jsonl), one JSON object a line."
        )
    return splits


def dataset_root(ref: DatasetRef, cache_dir: Path) -> Path:
    """``<cache>/<org>___<name>``, named as datasets' ``CachedDatasetModuleFactory`` looks it up."""
    from datasets.naming import camelcase_to_snakecase

    *namespace, name = ref.path.split("/")
    return cache_dir / "___".join([*namespace, camelcase_to_snakecase(name)])


def files_hash(splits: dict[str, Path]) -> str:
    """The cache's ``<hash>`` folder name: a digest of the files, so the same data gives the
    same folder (online, datasets uses the hub commit here)."""
    digest = hashlib.sha256()
    for split, path in sorted(splits.items()):
        digest.update(split.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def import_dataset(ref: DatasetRef, splits: dict[str, Path], cache_dir: Path) -> Path:
    """Build the cache folder with datasets' own JSON builder, then swap it in for the config.

    The builder names its folder ``<config>-<hash of data_files>``, which a lookup by config
    name rejects, so the result is moved to ``<root>/<config>/<version>/<hash>``. The whole
    config folder is replaced: datasets reloads the newest ``<version>/<hash>`` it finds, so an
    older import left next to the new one could still be picked up by its mtime.
    """
    from datasets.exceptions import DatasetGenerationError
    from datasets.packaged_modules.json.json import Json

    root = dataset_root(ref, cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=root) as tmp:
        builder = Json(
            cache_dir=tmp,
            dataset_name=ref.path.split("/")[-1],
            config_name=ref.config,
            data_files={split: str(path) for split, path in splits.items()},
            hash=files_hash(splits),
        )
        try:
            builder.download_and_prepare()
        except DatasetGenerationError as err:
            raise DataImportError(
                f"datasets could not read {sorted(map(str, splits.values()))}: "
                f"{err.__cause__ or err}. Each line must be one JSON object."
            ) from err
        built = Path(builder.cache_dir)
        staged = Path(tmp, "staged")
        (staged / VERSION).mkdir(parents=True)
        built.rename(staged / VERSION / built.name)
        target = root / ref.config
        if target.exists():
            target.rename(Path(tmp, "previous"))
        staged.rename(target)
    return target / VERSION / built.name


def rows_digest(rows: Iterable[dict]) -> SplitDigest:
    """Count and hash rows as canonical JSON, so files and loaded data compare field by field."""
    digest, count = hashlib.sha256(), 0
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
        count += 1
    return SplitDigest(count, digest.hexdigest())


def jsonl_rows(path: Path) -> Iterable[dict]:
    """The rows of a JSONL file (gzipped or not), blank lines skipped (as datasets' JSON
    builder does)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        yield from (json.loads(line) for line in lines if line.strip())


def loaded_digests(path: str, name: str | None) -> dict[str, SplitDigest]:
    """Digests of what ``load_dataset(path, name)`` returns, i.e. what lm-eval would get."""
    import datasets

    loaded = datasets.load_dataset(path, name)
    return {split: rows_digest(loaded[split]) for split in loaded}


def offline_digests(ref: DatasetRef, cache_dir: Path) -> dict[str, SplitDigest]:
    """:func:`loaded_digests` in a fresh offline interpreter: datasets reads the offline flags
    and the cache location when it is imported, and lm-eval will load under those flags."""
    package_parent = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "HF_DATASETS_CACHE": str(cache_dir),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])),
    }
    code = (
        "import dataclasses, json, sys\n"
        "from lm_eval_cola.data_import import loaded_digests\n"
        "digests = loaded_digests(sys.argv[1], sys.argv[2] or None)\n"
        "print(json.dumps({k: dataclasses.asdict(v) for k, v in digests.items()}))\n"
    )
    argv = [sys.executable, "-c", code, ref.path, ref.name or ""]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise DataImportError(f"Loading {ref} back offline failed:\n{done.stderr[-3000:]}")
    return {k: SplitDigest(**v) for k, v in json.loads(done.stdout.splitlines()[-1]).items()}


def verify(ref: DatasetRef, splits: dict[str, Path], cache_dir: Path) -> list[str]:
    """One summary line per split; raise unless the offline load equals the files exactly."""
    loaded = offline_digests(ref, cache_dir)
    lines, problems = [], []
    for split, path in sorted(splits.items()):
        expected, got = rows_digest(jsonl_rows(path)), loaded.get(split)
        ok = got == expected
        lines.append(
            f"{ref} {split}: {expected.rows} rows, sha256 {expected.sha256[:12]}, "
            + ("loads back identical offline" if ok else f"MISMATCH: loaded {got}")
        )
        if not ok:
            problems.append(split)
    if problems or set(loaded) != set(splits):
        raise DataImportError("\n".join([*lines, f"Loaded splits: {sorted(loaded)}"]))
    return lines


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``import`` on the ``cola data`` sub-commands."""
    parser = add_command(
        subparsers,
        "import",
        help="build the datasets cache for a stock lm-eval task from local JSONL files",
        description=(
            "Build the Hugging Face datasets cache that a stock lm-eval task loads, from local\n"
            "JSONL files, so that the unchanged task runs offline on exactly those rows."
        ),
        epilog=EPILOG,
    )
    parser.add_argument("--tasks", required=True, help="one lm-eval task name, e.g. arc_easy")
    parser.add_argument(
        "--data_dir",
        type=Path,
        help="folder of <split>.jsonl files (default for arc_easy: the copy in the package)",
    )
    parser.add_argument(
        "--cache_dir",
        type=Path,
        help="datasets cache to fill (default: $HF_DATASETS_CACHE, else $HF_HOME/datasets)",
    )
    parser.add_argument("--include_path", help="extra lm-eval task folder, as for lm_eval")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Import, verify, and print one line per split; errors go to stderr with exit code 1."""
    try:
        if "," in args.tasks:
            raise DataImportError("Pass one task to --tasks per call, each with its --data_dir.")
        with tqdm(total=3, desc=f"Importing {args.tasks}", unit="step") as bar:
            bar.set_postfix_str("finding the task's data set")
            ref = task_dataset(args.tasks, args.include_path)
            splits = find_splits(data_dir_of(args.tasks, ref, args.data_dir))
            cache_dir = (args.cache_dir or default_cache_dir()).expanduser().resolve()
            bar.update()
            bar.set_postfix_str(f"building the cache of {len(splits)} splits")
            where = import_dataset(ref, splits, cache_dir)
            bar.update()
            bar.set_postfix_str("loading it back offline, as lm-eval will")
            lines = verify(ref, splits, cache_dir)
            bar.update()
            bar.set_postfix_str("done")
    except DataImportError as err:
        print(f"cola data import: error: {err}", file=sys.stderr)
        return 1
    print("\n".join([*lines, f"Imported {args.tasks} ({ref}) into {where}"]))
    if args.cache_dir:
        print(f"Run lm_eval with HF_DATASETS_CACHE={cache_dir} to use it.")
    return 0


def default_cache_dir() -> Path:
    """datasets' own cache location, which honours ``HF_DATASETS_CACHE`` and ``HF_HOME``."""
    import datasets.config

    return Path(datasets.config.HF_DATASETS_CACHE)
