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
import sys

from lm_eval_cola.cli import add_command, add_model_args, load_model

HELP = "re-register results stored under the earlier weights fingerprint"
EPILOG = """examples:
  cola refingerprint --store cola.db --predictors predictors/*.pt
  cola refingerprint --model_args pretrained=Qwen/Qwen3-0.6B --store postgresql://host/cola
  cola refingerprint --model_args chain=0-11.11-29 --use_cache lmcache_rank0.db
  (--model_args: the model the results came from, default the embedded SmolLM2; for a cache,
  also its chain settings, as in the run that wrote it; re-register a store or predictor
  before a cache written with chains= from it)
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "refingerprint", HELP, __doc__, EPILOG)
    add_model_args(parser, "the model's args")
    parser.add_argument("--store", action="append", default=[], help="store path or URL")
    parser.add_argument("--predictors", nargs="+", default=[], help="predictor files")
    parser.add_argument("--use_cache", action="append", default=[], help="cache .db file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not (args.store or args.predictors or args.use_cache):
        print("cola refingerprint: name a --store, --predictors or --use_cache", file=sys.stderr)
        return 2
    from lm_eval_cola.fingerprint import sampled_fingerprint
    from lm_eval_cola.predict.predictors import reregister

    lm = load_model(args)
    sampled = sampled_fingerprint(lm.model)
    print(f"{lm.identity.name}: sampled fingerprint {sampled[:12]}, now {lm.identity.fingerprint}")
    failed = False
    for url in args.store:
        failed |= _report(lambda url=url: _reregister_store(url, sampled, lm.identity))
    for path in args.predictors:
        failed |= _report(lambda path=path: reregister(path, sampled, lm.identity))
    for path in args.use_cache:
        failed |= _report(lambda path=path: lm.reregister_cache(path, sampled))
    return 1 if failed else 0


def _report(step) -> bool:
    """Run one re-registration and print its outcome; True when it failed."""
    try:
        print(step())
    except (ValueError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return True
    return False


def _reregister_store(url: str, sampled: str, identity) -> str:
    from lm_eval_cola.store.store import Store

    with Store(url) as store:
        return store.reregister(sampled, identity)
