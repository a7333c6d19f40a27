"""Controls beside the oracle: decoy targets, decoy searches paired with their gold runs, and
the corrections a search for the gold answer finds above those a search for a wrong one does."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import delete, select

from lm_eval_cola.chain import Chain
from lm_eval_cola.cli import main
from lm_eval_cola.lm import ColaLM
from lm_eval_cola.sampling import sample
from lm_eval_cola.scoring import Objective, Proposal, Trial
from lm_eval_cola.search.baselines import Menu, RandomWalks
from lm_eval_cola.search.controls import (
    ControlError,
    SampledLottery,
    SamplingCheck,
    ShuffleCheck,
    Survival,
    TrialLog,
)
from lm_eval_cola.search.runner import SearchRun, SearchSettings
from lm_eval_cola.search.space import ChainSpace, single_reversions
from lm_eval_cola.store import controls, frames, queries
from lm_eval_cola.store.cli import share_text
from lm_eval_cola.store.controls import read_records
from lm_eval_cola.store.report import CHECKS_CAPTION, SHORTER_CAPTION
from lm_eval_cola.store.schema import Evaluation, Run
from lm_eval_cola.store.store import Store
from lm_eval_cola.targets import TargetError, decoy, judged_by, shuffled
from lm_eval_cola.tasks import TaskSpec, documents_of, load_tasks, task_documents
from tests.conftest import GEN_DOCS, MC_DOCS

TEMPLATE = Path(__file__).parents[1] / "lm_eval_cola" / "task_configs" / "_arc_gen_template_yaml"


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    return ColaLM(pretrained=tiny_llama_dir, device="cpu", batch_size=1)


def loaded(task_dir: str, name: str):
    return load_tasks(name, task_dir)[name]


@pytest.fixture(scope="module")
def letter_dir(tmp_path_factory) -> str:
    """The shipped lettered-answer template (arc_*_gen) on the test's ARC-format documents."""
    root = tmp_path_factory.mktemp("letters")
    data = root / "arc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (root / "cola_letters.yaml").write_text(
        f"include: {TEMPLATE}\ntask: cola_letters\ntag: []\ndataset_path: json\n"
        f"dataset_name: null\ndataset_kwargs: {{data_files: {{test: {json.dumps(str(data))}}}}}\n"
        "training_split: null\nvalidation_split: null\nfewshot_split: null\n"
    )
    return str(root)


def test_a_multiple_choice_decoy_is_the_next_option_cyclically(task_dir):
    task = loaded(task_dir, "cola_mc")
    docs = [d.doc for d in task_documents(task, None)]
    assert [decoy(task, d) for d in docs] == [1, 2, 0, 1, 2, 0, 1]  # gold A B C A B C A
    assert all(decoy(task, d) != task.doc_to_target(d) for d in docs)


def test_a_letter_decoy_is_the_next_lettered_option(letter_dir):
    task = loaded(letter_dir, "cola_letters")
    docs = [d.doc for d in task_documents(task, None)]
    assert [task.doc_to_target(d) for d in docs[:3]] == ["A", "B", "C"]
    assert [decoy(task, d) for d in docs[:3]] == ["B", "C", "A"]  # three options: C -> A


def test_a_number_decoy_is_the_gold_number_plus_one(task_dir):
    task = loaded(task_dir, "cola_gen")
    docs = [d.doc for d in task_documents(task, None)]
    assert [task.doc_to_target(d) for d in docs] == ["3", "5", "8"]
    assert [decoy(task, d) for d in docs] == ["4", "6", "9"]
    for gold, expected in [("1,000", "1001"), ("-1", "0"), ("2.5", "3.5"), ("$7", "8")]:
        assert decoy(_Target(gold), {}) == expected


class _Target:
    """A generation task whose every target is ``gold`` and whose prompt has no options."""

    def __init__(self, gold: str) -> None:
        self.gold = gold
        self.config = type("Config", (), {"task": "numbers", "doc_to_choice": None})()

    def doc_to_target(self, doc):
        return self.gold

    def doc_to_text(self, doc):
        return "How many?"

    def get_config(self, key):
        return "generate_until"


def test_tasks_without_a_decoy_are_refused(task_dir):
    task = loaded(task_dir, "cola_text")
    with pytest.raises(TargetError, match="needs a multiple-choice task"):
        decoy(task, task_documents(task, None)[0].doc)
    with pytest.raises(TargetError, match="'blue' is none of them"):
        decoy(_Target("blue"), {})


@pytest.mark.parametrize("name", ["cola_mc", "cola_gen"])
def test_a_decoy_search_is_rewarded_by_the_decoy_alone(lm, task_dir, name):
    """Judged by the task's own metric against the decoy: right exactly when the answer is the
    decoy, never when it is the gold one."""
    task = loaded(task_dir, name)
    gold, decoys = Objective(lm, task), Objective(lm, task, target="decoy")
    for document in task_documents(task, None):
        for chain in (Chain.identity(4), Chain.parse("0.1.1.3"), Chain.parse("3.2.1.0")):
            right, lure = gold.score(document, chain), decoys.score(document, chain)
            assert right.response == lure.response
            expected = decoy(task, document.doc)
            if name == "cola_mc":
                assert lure.correct == (int(lure.response) == expected)
            else:
                assert lure.correct == (lure.response.strip() == expected)
            assert not (lure.correct and right.correct)
    assert judged_by(task, "gold") is task


def search(lm, task, store: Store, run_name: str | None = None, **settings) -> int:
    settings = {"method": "mcts", "budget": 6, **settings}
    return SearchRun(lm, task, store, SearchSettings(**settings), run_name=run_name).run()


