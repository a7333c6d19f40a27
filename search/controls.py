"""``cola controls``: unguided runs beside a gold search run, on its documents and budget.

``random`` evaluates, per document, the full model and then ``--k`` random chains of the gold
run's space, drawn with the gold run's own distribution of chain lengths; ``menu`` evaluates
the full model and the ``--k`` chains right on the most documents of a search on training
documents, the same for every document (refused when the training run shares a document with
the gold run). Both are search runs of their own (methods ``random-walk`` and ``menu``,
:mod:`lm_eval_cola.search.baselines`), named after their settings and their gold run, so the
same command resumes or grows them; ``cola db controls`` reports them beside the gold search.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from lm_eval_cola.cli import add_command
from lm_eval_cola.errors import ColaError, report

EPILOG = """examples:
  cola controls random --store cola.db --run arc-mcts --k 200
  cola controls menu --store cola.db --run arc-mcts --train_run arc-train --k 200
  cola db controls --store cola.db --run arc-mcts
"""


class ControlError(ColaError, ValueError):
    """The control cannot be made for this gold run; the message says why."""


@dataclass(frozen=True)
class GoldRun:
    """What a control copies from its gold run."""

    id: int
    name: str
    task: str
    split: str | None
    config_hash: str
    fingerprint: str
    seed: int
    budget: int
    n_documents: int
    space: dict[str, Any]
    settings: dict[str, Any]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "controls",
        help="unguided runs beside a gold search: random chains, a fixed menu",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
    )
    kinds = parser.add_subparsers(dest="controls_command", metavar="KIND", required=True)
    random = _add_kind(kinds, "random", "k random chains of the space, lengths as the search's")
    random.set_defaults(func=run_random)
    menu = _add_kind(kinds, "menu", "the k chains right on the most training documents")
    menu.add_argument("--train_run", required=True, help="a search on training documents")
    menu.add_argument("--train_store", help="the training run's store (default: --store)")
    menu.set_defaults(func=run_menu)


def _add_kind(kinds: argparse._SubParsersAction, name: str, summary: str):
    parser = add_command(
        kinds,
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ", on every document of a gold run.",
        epilog=EPILOG,
    )
    parser.add_argument("--store", default="cola.db", help="the gold run's store")
    parser.add_argument("--run", required=True, help="the gold run, id or name")
    parser.add_argument("--k", type=int, help="chains per document (default: the gold budget)")
    parser.add_argument("--model_args", default="", help="the gold run's model (default: SmolLM2)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--include_path", help="extra folder of task YAMLs")
    parser.add_argument("--parallel_docs", type=int, default=16, help="(default: 16)")
    parser.add_argument("--prefix_cache_mb", type=float, default=4096, help="(default: 4096)")
    return parser


def run_random(args: argparse.Namespace) -> int:
    from lm_eval_cola.store import controls
    from lm_eval_cola.store.store import Store

    def lengths(store: Store, gold: GoldRun, documents: set[str]) -> dict[str, Any]:
        with store.session() as session:
            found = controls.run_lengths(session, gold.id)
        lengths = {str(n): count for n, count in found.items()}  # string keys, as JSON keeps them
        return {"lengths": lengths, "source": gold.name}

    return _run_control(args, "random-walk", lengths)


def run_menu(args: argparse.Namespace) -> int:
    from lm_eval_cola.chain import Chain
    from lm_eval_cola.store import queries
    from lm_eval_cola.store.store import Store

    def menu(store: Store, gold: GoldRun, documents: set[str]) -> dict[str, Any]:
        with Store(args.train_store or args.store, read_only=True) as train:
            trained = _gold_run(train, args.train_run)
            if trained.fingerprint != gold.fingerprint:
                raise ControlError(f"training run {trained.id} was searched on other weights")
            with train.session() as session:
                seen = set(queries.finished_documents(session, [trained.id]))
                k = args.k or gold.budget
                chains = queries.frequent_chains(session, [trained.id], k + 1)
        shared = seen & documents
        if shared:
            raise ControlError(
                f"training run {trained.id} has {len(shared)} of gold run {gold.id}'s documents: "
                "a menu must be chosen on other documents (search the train split)"
            )
        identity = str(Chain.identity(int(gold.space["n_layers"])))
        return {"chains": [c for c in chains if c != identity][:k], "source": trained.name}

    return _run_control(args, "menu", menu)


def _run_control(args: argparse.Namespace, method: str, options_for) -> int:
    """Build the control run of the gold run ``args.run`` with ``method`` and run it."""
    from lm_eval_cola.lm import load
    from lm_eval_cola.model_args import parse, preflight
    from lm_eval_cola.search.runner import SearchRun, describe_task
    from lm_eval_cola.store.store import Store
    from lm_eval_cola.tasks import task_documents

    k = args.k or None
    try:
        preflight(parse(args.model_args))
        with Store(args.store, read_only=True) as store:
            gold = _gold_run(store, args.run)
            task = _task(gold, args.include_path)
            if describe_task(task).config_hash != gold.config_hash:
                raise ControlError(f"task {gold.task} has changed since run {gold.id}")
            documents = {d.doc_hash for d in task_documents(task, gold.n_documents)}
            k = k or gold.budget
            options = options_for(store, gold, documents)
            options = _existing_options(store, gold, method, k, options["source"]) or options
        settings = control_settings(gold, method, options, k)
        lm = load(args.model_args, args.device)
        if lm.identity.fingerprint != gold.fingerprint:
            raise ControlError(f"run {gold.id} was searched on other weights than these")
    except (ColaError, ValueError) as err:
        return report(f"cola controls {args.controls_command}", err)
    with Store(args.store) as store:
        search = SearchRun(
            lm, task, store, settings, args.prefix_cache_mb, parallel_docs=args.parallel_docs
        )
        run_id = search.run()
    print(f"{gold.task}: {method} control run {run_id} of run {gold.id}: {search.tally}")
    print(f"  see: cola db controls --store {args.store} --run {gold.id}")
    return 0


def control_settings(gold: GoldRun, method: str, options: dict, k: int):
    """The gold run's settings with ``method`` choosing the chains: the full model and ``k``
    chains per document."""
    from lm_eval_cola.search.runner import SearchSettings

    named = {key: gold.settings.get(key) for key in ("metric", "filter_name", "num_fewshot")}
    space = {key: value for key, value in gold.space.items() if key != "n_layers"}
    return SearchSettings(
        method=method,
        budget=k + 1,
        seed=gold.seed,
        space=space,
        method_options=options,
        limit=gold.n_documents,
        max_gen_toks=gold.settings.get("max_gen_toks"),
        control_of=gold.name,
        **named,
    )


def _gold_run(store, spec: str) -> GoldRun:
    from lm_eval_cola.store import queries
    from lm_eval_cola.store.schema import Run

    with store.session() as session:
        run_id = queries.find_run(session, spec)
        if run_id is None:
            raise ControlError(f"{store} has no run '{spec}'")
        run = session.get(Run, run_id)
        if run.settings.get("target", "gold") != "gold" or run.settings.get("control_of"):
            raise ControlError(f"run {run_id} is itself a control: name the gold search run")
        return GoldRun(
            run.id, run.name, run.task.name, run.task.split, run.task.config_hash,
            run.model.fingerprint, run.seed, run.budget, run.n_documents, run.space,
            run.settings,
        )  # fmt: skip


def _existing_options(
    store, gold: GoldRun, method: str, k: int, source: str
) -> dict[str, Any] | None:
    """The options of an earlier control of this kind, size and source, so that the same
    command resumes it even after its source has grown (and its lengths or menu moved)."""
    from lm_eval_cola.store import controls
    from lm_eval_cola.store.schema import Run

    with store.session() as session:
        runs = controls.controls_of(session, session.get(Run, gold.id))
        found = [
            run.settings["method_options"]
            for run in runs
            if run.method == method
            and run.budget == k + 1
            and run.settings["method_options"].get("source") == source
        ]
        return found[-1] if found else None


def _task(gold: GoldRun, include_path: str | None):
    from lm_eval_cola.tasks import load_tasks

    settings = gold.settings
    return load_tasks(
        gold.task,
        include_path,
        metric=settings.get("metric"),
        filter_name=settings.get("filter_name"),
        num_fewshot=settings.get("num_fewshot"),
        max_gen_toks=settings.get("max_gen_toks"),
        split=gold.split,
    )[gold.task]
