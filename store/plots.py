"""The CoLa paper's figures for any run in a store, as matplotlib figures (``cola plot``).

Each figure answers one question with data computed in SQL (``queries.py``) and carries a
title, labelled axes and the run(s) it came from:

- :func:`layer_usage`: per layer, how often the best chains apply it, skip it and repeat it
  (the paper's Figures 5 and 6);
- :func:`chain_lengths`: the lengths of the best correct chains, for originally correct and
  originally wrong documents (Figure 2);
- :func:`pareto`: score against chain length, for one document (every chain evaluated, and
  the Pareto front) or for a whole run (the share of documents with a correct chain of at
  most each length);
- :func:`budget_curves`: the share of documents with a correct chain within the first ``b``
  evaluations, for each run (one per search method), against ``b``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lm_eval_cola.store import queries
from lm_eval_cola.store.schema import Run
from lm_eval_cola.store.store import Store

KINDS = ("layers", "lengths", "pareto", "budget")


def describe(store: Store, run_id: int) -> str:
    """``run 3: mcts, budget 200, arc_easy (test), SmolLM2 (30 layers)``: where a figure is from."""
    with store.session() as session:
        run = session.get(Run, run_id)
        if run is None:
            raise ValueError(f"{store} has no run {run_id}")
        space = run.space.get("mode", "both")
        return (
            f"run {run.id}: {run.method}, {space} space, budget {run.budget}, "
            f"{run.task.name} ({run.task.split}), {_short(run.model.name)} "
            f"({run.model.n_layers} layers)"
        )


def _short(name: str) -> str:
    """A model name short enough for a title: its last path part, without remarks."""
    return name.rstrip("/").split("/")[-1].split(" (")[0][:40]


def layer_usage(store: Store, run_id: int) -> Figure:
    with store.session() as session:
        stats = queries.stats(session, run_id)
    layers = list(range(stats.n_layers))
    figure, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    panels = [
        (stats.usage, "mean applications", "tab:blue"),
        (stats.skip_rate, "share skipping it", "tab:red"),
        (stats.repeat_rate, "share repeating it", "tab:green"),
    ]
    for ax, (values, label, colour) in zip(axes, panels, strict=True):
        ax.bar(layers, values, color=colour)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[-1].set_xlabel("layer index")
    figure.suptitle(
        f"Layer usage in the best chains of {stats.documents} documents\n{describe(store, run_id)}",
        fontsize=10,
    )
    figure.tight_layout()
    return figure


def chain_lengths(store: Store, run_id: int) -> Figure:
    with store.session() as session:
        rows = queries.chosen_lengths(session, run_id)
        n_layers = queries.stats(session, run_id).n_layers
    groups = {
        "originally correct (C→C)": [n for original, ok, n in rows if original == 1 and ok],
        "originally wrong, corrected (W→C)": [
            n for original, ok, n in rows if original == 0 and ok
        ],
    }
    lengths = [n for values in groups.values() for n in values] or [n_layers]
    bins = range(min([*lengths, n_layers]) - 1, max([*lengths, n_layers]) + 2)
    figure, ax = plt.subplots(figsize=(8, 4.5))
    for label, values in groups.items():
        ax.hist(values, bins=bins, alpha=0.6, label=f"{label}: {len(values)} documents")
    ax.axvline(n_layers, color="black", ls="--", lw=1, label=f"model depth {n_layers}")
    ax.set_xlabel("length of the best correct chain (layers applied)")
    ax.set_ylabel("documents")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts, never 0.2 of a document
    ax.legend(fontsize=8)
    ax.set_title(f"Best chain lengths\n{describe(store, run_id)}", fontsize=10)
    figure.tight_layout()
    return figure


def pareto(store: Store, run_id: int, doc_id: int | None = None) -> Figure:
    figure, ax = plt.subplots(figsize=(8, 4.5))
    with store.session() as session:
        n_layers = queries.stats(session, run_id).n_layers
        if doc_id is not None:
            points = queries.document_evaluations(session, run_id, doc_id)
            if not points:
                raise ValueError(f"run {run_id} has no evaluation of document {doc_id}")
            _document_front(ax, points)
            title = f"Score against chain length, document {doc_id}"
        else:
            _run_front(ax, queries.shortest_correct(session, run_id), n_layers)
            title = "Correct chains within a depth budget"
    ax.axvline(n_layers, color="black", ls="--", lw=1, label=f"model depth {n_layers}")
    ax.set_xlabel("chain length (layers applied)")
    ax.legend(fontsize=8)
    ax.set_title(f"{title}\n{describe(store, run_id)}", fontsize=10)
    figure.tight_layout()
    return figure


def _document_front(ax, points: list[tuple[int, float]]) -> None:
    lengths, scores = zip(*points, strict=True)
    ax.scatter(lengths, scores, s=12, alpha=0.5, label=f"{len(points)} chains evaluated")
    front, best = [], float("-inf")
    for length, score in sorted(points, key=lambda p: (p[0], -p[1])):
        if score > best:
            front.append((length, score))
            best = score
    ax.step(*zip(*front, strict=True), where="post", color="tab:red", label="Pareto front")
    ax.set_ylabel("score (task metric)")


def _run_front(ax, shortest: list[int | None], n_layers: int) -> None:
    found = [n for n in shortest if n is not None]
    top = max([*found, n_layers])
    budgets = list(range(1, top + 1))
    share = [sum(n <= b for n in found) / max(len(shortest), 1) for b in budgets]
    ax.step(budgets, share, where="post", label=f"{len(shortest)} documents")
    ax.set_ylabel("share of documents with a correct chain of at most this length")
    ax.set_ylim(0, 1.02)


def budget_curves(store: Store, run_ids: Sequence[int]) -> Figure:
    figure, ax = plt.subplots(figsize=(8, 4.5))
    with store.session() as session:
        documents = queries.common_documents(session, run_ids)
        if not documents:
            raise ValueError(f"runs {', '.join(map(str, run_ids))} have no finished document "
                             "in common: compare runs of the same task")  # fmt: skip
        for run_id in run_ids:
            run = session.get(Run, run_id)
            steps = queries.first_correct_step(session, run_id, documents)
            budgets = list(range(1, run.budget + 1))
            share = [sum(s is not None and s <= b for s in steps) / len(steps) for b in budgets]
            ax.plot(budgets, share, label=f"{run.method} (run {run_id}, budget {run.budget})")
        first = session.get(Run, run_ids[0])
        task, model = first.task.name, _short(first.model.name)
    ax.set_xlabel("chain evaluations per document (budget)")
    ax.set_ylabel("share of documents with a correct chain")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    runs = ", ".join(map(str, run_ids))
    ax.set_title(
        f"Existence rate against budget: {task}, {model}\n"
        f"runs {runs}, on the {len(documents)} documents every run finished",
        fontsize=10,
    )
    figure.tight_layout()
    return figure


def save(
    store: Store, kind: str, run_ids: Sequence[int], folder: Path, doc_id: int | None = None
) -> Path:
    """Write the figure ``kind`` to ``folder/run<ids>-<kind>.png``; returns the path."""
    figure = render(store, kind, run_ids, doc_id)
    folder.mkdir(parents=True, exist_ok=True)
    runs = "-".join(map(str, run_ids if kind == "budget" else run_ids[:1]))
    path = folder / f"run{runs}-{kind}.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def render(store: Store, kind: str, run_ids: Sequence[int], doc_id: int | None = None) -> Figure:
    """The figure ``kind`` (one of :data:`KINDS`); ``budget`` compares all ``run_ids``, the
    others show the first."""
    if kind == "budget":
        return budget_curves(store, run_ids)
    if kind == "pareto":
        return pareto(store, run_ids[0], doc_id)
    return {"layers": layer_usage, "lengths": chain_lengths}[kind](store, run_ids[0])
