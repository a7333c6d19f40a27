"""The CoLa paper's figures for any run in a store, as matplotlib figures (``cola plot``).

Each figure answers one question with data computed in SQL (``queries.py``) and carries a
title, labelled axes and the run(s) it came from. So that a reader can trust it at a glance,
whole quantities (layer indices, chain lengths, budgets) get whole-number ticks, bars have
edges, and legends sit right of the axes, where they cover no data:

- :func:`layer_usage`: per layer, how often the best chains apply it, skip it and repeat it
  (the paper's Figures 5 and 6);
- :func:`chain_lengths`: the lengths of the best correct chains, for originally correct and
  originally wrong documents (Figure 2);
- :func:`pareto`: score against chain length, for one document (every chain evaluated, and
  the Pareto front) or for a whole run (the share of documents with a correct chain of at
  most each length);
- :func:`budget_curves`: the share of documents with a correct chain within the first ``b``
  evaluations, for each run (one per search method), against ``b``;
- :func:`control_curves`: a gold search's corrections within the first k chains beside what
  chance gives on the same documents: its decoy search, unguided chains and the model's own
  samples (an oracle figure with its controls).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, MultipleLocator

from lm_eval_cola.store import controls, queries
from lm_eval_cola.store.schema import Run
from lm_eval_cola.store.store import Store

KINDS = ("layers", "lengths", "pareto", "budget", "controls")


def describe(store: Store, run_id: int) -> str:
    """``run 3: mcts, budget 200, arc_easy (test), SmolLM2 (30 layers)``: where a figure is from."""
    with store.session() as session:
        run = session.get(Run, run_id)
        if run is None:
            raise ValueError(f"{store} has no run {run_id}")
        return (
            f"run {run.id}: {run.method}, {space_name(run)} space, budget {run.budget}, "
            f"{run.task.name} ({run.task.split}), {_short(run.model.name)} "
            f"({run.model.n_layers} layers)"
        )


def space_name(run: Run) -> str:
    """``skip+repeat``, ``skip-only`` or ``repeat-only``: the search space, in the paper's words."""
    mode = run.space.get("mode", "both")
    return {"both": "skip+repeat", "skip": "skip-only", "repeat": "repeat-only"}.get(mode, mode)


def _short(name: str) -> str:
    """A model name short enough for a title: its last path part, without remarks."""
    return name.rstrip("/").split("/")[-1].split(" (")[0][:40]


#: Line styles for the runs of a budget figure, so that curves which coincide stay visible.
STYLES = ("-", "--", ":", "-.")
#: Bar edges: adjacent bars of one colour must read as separate bars, not one wide bar.
EDGE = {"edgecolor": "black", "linewidth": 0.6}


def runs_phrase(run_ids: Sequence[int]) -> str:
    """``run 1``, ``runs 1 and 2``, ``runs 1, 2 and 3``: a title that reads as English."""
    ids = list(map(str, run_ids))
    if len(ids) == 1:
        return f"run {ids[0]}"
    return f"runs {', '.join(ids[:-1])} and {ids[-1]}"


