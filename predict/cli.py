"""``cola predict``: train chain predictors from a store's searched chains, and judge them on
documents they never saw.

This module imports nothing heavy at load time: ``cola`` imports it to build its parser.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lm_eval_cola.cli import add_command, add_model_args, load_model
from lm_eval_cola.predict import PREDICTORS

EPILOG_TRAIN = """example:
  cola search --tasks arc_easy --split train --limit 300 --budget 50 --store cola.db
  cola predict train --store cola.db --run 1 --output_dir predictors/ --select
  cola predict train --store cola.db --run 1 --output_dir short/ --kinds static \\
      --prune_to 25 --max_depth 0.85
  lm_eval --model cola --model_args chains=predictor:predictors/knn.pt --tasks arc_easy
"""
EPILOG_EVALUATE = """example:
  cola predict evaluate --predictors predictors/*.pt --tasks arc_easy,arc_challenge --limit 500
  (the documents must not overlap the predictors' training documents; a task other than
  the predictors' own is judged out of domain)
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    predict = add_command(
        subparsers,
        "predict",
        help="train and evaluate chain predictors (chains from the input alone)",
        description="Train chain predictors from a store and evaluate them on held-out documents.",
        epilog=EPILOG_TRAIN + "\n" + EPILOG_EVALUATE.replace("example:\n", ""),
    )
    commands = predict.add_subparsers(dest="predict_command", metavar="COMMAND", required=True)
    _add_train(commands)
    _add_evaluate(commands)


def model_options(parser: argparse.ArgumentParser) -> None:
    """The model the predictors read and run, and where extra task YAMLs are."""
    add_model_args(parser)
    parser.add_argument("--include_path", help="extra folder of task YAMLs, as for lm_eval")


def training_data_options(parser: argparse.ArgumentParser) -> None:
    """Where the training documents come from: search runs of a store, read with a model. Shared
    with the benchmark scripts that build the same training set."""
    parser.add_argument("--store", required=True, help="SQLite path or SQLAlchemy URL")
    parser.add_argument(
        "--run", action="append", required=True, help="training run id or name (repeatable)"
    )
    model_options(parser)


def _add_train(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands,
        "train",
        help="train predictors on the documents of search runs",
        description="Train predictors on the chains that search runs stored, one file per kind.",
        epilog=EPILOG_TRAIN,
    )
    training_data_options(parser)
    parser.add_argument("--output_dir", required=True, help="writes KIND.pt per predictor")
    parser.add_argument(
        "--kinds",
        default=",".join(PREDICTORS),
        help="comma-separated, of " + "/".join(PREDICTORS) + " (default: all)",
    )
    parser.add_argument("--candidates", type=int, default=16, help="chains to choose from")
    parser.add_argument(
        "--prune_to",
        type=int,
        help="also offer the greedy path of pruned chains (the model less one layer, two, ...) "
        "down to this many layers, judged on the first 300 training documents",
    )
    parser.add_argument(
        "--max_depth",
        type=float,
        help="hold static, knn and network to this share of the model's layers, their prompt "
        "states included (e.g. 0.85 with --prune_to 25 for a 30-layer model)",
    )
    parser.add_argument("--layer", type=int, help="prompt states after this many layers (N/2)")
    parser.add_argument("--max_tokens", type=int, default=256, help="last prompt tokens read")
    parser.add_argument("--k", type=int, default=5, help="neighbours (knn)")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (network, program)")
    parser.add_argument(
        "--router_loss", choices=["focal", "ce"], default="focal", help="Dr.LLM: focal"
    )
    parser.add_argument(
        "--router_targets",
        choices=["path", "ties"],
        default="path",
        help="what routers learn: each document's shortest right path (Dr.LLM), or every "
        "decision that keeps to one of its equally short right chains",
    )
    parser.add_argument(
        "--router_unweighted",
        action="store_true",
        help="routers without class weights (Dr.LLM weights classes by inverse frequency)",
    )
    parser.add_argument(
        "--select",
        action="store_true",
        help="choose knn's k and the network's width and epochs on a validation split of the "
        "training documents (20%%, from the score table), then train on all of them",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=train)


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands,
        "evaluate",
        help="judge predictors on held-out documents",
        description=(
            "Score each predictor's chains, the identity chain and the best static chain on "
            "documents none of the predictors trained on: accuracy with a paired 95% "
            "interval and McNemar's test against the identity, layers run (the predictor's "
            "feature layers included), and oracle@k apart (any of k predicted chains right: "
            "the gold answer picks, so it is not an accuracy)."
        ),
        epilog=EPILOG_EVALUATE,
    )
    parser.add_argument("--predictors", nargs="+", required=True, help="files from train")
    parser.add_argument(
        "--tasks",
        required=True,
        help="comma-separated: the predictors' task (in domain) and others (out of domain)",
    )
    parser.add_argument("--split", help="default: each task's test split")
    parser.add_argument("--limit", type=int, help="first N documents of each task")
    parser.add_argument(
        "--k", type=int, default=5, help="chains a ranking predictor proposes, for oracle@k"
    )
    parser.add_argument("--output", help="also write the results as JSON here")
    model_options(parser)
    parser.set_defaults(func=evaluate)


def train(args: argparse.Namespace) -> int:
    from lm_eval_cola.predict.dataset import TrainingDataError, build_training_set
    from lm_eval_cola.predict.features import FeatureSpec
    from lm_eval_cola.predict.predictors import save, within_depth
    from lm_eval_cola.predict.predictors import train as fit
    from lm_eval_cola.predict.selection import GRIDS, describe, select
    from lm_eval_cola.store.engine import StoreError
    from lm_eval_cola.store.store import Store

    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(PREDICTORS))
    if args.max_depth is not None and args.max_depth <= 0:
        return _fail(f"--max_depth {args.max_depth}: give a share of the model's layers, e.g. 0.85")
    if unknown or args.candidates < 1:
        return _fail(f"--kinds {','.join(unknown)}: choose from {', '.join(PREDICTORS)}"
                     if unknown else "--candidates must be at least 1")  # fmt: skip
    try:
        store = Store(args.store, read_only=True)
        lm = load_model(args)
        spec = FeatureSpec(args.layer, args.max_tokens) if args.layer else None
        data = build_training_set(
            lm, store, args.run, args.candidates, spec, args.include_path, args.prune_to, kinds
        )
    except (TrainingDataError, StoreError, ValueError) as err:
        return _fail(str(err))
    network = {"epochs": args.epochs, "seed": args.seed}
    router = {
        "loss": args.router_loss,
        "balance": not args.router_unweighted,
        "targets": args.router_targets,
        "seed": args.seed,
    }
    options = {"knn": {"k": args.k}, "network": network, "program": network, "router": router}
    for kind in kinds:
        chosen, tried = options.get(kind, {}), []
        try:
            own = data
            if args.max_depth is not None:
                own = within_depth(kind, data, args.max_depth, lm.executor.n_layers)
            if args.select and kind in GRIDS:
                best, tried = select(kind, own, lm.identity, seed=args.seed)
                chosen = {**chosen, **best}
                scores = "; ".join(f"{describe(o)} {a:.3f}" for o, a in tried)
                print(f"{kind}: validation accuracy {scores} -> {describe(best)}")
            predictor = fit(kind, own, lm.identity, **chosen)
        except ValueError as err:
            return _fail(f"{kind}: {err}")
        if tried:
            predictor.info.options["validation"] = [[o, a] for o, a in tried]
        if args.max_depth is not None:
            predictor.info.options["max_depth"] = args.max_depth
        print(f"{kind}: {save(predictor, Path(args.output_dir) / f'{kind}.pt')}")
    print(
        f"trained on {len(data.doc_hashes)} documents of {data.task} ({data.split}), "
        f"{len(data.candidates)} candidate chains, {data.filled} candidate evaluations added"
    )
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from lm_eval_cola.predict.evaluate import LeakError, check_no_leak
    from lm_eval_cola.predict.evaluate import evaluate as judge
    from lm_eval_cola.predict.predictors import PredictorFileError, load
    from lm_eval_cola.tasks import load_tasks, task_documents

    try:
        predictors = [load(path) for path in args.predictors]
        tasks = load_tasks(args.tasks, args.include_path, split=args.split)
        for task in tasks.values():
            check_no_leak(predictors, task_documents(task, args.limit))
        lm = load_model(args)
        results = [
            row
            for task in tasks.values()
            for row in judge(lm, task, predictors, args.limit, max(args.k, 1))
        ]
    except (PredictorFileError, LeakError, ValueError) as err:
        return _fail(str(err))
    for task in tasks:
        _print_results([r for r in results if r.task == task])
    if args.output:
        rows = [r.__dict__ for r in results]
        Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _print_results(results) -> None:
    first = results[0]
    domain = "in domain" if first.in_domain else "out of domain"
    print(f"\n{first.task} ({domain}): {first.documents} held-out documents; "
          f"model depth {first.n_layers}")  # fmt: skip
    print(f"identity chain accuracy {first.identity_accuracy:.3f}; best static chain "
          f"{first.static_chain} accuracy {first.static_accuracy:.3f}")  # fmt: skip
    if first.sampling_at_k is not None:
        print(f"the full model's own {first.k} samples, best temperature: sampling@{first.k} "
              f"{first.sampling_at_k:.3f}")  # fmt: skip
    oracle_k, menu_k = f"oracle@{first.k}", f"menu@{first.k}"
    print(f"{'predictor':<10} {'accuracy':>8} {'vs identity [95% CI]':>27} {'McNemar p':>9} "
          f"{'layers':>7} {'depth':>6} {'not identity':>12} {oracle_k:>9} {menu_k:>7}")  # fmt: skip
    for r in results:
        interval = f"{r.delta:+.3f} [{r.delta_low:+.3f}, {r.delta_high:+.3f}]"
        oracle = "-" if r.oracle_at_k is None else f"{r.oracle_at_k:.3f}"
        print(f"{r.predictor:<10} {r.accuracy:>8.3f} {interval:>27} {r.mcnemar_p:>9.3f} "
              f"{r.layers_run:>7.2f} {r.depth:>6.1%} {r.differs_from_identity:>12.3f} "
              f"{oracle:>9} {r.menu_at_k:>7.3f}")  # fmt: skip
    print(
        "layers: the chain's plus the predictor's feature layers, per document; oracle@k: "
        "any of k predicted chains right (picked by the gold answer: not an accuracy); "
        "menu@k: the same for a fixed menu of the k training candidates right most often, "
        "which a predictor's k chains must beat to adapt to the input (and, for a "
        "generation task, sampling@k: any of the unmodified model's own k samples right)"
    )
    if not any(r.delta_low > 0 for r in results):
        print("No predictor beats the identity chain on these documents (95% interval).")


def _fail(message: str) -> int:
    print(f"cola predict: error: {message}", file=sys.stderr)
    return 2
