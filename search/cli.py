"""``cola search``: search chains per document of lm-eval tasks and record them in a store.

Flags follow lm-eval's where the meaning is the same (``--model_args``, ``--tasks``,
``--limit``, ``--device``, ``--num_fewshot``, ``--include_path``). Everything that can be
checked without the model (method, budget, tasks, metric, store) is checked before it loads.
"""

from __future__ import annotations

import argparse
import dataclasses

from lm_eval_cola.cli import add_command, add_model_args, check_model_args, load_model
from lm_eval_cola.errors import report
from lm_eval_cola.search.base import LOOK_AHEAD, SEARCHERS
from lm_eval_cola.search.space import MODES

HELP = "search chains per document and record every one in a store"
EPILOG = """examples:
  cola search --tasks arc_easy --method mcts --budget 200 --limit 100 --store cola.db
  cola search --tasks arc_easy --limit 500 --parallel_docs 32 --device cuda --store cola.db
  cola search --model_args pretrained=Qwen/Qwen3-0.6B,dtype=bfloat16 --device cuda \\
      --tasks gsm8k --method tpe --budget 50 --max_gen_toks 64 --store cola.db
  cola search --tasks arc_easy --method mcts --budget 200 --store cola.db --shard 0/4
  cola search --tasks arc_easy --split train --limit 500 --budget 50 --store cola.db
  cola search --tasks arc_easy_gen --limit 500 --budget 200 --store cola.db
  cola search --tasks arc_easy_gen --limit 500 --budget 200 --workers 2 --store cola.db
  cola search --tasks arc_easy_gen --limit 500 --decoding hf --store old.db   (a run searched
      with HF's generate, before batch-invariant decoding: resume it in its own mode)
  cola search --tasks arc_easy --limit 100 --budget 50 --target decoy --store cola.db
  (the same command again continues a killed run with the documents not yet done)
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "search", HELP, __doc__, EPILOG)
    model = parser.add_argument_group("model and task (as in lm_eval)")
    add_model_args(model)
    model.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    model.add_argument("--limit", type=int, help="documents per task (first N)")
    model.add_argument("--num_fewshot", type=int)
    model.add_argument("--include_path", help="extra folder of task YAMLs")
    model.add_argument(
        "--split", help="search this split instead of the task's test split, e.g. train"
    )
    search = parser.add_argument_group("search")
    search.add_argument("--method", default="mcts", choices=sorted(SEARCHERS))
    search.add_argument("--budget", type=int, default=200, help="chains evaluated per document")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--method_args", default="", help="e.g. c=1.4,explore=0.1 (mcts)")
    search.add_argument("--space", default="both", choices=MODES, help="actions allowed")
    search.add_argument("--max_block", type=int, default=4, help="k: layers per action")
    search.add_argument("--max_times", type=int, default=4, help="r: repeats per action")
    search.add_argument("--min_length", type=int, help="default: half the depth")
    search.add_argument("--max_length", type=int, help="default: 1.25 x the depth")
    search.add_argument("--metric", help="default: acc, exact_match or word_perplexity")
    search.add_argument("--filter", dest="filter_name", help="default: the task's first")
    search.add_argument("--max_gen_toks", type=int, help="cap on generated tokens")
    search.add_argument(
        "--target",
        default="gold",
        choices=("gold", "decoy"),
        help="what the search is rewarded by: the gold answer, or a designated wrong one "
        "(the option after the gold one; a number plus one), to measure how much of the oracle "
        "a lottery over answers gives (default: gold)",
    )
    _add_speed(parser.add_argument_group("decoding and speed"))
    where = parser.add_argument_group("where results go")
    where.add_argument("--store", default="cola.db", help="SQLite path or SQLAlchemy URL")
    where.add_argument("--run_name", help="default: task, method and a hash of all settings")
    where.add_argument("--shard", help="i/n: search every n-th document from the i-th")
    parser.set_defaults(func=run)


def _add_speed(group: argparse._ArgumentGroup) -> None:
    """How the search computes: decoding mode, documents at once, processes, prefix cache."""
    group.add_argument(
        "--decoding",
        choices=("batch_invariant", "hf"),
        help="generation tasks: batch_invariant decodes the chains of all documents in flight "
        "together, each generation's tokens those it gets alone (default for new runs); hf "
        "decodes a chain at a time with HF's generate, as runs searched before this option did "
        "(resume those with --decoding hf)",
    )
    group.add_argument(
        "--parallel_docs",
        type=int,
        default=16,
        help="documents searched at once, their chains in one forward pass (generation with "
        "--decoding hf: documents whose chains are equal) (default: 16)",
    )
    group.add_argument(
        "--workers",
        type=int,
        default=1,
        help="CPU only: processes of one thread on this machine (one a core), each searching "
        "every n-th document with --parallel_docs and --prefix_cache_mb of its own; a "
        "generated-answer search's per-call Python work then runs on every core, with the same "
        "results (default: 1)",
    )
    group.add_argument(
        "--look_ahead",
        type=int,
        default=LOOK_AHEAD,
        help="generation tasks (batch_invariant): chains of a document decoded beside its "
        "pending one, those the method will ask next if the pending one scores as most of the "
        "document's chains did; the same results at any depth, fewer forward passes when the "
        "guess holds; 0: one chain of a document at a time (default: %(default)s)",
    )
    group.add_argument(
        "--prefix_cache_mb",
        type=float,
        default=4096,
        help="memory for the work done under chain prefixes (layer outputs; for generation "
        "also the prompt's KV cache), reused across a search's chains; 0 turns it off "
        "(default: 4096)",
    )


def run(args: argparse.Namespace) -> int:
    from lm_eval_cola.lm import default_device
    from lm_eval_cola.search.runner import SearchRun, SearchSettings, check_pace, shard_of
    from lm_eval_cola.search.workers import check_workers
    from lm_eval_cola.store.engine import check_usable
    from lm_eval_cola.targets import check_decoys
    from lm_eval_cola.tasks import load_specs, task_documents

    try:
        settings = SearchSettings(
            method=args.method,
            budget=args.budget,
            seed=args.seed,
            space=_space(args),
            method_options=_parse_pairs(args.method_args),
            limit=args.limit,
            target=args.target,
            decoding=args.decoding,
        )
        check_pace(args.parallel_docs, args.look_ahead)
        check_workers(args.workers, args.device or default_device())
        shard = shard_of(args.shard)
        check_model_args(args)
        specs = _task_specs(args)
        tasks = load_specs(specs, args.include_path)
        if args.target == "decoy":
            for task in tasks.values():
                check_decoys(task, task_documents(task, args.limit))
        check_usable(args.store)  # created only once the model has loaded
        lm = load_model(args)
        store = _open_store(args.store)
    except (ValueError, RuntimeError, KeyError) as err:
        return report("cola search", err)
    for spec in specs:
        task, how = tasks[spec.name], dataclasses.replace(settings, task=spec)
        search = SearchRun(
            lm, task, store, how, args.prefix_cache_mb, args.run_name, args.parallel_docs,
            args.workers, args.look_ahead,
        )  # fmt: skip
        run_id = search.run(shard)
        print(f"{task.config.task}: run {run_id} in {store}: searched {search.tally}")
        print(f"  see: cola db stats --store {args.store} --run {run_id}")
    return 0


def _space(args: argparse.Namespace) -> dict:
    return {
        "mode": args.space,
        "max_block": args.max_block,
        "max_times": args.max_times,
        "min_length": args.min_length,
        "max_length": args.max_length,
    }


def _parse_pairs(text: str) -> dict:
    from lm_eval_cola.model_args import parse

    return parse(text)


def _task_specs(args: argparse.Namespace) -> list:
    from lm_eval_cola.tasks import TaskSpec

    return TaskSpec.many(
        args.tasks,
        metric=args.metric,
        filter_name=args.filter_name,
        num_fewshot=args.num_fewshot,
        max_gen_toks=args.max_gen_toks,
        split=args.split,
    )


def _open_store(location: str):
    from lm_eval_cola.store.store import Store

    return Store(location)
