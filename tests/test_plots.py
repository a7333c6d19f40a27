"""``cola plot``: the figures' numbers, worked out by hand on the store of test_store_cli, and
the PNG files with their titles, axes and run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from lm_eval_cola.cli import main
from lm_eval_cola.store import cli as store_cli
from lm_eval_cola.store import controls, frames, plots, queries
from lm_eval_cola.store.store import DocumentInfo, RunInfo, Store
from tests.test_store_cli import MODEL, TASK, evaluation, fill

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    path = str(tmp_path_factory.mktemp("plots") / "cola.db")
    fill(path)
    return Store(path, read_only=True)


def test_figure_data_answers_the_papers_questions(store):
    with store.session() as session:
        # GRID: the first correct chain is the identity for documents 0-2, the 2nd chain for
        # 3 and 4, and none for 5.
        assert sorted(queries.first_correct_step(session, 1), key=str) == [1, 1, 1, 2, 2, None]
        assert sorted(queries.shortest_correct(session, 1), key=str) == [3, 3, 3, 4, 5, None]
        # best chains (BEST) with the identity's correctness: C->C 3, 4, 5; W->C 5, 3; 5 wrong
        assert sorted(queries.chosen_lengths(session, 1)) == [
            (0, False, 3), (0, True, 3), (0, True, 5), (1, True, 3), (1, True, 4), (1, True, 5)
        ]  # fmt: skip
        # within 1 evaluation only the identity; within 2 also 0-2, 0-2, 1-3, 0.1.1.2.3, 0.2.3, 1-3
        assert sorted(queries.best_within_budget(session, 1, 1)) == [
            (False, 4), (False, 4), (False, 4), (True, 4), (True, 4), (True, 4)
        ]  # fmt: skip
        assert sorted(queries.best_within_budget(session, 1, 2)) == [
            (False, 3), (True, 3), (True, 3), (True, 4), (True, 4), (True, 5)
        ]  # fmt: skip
        assert queries.run_seconds(session, 1) == 6 * 0.5
        assert sorted(queries.document_evaluations(session, 1, 2)) == [
            (3, 0.8), (4, 0.9), (5, 0.95)
        ]  # fmt: skip


def lines(figure) -> list[list[tuple[float, float]]]:
    return [list(zip(*line.get_data(), strict=True)) for ax in figure.axes for line in ax.lines]


def test_budget_curves_count_documents_solved_within_each_budget(store):
    figure = plots.budget_curves(store, [1])
    curve = next(line for line in lines(figure) if len(line) == 4)
    assert curve == [(1, 3 / 6), (2, 5 / 6), (3, 5 / 6), (4, 5 / 6)]
    assert (
        "grid, skip+repeat space (run 1, budget 4)"
        in figure.axes[0].get_legend().get_texts()[0].get_text()
    )
    assert "run 1, on the 6 documents it finished" in figure.axes[0].get_title()
    plt.close(figure)


def test_methods_are_compared_on_the_documents_every_run_finished(store):
    """mcts-a (run 2) finished documents 0 and 1 only; on those, grid's identity is correct at
    once, so its curve is 2/2 from budget 1, not the 3/6 it reads over all six documents."""
    with store.session() as session:
        common = queries.common_documents(session, [1, 2])
        assert len(common) == 2 and queries.common_documents(session, [1]) != common
        assert queries.best_within_budget(session, 1, 1, common) == [(True, 4), (True, 4)]
        assert sorted(queries.first_correct_step(session, 2, common)) == [1, 1]
    figure = plots.budget_curves(store, [1, 2])
    grid, mcts = [line for line in lines(figure) if len(line) > 1]
    assert grid == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0)] and mcts == [(1, 1.0), (2, 1.0)]
    assert "runs 1 and 2, on the 2 documents every run finished" in figure.axes[0].get_title()
    plt.close(figure)
    with pytest.raises(ValueError, match="no finished document in common"):
        plots.budget_curves(store, [1, 3])


def test_layer_usage_bars_are_the_stats(store):
    figure = plots.layer_usage(store, 1)
    heights = [[bar.get_height() for bar in ax.patches] for ax in figure.axes]
    assert heights[0] == pytest.approx([5 / 6, 7 / 6, 1.0, 5 / 6])
    assert heights[1] == pytest.approx([1 / 6, 1 / 6, 0.0, 1 / 6])
    assert heights[2] == pytest.approx([0.0, 2 / 6, 0.0, 0.0])
    assert "run 1: grid" in figure._suptitle.get_text()
    plt.close(figure)


def test_chain_length_histogram_counts_whole_documents(store):
    figure = plots.chain_lengths(store, 1)
    heights = sorted(bar.get_height() for bar in figure.axes[0].patches if bar.get_height())
    assert heights == [1] * 5  # best correct lengths: C->C 3, 4, 5; W->C 5, 3 (one bar each)
    assert all(tick == int(tick) for tick in figure.axes[0].get_yticks())
    plt.close(figure)


def test_chain_length_bars_have_edges_and_stand_over_their_length(store):
    """Without edges, the bars of lengths 26 and 27 read as one wide bar; a bar of length 3
    spans 2.5 to 3.5 (both groups side by side within it), not 3 to 4."""
    figure = plots.chain_lengths(store, 1)
    bars = [bar for bar in figure.axes[0].patches if bar.get_height()]
    for bar in bars:
        assert bar.get_linewidth() > 0
        assert to_rgba(bar.get_edgecolor()) != to_rgba(bar.get_facecolor())
    centres = []
    for bar in bars:
        length = round(bar.get_x() + bar.get_width() / 2)
        assert length - 0.5 <= bar.get_x() and bar.get_x() + bar.get_width() <= length + 0.5
        centres.append(length)
    assert sorted(centres) == [3, 3, 4, 5, 5]  # C->C 3, 4, 5; W->C 5, 3
    plt.close(figure)


@pytest.mark.parametrize("kind", [*plots.KINDS, "document"])
def test_integer_quantities_get_integer_ticks(store, kind):
    """Layer indices, chain lengths and budgets are whole numbers: no tick at layer 0.5 or at
    1.5 evaluations (the 4-layer, budget-4 store drew both)."""
    doc_id = 2 if kind == "document" else None
    figure = plots.render(store, "pareto" if doc_id else kind, [1, 2], doc_id=doc_id)
    ax = figure.axes[-1]
    low, high = ax.get_xlim()
    ticks = [tick for tick in ax.get_xticks() if low <= tick <= high]
    assert len(ticks) >= 2 and all(tick == int(tick) for tick in ticks), ticks
    plt.close(figure)


def test_titles_name_one_run_or_several_in_english(store):
    assert plots.runs_phrase([1]) == "run 1"
    assert plots.runs_phrase([1, 2]) == "runs 1 and 2"
    assert plots.runs_phrase([1, 2, 3]) == "runs 1, 2 and 3"
    figure = plots.budget_curves(store, [1])
    assert "runs 1" not in figure.axes[0].get_title()
    plt.close(figure)


def test_budget_curves_that_coincide_stay_visible(store):
    """On their two common documents both runs are at 1.0 from budget 1: one line style each,
    so the second curve does not hide the first."""
    figure = plots.budget_curves(store, [1, 2])
    styles = [line.get_linestyle() for line in figure.axes[0].lines]
    assert len(styles) == 2 and len(set(styles)) == 2
    plt.close(figure)


def test_pareto_front_of_a_document_spans_every_chain_length(store):
    """Document 0 of grid: 0-2 (length 3) is correct, so the front is 1.0 from length 3 to the
    longest chain, 4; it must not stop at 3 as if no longer chain was evaluated."""
    figure = plots.pareto(store, 1, doc_id=0)
    assert [(3, 1.0), (4, 1.0)] in lines(figure)
    plt.close(figure)


def test_points_of_a_document_count_the_chains_on_them():
    """Chains often share a length and a score: a point's area counts them, so that
    "3 chains evaluated" shows three chains, not two dots."""
    figure, ax = plt.subplots()
    plots._document_front(ax, [(3, 0.0), (3, 0.0), (4, 1.0)])
    (points,) = ax.collections
    assert list(points.get_sizes()) == [24, 12]
    assert "3 chains evaluated" in points.get_label()
    plt.close(figure)


def test_nothing_is_cut_off_and_legends_cover_no_data(store):
    for kind in plots.KINDS:
        figure = plots.render(store, kind, [1, 2], doc_id=2 if kind == "pareto" else None)
        figure.canvas.draw()
        page = figure.bbox
        texts = [figure._suptitle] if figure._suptitle else []
        for ax in figure.axes:
            texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
            legend = ax.get_legend()
            if legend is not None:
                texts.append(legend)
                assert legend.get_window_extent().x0 >= ax.get_window_extent().x1, kind
        for text in texts:
            box = text.get_window_extent()
            assert page.x0 <= box.x0 and box.x1 <= page.x1, (kind, text)
            assert page.y0 <= box.y0 and box.y1 <= page.y1, (kind, text)
        plt.close(figure)


def test_every_figure_has_a_title_axes_labels_and_its_run(store):
    for kind in plots.KINDS:
        figure = plots.render(store, kind, [1, 2], doc_id=2 if kind == "pareto" else None)
        title = figure._suptitle.get_text() if figure._suptitle else figure.axes[0].get_title()
        assert "run" in title and "1" in title, kind
        for ax in figure.axes:
            assert ax.get_ylabel(), kind
        assert figure.axes[-1].get_xlabel(), kind
        plt.close(figure)


def test_cola_plot_writes_png_files(store, tmp_path, capsys):
    out = tmp_path / "figures"
    status = main(
        ["plot", "--store", store.url, "--run", "grid", "mcts-a", "--output_dir", str(out)]
    )
    assert status == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == [
        "run1-2-budget.png",
        "run1-controls.png",
        "run1-layers.png",
        "run1-lengths.png",
        "run1-pareto.png",
    ]
    for path in out.iterdir():
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000
    assert capsys.readouterr().out.count(".png") == 5


def test_cola_plot_errors_are_one_line(store, tmp_path, capsys):
    status = main(["plot", "--store", store.url, "--run", "9", "--output_dir", str(tmp_path)])
    assert status == 1
    assert capsys.readouterr().err.strip() == f"cola plot: error: {store} has no run '9'"
    args = ["plot", "--store", store.url, "--run", "1", "--kind", "pareto", "--doc_id", "99"]
    assert main([*args, "--output_dir", str(tmp_path)]) == 1
    assert "run 1 has no evaluation of document 99" in capsys.readouterr().err


def test_plot_kinds_named_in_the_cli_are_the_plots():
    assert store_cli.PLOT_KINDS == plots.KINDS


# -- the controls figure ----------------------------------------------------------------------

#: Per run (name, method, settings) and document: is each evaluation right, the full model
#: (``0-3``) first. Budget 4: three chains after the full model. The decoy run's "right" is
#: its wrong answer reached. The random walk has not finished document 4 yet.
RANDOM = {"control_of": "gold"}
DECOY = {"target": "decoy"}
CONTROLLED = [
    ("gold", "mcts", {}, [[1], [0, 0, 1], [0, 1], [0, 0, 0, 0], [0, 1]]),
    ("gold-decoy", "mcts", DECOY, [[0, 0, 0, 1], [0, 0], [0, 0, 0, 0], [0, 1], [0, 0]]),
    ("gold-random", "random-walk", RANDOM, [[1], [0, 1], [0, 0, 0, 0], [0, 0, 0, 1]]),
]
CHAINS = ["0-3", "0-2", "1-3", "0.1.1.2.3"]
#: Per document, the full model's samples at temperature 0.5 (k = 3): right or not.
SAMPLES = [[1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0]]


def _hash(i: int) -> str:
    return hashlib.sha256(f"controlled {i}".encode()).hexdigest()


@pytest.fixture(scope="module")
def controlled(tmp_path_factory) -> Store:
    """A gold search of four documents with its decoy search and a random-walk control."""
    path = str(tmp_path_factory.mktemp("controls") / "cola.db")
    with Store(path) as store:
        model_id, task_id = store.model(MODEL), store.task(TASK)
        docs = [DocumentInfo(_hash(i), i, {"q": f"q{i}"}) for i in range(5)]
        ids = list(store.documents(task_id, docs).values())
        for name, method, settings, per_document in CONTROLLED:
            info = RunInfo(method, 4, 0, 5, settings=settings, name=name)
            run_id = store.start_run(model_id, task_id, info)
            for document_id, rights in zip(ids, per_document, strict=False):
                evaluations = [
                    evaluation(chain, float(right), bool(right))
                    for chain, right in zip(CHAINS, rights, strict=False)
                ]
                store.record_document(run_id, document_id, evaluations, 0.5)
    return Store(path, read_only=True)


def sampling(covered: int = 4) -> list[tuple[dict, list[dict]]]:
    header = {"run": "gold", "k": 3, "seed": 0, "fingerprint": MODEL.fingerprint}
    records = [
        {"doc_hash": _hash(i), "temperature": 0.5, "correct": [bool(c) for c in SAMPLES[i]]}
        for i in range(covered)
    ]
    return [(header, records)]


def sampling_file(folder: Path) -> Path:
    """:func:`sampling` as ``cola controls sampling`` writes it: a header line, then records."""
    (header, records), path = sampling()[0], folder / "sampling.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in [header, *records]) + "\n")
    return path


def test_control_curves_count_each_runs_corrections_within_k_chains(controlled):
    """Gold: of documents 1-3 (document 0 right at once), 2 is right at its 1st chain after
    the full model and 1 at its 2nd: 1, 2, 2 of 3. Decoy: all four start wrong, 3 reaches its
    answer at the 1st chain, 0 at the 3rd. Random walk: 1 at the 1st, 3 at the 3rd. Samples:
    3 at the 1st, 1 at the 2nd, 2 never."""
    with controlled.session() as session:
        found = controls.control_curves(session, 3, sampling())  # from a control: its gold run
    assert found.gold_run == 1 and found.documents == 4 and found.sampling_note is None
    by_kind = {curve.kind: (curve.documents, curve.reached) for curve in found.curves}
    assert by_kind == {
        "search": (3, [1, 2, 2]),
        "decoy": (4, [1, 1, 2]),
        "unguided": (3, [1, 1, 2]),
        "sampling": (3, [1, 2, 2]),
    }
    # on documents 1-3 (the full model gives neither answer): gold 2 of 3, decoy 1 of 3; with
    # document 4, which the random walk has not finished, gold 3 of 4, decoy 1 of 4
    assert found.lottery.neither == 3 and found.lottery.above_lottery == pytest.approx(1 / 3)
    with controlled.session() as session:
        assert controls.lottery(session, 1, 2).above_lottery == pytest.approx(1 / 2)


def test_the_controls_figure_draws_the_oracle_beside_chance(controlled):
    figure = plots.render(controlled, "controls", [1], samples=sampling())
    ax = figure.axes[0]
    assert [(1, 1 / 3), (2, 2 / 3), (3, 2 / 3)] in lines(figure)  # the gold search
    assert [(1, 0.25), (2, 0.25), (3, 0.5)] in lines(figure)  # the decoy
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels[0] == "gold search (mcts, run 1): 2/3 at 3"
    assert "decoy search, its wrong answer (run 2): 2/4 at 3" in labels
    assert "random-walk chains, unguided (run 3): 2/3 at 3" in labels
    assert "own samples, temperature 0.5: 2/3 at 3" in labels
    title = ax.get_title()
    assert "on the 4 documents every run drawn finished" in title and "run 1: mcts" in title
    assert "corrections above the lottery +33.3 points" in title
    plt.close(figure)


def test_a_controls_figure_says_what_it_lacks(controlled, store):
    """A run without controls is drawn alone with a title that says it cannot be cited as is;
    a sampling file short of a document is left out, and says so."""
    figure = plots.render(store, "controls", [1])
    assert "no controls stored" in figure.axes[0].get_title() and len(lines(figure)) == 1
    plt.close(figure)
    figure = plots.render(controlled, "controls", [1], samples=sampling(covered=3))
    title = figure.axes[0].get_title()
    assert "own samples cover 3 of the 4 documents: not drawn" in title
    assert len(lines(figure)) == 3
    plt.close(figure)


def test_cola_plot_draws_the_controls_with_a_sampling_file(controlled, tmp_path, capsys):
    path = sampling_file(tmp_path)
    args = ["plot", "--store", controlled.url, "--run", "gold", "--kind", "controls"]
    assert main([*args, "--sampling", str(path), "--output_dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "run1-controls.png")
    assert (tmp_path / "run1-controls.png").read_bytes()[:8] == PNG
    path.write_text('{"k": 3}\n')
    assert main([*args, "--sampling", str(path), "--output_dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"cola plot: error: {path} is not a file of cola controls sampling"
    )


def test_the_controls_figure_data_as_a_frame(controlled, tmp_path):
    path = sampling_file(tmp_path)
    frame = frames.control_curves(controlled.url, "gold-random", sampling=[path])
    assert list(frame.columns) == ["curve", "kind", "k", "reached", "documents", "share"]
    decoy = frame[frame["kind"] == "decoy"]
    assert list(decoy["k"]) == [1, 2, 3] and list(decoy["reached"]) == [1, 1, 2]
    assert list(decoy["share"]) == [0.25, 0.25, 0.5] and set(decoy["documents"]) == {4}
    assert sorted(set(frame["kind"])) == ["decoy", "sampling", "search", "unguided"]


def test_the_controls_frame_takes_one_sampling_file_as_a_path_or_a_string(controlled, tmp_path):
    path = sampling_file(tmp_path)
    listed = frames.control_curves(controlled.url, "gold-random", sampling=[path])
    assert "sampling" in set(listed["kind"])
    for one in (path, str(path)):
        frame = frames.control_curves(controlled.url, "gold-random", sampling=one)
        pd.testing.assert_frame_equal(frame, listed)