def _count(n: int, noun: str) -> str:
    """``1 document``, ``2 documents``: a count that reads as English."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _integer_ticks(axis: Axis, every: bool = True) -> None:
    """Ticks on whole numbers only, for layer indices, lengths and budgets (there is no layer
    2.5), in steps of 1, 2, 5 or 10; with ``every``, a minor tick on each integer so that each
    bar or step can be read off."""
    axis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    if every:
        axis.set_minor_locator(MultipleLocator(1))


def _legend_outside(ax: Axes) -> None:
    """The legend right of the axes, where it can never cover a curve, bar or point."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def layer_usage(store: Store, run_id: int) -> Figure:
    with store.session() as session:
        stats = queries.stats(session, run_id)
    layers = list(range(stats.n_layers))
    figure, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    panels = [
        (stats.usage, "mean applications\n(dashed: once)", "tab:blue"),
        (stats.skip_rate, "share of chains\nskipping it", "tab:red"),
        (stats.repeat_rate, "share of chains\nrepeating it", "tab:green"),
    ]
    for ax, (values, label, colour) in zip(axes, panels, strict=True):
        ax.bar(layers, values, color=colour, **EDGE)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[-1].set_xlabel("layer index")
    axes[-1].set_xlim(-0.6, stats.n_layers - 0.4)  # no tick past the last layer
    _integer_ticks(axes[-1].xaxis)
    figure.suptitle(
        f"Layer usage in the best chains of {_count(stats.documents, 'document')}\n"
        f"{describe(store, run_id)}",
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
    lengths = [n_layers, *(n for values in groups.values() for n in values)]
    # one bin per length, centred on it: the bar of length 26 stands over the tick 26
    bins = [n - 0.5 for n in range(min(lengths), max(lengths) + 2)]
    figure, ax = plt.subplots(figsize=(10, 4.5))
    labels = [f"{label}:\n{_count(len(values), 'document')}" for label, values in groups.items()]
    # side by side, not overlaid: no third colour where the two groups overlap
    ax.hist(list(groups.values()), bins=bins, label=labels, **EDGE)
    ax.axvline(n_layers, color="black", ls="--", lw=1, zorder=0, label=f"model depth {n_layers}")
    ax.set_xlim(min(lengths) - 1, max(lengths) + 1)
    ax.set_xlabel("length of the best correct chain (layers applied)")
    ax.set_ylabel("documents")
    _integer_ticks(ax.xaxis)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts, never 0.2 of a document
    _legend_outside(ax)
    ax.set_title(f"Best chain lengths\n{describe(store, run_id)}", fontsize=10)
    figure.tight_layout()
    return figure


def pareto(store: Store, run_id: int, doc_id: int | None = None) -> Figure:
    figure, ax = plt.subplots(figsize=(10, 4.5))
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
    ax.axvline(n_layers, color="black", ls="--", lw=1, zorder=0, label=f"model depth {n_layers}")
    ax.set_xlabel("chain length (layers applied)")
    _integer_ticks(ax.xaxis)
    _legend_outside(ax)
    ax.set_title(f"{title}\n{describe(store, run_id)}", fontsize=10)
    figure.tight_layout()
    return figure


def _document_front(ax: Axes, points: list[tuple[int, float]]) -> None:
    """Every chain as a point whose area counts the chains with that length and score (many
    share both, and one small dot for 30 chains would hide them), and the Pareto front: the
    best score of any chain of at most each length, up to the longest chain evaluated."""
    counts = Counter(points)
    lengths, scores = zip(*counts, strict=True)
    scale = min(12.0, 400 / max(counts.values()))  # the largest point stays a point
    sizes = [scale * n for n in counts.values()]
    label = f"{_count(len(points), 'chain')} evaluated\n(area: chains at the point)"
    ax.scatter(lengths, scores, s=sizes, alpha=0.5, zorder=3, label=label)
    front, best = [], float("-inf")
    for length, score in sorted(points, key=lambda p: (p[0], -p[1])):
        if score > best:
            front.append((length, score))
            best = score
    if max(lengths) > front[-1][0]:
        front.append((max(lengths), best))
    ax.step(*zip(*front, strict=True), where="post", color="tab:red", label="Pareto front")
    ax.set_ylabel("score (task metric)")


def _run_front(ax: Axes, shortest: list[int | None], n_layers: int) -> None:
    found = [n for n in shortest if n is not None]
    top = max([*found, n_layers])
    budgets = list(range(1, top + 1))
    share = [sum(n <= b for n in found) / max(len(shortest), 1) for b in budgets]
    # a dot per length: the last share, at the longest chain, is a point and not a step
    label = _count(len(shortest), "document")
    ax.step(budgets, share, where="post", marker="o", markersize=3, label=label)
    ax.set_ylabel("share of documents with a correct\nchain of at most this length")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)


def budget_curves(store: Store, run_ids: Sequence[int]) -> Figure:
    figure, ax = plt.subplots(figsize=(10, 4.5))
    with store.session() as session:
        documents = queries.common_documents(session, run_ids)
        if not documents:
            raise ValueError(f"runs {', '.join(map(str, run_ids))} have no finished document "
                             "in common: compare runs of the same task")  # fmt: skip
        for index, run_id in enumerate(run_ids):
            run = session.get(Run, run_id)
            steps = queries.first_correct_step(session, run_id, documents)
            budgets = list(range(1, run.budget + 1))
            share = [sum(s is not None and s <= b for s in steps) / len(steps) for b in budgets]
            label = f"{run.method}, {space_name(run)} space (run {run_id}, budget {run.budget})"
            ax.step(budgets, share, where="post", ls=STYLES[index % len(STYLES)], label=label)
        first = session.get(Run, run_ids[0])
        task, model = first.task.name, _short(first.model.name)
    ax.set_xlabel("chain evaluations per document (budget)")
    ax.set_ylabel("share of documents with a correct chain")
    ax.set_ylim(0, 1.02)
    _integer_ticks(ax.xaxis, every=False)  # a budget counts whole evaluations
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    finished = "it" if len(run_ids) == 1 else "every run"
    ax.set_title(
        f"Existence rate against budget: {task}, {model}\n{runs_phrase(run_ids)}, on the "
        f"{_count(len(documents), 'document')} {finished} finished",
        fontsize=10,
    )
    figure.tight_layout()
    return figure


