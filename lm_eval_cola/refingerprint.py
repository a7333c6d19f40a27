"""``cola refingerprint``: re-register results stored under the earlier weights fingerprint.

Releases before schema 0002 fingerprinted weights by sampling 4,096 values per tensor (the
``sampled`` scheme, :mod:`lm_eval_cola.fingerprint`), which could miss a changed weight. What
they stored is no longer matched to any model. This command loads a model once, computes both
of its fingerprints, and moves to the full one whatever was registered under its sampled one:

- a store's model row (its runs follow; a run named by default is renamed as a search with
  today's fingerprint names it, so the same ``cola search`` command resumes it);
- a predictor file's record of the weights it was trained for;
- a request-cache file's table for this model and chain set (``--use_cache``).

Anything registered under another sampled fingerprint came from other weights and is left
alone; the command says so. Nothing is deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import sys

from lm_eval_cola.cli import add_command

EPILOG = """examples:
  cola refingerprint --store cola.db --predictors predictors/*.pt
  cola refingerprint --model_args pretrained=Qwen/Qwen3-0.6B --store postgresql://host/cola
  cola refingerprint --model_args chain=0-11.11-29 --use_cache lmcache_rank0.db
  (--model_args: the model the results came from, default the embedded SmolLM2; for a cache,
  also its chain settings, as in the run that wrote it; re-register a store or predictor
  before a cache written with chains= from it)
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "refingerprint",
        help="re-register results stored under the earlier weights fingerprint",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
    )
    parser.add_argument("--model_args", default="", help="the model's args (default: SmolLM2)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ...")
    parser.add_argument("--store", action="append", default=[], help="store path or URL")
    parser.add_argument("--predictors", nargs="+", default=[], help="predictor files")
    parser.add_argument("--use_cache", action="append", default=[], help="cache .db file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not (args.store or args.predictors or args.use_cache):
        print("cola refingerprint: name a --store, --predictors or --use_cache", file=sys.stderr)
        return 2
    from lm_eval_cola.fingerprint import sampled_fingerprint
    from lm_eval_cola.lm import load

    lm = load(args.model_args, args.device)
    sampled = sampled_fingerprint(lm.model)
    print(f"{lm.identity.name}: sampled fingerprint {sampled[:12]}, now {lm.identity.fingerprint}")
    failed = False
    for url in args.store:
        failed |= _report(lambda url=url: reregister_store(url, sampled, lm.identity))
    for path in args.predictors:
        failed |= _report(lambda path=path: reregister_predictor(path, sampled, lm.identity))
    for path in args.use_cache:
        failed |= _report(lambda path=path: reregister_cache(path, lm, sampled))
    return 1 if failed else 0


def _report(step) -> bool:
    """Run one re-registration and print its outcome; True when it failed."""
    try:
        print(step())
    except (ValueError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return True
    return False


def reregister_store(url: str, sampled: str, identity) -> str:
    """Move the store's model registered under ``sampled`` to ``identity``'s fingerprint."""
    from sqlalchemy import select, update

    from lm_eval_cola.store.schema import Model, Run
    from lm_eval_cola.store.store import Store

    with Store(url) as store, store.session() as session:
        old = session.scalar(select(Model).where(Model.fingerprint == sampled))
        if old is None:
            return f"{store}: nothing registered under this model's sampled fingerprint"
        current = session.scalar(select(Model).where(Model.fingerprint == identity.fingerprint))
        if current is None:
            old.fingerprint, model_id = identity.fingerprint, old.id
        else:  # a search since the upgrade registered the model anew: its runs join that row
            session.execute(update(Run).where(Run.model_id == old.id).values(model_id=current.id))
            session.delete(old)
            model_id = current.id
        runs = session.scalars(select(Run).where(Run.model_id == model_id)).all()
        notes = [_rename(session, run, sampled, identity.fingerprint) for run in runs]
    renamed = [note for note in notes if note]
    lines = [f"{store}: {len(runs)} run(s) of {identity.name} re-registered", *renamed]
    return "\n  ".join(lines)


def _rename(session, run, sampled: str, fingerprint: str) -> str | None:
    """Give a run named by default the name a search of today's fingerprint gives it."""
    from sqlalchemy import select

    from lm_eval_cola.store.schema import Run
    from lm_eval_cola.store.store import default_run_name

    settings = {"method": run.method, "budget": run.budget, "seed": run.seed, **run.settings}
    task, config = run.task.name, run.task.config_hash
    if run.name != default_run_name(task, run.method, sampled, config, settings):
        return None  # named by its user: the name stays
    new = default_run_name(task, run.method, fingerprint, config, settings)
    if session.scalar(select(Run.id).where(Run.name == new)) is not None:
        return f"run {run.id} keeps its name {run.name}: a run named {new} exists already"
    old, run.name = run.name, new
    return f"run {run.id} renamed {old} -> {new}"


def reregister_predictor(path: str, sampled: str, identity) -> str:
    from lm_eval_cola.predict.predictors import load, save

    predictor = load(path)
    trained = predictor.info.model["fingerprint"]
    if trained == identity.fingerprint:
        return f"predictor '{path}': already registered for these weights"
    if trained != sampled:
        raise ValueError(
            f"predictor '{path}' was trained for other weights (fingerprint {trained[:17]}); "
            "give the model args of the model it was trained for"
        )
    predictor.info.model["fingerprint"] = identity.fingerprint
    save(predictor, path)
    return f"predictor '{path}': re-registered for {identity.name}"


def reregister_cache(path: str, lm, sampled: str) -> str:
    """Rename the cache's table of these weights and chains to today's name for it."""
    old, new = f"cola_{lm.cache_namespace(sampled)}", f"cola_{lm.cache_namespace()}"
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        if old not in tables:
            return f"cache '{path}': no table of these weights and chains under the old name"
        if new in tables:
            return f"cache '{path}': {new} exists already; {old} is left as it is"
        connection.execute(f'ALTER TABLE "{old}" RENAME TO "{new}"')
    return f"cache '{path}': table {old} renamed {new}"
