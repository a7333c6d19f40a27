"""Predicted chains judged honestly, with a learning curve: the predictors trained on the first
100, 400, ... searched training documents, each judged on held-out test documents of their task
(paired 95% interval and McNemar's test against the identity chain, layers run with the
predictor's own cost, oracle@k apart) and, at the largest size, out of domain.

Writes a markdown report (one table per training size and task) with the command that made it.

Example (after a training search, e.g. ``cola search --tasks arc_easy --split train --limit 1500
--budget 50 --max_block 1 --max_times 1 --store results/train.db``):

    python benchmarks/predictors.py --store results/train.db --run 1 --sizes 100,400,1500 \\
        --test_limit 500 --ood_tasks arc_challenge,gsm8k_direct --ood_limit 200 \\
        --report results/PREDICTORS.md
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval_cola.lm import load
from lm_eval_cola.predict import PREDICTORS
from lm_eval_cola.predict import predictors as predicting
from lm_eval_cola.predict.cli import training_data_options
from lm_eval_cola.predict.dataset import build_training_set, saved_or_built, shortest_routable
from lm_eval_cola.predict.evaluate import PredictorScore, evaluate
from lm_eval_cola.predict.router import ROUTER_VARIANTS
from lm_eval_cola.predict.selection import GRIDS, select, subset
from lm_eval_cola.store import queries
from lm_eval_cola.store.schema import Run
from lm_eval_cola.store.store import Store
from lm_eval_cola.tasks import load_tasks

#: Named variants trained beside the registered kinds: Dr.LLM's routers (focal loss, class
#: weights, one target path) against the same routers trained otherwise.
VARIANTS = {name: ("router", options) for name, options in ROUTER_VARIANTS.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/predictors.py --store results/train.db --run 1",
    )
    add = parser.add_argument
    training_data_options(parser)
    add("--sizes", default="100,400,1500", help="training documents per point of the curve")
    add(
        "--kinds",
        default=",".join([*PREDICTORS, *VARIANTS]),
        help=f"predictor kinds, or variants: {', '.join(VARIANTS)}",
    )
    add("--candidates", type=int, default=16)
    add("--prune_to", type=int, help="add the greedy path of pruned chains down to this depth")
    add(
        "--max_depth",
        type=float,
        help="also train each candidate kind held to this share of the model's layers "
        "(named KIND@SHARE)",
    )
    add("--test_limit", type=int, default=500, help="held-out test documents of the task")
    add("--ood_tasks", default="", help="comma-separated tasks judged out of domain")
    add("--ood_limit", type=int, default=200)
    add("--k", type=int, default=5, help="chains a ranking predictor proposes (oracle@k)")
    add("--training_set", help="cache the built training set in this file (reused if present)")
    add("--report", default="results/PREDICTORS.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("lm_eval.cola").setLevel(logging.INFO)  # e.g. each step of --prune_to
    lm = load(args.model_args, args.device)
    store = Store(args.store, read_only=True)
    kinds = [VARIANTS.get(name, (name,))[0] for name in args.kinds.split(",")]
    data = saved_or_built(
        args.training_set,
        lambda: build_training_set(
            lm, store, args.run, args.candidates, None, args.include_path, args.prune_to, kinds
        ),
    )
    sizes = [n for n in map(int, args.sizes.split(",")) if n <= len(data.doc_hashes)]
    if not sizes:
        print(f"the runs have {len(data.doc_hashes)} finished documents, fewer than any size")
        return 1
    (task,) = load_tasks(data.task, args.include_path).values()
    ood = load_tasks(args.ood_tasks, args.include_path) if args.ood_tasks else {}
    lines = [
        f"# Predicted chains on {data.task}: learning curve and held-out evaluation",
        "",
        f"`python benchmarks/predictors.py {shlex.join(argv or sys.argv[1:])}`",
        "",
        f"{len(data.doc_hashes)} searched training documents ({data.split} split), "
        f"{len(data.candidates)} candidate chains; hyper-parameters chosen on a validation "
        "fifth of each training set. oracle@k is any of a ranking predictor's k best chains "
        "right: the gold answer picks it, so it is not an accuracy.",
    ]
    lines += _training_data(store, args.run, data)
    for n in sizes:
        trained = _train(subset(data, list(range(n))), lm, args.kinds.split(","), args.max_depth)
        judged = [(task, args.test_limit)]
        if n == max(sizes):
            judged += [(t, args.ood_limit) for t in ood.values()]
        for judged_task, limit in judged:
            start = time.perf_counter()
            results = evaluate(lm, judged_task, list(trained.values()), limit, args.k)
            named = dict(zip(trained, results, strict=True))
            lines += _table(n, named, time.perf_counter() - start)
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _training_data(store: Store, runs: list[str], data) -> list[str]:
    """How often the training search found a correct chain within its first b evaluations,
    and the routers' targets: how many documents have one, and how long they are."""
    with store.session() as session:
        run_ids = [queries.find_run(session, run) for run in runs]
        budget = max(session.get(Run, run_id).budget for run_id in run_ids)
        budgets = [b for b in (1, 5, 10, 25, 50, 100, 200) if b <= budget]
        best = {
            b: [row for run_id in run_ids for row in queries.best_within_budget(session, run_id, b)]
            for b in budgets
        }
    found = {b: [length for correct, length in rows if correct] for b, rows in best.items()}
    rates = data.correct.float().mean(dim=0).tolist()
    return [
        "",
        "## The training data",
        "",
        "| budget b (first b evaluations) | " + " | ".join(map(str, budgets)) + " |",
        "|---" * (len(budgets) + 1) + "|",
        "| documents with a correct chain | "
        + " | ".join(f"{100 * len(found[b]) / len(best[b]):.1f}%" for b in budgets)
        + " |",
        "| mean length of the best correct chain | "
        + " | ".join(f"{sum(found[b]) / max(len(found[b]), 1):.2f}" for b in budgets)
        + " |",
        *_router_targets(data),
        "",
        "Candidate chains (share of the training documents each answers right): "
        + ", ".join(f"`{c}` {100 * r:.1f}%" for c, r in zip(data.candidates, rates, strict=True))
        + ".",
    ]


