"""Why predicted chains do not beat the full model: label noise and features, measured.

Offline, from one training set (the score table, prompt states and router paths of a training
search) and a validation fifth of its documents, no test document involved:

- **label noise** of the routers' targets: how many equally short right chains routers can
  express each document has (the target is the first of them), and how many of its per-layer
  decisions change when the tie is broken the other way;
- **routers, teacher-forced**: per-layer decision accuracy on the validation documents (each
  fed the states along its own target path) against always running the layer once and against
  decisions drawn at random at the routers' own rates, the same for decisions that keep to
  any of the equally short right chains (what routers trained on tied targets learn), and how
  often the rare decisions (skip, repeat) are recalled;
- **features**: knn's and the network's validation accuracy (read from the score table) with
  each document's own prompt states against the same predictors trained on states shuffled
  across documents, from which they can learn only how often each candidate is right; the
  identity, the best static candidate and any candidate right (an oracle) give the scale.

Example:

    python benchmarks/ablation.py --store results/train.db --run 1 --candidates 8 \\
        --report results/ABLATION.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from lm_eval_cola.lm import load
from lm_eval_cola.predict import predictors as predicting
from lm_eval_cola.predict.cli import training_data_options
from lm_eval_cola.predict.dataset import (
    TrainingSet,
    build_training_set,
    right_chains,
    saved_or_built,
    shortest_paths,
)
from lm_eval_cola.predict.router import ROUTER_VARIANTS
from lm_eval_cola.predict.selection import split, subset, validation_accuracy
from lm_eval_cola.store import queries
from lm_eval_cola.store.store import Store

#: the predictors whose features are ablated, with fixed settings (no selection: the question
#: is whether the states carry signal, not which setting reads it best)
FEATURE_KINDS = {"knn": {"k": 10}, "network": {}}
#: the routers compared: Dr.LLM's recipe and its variants
ROUTERS = {"router": {}, **ROUTER_VARIANTS}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/ablation.py --store results/train.db --run 1",
    )
    add = parser.add_argument
    training_data_options(parser)
    add("--candidates", type=int, default=8)
    add("--training_set", help="cache the built training set in this file (reused if present)")
    add("--report", default="results/ABLATION.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lm = load(args.model_args, args.device)
    store = Store(args.store, read_only=True)
    data = saved_or_built(
        args.training_set,
        lambda: build_training_set(lm, store, args.run, args.candidates, None, args.include_path),
    )
    fit_rows, held_rows = split(len(data.doc_hashes))
    fit_on, held = subset(data, fit_rows), subset(data, held_rows)
    lines = [
        f"# Why predictors do not beat the full model on {data.task}: an ablation",
        "",
        f"`python benchmarks/ablation.py {shlex.join(argv or sys.argv[1:])}`",
        "",
        f"{len(data.doc_hashes)} training documents ({data.split} split), "
        f"{len(data.candidates)} candidate chains; trained on {len(fit_rows)}, judged on the "
        f"other {len(held_rows)} (a seeded validation fifth); no test document is used.",
    ]
    lines += _label_noise(store, args.run, data)
    lines += _routers(fit_on, held, lm)
    lines += _features(fit_on, held, lm)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _label_noise(store: Store, runs: list[str], data: TrainingSet) -> list[str]:
    """How arbitrary the routers' targets are: ties among the shortest right routable chains."""
    with store.session() as session:
        run_ids = [queries.find_run(session, run) for run in runs]
        searched = queries.correct_chains(session, run_ids)
    n_layers = len(data.candidates[0])
    targets = tied = flips = 0
    for i, doc_hash in enumerate(data.doc_hashes):
        right = right_chains(searched, doc_hash, data.candidates, data.correct[i].tolist())
        ties = shortest_paths(right, n_layers)
        if not ties:
            continue
        targets += 1
        if len(ties) > 1:
            tied += 1
            flips += sum(a != b for a, b in zip(ties[0], ties[-1], strict=True))
    return [
        "",
        "## Label noise: ties among the routers' targets",
        "",
        f"{targets} of {len(data.doc_hashes)} documents have a right chain routers can express. "
        f"For {tied} of them ({100 * tied / max(targets, 1):.1f}%) the shortest is not unique; "
        f"breaking the tie the other way changes {flips / max(tied, 1):.2f} of its "
        f"{n_layers} per-layer decisions on average, and a document has "
        f"{sum(_nondefault(p) for p in _targets(data)) / max(targets, 1):.2f} non-default "
        "decisions (skip or repeat) in its target.",
    ]


