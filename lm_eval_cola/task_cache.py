"""lm-eval's index of its own tasks, kept on disk between processes.

Why: every ``TaskManager`` parses each of the ~14,000 task YAML files lm-eval ships (about 15 s
on a 2-core CPU), so every ``cola`` and ``lm_eval`` command paid that before any work. The parsed
index of lm-eval's task folder is stored in this package's cache, keyed by lm-eval's version and
every YAML file's path, size and modification time (the templates they include too): an edited,
added or removed file (or another lm-eval) rebuilds it. Other folders (this package's tasks, a
user's ``include_path``) are small and parsed every time, as lm-eval does, and still override
lm-eval's tasks of the same name.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lm_eval_cola.default_model import cache_home

logger = logging.getLogger("lm_eval_cola")

Index = dict[str, Any]  # task name -> lm-eval's index entry


def fingerprint(root: Path) -> str:
    """What the index of ``root`` depends on: lm-eval's version and its YAML files' stats,
    the templates that task files include (``_default_template_yaml``) among them."""
    from lm_eval import __version__

    digest = hashlib.sha256(f"lm-eval {__version__}\n".encode())
    for path in sorted(root.rglob("*yaml")):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_file(root: Path) -> Path:
    """One file a folder, replaced when its fingerprint changes, so the cache never grows."""
    name = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return cache_home() / "task_index" / f"{name}.pickle"


def cached_index(root: Path, build: Callable[[Path], Index]) -> Index:
    """``build(root)``, or the index stored for the same fingerprint. An unreadable cache file
    is rebuilt and replaced; a cache that cannot be written only costs the next process time."""
    key, path = fingerprint(root), cache_file(root)
    try:
        with path.open("rb") as stored:
            stored_key, index = pickle.load(stored)
        if stored_key == key:
            return index
    except FileNotFoundError:
        pass
    except Exception as err:  # a truncated or foreign file: rebuild it
        logger.debug("task index cache %s unreadable (%s): rebuilding it", path, err)
    index = build(root)
    _write(path, (key, index))
    return index


def _write(path: Path, value: object) -> None:
    partial = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as out:
            partial = Path(out.name)
            pickle.dump(value, out, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(partial, path)  # atomic: a concurrent reader sees the old file or the new
    except (OSError, pickle.PicklingError) as err:
        logger.debug("task index cache %s not written: %s", path, err)
        if partial is not None:
            partial.unlink(missing_ok=True)


def install() -> None:
    """Serve lm-eval's own task folder from the cache in every ``TaskIndex.build``."""
    from lm_eval.tasks import _index

    original = _index.TaskIndex.build
    if getattr(original, "_cola_cached", False):
        return
    lm_eval_tasks = Path(_index.__file__).parent

    @functools.wraps(original)
    def build(paths: Iterable[Path], *, resolve_includes: bool = True) -> Index:
        roots = [Path(root) for root in paths]
        if not resolve_includes or not roots or roots[0] != lm_eval_tasks:
            return original(roots, resolve_includes=resolve_includes)
        index = dict(cached_index(roots[0], lambda root: original([root])))
        for name, entry in original(roots[1:]).items():  # later folders win, as in lm-eval
            if name in index:
                _index.log.warning(
                    "Task '%s' from %s overrides existing task from %s",
                    name,
                    entry.yaml_path,
                    index[name].yaml_path,
                )
            index[name] = entry
        return index

    build._cola_cached = True
    _index.TaskIndex.build = staticmethod(build)