def _router_targets(data) -> list[str]:
    """How many documents have a target path for routers, and how long it is (nothing when no
    router was trained: the paths were not built)."""
    if data.routes is None:
        return []
    targets = [route.runs for route in data.routes if route is not None]
    own = sum(_from_own_search(data, i) for i in range(len(data.doc_hashes)))
    return [
        "",
        f"Router targets (each document's shortest right chain routers can express): "
        f"{len(targets)} of {len(data.doc_hashes)} documents have one, "
        f"{sum(int(t.sum()) for t in targets) / max(len(targets), 1):.2f} layers run on average; "
        f"for {own} of them it is shorter than every right candidate (or no candidate is "
        f"right), so it comes from the document's own search.",
    ]


def _from_own_search(data, i: int) -> bool:
    route = data.routes[i]
    if route is None:
        return False
    right = [c for c, ok in zip(data.candidates, data.correct[i].tolist(), strict=True) if ok]
    shortest = shortest_routable(right, len(data.candidates[0]))
    return shortest is None or int(route.runs.sum()) < sum(shortest)


def _train(data, lm, names: list[str], max_depth: float | None) -> dict[str, predicting.Predictor]:
    """The predictors by name (a kind, or a variant's name), and with ``max_depth`` each
    candidate kind again under that depth budget (``KIND@SHARE``)."""
    budgets = [None] if max_depth is None else [None, max_depth]
    trained = {}
    for name, budget in ((name, budget) for budget in budgets for name in names):
        kind, options = VARIANTS.get(name, (name, {}))
        label = name if budget is None else f"{name}@{budget:.0%}"
        try:
            own = data
            if budget is not None:
                own = predicting.within_depth(kind, data, budget, lm.executor.n_layers)
            if kind in GRIDS:
                options = select(kind, own, lm.identity)[0]
            trained[label] = predicting.train(kind, own, lm.identity, **options)
        except ValueError as err:  # e.g. no right chain routers can express
            print(f"{label} not trained on {len(data.doc_hashes)} documents: {err}")
    return trained


def _statics(results: dict[str, PredictorScore]) -> str:
    """Each distinct best static chain (a depth budget has its own), and who trained with it."""
    names: dict[tuple[str, float], list[str]] = {}
    for name, r in results.items():
        names.setdefault((r.static_chain, r.static_accuracy), []).append(name)
    return "; ".join(
        f"`{chain}` {100 * accuracy:.1f}% ({', '.join(users)})"
        for (chain, accuracy), users in names.items()
    )


def _table(n: int, results: dict[str, PredictorScore], seconds: float) -> list[str]:
    first = next(iter(results.values()))
    domain = "in domain" if first.in_domain else "out of domain"
    lines = [
        "",
        f"## Trained on {n} documents, judged on {first.documents} {first.task} documents "
        f"({domain}, {seconds / 60:.1f} min)",
        "",
        f"Identity chain {100 * first.identity_accuracy:.1f}%; best static chain of each "
        f"training set: {_statics(results)}.",
        "",
        "| predictor | accuracy | vs identity, points [paired 95% CI] | McNemar p | layers run "
        f"| depth | not the identity | oracle@{first.k} (not an accuracy) | menu@{first.k} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        oracle = "-" if r.oracle_at_k is None else f"{100 * r.oracle_at_k:.1f}%"
        lines.append(
            f"| {name} | {100 * r.accuracy:.1f}% | {100 * r.delta:+.1f} "
            f"[{100 * r.delta_low:+.1f}, {100 * r.delta_high:+.1f}] | {r.mcnemar_p:.3f} | "
            f"{r.layers_run:.2f} | {100 * r.depth:.1f}% | {100 * r.differs_from_identity:.1f}% "
            f"| {oracle} | {100 * r.menu_at_k:.1f}% |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
