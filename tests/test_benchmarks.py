"""The benchmark scripts' checks have teeth: a wrong result makes them exit non-zero."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from lm_eval_cola.lm import ColaLM

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_overhead_fails_when_cola_results_differ(tiny_llama_dir, task_dir, monkeypatch):
    overhead = script("overhead")
    args = ["--pretrained", tiny_llama_dir, "--task", "cola_mc", "--include_path", task_dir,
            "--limit", "4", "--batch_size", "3", "--repeats", "1"]  # fmt: skip
    assert overhead.main(args) == 0
    exact = ColaLM.loglikelihood

    def off_by_a_little(self, requests, disable_tqdm=False):
        return [(loglik + 1e-3, greedy) for loglik, greedy in exact(self, requests, disable_tqdm)]

    monkeypatch.setattr(ColaLM, "loglikelihood", off_by_a_little)
    assert overhead.main(args) == 1


def test_predictor_report_has_a_learning_curve_and_out_of_domain_tables(
    tiny_llama_dir, task_dir, tmp_path
):
    """benchmarks/predictors.py on a tiny search: one table per training size on the held-out
    test split, and the out-of-domain task at the largest size, every predictor a row."""
    from lm_eval_cola.search.runner import SearchRun, SearchSettings
    from lm_eval_cola.store.store import Store
    from lm_eval_cola.tasks import load_tasks

    lm = ColaLM(pretrained=tiny_llama_dir, device="cpu", batch_size=1)
    train = load_tasks("cola_split", task_dir, split="train")["cola_split"]
    with Store(str(tmp_path / "train.db")) as store:
        run_id = SearchRun(lm, train, store, SearchSettings(method="mcts", budget=12)).run()
    report = tmp_path / "PREDICTORS.md"
    args = ["--store", str(tmp_path / "train.db"), "--run", str(run_id),
            "--model_args", f"pretrained={tiny_llama_dir}", "--device", "cpu",
            "--include_path", task_dir, "--sizes", "7,14", "--kinds", "static,knn,router,router-ce",
            "--candidates", "6", "--ood_tasks", "cola_mc", "--report", str(report),
            "--prune_to", "2", "--max_depth", "0.75"]  # fmt: skip
    assert script("predictors").main(args) == 0
    text = report.read_text()
    assert "Trained on 7 documents, judged on 8 cola_split documents (in domain" in text
    assert "Trained on 14 documents, judged on 8 cola_split documents (in domain" in text
    assert (
        "Trained on 14 documents, judged on" in text and "cola_mc documents (out of domain" in text
    )
    assert text.count("| knn |") == 3 and text.count("| static |") == 3
    assert text.count("| router |") == text.count("| router-ce |") == 3
    assert "| documents with a correct chain |" in text and "Router targets" in text
    assert "Candidate chains (share of the training documents each answers right): `0-3`" in text
    # held to 3 of 4 layers: static chooses a pruned chain; knn's 2 feature layers leave 1
    assert text.count("| static@75% |") == 3 and "| knn@75% |" not in text
    assert re.search(r"`[0-9.-]+` [0-9.]+% \([^)]*static@75%", text)  # its chain is named
    rows = [line for line in text.splitlines() if line.startswith("| static@75% |")]
    assert all(float(row.split("|")[5]) <= 3 for row in rows)  # layers run


def test_ablation_reports_label_noise_routers_and_features(tiny_llama_dir, task_dir, tmp_path):
    from lm_eval_cola.search.runner import SearchRun, SearchSettings
    from lm_eval_cola.store.store import Store
    from lm_eval_cola.tasks import load_tasks

    lm = ColaLM(pretrained=tiny_llama_dir, device="cpu", batch_size=1)
    train = load_tasks("cola_split", task_dir, split="train")["cola_split"]
    with Store(str(tmp_path / "train.db")) as store:
        run_id = SearchRun(lm, train, store, SearchSettings(method="mcts", budget=12)).run()
    report, cache = tmp_path / "ABLATION.md", tmp_path / "set.pt"
    args = ["--store", str(tmp_path / "train.db"), "--run", str(run_id),
            "--model_args", f"pretrained={tiny_llama_dir}", "--device", "cpu",
            "--include_path", task_dir, "--candidates", "6", "--report", str(report),
            "--training_set", str(cache)]  # fmt: skip
    ablation = script("ablation")
    assert ablation.main(args) == 0 and cache.is_file()
    first = report.read_text()
    assert "14 training documents (train split), 6 candidate chains" in first
    assert "trained on 11, judged on the other 3" in first
    assert "## Label noise" in first and "| router |" in first and "| router-ce |" in first
    assert "| knn |" in first and "| network |" in first
    assert ablation.main(args) == 0 and report.read_text() == first  # from the cached set


def test_answers_by_edits_counts_options_and_cumulative_corrections():
    """benchmarks/answers.py: chains grouped by edits from the full model; a document counts as
    corrected from the first number of edits at which one of its chains is right."""
    import pandas as pd

    answers = script("answers")
    rows = [  # (document, edits, answer, right); the full model wrong on a and b, right on c
        ("a", 0, "A", False), ("a", 1, "B", True), ("a", 2, "[invalid]", False),
        ("b", 0, "A", False), ("b", 1, "C", False), ("b", 2, "D", True),
        ("c", 0, "C", True), ("c", 1, None, False), ("c", 2, "A", False),
    ]  # fmt: skip
    frame = pd.DataFrame(rows, columns=["doc_hash", "edits", "response", "correct"])
    table = answers.by_edits(frame)
    assert list(table.index) == ["0", "1", "2"]
    assert list(table["wrong -> right within"]) == ["0/2", "1/2", "2/2"]
    assert list(table["'A'"]) == ["66.7%", "0.0%", "33.3%"]
    assert list(table["no option"]) == ["0.0%", "33.3%", "33.3%"]
    assert list(table["right"]) == ["33.3%", "33.3%", "33.3%"]


def test_reproduction_puts_a_decoy_and_random_chains_beside_table_1(
    tiny_llama_dir, task_dir, tmp_path, monkeypatch
):
    """benchmarks/reproduce.py: Table 1's headline oracle is searched beside its lottery (the
    same search rewarded by the decoy, random chains at its budget, on its documents), and the
    report ends with every oracle of the store beside its controls."""
    from sqlalchemy import select

    from lm_eval_cola.store import queries
    from lm_eval_cola.store.controls import target_of
    from lm_eval_cola.store.report import SHORTER_CAPTION
    from lm_eval_cola.store.schema import Evaluation, Run
    from lm_eval_cola.store.store import Store

    store, report = tmp_path / "r.db", tmp_path / "R.md"
    argv = table1_argv(tiny_llama_dir, task_dir, tmp_path, "cola_mc", "--spaces", "both,skip")
    monkeypatch.setattr("sys.argv", argv)
    script("reproduce").main()
    with Store(str(store), read_only=True) as opened, opened.session() as session:
        runs = {r.id: r for r in session.query(Run)}
    gold = [r for r in runs.values() if r.method == "mcts" and target_of(r) == "gold"]
    both = next(r for r in gold if r.space["mode"] == "both")
    decoy = [r for r in runs.values() if target_of(r) == "decoy"]
    random = [r for r in runs.values() if r.method == "random-walk"]
    assert len(gold) == 2 and len(decoy) == 1 and len(random) == 1
    assert decoy[0].space == both.space and decoy[0].budget == both.budget == random[0].budget
    assert random[0].settings["control_of"] == both.name
    assert decoy[0].n_documents == random[0].n_documents == both.n_documents == 4
    text = report.read_text()
    table = text.split("## Controls: what a lottery gives beside every oracle")[1]
    corrections, shortenings = table.split(SHORTER_CAPTION)
    rows = {
        line.split(" | ")[2]: line for line in corrections.splitlines() if "| cola_mc |" in line
    }
    shortened = [line for line in shortenings.splitlines() if "| cola_mc |" in line]
    assert len(shortened) == 2 and all(line.endswith(" | - |") for line in shortened)  # no menu
    assert set(rows) == {"both", "skip"}
    assert rows["both"].count(" - ") == 1  # no menu; decoy and random are there
    assert rows["skip"].count(" - ") == 5  # its controls were not run, and it says so
    assert all(" | n/a | " in row for row in rows.values()), "a scored task samples nothing"
    assert f"| {both.name} | 0 | - | - | - | - | - | - |" in table  # the tiny model rescues none
    figure = f"run{both.id}-controls.png"
    assert f"beside chance: {both.name}\n\n![controls](figures/{figure})" in table
    assert (tmp_path / "figures" / figure).stat().st_size > 10_000

    with Store(str(store)) as opened, opened.session() as session:  # so mark one rescue
        wrong = next(
            r.document_id for r in queries.per_document(session, both.id, 4) if not r.original
        )
        session.scalars(
            select(Evaluation)
            .where(Evaluation.run_id == both.id, Evaluation.document_id == wrong)
            .where(Evaluation.chain != "0-3")
        ).first().correct = True
    script("reproduce").main()  # searches nothing new: its runs are finished
    table = report.read_text().split("## Controls: what a lottery gives")[1]
    (checks,) = [line for line in table.splitlines() if line.startswith(f"| {both.name} | 1 |")]
    assert " - " not in checks and checks.count("/2 (") == 3  # shuffled twice: both checks ran
    assert checks.count("/1 (") == 3, "its one edit undone: of the reversions, then the rescues"
    kept = {p.name for p in (tmp_path / "r-checks").iterdir()}
    assert kept == {f"{both.name}-{check}.jsonl.gz" for check in ("reversion", "shuffle")}

    def evaluate_nothing(objective, proposals, *_, **__):
        assert not proposals, "a rebuilt report evaluates only rescues it has not checked"
        return []

    monkeypatch.setattr("lm_eval_cola.scoring.Objective.score_all", evaluate_nothing)
    script("reproduce").main()
    assert checks in report.read_text(), "the same checks, read back"


def test_reproduction_sets_a_menu_chosen_on_training_documents_beside_the_oracle(
    tiny_llama_dir, task_dir, tmp_path, monkeypatch, capsys
):
    """--menu_runs TASK=RUN: the headline oracle's menu control holds the chains right on the
    most documents of that training run, and the report shows it."""
    from lm_eval_cola.cli import main
    from lm_eval_cola.store import queries
    from lm_eval_cola.store.report import SHORTER_CAPTION
    from lm_eval_cola.store.schema import Run
    from lm_eval_cola.store.store import Store

    store, report = tmp_path / "r.db", tmp_path / "R.md"
    assert main(["search", "--tasks", "cola_split", "--split", "train", "--include_path",
                 task_dir, "--limit", "6", "--budget", "6", "--store", str(store),
                 "--run_name", "split-train", "--model_args", f"pretrained={tiny_llama_dir}",
                 "--device", "cpu"]) == 0  # fmt: skip
    menu_runs = ["--menu_runs", "cola_split=split-train"]
    argv = table1_argv(tiny_llama_dir, task_dir, tmp_path, "cola_split", "--spaces", "both",
                       "--controls", "menu", *menu_runs)  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    script("reproduce").main()
    with Store(str(store), read_only=True) as opened, opened.session() as session:
        runs = {r.name: r for r in session.query(Run)}
        train = runs["split-train"]
        frequent = queries.frequent_chains(session, [train.id], 6)
    (gold,) = [r for r in runs.values() if r.method == "mcts" and r is not train]
    (menu,) = [r for r in runs.values() if r.method == "menu"]
    assert menu.settings["control_of"] == gold.name and menu.budget == gold.budget
    assert menu.n_documents == gold.n_documents == 4
    options = menu.settings["method_options"]
    assert options["source"] == "split-train"
    assert options["chains"] == [c for c in frequent if c != "0-3"][:5]
    assert not [r for r in runs.values() if r.method == "random-walk"], "only what was asked"
    shortenings = report.read_text().split(SHORTER_CAPTION)[1].split("Rescue checks")[0]
    (row,) = [line for line in shortenings.splitlines() if line.startswith(f"| {gold.name} |")]
    assert not row.endswith(" | - |"), "the menu's column is filled"
    monkeypatch.setattr("sys.argv", [*argv[:-2], "--menu_runs", "cola_split"])
    with pytest.raises(SystemExit) as refused:
        script("reproduce").main()
    assert refused.value.code == 2 and "give TASK=RUN pairs" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", [*argv[:-2], "--menu_runs", "cola_split=split-tran"])
    reproduce = script("reproduce")
    monkeypatch.setattr(reproduce, "load", None)  # refused before any model loads
    with pytest.raises(SystemExit, match="has no run 'split-tran' \\(--menu_runs\\)"):
        reproduce.main()
    monkeypatch.setattr("sys.argv", [*argv[:-2], "--menu_runs", "cola_splt=split-train"])
    with pytest.raises(SystemExit, match="names cola_splt, which no headline searches"):
        reproduce.main()


def table1_argv(tiny_llama_dir, task_dir, tmp_path: Path, task: str, *options: str) -> list[str]:
    """benchmarks/reproduce.py's Table 1 on the tiny model, four documents at budget 6, into
    ``tmp_path / "r.db"``."""
    return ["reproduce.py", "--model_args", f"pretrained={tiny_llama_dir}", "--device", "cpu",
            "--task", task, "--include_path", task_dir, "--limit", "4", "--budget", "6",
            "--sections", "table1", "--store", str(tmp_path / "r.db"),
            "--report", str(tmp_path / "R.md"), "--figures", str(tmp_path / "figures"),
            *options]  # fmt: skip


def protocol_argv(tiny_llama_dir, task_dir, tmp_path: Path, *options: str) -> list[str]:
    """benchmarks/reproduce.py's paper protocol on the tiny model's generated-answer task, two
    documents, into ``tmp_path / "paper.db"``."""
    return ["reproduce.py", "--model_args", f"pretrained={tiny_llama_dir}", "--device", "cpu",
            "--include_path", task_dir, "--sections", "generated", "--gen_tasks", "cola_gen",
            "--gen_limit", "2", "--math_limit", "0", "--step", "2",
            "--store", str(tmp_path / "paper.db"), "--report", str(tmp_path / "P.md"),
            "--figures", str(tmp_path / "figures"), *options]  # fmt: skip


def test_reproduction_samples_the_full_model_beside_the_paper_protocol(
    tiny_llama_dir, task_dir, tmp_path, monkeypatch
):
    """benchmarks/reproduce.py --controls sampling: the full model's own samples, as many as a
    search's chains after the full model, on the documents of the protocol's runs, kept
    compressed beside the store; every run of the task gets the same cell, and a report
    rebuilt later draws nothing again."""
    from lm_eval_cola.store.controls import read_samples
    from lm_eval_cola.store.schema import Run
    from lm_eval_cola.store.store import Store

    store = tmp_path / "paper.db"
    argv = protocol_argv(tiny_llama_dir, task_dir, tmp_path, "--gen_space_limit", "2",
                         "--budget", "4", "--controls", "sampling,reversion")  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    script("reproduce").main()
    with Store(str(store), read_only=True) as opened, opened.session() as session:
        runs = {r.space["mode"]: r for r in session.query(Run)}
    assert set(runs) == {"both", "skip", "repeat"}, "no decoy or random run was asked for"
    (written,) = (tmp_path / "paper-sampling").iterdir()
    assert written.name == f"{runs['both'].name}.jsonl.gz"
    header, records = read_samples(written)
    assert header["k"] == 3 and len(records) == 2 * 3  # two documents, three temperatures
    assert all(len(r["correct"]) == 3 for r in records)
    table = (tmp_path / "P.md").read_text().split("## Controls: what a lottery gives")[1]
    rows = [line.split(" | ") for line in table.splitlines() if "| cola_gen |" in line]
    cells = {row[2]: row[9] for row in rows[:3]}  # the corrections table's own-sampling column
    assert set(cells) == {"both", "skip", "repeat"} and len(set(cells.values())) == 1
    assert cells["both"] != "-", cells
    before = written.read_bytes()
    script("reproduce").main()
    assert written.read_bytes() == before


def test_reproduction_grows_each_run_in_its_own_decoding_mode(
    tiny_llama_dir, task_dir, tmp_path, monkeypatch
):
    """benchmarks/reproduce.py --decoding hf grows a store of runs searched with HF's
    ``generate`` (results/paper.db), their controls decoded as they were; the default mode on
    that store stops before any search, naming the option, rather than starting every run over."""
    from lm_eval_cola.store.controls import target_of
    from lm_eval_cola.store.schema import Run
    from lm_eval_cola.store.store import Store

    store = tmp_path / "paper.db"
    argv = protocol_argv(tiny_llama_dir, task_dir, tmp_path, "--gen_space_limit", "1",
                         "--budget", "3", "--controls", "decoy,random")  # fmt: skip
    monkeypatch.setattr("sys.argv", [*argv, "--decoding", "hf"])
    script("reproduce").main()

    def runs() -> list[Run]:
        with Store(str(store), read_only=True) as opened, opened.session() as session:
            return list(session.query(Run))

    searched = runs()
    kinds = sorted((r.space["mode"], target_of(r), r.method) for r in searched)
    assert kinds == [("both", "decoy", "mcts"), ("both", "gold", "mcts"),
                     ("both", "gold", "random-walk"), ("repeat", "gold", "mcts"),
                     ("skip", "gold", "mcts")]  # fmt: skip
    assert all("decoding" not in r.settings for r in searched)  # HF's generate, as recorded

    monkeypatch.setattr("sys.argv", argv)  # batch_invariant, the default
    with pytest.raises(SystemExit, match="searched with --decoding hf: pass --decoding hf"):
        script("reproduce").main()
    assert [(r.id, r.name) for r in runs()] == [(r.id, r.name) for r in searched]


TINY_GEN_SEARCH = ["--task", "cola_gen", "--limit", "3", "--budget", "6", "--parallel_docs", "3",
                   "--workers", "1", "--prefix_cache_mb", "64"]  # fmt: skip


def _changed(row: tuple, field: str) -> tuple:
    """One evaluation ``(document, chain, correct, score, response)`` with ``field`` changed."""
    document, chain, correct, score, response = row
    return {
        "chain": (document, chain + ".0", correct, score, response),
        "correct": (document, chain, not correct, score, response),
        "score": (document, chain, correct, score + 1e-3, response),
        "answer": (document, chain, correct, score, f"{response} and more"),
    }[field]


def _one_run_changed(bench, monkeypatch, run_name: str, field: str) -> None:
    """``bench.measured_search`` as it is, but the run named ``run_name`` reads back its first
    evaluation with ``field`` changed, as a path that decoded differently would store it."""
    honest = bench.measured_search

    def measured(lm, task, args, folder, name, *rest, **how):
        found = honest(lm, task, args, folder, name, *rest, **how)
        if name == run_name:
            found.rows[0] = _changed(found.rows[0], field)
        return found

    monkeypatch.setattr(bench, "measured_search", measured)


@pytest.mark.parametrize("field", ["chain", "correct", "score", "answer"])
def test_search_fails_when_parallel_documents_store_another_evaluation(
    tiny_llama_dir, task_dir, monkeypatch, field
):
    """benchmarks/search.py on a generated task: every path agrees on the tiny model, and a
    parallel path that stored one other chain, correctness, score or answer fails it."""
    search = script("search")
    args = ["--model_args", f"pretrained={tiny_llama_dir}", "--include_path", task_dir,
            *TINY_GEN_SEARCH]  # fmt: skip
    if field == "chain":  # one honest run is enough
        assert search.main(args) == 0
    _one_run_changed(search, monkeypatch, "new, 3 documents at a time", field)
    assert search.main(args) == 1


def test_look_ahead_fails_when_a_depth_stores_another_answer(tiny_llama_dir, task_dir, monkeypatch):
    """benchmarks/look_ahead.py: the depths agree on the tiny model, and a depth that stored
    another answer fails it."""
    search = script("search")
    monkeypatch.setitem(sys.modules, "search", search)  # look_ahead.py's ``import search``
    look_ahead = script("look_ahead")
    args = ["--model_args", f"pretrained={tiny_llama_dir}", "--include_path", task_dir,
            *TINY_GEN_SEARCH, "--depths", "0,2", "--skip_hf"]  # fmt: skip
    assert look_ahead.main(args) == 0
    _one_run_changed(search, monkeypatch, "ahead2", "answer")
    assert look_ahead.main(args) == 1
