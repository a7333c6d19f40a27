"""The architecture as tests: who may import whom, how long a function may grow, and the
surface of lm-eval and transformers the backend stands on (docs/DESIGN.md, "Structure")."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The package's folders, by the name each installs as.
PACKAGES = {
    "lm_eval_cola": ROOT / "lm_eval_cola",
    "lm_eval_cola.search": ROOT / "search",
    "lm_eval_cola.store": ROOT / "store",
    "lm_eval_cola.predict": ROOT / "predict",
}
MAX_FUNCTION_LINES = 60


def sources(package: str) -> list[Path]:
    folder = PACKAGES[package]
    files = folder.rglob("*.py") if package == "lm_eval_cola" else folder.glob("*.py")
    return [f for f in files if "migrations" not in f.parts]


def imported_modules(path: Path) -> set[str]:
    """Every module the file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("lm_eval_cola.search", "lm_eval_cola.predict"),
        ("lm_eval_cola.predict", "lm_eval_cola.search"),
    ],
)
def test_search_and_predict_are_siblings_that_never_import_each_other(package, forbidden):
    offending = {
        path.name: sorted(m for m in imported_modules(path) if m.startswith(forbidden))
        for path in sources(package)
    }
    assert {name: mods for name, mods in offending.items() if mods} == {}


def test_the_core_never_reaches_up_into_search_or_predict():
    """lm_eval_cola/ (tasks, chains, executor, backend, scoring) is what both build on; the
    command-line entry points are the only files that name the folders above it."""
    entry_points = {"cli.py", "refingerprint.py"}
    offending = {
        path.name: sorted(
            m
            for m in imported_modules(path)
            if m.startswith(("lm_eval_cola.search", "lm_eval_cola.predict"))
        )
        for path in sources("lm_eval_cola")
        if path.name not in entry_points
    }
    assert {name: mods for name, mods in offending.items() if mods} == {}


def test_a_predictor_source_loads_without_the_store_or_the_objective():
    """``chains=predictor:`` opens a predictor file; it needs neither SQLAlchemy's store nor
    the scoring objective (nor the search)."""
    code = (
        "import sys, lm_eval_cola.predict.source\n"
        "print(sorted(m for m in sys.modules if m.startswith(('lm_eval_cola.store', "
        "'lm_eval_cola.scoring', 'lm_eval_cola.search', 'lm_eval_cola.predict.dataset'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for package in PACKAGES:
        for path in sources(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines} lines)")
    assert long == []


# -- the surface the backend stands on -------------------------------------------------------

#: What ``ColaLM`` uses of HFLM that lm-eval does not document as public, each with why
#: (docs/DESIGN.md lists them): a change in a new lm-eval release fails here, by name.
HFLM_SURFACE = {
    "_model_generate": "the documented extension point for generation (prefix-cache reuse)",
    "_encode_pair": "tokenises a (context, continuation) pair exactly as HFLM scores it",
    "_detect_batch_size": "resolves batch_size=auto once for packed rows and chain groups",
    "batch_size": "read by HFLM's loops; overridden to run a chain group in one batch",
    "world_size": "read by HFLM's collectives; overridden to run chain groups apart",
    "tok_encode": "HFLM's tokenisation of a prompt",
    "prefix_token_id": "the token an empty context becomes",
    "loglikelihood": "HFLM's own loop, run per chain group",
    "loglikelihood_rolling": "HFLM's own loop, run per chain group",
    "generate_until": "HFLM's own loop, run per chain group",
    "set_cache_hook": "where --use_cache's table is chosen per model and chains",
}


def test_the_lm_eval_surface_the_backend_uses_is_there():
    from lm_eval.models.huggingface import HFLM

    missing = [name for name in HFLM_SURFACE if not hasattr(HFLM, name)]
    assert missing == []
    generate = inspect.signature(HFLM._model_generate).parameters
    assert list(generate)[:4] == ["self", "context", "max_length", "stop"]


def test_lm_eval_tasks_still_build_filters_where_the_scorer_reads_them(task_dir):
    """``tasks.filters_of`` reads ``Task._filters`` (no public accessor gives one document's
    filtering); a task built by lm-eval must still carry them there."""
    from lm_eval_cola.tasks import filters_of, load_tasks

    task = load_tasks("cola_mc", task_dir)["cola_mc"]
    assert [f.name for f in filters_of(task)] == ["none"]


def test_every_subpackage_is_shipped_in_the_wheel():
    """A folder with an ``__init__.py`` that setup.py does not list installs nowhere (editable
    installs hide it; a wheel, as tox and users install it, would lack it)."""
    listed = set(re.findall(r'"(lm_eval_cola[\w.]*)",', (ROOT / "setup.py").read_text()))
    found = {
        package + "".join(f".{part}" for part in init.parent.relative_to(folder).parts)
        for package, folder in PACKAGES.items()
        for init in folder.rglob("__init__.py")
        if "migrations" not in init.parts
    }
    assert found <= listed, sorted(found - listed)
