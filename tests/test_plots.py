"""``cola plot``: the figures' numbers, worked out by hand on the store of test_store_cli, and
the PNG files with their titles, axes and run."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from lm_eval_cola.cli import main
from lm_eval_cola.store import cli as store_cli
from lm_eval_cola.store import plots, queries
from lm_eval_cola.store.store import Store
from tests.test_store_cli import fill

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
    assert "grid (run 1, budget 4)" in figure.axes[0].get_legend().get_texts()[0].get_text()
    assert "on the 6 documents every run finished" in figure.axes[0].get_title()
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
    assert "on the 2 documents every run finished" in figure.axes[0].get_title()
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
        "run1-layers.png",
        "run1-lengths.png",
        "run1-pareto.png",
    ]
    for path in out.iterdir():
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000
    assert capsys.readouterr().out.count(".png") == 4


def test_cola_plot_errors_are_one_line(store, tmp_path, capsys):
    status = main(["plot", "--store", store.url, "--run", "9", "--output_dir", str(tmp_path)])
    assert status == 1
    assert capsys.readouterr().err.strip() == f"cola plot: error: {store} has no run '9'"
    args = ["plot", "--store", store.url, "--run", "1", "--kind", "pareto", "--doc_id", "99"]
    assert main([*args, "--output_dir", str(tmp_path)]) == 1
    assert "run 1 has no evaluation of document 99" in capsys.readouterr().err


def test_plot_kinds_named_in_the_cli_are_the_plots():
    assert store_cli.PLOT_KINDS == plots.KINDS