def test_a_decoy_run_is_its_own_run_paired_with_its_gold_run(lm, task_dir, tmp_path):
    task = loaded(task_dir, "cola_mc")
    with Store(str(tmp_path / "cola.db")) as store:
        gold = search(lm, task, store)
        lure = search(lm, task, store, target="decoy")
        other_seed = search(lm, task, store, target="decoy", seed=1)
        with store.session() as session:
            runs = {run.id: run for run in session.scalars(select(Run))}
            assert "target" not in runs[gold].settings, "gold runs keep the names they had"
            assert runs[lure].settings["target"] == "decoy" and runs[lure].name != runs[gold].name
            assert controls.paired_run(session, gold) == lure
            assert controls.paired_run(session, lure) == gold
            assert controls.paired_run(session, other_seed) is None
            result = controls.lottery(session, gold, lure)
            gold_rows = queries.per_document(session, gold, 4)
            decoy_rows = {r.document_id: r for r in queries.per_document(session, lure, 4)}
    neither = [r for r in gold_rows if not r.original and not decoy_rows[r.document_id].original]
    assert result.documents == 7 and result.neither == len(neither)
    assert result.gold_on_neither == sum(row.any_correct for row in neither)
    assert result.decoy_on_neither == sum(decoy_rows[r.document_id].any_correct for r in neither)
    assert result.gold_original + result.decoy_original <= 7  # never both on one document