#: A controls figure of more chains than this has a logarithmic axis of chains.
LOG_FROM = 20
#: How each kind of controls curve is drawn: the search bold, chance in thinner lines, a
#: family of colours a kind (so that a sampling temperature never takes the decoy's red).
CURVE_STYLES = {
    "search": ({"lw": 2.0, "ls": "-"}, ("black",)),
    "decoy": ({"lw": 1.5, "ls": "--"}, ("tab:red",)),
    "unguided": ({"lw": 1.2, "ls": "-."}, ("tab:blue", "tab:orange", "tab:brown")),
    "sampling": ({"lw": 1.2, "ls": ":"}, ("tab:green", "tab:olive", "tab:cyan", "tab:purple")),
}


def control_curves(store: Store, run_id: int, samples: controls.Samples = None) -> Figure:
    """An oracle curve alone cannot say whether the gold answer or chance found the chains;
    drawn beside a decoy's, unguided chains' and the model's own samples' on the same
    documents, the gap (or its absence) is what can be cited."""
    with store.session() as session:
        found = controls.control_curves(session, run_id, samples)
    described = describe(store, found.gold_run)
    figure, ax = plt.subplots(figsize=(10, 4.8))
    drawn: Counter[str] = Counter()
    for curve in found.curves:
        k = list(range(1, len(curve.reached) + 1))
        share = [n / max(curve.documents, 1) for n in curve.reached]
        last = f"{curve.reached[-1]}/{curve.documents}" if curve.reached else "none"
        style, colours = CURVE_STYLES[curve.kind]
        colour = colours[drawn[curve.kind] % len(colours)]
        drawn[curve.kind] += 1
        label = f"{curve.label}: {last} at {len(k)}"
        ax.step(k, share, where="post", label=label, color=colour, **style)
    if max(len(curve.reached) for curve in found.curves) > LOG_FROM:
        ax.set_xscale("log")  # the first few chains matter as much as the last hundred
    else:
        _integer_ticks(ax.xaxis, every=False)
    ax.set_xlabel("chains (or samples) after the full model, k")
    ax.set_ylabel("share reaching the target within k\n(of documents the full model misses)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, which="both")
    _legend_outside(ax)
    lines = [
        f"Corrections beside what chance gives, on the {_count(found.documents, 'document')} "
        "every run drawn finished",
        described,
        *_control_notes(found),
    ]
    ax.set_title("\n".join(lines), fontsize=9)
    figure.tight_layout()
    return figure


def _control_notes(found: controls.ControlCurves) -> list[str]:
    """What the title says of the controls: the paired difference against the decoy, or that
    nothing controls the run (so the curve alone says nothing about depth adaptation)."""
    phrases = []
    lottery = found.lottery
    if lottery is not None and lottery.above_lottery is not None:
        low, high = lottery.interval
        phrases.append(
            f"corrections above the lottery {100 * lottery.above_lottery:+.1f} points "
            f"[{100 * low:+.1f}, {100 * high:+.1f}] on {lottery.neither}"
        )
    if len(found.curves) == 1:
        phrases.append(
            "no controls stored (cola search --target decoy, cola controls random|menu):\n"
            "this curve alone does not say what chance gives"
        )
    elif lottery is None:
        phrases.append("no decoy search stored (cola search --target decoy)")
    if found.sampling_note:
        phrases.append(found.sampling_note)
    return phrases


def save(
    store: Store,
    kind: str,
    run_ids: Sequence[int],
    folder: Path,
    doc_id: int | None = None,
    samples: controls.Samples = None,
) -> Path:
    """Write the figure ``kind`` to ``folder/run<ids>-<kind>.png``; returns the path."""
    figure = render(store, kind, run_ids, doc_id, samples)
    folder.mkdir(parents=True, exist_ok=True)
    runs = "-".join(map(str, run_ids if kind == "budget" else run_ids[:1]))
    path = folder / f"run{runs}-{kind}.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def render(
    store: Store,
    kind: str,
    run_ids: Sequence[int],
    doc_id: int | None = None,
    samples: controls.Samples = None,
) -> Figure:
    """The figure ``kind`` (one of :data:`KINDS`); ``budget`` compares all ``run_ids``, the
    others show the first; ``samples``: ``cola controls sampling`` files as (header, records),
    for ``controls``."""
    if kind == "budget":
        return budget_curves(store, run_ids)
    if kind == "controls":
        return control_curves(store, run_ids[0], samples)
    if kind == "pareto":
        return pareto(store, run_ids[0], doc_id)
    return {"layers": layer_usage, "lengths": chain_lengths}[kind](store, run_ids[0])