def _targets(data: TrainingSet) -> list[list[int]]:
    return [route.runs.tolist() for route in data.routes if route is not None]


def _nondefault(runs: list[int]) -> int:
    return sum(r != 1 for r in runs)


def _routers(fit_on: TrainingSet, held: TrainingSet, lm) -> list[str]:
    """Per-layer decisions on validation documents, teacher-forced along their targets."""
    routes = [route for route in held.routes if route is not None]
    labels = torch.stack([route.runs for route in routes])
    lines = [
        "",
        "## Routers, teacher-forced on the validation documents",
        "",
        f"{len(routes)} validation documents with a target, {labels.numel()} decisions; "
        f"always running the layer once is right on {100 * (labels == 1).float().mean():.1f}%.",
        "",
        "| routers | decisions right | at random with its rates | on a shortest right chain "
        "| at random with its rates | skips recalled | repeats recalled | skip or repeat "
        "predicted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    allowed = torch.stack([route.targets() for route in routes]) > 0  # (docs, layers, 3)
    for name, options in ROUTERS.items():
        router = predicting.train("router", fit_on, lm.identity, **options)
        with torch.no_grad():
            chosen = torch.stack(
                [
                    torch.stack([router.network(layer, r.states[layer]).argmax() for layer in
                                 range(labels.shape[1])])
                    for r in routes
                ]
            )  # fmt: skip
        rate = [(chosen == a).float().mean() for a in range(3)]
        chance = sum(rate[a] * (labels == a).float().mean() for a in range(3))
        kept = allowed.gather(2, chosen[..., None])[..., 0]
        kept_by_chance = sum(rate[a] * allowed[..., a].float().mean() for a in range(3))
        lines.append(
            f"| {name} | {_share(chosen == labels)} | {100 * chance:.1f}% | {_share(kept)} | "
            f"{100 * kept_by_chance:.1f}% | {_share(chosen[labels == 0] == 0)} | "
            f"{_share(chosen[labels == 2] == 2)} | {_share(chosen != 1)} |"
        )
    return lines


def _features(fit_on: TrainingSet, held: TrainingSet, lm) -> list[str]:
    """Candidate choice with the documents' own prompt states against shuffled ones."""
    order = torch.randperm(len(fit_on.states), generator=torch.Generator().manual_seed(1))
    shuffled_fit = dataclasses.replace(fit_on, states=[fit_on.states[j] for j in order])
    static = predicting.train("static", fit_on, lm.identity)
    lines = [
        "",
        "## Features: the documents' own prompt states against shuffled ones",
        "",
        f"Validation accuracy: identity {_share(held.correct[:, 0])}, best static candidate "
        f"on the fit documents {100 * validation_accuracy(static, held):.1f}%, any candidate "
        f"right (an oracle) {_share(held.correct.any(dim=1))}.",
        "",
        "| predictor | own states | shuffled states | difference, points |",
        "|---|---|---|---|",
    ]
    for kind, options in FEATURE_KINDS.items():
        own = validation_accuracy(predicting.train(kind, fit_on, lm.identity, **options), held)
        blind = predicting.train(kind, shuffled_fit, lm.identity, **options)
        shuffled = validation_accuracy(blind, held)
        lines.append(
            f"| {kind} | {100 * own:.1f}% | {100 * shuffled:.1f}% | {100 * (own - shuffled):+.1f} |"
        )
    return lines


def _share(mask: torch.Tensor) -> str:
    return f"{100 * mask.float().mean():.1f}%" if mask.numel() else "-"


if __name__ == "__main__":
    sys.exit(main())