def test_cola_db_controls_prints_the_comparison(lm, task_dir, tmp_path, capsys):
    task = loaded(task_dir, "cola_mc")
    path = str(tmp_path / "cola.db")
    with Store(path) as store:
        gold = search(lm, task, store)
        search(lm, task, store, target="decoy")
    assert main(["db", "controls", "--store", path, "--run", str(gold)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gold run 1, decoy run 2: 7 documents both finished")
    assert "corrections above the lottery" in out
    assert main(["db", "controls", "--store", path, "--run", "2", "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    decoy = result["decoy"]
    assert (decoy["gold_run"], decoy["decoy_run"], decoy["documents"]) == (1, 2, 7)
    assert result["gold_run"] == 1 and result["at_k"][0]["run_id"] == 1
    with Store(path) as store:
        search(lm, task, store, seed=5)
    assert main(["db", "controls", "--store", path, "--run", "3"]) == 1
    assert "run 3 has no controls yet" in capsys.readouterr().err


def test_cola_search_refuses_a_decoy_for_a_task_without_one(tiny_llama_dir, task_dir, tmp_path):
    command = [
        sys.executable, "-m", "lm_eval_cola", "search", "--model_args",
        f"pretrained={tiny_llama_dir}", "--device", "cpu", "--tasks", "cola_text",
        "--include_path", task_dir, "--target", "decoy", "--store", str(tmp_path / "x.db"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "--target decoy needs a multiple-choice task" in done.stderr.splitlines()[-1]


# -- unguided baselines -------------------------------------------------------------------------


def test_random_walks_are_reproducible_by_seed_and_follow_the_lengths():
    space = ChainSpace(8)
    lengths = {"6": 3, "9": 1}
    first = [RandomWalks(space, 30, seed=7, lengths=lengths) for _ in range(2)]
    drawn = [[walks.ask() for _ in range(30)] for walks in first]
    assert drawn[0] == drawn[1], "the same seed draws the same chains"
    assert drawn[0] != [RandomWalks(space, 30, 8, lengths).ask() for _ in range(30)]
    root, *rest = drawn[0]
    assert root == space.root and len(set(rest)) == len(rest) and root not in rest
    assert {len(chain) for chain in rest} == {6, 9}
    assert sum(len(chain) == 6 for chain in rest) > sum(len(chain) == 9 for chain in rest)
    for chain in rest:
        chain.validate(8)


def test_a_menu_is_the_same_list_for_every_document_whatever_the_scores():
    menu = Menu(ChainSpace(4), 4, seed=0, chains=["0-2", "0-3", "0.1.1.2.3", "0-2", "1-3"])
    asked = []
    for score in (1.0, 0.0, 1.0, 0.0):
        asked.append(menu.ask())
        menu.tell(Trial(asked[-1], score, bool(score), {}))
    assert [str(c) for c in asked] == ["0-3", "0-2", "0-1.1-3", "1-3"]


def control_args(path: str, gold: int, task_dir: str, model_dir: str, k: int) -> list[str]:
    """``cola controls`` arguments for gold run ``gold`` of the store at ``path``, ``k`` chains."""
    return [
        *("--store", path, "--run", str(gold), "--include_path", task_dir, "--k", str(k)),
        *("--model_args", f"pretrained={model_dir}", "--device", "cpu"),
    ]


def controlled(
    lm, model_dir: str, task_dir: str, path: str, capsys, gold_name=None, alone_name=None
) -> tuple[int, int, int, int]:
    """A store holding a gold run of ``cola_mc`` with its decoy run and random chains (5 a
    document), and a run of another seed without controls: their ids (gold, decoy, alone,
    random)."""
    task = loaded(task_dir, "cola_mc")
    with Store(path) as store:
        gold = search(lm, task, store, run_name=gold_name)
        decoy = search(lm, task, store, target="decoy")
        alone = search(lm, task, store, seed=7, run_name=alone_name)
    random_args = control_args(path, gold, task_dir, model_dir, 5)
    assert cola_controls(capsys, "random", *random_args)[0] == 0
    return gold, decoy, alone, alone + 1


def cola_controls(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["controls", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_control_runs_of_a_gold_run_resume_and_are_reported(
    lm, tiny_llama_dir, task_dir, tmp_path, capsys
):
    task = loaded(task_dir, "cola_split")
    path = str(tmp_path / "cola.db")
    with Store(path) as store:
        gold = search(lm, task, store)
        train = search(lm, loaded_split(task_dir, "train"), store)
        same_documents = search(lm, task, store, seed=3)
    common = control_args(path, gold, task_dir, tiny_llama_dir, 4)
    status, out, err = cola_controls(capsys, "random", *common)
    assert status == 0, err
    status, _, err = cola_controls(capsys, "menu", *common, "--train_run", str(train))
    assert status == 0, err
    status, _, err = cola_controls(capsys, "menu", *common, "--train_run", str(same_documents))
    assert status == 2 and "has 8 of gold run 1's documents" in err
    with Store(path, read_only=True) as store, store.session() as session:
        runs = {run.id: run for run in session.scalars(select(Run))}
        found = controls.controls(session, gold)
    random_run, menu_run = 4, 5
    assert runs[random_run].settings["control_of"] == runs[gold].name
    assert runs[random_run].method == "random-walk" and runs[random_run].budget == 5
    assert set(runs[random_run].settings["method_options"]["lengths"]) <= {"2", "3", "4", "5"}
    assert runs[menu_run].settings["method_options"]["chains"] and found.decoy is None
    assert [row.run_id for row in found.at_k] == [gold, random_run, menu_run]
    assert all(set(row.corrected) == {1, 4} for row in found.at_k[1:])
    status, out, _ = cola_controls(capsys, "random", *common)
    assert status == 0 and f"random-walk control run {random_run} of run {gold}" in out
    assert main(["db", "controls", "--store", path, "--run", str(random_run)]) == 0
    report = capsys.readouterr().out
    assert "random-walk (run 4)" in report and "menu (run 5)" in report
    more = control_args(path, gold, task_dir, tiny_llama_dir, 500)
    status, _, err = cola_controls(capsys, "menu", *more, "--train_run", str(train))
    assert status == 0, err
    with Store(path, read_only=True) as store, store.session() as session:
        offered = session.get(Run, menu_run + 1).settings["method_options"]["chains"]
    assert 0 < len(offered) < 500
    assert f"has only {len(offered)} chains besides the full model" in err
    assert main(["db", "controls", "--store", path, "--run", str(gold)]) == 0
    listed = capsys.readouterr().out
    assert f"menu (run {menu_run + 1}, {len(offered)} chains)" in listed
    assert "menu (run 5)" in listed and "random-walk (run 4)" in listed, "full ones unmarked"


def test_a_random_control_in_shards_equals_one_whole_run(
    lm, tiny_llama_dir, task_dir, tmp_path, capsys
):
    """Two processes at ``--shard 0/2`` and ``1/2`` draw each document's chains by its own
    seed, so together they store what one process does."""
    task = loaded(task_dir, "cola_mc")
    stored = {}
    for name, shards in (("whole", [None]), ("shards", ["0/2", "1/2"])):
        path = str(tmp_path / f"{name}.db")
        with Store(path) as store:
            gold = search(lm, task, store)
        common = control_args(path, gold, task_dir, tiny_llama_dir, 4)
        for shard in shards:
            status, _, err = cola_controls(
                capsys, "random", *common, *(["--shard", shard] * bool(shard))
            )
            assert status == 0, err
        with Store(path, read_only=True) as store, store.session() as session:
            random_run = session.scalar(select(Run.id).where(Run.method == "random-walk"))
            evaluations = session.scalars(select(Evaluation).where(Evaluation.run_id == random_run))
            stored[name] = sorted(
                (e.document_id, e.chain, e.correct, e.response) for e in evaluations
            )
    assert stored["shards"] == stored["whole"] and len(stored["whole"]) == 5 * len(MC_DOCS)
    status, _, err = cola_controls(capsys, "random", *common, "--shard", "2/2")
    assert status == 2 and "--shard 2/2: write i/n with 0 <= i < n" in err


def test_cola_report_sets_every_oracle_beside_its_controls(
    lm, tiny_llama_dir, task_dir, tmp_path, capsys
):
    path = str(tmp_path / "cola.db")
    gold, _, alone, _ = controlled(
        lm, tiny_llama_dir, task_dir, path, capsys, "mc-gold", "no-controls"
    )
    output = tmp_path / "report.md"
    assert main(["report", "--store", path, "--output", str(output)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert output.read_text().strip().splitlines() == table
    with Store(path, read_only=True) as store, store.session() as session:
        found = controls.controls(session, gold)
        documents = queries.per_document(session, gold, 4)
    right = sum(bool(row.original) for row in documents)
    shorter = sum(bool(row.shorter_correct) for row in documents if row.original)
    (search_k, random_k), lottery = found.at_k, found.decoy
    assert (search_k.right, search_k.shortened[5]) == (right, shorter), "as cola db stats counts"
    corrections, rest = "\n".join(table).split(SHORTER_CAPTION)
    shortenings, checks = rest.split(CHECKS_CAPTION)
    rows = table_rows(corrections)
    assert set(rows) == {"mc-gold", "no-controls"}, "decoy and control runs are no rows"
    cells = rows["mc-gold"]
    assert cells[5] == share_text(right, found.documents), "all the gold run's documents"

    def at_1_and_5(row) -> str:  # budget 6: 1 chain, then all 5 (no separate @5)
        return f"{row.corrected[1]}, " + share_text(row.corrected[5], row.documents)

    assert cells[6] == at_1_and_5(search_k) and cells[7] == at_1_and_5(random_k)
    assert cells[8] == "-", "no menu was run"
    assert cells[9] == "n/a", "a scored task has no sampling"
    assert cells[11] == share_text(lottery.decoy.reached, lottery.decoy.documents)
    nothing = ["-", "-", "n/a", "-", "-", "- |"]
    assert rows["no-controls"][7:] == nothing, f"run {alone}: nothing beside it"

    def shortened_at_1_and_5(row) -> str:
        return f"{row.shortened[1]}, " + share_text(row.shortened[5], row.right)

    shortened = table_rows(shortenings)
    assert set(shortened) == set(rows) and shortened["mc-gold"][4] == cells[5]
    assert shortened["mc-gold"][5:] == [*map(shortened_at_1_and_5, found.at_k), "- |"]
    assert table_rows(checks)["mc-gold"][2:] == ["-"] * 5 + ["- |"], "no check file given"


def test_a_menu_shorter_than_asked_says_so_beside_the_search(
    lm, tiny_llama_dir, task_dir, tmp_path, capsys
):
    """A training run with few right chains gives a menu of fewer chains than ``--k``: its
    "within all chains" then counts fewer chains than the search's, and the report says so."""
    path = str(tmp_path / "cola.db")
    with Store(path) as store:
        gold = search(lm, loaded(task_dir, "cola_split"), store, run_name="gold")
        train = search(lm, loaded_split(task_dir, "train"), store, budget=3, limit=4)
    menu_args = control_args(path, gold, task_dir, tiny_llama_dir, 5)
    status, _, err = cola_controls(capsys, "menu", *menu_args, "--train_run", str(train))
    assert status == 0, err
    with Store(path, read_only=True) as store, store.session() as session:
        chains = len(session.get(Run, train + 1).settings["method_options"]["chains"])
    assert 0 < chains < 5, "the training run's right chains, fewer than --k"
    assert main(["report", "--store", path]) == 0
    corrections, shortenings = capsys.readouterr().out.split(SHORTER_CAPTION)
    assert table_rows(corrections)["gold"][8].endswith(f" with its {chains} chains")
    shortened = table_rows(shortenings.split(CHECKS_CAPTION)[0])["gold"]
    assert shortened[7].endswith(f" with its {chains} chains |")


def test_of_two_menus_the_report_compares_the_one_of_more_chains(
    lm, tiny_llama_dir, task_dir, tmp_path, capsys
):
    """A second menu of one method (here a one-chain menu made after a fuller one) does not
    replace the first in ``cola report``'s column: the one that tries more chains stays."""
    path = str(tmp_path / "cola.db")
    with Store(path) as store:
        gold = search(lm, loaded(task_dir, "cola_split"), store, run_name="gold")
        train = search(lm, loaded_split(task_dir, "train"), store, budget=6, limit=8)
    for k in (5, 1):
        menu_args = control_args(path, gold, task_dir, tiny_llama_dir, k)
        status, _, err = cola_controls(capsys, "menu", *menu_args, "--train_run", str(train))
        assert status == 0, err
    with Store(path, read_only=True) as store, store.session() as session:
        menus = session.scalars(select(Run).where(Run.method == "menu").order_by(Run.id)).all()
        sizes = [len(menu.settings["method_options"]["chains"]) for menu in menus]
    assert sizes[0] > sizes[1] == 1, "a fuller menu, then a one-chain menu"
    assert main(["report", "--store", path]) == 0
    corrections = capsys.readouterr().out.split(SHORTER_CAPTION)[0]
    menu_cell = table_rows(corrections)["gold"][8]
    assert " with its 1 chain" not in menu_cell
    if sizes[0] < 5:  # a short menu says how many chains it has
        assert menu_cell.endswith(f" with its {sizes[0]} chains")
    else:
        assert " with its " not in menu_cell


def test_cola_db_stats_never_shows_an_oracle_without_its_controls(
    lm, tiny_llama_dir, task_dir, tmp_path, capsys
):
    path = str(tmp_path / "cola.db")
    gold, decoy_run, alone, random_run = controlled(lm, tiny_llama_dir, task_dir, path, capsys)
    with Store(path, read_only=True) as store, store.session() as session:
        found = controls.controls(session, gold)
    (search_k, random_k), lottery = found.at_k, found.decoy

    def stats(run: int, *options: str) -> str:
        assert main(["db", "stats", "--store", path, "--run", str(run), *options]) == 0
        return capsys.readouterr().out

    text = stats(gold)
    low, high = lottery.interval
    assert (
        f"  corrections above the lottery: {100 * lottery.above_lottery:+.1f} points "
        f"[{100 * low:+.1f}, {100 * high:+.1f}]" in text
    )
    assert f"on the {found.documents} documents every control finished" in text
    for name, row in (
        (f"this search (run {gold})", search_k),
        (f"random-walk (run {random_run})", random_k),
    ):
        cells = [
            share_text(row.corrected[5], row.documents),
            share_text(row.shortened[5], row.right),
        ]
        assert re.search(
            rf"^    {re.escape(name)} +{re.escape(cells[0])} +{re.escape(cells[1])}$", text, re.M
        )
    for control in (decoy_run, random_run):
        assert f"a control of run {gold}: " in stats(control)
    listed = {run["id"]: run["controls"] for run in frames.runs(path).to_dict("records")}
    assert listed == {
        gold: f"decoy {decoy_run}, random-walk {random_run}",
        decoy_run: f"of {gold}",
        alone: "none",
        random_run: f"of {gold}",
    }
    assert "no controls yet" in stats(alone)
    as_json = json.loads(stats(gold, "--format", "json"))
    assert as_json["controls"]["gold_run"] == gold and as_json["control_of"] is None
    assert as_json["controls"]["decoy"]["decoy_run"] == decoy_run
    assert json.loads(stats(random_run, "--format", "json"))["control_of"] == gold


def table_rows(text: str) -> dict[str, list[str]]:
    """A Markdown table's rows by their first cell, each split into its cells."""
    lines = text.strip().splitlines()[2:]
    return {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines}


def test_a_control_that_has_finished_no_document_yet_is_left_out(
    lm, tiny_llama_dir, task_dir, tmp_path, capsys
):
    """A control just started (its run stored, no document finished) must not shrink the
    comparison to no documents: it is left out until it has finished one."""
    from lm_eval_cola.store.schema import RunDocument

    task = loaded(task_dir, "cola_mc")
    path = str(tmp_path / "cola.db")
    with Store(path) as store:
        gold = search(lm, task, store, run_name="mc-gold")
    common = control_args(path, gold, task_dir, tiny_llama_dir, 5)
    assert cola_controls(capsys, "random", *common)[0] == 0
    with Store(path) as store, store.session() as session:
        random_run = session.scalar(select(Run.id).where(Run.method == "random-walk"))
        session.execute(delete(RunDocument).where(RunDocument.run_id == random_run))
    with Store(path, read_only=True) as store, store.session() as session:
        found = controls.controls(session, gold)
    assert [row.run_id for row in found.at_k] == [gold] and found.documents == len(MC_DOCS)
    assert main(["report", "--store", path]) == 0
    row = table_rows(capsys.readouterr().out.split(SHORTER_CAPTION)[0])["mc-gold"]
    assert row[4] == str(len(MC_DOCS)) and row[7] == "-"


def loaded_split(task_dir: str, split: str):
    return load_tasks("cola_split", task_dir, split=split)["cola_split"]


def test_single_reversions_undo_one_edit_each():
    def undone(chain: str) -> list[str]:
        return [str(c) for c in single_reversions(Chain.parse(chain), 30)]

    assert undone("0-9.14-29") == ["0-29"]  # a skip put back
    assert undone("0-11.11-29") == ["0-29"]  # a repeat taken out
    assert undone("0-19.16-19x2.20-29") == ["0-19.16-29"]  # one of two repeats
    assert undone("0-5.3-9.20-29") == ["0-9.20-29", "0-5.3-29"]
    assert undone("2-25") == ["0-25", "2-29"]  # skips at the start and at the end
    assert undone("0-29") == []


def test_reversion_counts_the_rescues_that_survive(lm, tiny_llama_dir, task_dir, tmp_path, capsys):
    task = loaded(task_dir, "cola_mc")
    path = str(tmp_path / "cola.db")
    with Store(path) as store:
        gold = search(lm, task, store, budget=12)
        with store.session() as session:  # the tiny model rescues nothing: mark two rescues
            originals = queries.per_document(session, gold, 4)
            for document_id in [row.document_id for row in originals if row.original == 0][:2]:
                longest = session.scalars(
                    select(Evaluation)
                    .where(Evaluation.run_id == gold, Evaluation.document_id == document_id)
                    .where(Evaluation.chain != "0-3")
                    .order_by(Evaluation.length.desc())
                ).first()
                longest.correct = True
        with store.session() as session:
            rescued = controls.rescues(session, gold)
    assert len(rescued) == 2
    output = tmp_path / "survival.json"
    argv = [
        "--store",
        path,
        "--run",
        str(gold),
        "--include_path",
        task_dir,
        "--output",
        str(output),
    ]
    argv += ["--model_args", f"pretrained={tiny_llama_dir}", "--device", "cpu"]
    status, out, err = cola_controls(capsys, "reversion", *argv)
    assert status == 0, err
    counts = json.loads(output.read_text())
    expected = [single_reversions(Chain.parse(c), 4) for c in rescued.values()]
    assert counts["rescues"] == counts["checked"] == len(rescued)
    assert counts["reversions"] == sum(map(len, expected))
    assert counts["robust"] + counts["fragile"] <= counts["checked"]
    objective = Objective(lm, task)
    documents = {d.doc_hash: d for d in task_documents(task, None)}
    right = sum(
        objective.score(documents[doc_hash], chain).correct
        for doc_hash, chains in zip(rescued, expected, strict=True)
        for chain in chains
    )
    assert counts["still_right"] == right
    assert f"reversions still right: {right}/{counts['reversions']}" in out

    assert main(["report", "--store", path, "--checks", str(output)]) == 0  # its row's checks
    checks = table_rows(capsys.readouterr().out.split(CHECKS_CAPTION)[1])[str(counts["run"])]
    assert checks[1:4] == ["2", "-", "-"], "two rescues, no shuffle given"
    assert checks[5] == share_text(right, counts["reversions"])
    other_model = tmp_path / "other-model.json"
    other_model.write_text(json.dumps({**counts, "fingerprint": "0" * 64}))
    assert main(["report", "--store", path, "--checks", str(other_model)]) == 0
    out = capsys.readouterr().out.split(CHECKS_CAPTION)[1]
    assert table_rows(out)[str(counts["run"])][5] == "-", "another model's run of the same name"
    output.write_text(json.dumps({"check": "reversion", "rescues": 2}))
    assert main(["report", "--store", path, "--checks", str(output)]) == 2
    assert "is not a file of cola controls reversion|shuffle --output" in capsys.readouterr().err
    trials = tmp_path / "reversion.jsonl.gz"
    assert cola_controls(capsys, "reversion", *argv, "--trials", str(trials))[0] == 0
    assert json.loads(output.read_text()) == counts, "evaluations kept: the same counts"
    kept = read_records(trials, "")[1]
    assert len(kept) == counts["reversions"]
    with Store(path) as store, store.session() as session:  # the run gains a third rescue
        third = [row.document_id for row in originals if row.original == 0][2]
        session.scalars(
            select(Evaluation).where(Evaluation.run_id == gold, Evaluation.document_id == third)
            .where(Evaluation.chain != "0-3")
        ).first().correct = True  # fmt: skip
    assert main(["report", "--store", path, "--checks", str(output)]) == 2
    err = capsys.readouterr().err
    assert "counted 2 rescues, the run has 3 now: run cola controls reversion again" in err

    assert cola_controls(capsys, "reversion", *argv, "--trials", str(trials))[0] == 0
    grown, records = json.loads(output.read_text()), read_records(trials, "")[1]
    with Store(path, read_only=True) as store, store.session() as session:
        added = set(controls.rescues(session, gold)) - set(rescued)
    assert records[: len(kept)] == kept and {r["doc_hash"] for r in records[len(kept) :]} == added
    assert grown["rescues"] == 3 and grown["reversions"] == len(records), "only the new rescue"
    assert cola_controls(capsys, "reversion", *argv)[0] == 0
    assert json.loads(output.read_text()) == grown, "the same counts as evaluating them all"
    status, _, err = cola_controls(capsys, "shuffle", *argv, "--trials", str(trials))
    assert status == 2 and "holds evaluations of other settings" in err and "--trials" in err
    assert "Loading weights" not in err, "refused before the model is loaded"
    (tmp_path / "notes.jsonl").write_text("{}\n")
    status, _, err = cola_controls(
        capsys, "reversion", *argv, "--trials", str(tmp_path / "notes.jsonl")
    )
    assert status == 2 and "is not a file of cola controls reversion|shuffle --trials" in err


def test_a_check_that_dies_keeps_the_evaluations_of_its_finished_passes(
    lm, task_dir, tmp_path, monkeypatch
):
    """``--trials`` is written pass by pass: a check killed in its third pass keeps the first
    two passes' evaluations, and the same check run again evaluates only the rest."""
    task = loaded(task_dir, "cola_gen")
    documents = task_documents(task, 3)
    proposals = [Proposal(d, Chain.parse(c)) for d in documents for c in ("0-3", "0-2", "1-3")]
    path, header = tmp_path / "reversion.jsonl.gz", {"run": "gold", "check": "reversion"}
    objective, honest = Objective(lm, task), Objective.score_many
    asked: list[int] = []
    dying = True

    def dies_in_third_pass(self, batch):
        asked.append(len(batch))
        if len(asked) == 3 and dying:
            raise RuntimeError("killed")
        return honest(self, batch)

    monkeypatch.setattr(Objective, "score_many", dies_in_third_pass)
    with pytest.raises(RuntimeError, match="killed"):
        TrialLog.open(path, header).score(objective, proposals, 2, "reversions")
    kept = TrialLog.open(path, header).records
    assert len(kept) == asked[0] + asked[1] == 3  # the full model: 2 documents, then 1
    asked.clear()
    dying = False
    trials = TrialLog.open(path, header).score(objective, proposals, 2, "reversions")
    assert sum(asked) == len(proposals) - len(kept)
    monkeypatch.undo()
    assert trials == [_logged(t) for t in Objective(lm, task).score_all(proposals, 2)], (
        "the same trials as a check that never died"
    )


def _logged(trial: Trial) -> Trial:
    """A trial as a log keeps it: its chain, score, correctness and answer."""
    return Trial(trial.chain, trial.score, trial.correct, {}, response=trial.response)


def test_an_option_shuffled_document_keeps_its_content_and_moves_its_gold_label():
    doc = MC_DOCS[1]  # "Which animal barks?" cat / dog / fish, gold B (dog)
    for shift in (1, 2):
        moved = shuffled(doc, shift)
        assert moved["question"] == doc["question"]
        assert moved["choices"]["label"] == doc["choices"]["label"]
        assert sorted(moved["choices"]["text"]) == sorted(doc["choices"]["text"])
        gold = moved["choices"]["label"].index(moved["answerKey"])
        assert moved["choices"]["text"][gold] == "dog" and moved["answerKey"] != "B"
    mmlu = shuffled({"question": "q", "choices": ["a", "b", "c", "d"], "answer": 3}, 1)
    assert mmlu["choices"] == ["d", "a", "b", "c"] and mmlu["answer"] == 0
    with pytest.raises(TargetError, match="option shuffle needs"):
        shuffled({"question": "q", "answer": "42"}, 1)


def test_shuffled_documents_are_asked_with_their_options_in_the_new_order(letter_dir):
    task = loaded(letter_dir, "cola_letters")
    original = task_documents(task, None)[1]
    (moved,) = documents_of(task, [shuffled(original.doc, 1)])
    prompt = moved.instances[0].args[0]
    assert "A. fish\nB. cat\nC. dog" in prompt and task.doc_to_target(moved.doc) == "C"


def test_shuffle_checks_whether_rescues_follow_the_content(
    lm, tiny_llama_dir, task_dir, tmp_path, capsys
):
    """On a log-likelihood task the options are scored one by one, so a chain's choice moves
    with the options: every rescue follows the content, none the position."""
    task = loaded(task_dir, "cola_mc")
    path = str(tmp_path / "cola.db")
    with Store(path) as store:
        gold = search(lm, task, store, budget=12)
        with store.session() as session:  # mark the last chain of each wrong document right
            originals = queries.per_document(session, gold, 4)
            for document_id in [row.document_id for row in originals if row.original == 0]:
                evaluations = session.scalars(
                    select(Evaluation)
                    .where(Evaluation.run_id == gold, Evaluation.document_id == document_id)
                    .order_by(Evaluation.id.desc())
                )
                next(iter(evaluations)).correct = True
        with store.session() as session:
            rescued = controls.rescues(session, gold)
            answers = {
                r.doc_hash: r.response for r in queries.evaluations(session, [gold])
                if rescued.get(r.doc_hash) == r.chain
            }  # fmt: skip
    output = tmp_path / "shuffle.json"
    argv = ["--store", path, "--run", str(gold), "--include_path", task_dir]
    argv += ["--model_args", f"pretrained={tiny_llama_dir}", "--device", "cpu"]
    status, out, err = cola_controls(capsys, "shuffle", *argv, "--output", str(output))
    assert status == 0, err
    counts = json.loads(output.read_text())
    assert counts["rescues"] == len(rescued) > 0 and counts["shuffles"] == 2 * len(rescued)
    with Store(path, read_only=True) as store, store.session() as session:
        assert (counts["check"], counts["run"]) == ("shuffle", session.get(Run, gold).name)
    documents = {d.doc_hash: d.doc for d in task_documents(task, None)}
    golds = {h: task.doc_to_target(documents[h]) for h in rescued}
    truly_right = sum(int(answers[h]) == golds[h] for h in rescued)
    assert counts["content"] == 2 * truly_right
    assert counts["position"] == sum(
        (int(answers[h]) + shift) % 3 == golds[h] for h in rescued for shift in (1, 2)
    )
    assert "the rescue follows the answer's text" in out


def test_a_shuffle_of_documents_without_options_is_refused_before_the_model_loads(
    lm, tiny_llama_dir, task_dir, tmp_path, capsys, monkeypatch
):
    task = loaded(task_dir, "cola_gen")  # numbers: nothing to move
    path = str(tmp_path / "cola.db")
    with Store(path) as store:
        gold = search(lm, task, store)
        with store.session() as session:  # a rescue to check: one chain of a wrong document
            originals = queries.per_document(session, gold, 4)
            wrong = next(row.document_id for row in originals if row.original == 0)
            session.scalars(
                select(Evaluation)
                .where(Evaluation.run_id == gold, Evaluation.document_id == wrong)
                .where(Evaluation.chain != "0-3")
            ).first().correct = True  # fmt: skip

    def no_model(*_):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("lm_eval_cola.search.controls._model_of", no_model)
    argv = ["--store", path, "--run", str(gold), "--include_path", task_dir]
    status, _, err = cola_controls(capsys, "shuffle", *argv)
    assert status == 2 and "option shuffle needs ARC-style documents" in err


def test_a_run_without_rescues_reports_nothing_to_check():
    assert "reversions still right: -" in Survival.of({}, [], []).text(1)
    assert "follows the old position: -" in ShuffleCheck.of(0, [], [], []).text(1)


@pytest.mark.internals  # the KV cache's name and its copy per row changed across transformers
def test_the_full_models_samples_are_seeded_and_greedy_at_temperature_zero(lm, task_dir):
    """Samples come from one shared prefill, yet at temperature 0 each is exactly the answer
    HFLM's own generate_until gives the request; at temperature 1 a seed fixes them."""
    task = loaded(task_dir, "cola_gen")
    for document in task_documents(task, None):
        (request,) = document.instances
        (greedy,) = lm.generate_until([request])
        assert sample(lm, request, 3, 0.0, seed=1) == [greedy] * 3
        drawn = sample(lm, request, 8, 1.0, seed=5)
        assert sample(lm, request, 8, 1.0, seed=5) == drawn
        assert len(set(drawn)) > 1  # a tiny random model's samples spread over its vocabulary


def test_sampling_at_k_counts_corrections_within_the_first_k_samples():
    records = [
        {"doc_hash": "a", "temperature": 0.7, "correct": [False, True], "seconds": 1.0},
        {"doc_hash": "b", "temperature": 0.7, "correct": [True, True], "seconds": 1.0},
        {"doc_hash": "c", "temperature": 0.7, "correct": [False, False], "seconds": 1.0},
        {"doc_hash": "a", "temperature": 1.0, "correct": [True, False], "seconds": 3.0},
        {"doc_hash": "b", "temperature": 1.0, "correct": [False, False], "seconds": 1.0},
        {"doc_hash": "c", "temperature": 1.0, "correct": [False, False], "seconds": 1.0},
    ]
    check = SamplingCheck.of(records, {"a": False, "b": True, "c": False}, 2)
    assert (check.documents, check.wrong) == (3, 2)
    assert check.corrected == {0.7: {1: 0, 2: 1}, 1.0: {1: 1, 2: 1}}
    assert check.right == {0.7: 3 / 6, 1.0: 1 / 6}
    assert (check.best(1), check.best(2)) == (1, 1)
    assert "best temperature per k: @1 1/2 (50.0%), @2 1/2 (50.0%)" in check.text(1)


def test_the_models_samples_judged_by_the_decoy_too(lm, task_dir):
    """sampling@k's lottery: a sample that gives the gold number plus one reaches the decoy;
    a document whose greedy answer is either target is left out; stored answers that no
    longer judge as they were are refused; a task with no decoy has no lottery."""
    task = loaded(task_dir, "cola_gen")
    by_answer = {d.doc["answer"]: d.doc_hash for d in task_documents(task, len(GEN_DOCS))}
    three, five, eight = by_answer["3"], by_answer["5"], by_answer["8"]  # decoys 4, 6, 9
    greedy = {three: "7", five: "6", eight: "x"}  # 5's greedy answer is its decoy: left out
    records = [
        {"doc_hash": three, "temperature": 1.0, "answers": ["4", "zz"], "correct": [False] * 2},
        {"doc_hash": five, "temperature": 1.0, "answers": ["5", "5"], "correct": [True] * 2},
        {"doc_hash": eight, "temperature": 1.0, "answers": ["8", "9"], "correct": [True, False]},
    ]
    documents = task_documents(task, len(GEN_DOCS))
    spec = TaskSpec("cola_gen")
    originals = dict.fromkeys(greedy, False)
    lottery = SampledLottery.of(lm, task, spec, documents, originals, greedy, records)
    assert lottery.samples == 2 and lottery.reached == {1.0: (2, 1, 2)}
    assert "gold reached 1/2 (50.0%), decoy reached 2/2 (100.0%)" in lottery.text()
    assert "above the lottery -50.0 points" in lottery.text()
    records[2]["correct"] = [False, False]
    with pytest.raises(ControlError, match="no longer judge as they did"):
        SampledLottery.of(lm, task, spec, documents, originals, greedy, records)
    text = loaded(task_dir, "cola_text")
    texts = task_documents(text, 1)
    no_decoy = SampledLottery.of(lm, text, TaskSpec("cola_text"), texts, originals, greedy, records)
    assert no_decoy is None


def test_cola_controls_sampling_writes_as_it_goes_and_resumes(
    lm, tiny_llama_dir, task_dir, tmp_path, capsys
):
    path, output = str(tmp_path / "cola.db"), tmp_path / "sampling.jsonl"
    with Store(path) as store:
        gold = search(lm, loaded(task_dir, "cola_gen"), store)
        scored = search(lm, loaded(task_dir, "cola_mc"), store)
        search(lm, loaded(task_dir, "cola_gen"), store, "skips", space={"mode": "skip"})
    argv = ["--store", path, "--include_path", task_dir, "--output", str(output)]
    argv += ["--model_args", f"pretrained={tiny_llama_dir}", "--device", "cpu"]
    common = [*argv, "--run", str(gold), "--temperatures", "0,1", "--k", "5"]
    with pytest.raises(SystemExit):  # the model's own sampling batches no chains
        cola_controls(capsys, "sampling", *common, "--parallel_docs", "4")
    status, out, err = cola_controls(capsys, "sampling", *common)
    assert status == 0, err
    header, *records = [json.loads(line) for line in output.read_text().splitlines()]
    assert header["k"] == 5 and len(records) == 2 * len(GEN_DOCS)
    assert header["fingerprint"] == lm.identity.fingerprint
    assert all(len(r["correct"]) == len(r["answers"]) == 5 for r in records)
    with Store(path, read_only=True) as store, store.session() as session:
        originals = controls.originals(session, gold)
    greedy = [r for r in records if r["temperature"] == 0]
    assert [not all(r["correct"]) for r in greedy] == [not originals[r["doc_hash"]] for r in greedy]
    assert "temperature 0: wrong -> right" in out and "best temperature per k" in out
    assert "samples judged by the decoy too" in out and "temperature 1: gold reached" in out
    output.write_text("".join(line + "\n" for line in output.read_text().splitlines()[:-1]))
    status, again, err = cola_controls(capsys, "sampling", *common)
    assert status == 0, err
    again_header, *redrawn = [json.loads(line) for line in output.read_text().splitlines()]
    timeless = [r | {"seconds": 0} for r in records]
    assert again_header == header and [r | {"seconds": 0} for r in redrawn] == timeless
    assert again.split("  cost")[0] == out.split("  cost")[0]  # the one redrawn, drawn as before
    assert main(["report", "--store", path, "--sampling", str(output)]) == 0
    rows = table_rows(capsys.readouterr().out.split(SHORTER_CAPTION)[0])
    row = rows[str(header["run"])]
    wrong = [r for r in records if not originals[r["doc_hash"]]]
    best = max(sum(any(r["correct"]) for r in wrong if r["temperature"] == t) for t in (0, 1))
    best_1 = max(sum(r["correct"][0] for r in wrong if r["temperature"] == t) for t in (0, 1))
    best_at = f"{best_1}, " + share_text(best, len(wrong) // 2)
    assert row[9] == best_at, "the best temperature within 1 and the search's 5"
    assert rows["skips"][9] == row[9], "the samples run no chain: any space"
    lines = output.read_text().splitlines()
    for fingerprint, cell in (("0" * 64, "-"), (None, row[9])):  # another model's; an old file
        older = {k: v for k, v in header.items() if k != "fingerprint"}
        first = older if fingerprint is None else {**header, "fingerprint": fingerprint}
        output.write_text("".join(line + "\n" for line in [json.dumps(first), *lines[1:]]))
        assert main(["report", "--store", path, "--sampling", str(output)]) == 0
        out = capsys.readouterr().out.split(SHORTER_CAPTION)[0]
        assert table_rows(out)[str(header["run"])][9] == cell
    assert cola_controls(capsys, "sampling", *common)[0] == 0, "an old file resumes"
    status, _, err = cola_controls(capsys, "sampling", *common[:-1], "4")
    assert status == 2 and "holds samples of other settings" in err and "another --output" in err
    status, _, err = cola_controls(capsys, "sampling", *argv, "--run", str(scored))
    assert status == 2 and "generates nothing to sample" in err


def test_a_sampling_file_named_gz_is_compressed_and_holds_what_a_plain_one_does(
    lm, tiny_llama_dir, task_dir, tmp_path, capsys
):
    """A paper's sampling files hold 200 answers a document: one named ``.gz`` is written
    compressed, record by record, resumes as a plain one does and reports the same counts."""
    from lm_eval_cola.store.controls import read_samples

    path = str(tmp_path / "cola.db")
    with Store(path) as store:
        gold = search(lm, loaded(task_dir, "cola_gen"), store)
    argv = ["--store", path, "--include_path", task_dir, "--run", str(gold), "--k", "3"]
    argv += ["--model_args", f"pretrained={tiny_llama_dir}", "--device", "cpu"]
    found = {}
    for name in ("plain.jsonl", "packed.jsonl.gz"):
        output = ["--output", str(tmp_path / name)]
        status, out, err = cola_controls(capsys, "sampling", *argv, *output)
        assert status == 0, err
        header, records = read_samples(tmp_path / name)
        found[name] = (header, [r | {"seconds": 0} for r in records], out.split("  cost")[0])
    assert found["plain.jsonl"] == found["packed.jsonl.gz"]
    packed = tmp_path / "packed.jsonl.gz"
    assert gzip.decompress(packed.read_bytes()).decode().count("\n") == 1 + 3 * len(GEN_DOCS)
    before = packed.read_bytes()
    assert cola_controls(capsys, "sampling", *argv, "--output", str(packed))[0] == 0
    assert packed.read_bytes() == before, "every record there: nothing drawn again"
