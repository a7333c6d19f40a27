"""The search layer: the space, every method, the lm-eval objective, runs, resume and shards."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import lm_eval
import optuna
import pytest
from lm_eval.tasks import get_task_dict
from sqlalchemy import func, select

import lm_eval_cola.lm
from lm_eval_cola.chain import Chain
from lm_eval_cola.cli import main
from lm_eval_cola.lm import ColaLM
from lm_eval_cola.scoring import Objective, Proposal, Trial
from lm_eval_cola.search.base import (
    LOOK_AHEAD,
    SEARCHERS,
    DocumentSearch,
    pareto_front,
    run_search,
    searcher_class,
)
from lm_eval_cola.search.mcts import MCTS
from lm_eval_cola.search.runner import SearchProgress, SearchRun, SearchSettings
from lm_eval_cola.search.space import Action, ChainSpace
from lm_eval_cola.store import queries
from lm_eval_cola.store.schema import Evaluation, Run, RunDocument
from lm_eval_cola.store.store import Store, default_run_name
from lm_eval_cola.tasks import TaskError, TaskSpec, config_hash, task_documents, task_index

optuna.logging.set_verbosity(optuna.logging.WARNING)
TASKS = ["cola_mc", "cola_gen", "cola_text"]


# -- the space ----------------------------------------------------------------------------


def test_actions_skip_and_repeat_blocks_within_bounds():
    space = ChainSpace(6, min_length=4, max_length=8)
    root = space.root
    assert Action("skip", 1, 2).apply(root) == Chain.parse("0.3-5")
    assert Action("repeat", 2, 2, 2).apply(root) == Chain.parse("0-3.2-3.2-3.4-5")
    for action in space.actions(root):
        assert 4 <= len(action.apply(root)) <= 8
        assert action.size <= space.max_block and action.times <= space.max_times
    kinds = {a.kind for a in space.actions(root)}
    assert kinds == {"skip", "repeat"}
    assert {a.kind for a in ChainSpace(6, mode="skip").actions(root)} == {"skip"}
    assert {a.kind for a in ChainSpace(6, mode="repeat").actions(root)} == {"repeat"}


def test_space_refuses_bounds_that_exclude_the_model():
    with pytest.raises(ValueError, match="must include the model's depth"):
        ChainSpace(30, max_length=20)
    with pytest.raises(ValueError, match="unknown space"):
        ChainSpace(30, mode="loop")


# -- every method on a synthetic objective ---------------------------------------------------


def synthetic(chain: Chain) -> Trial:
    """Right when layer 5 is skipped or layer 9 runs twice: both need a search to find."""
    right = 5 not in chain.layers or chain.layers.count(9) > 1
    return Trial(chain, float(right), right, {"acc": float(right)})


@pytest.mark.parametrize("method", sorted(SEARCHERS))
def test_every_method_starts_at_the_full_model_and_keeps_its_budget(method):
    space = ChainSpace(12)
    budget = 6 if method == "gp" else 25  # the GP sampler is slow on CPU
    # a menu is whatever list it is given: here chains one edit from the full model
    options = {"chains": [str(c) for c in space.children(space.root)]} if method == "menu" else {}
    trials = run_search(searcher_class(method)(space, budget, seed=3, **options), synthetic)
    assert trials[0].chain == space.root
    assert len(trials) == budget == len({t.chain for t in trials})
    assert all(space.lower <= t.length <= space.upper for t in trials)
    again = run_search(searcher_class(method)(space, budget, seed=3, **options), synthetic)
    assert [t.chain for t in again] == [t.chain for t in trials]  # seeded: reproducible


@pytest.mark.parametrize("method", ["mcts", "tpe", "cmaes", "nsga2"])
def test_methods_find_right_chains_the_full_model_misses(method):
    trials = run_search(searcher_class(method)(ChainSpace(12), 60, seed=0), synthetic)
    assert not trials[0].correct
    assert any(t.correct for t in trials)


@pytest.mark.parametrize("method", sorted(SEARCHERS))
def test_chains_looked_ahead_are_the_ones_asked_when_the_guess_comes_true(method):
    """``chains_ahead(score, 3)`` names the chains the method asks next if the pending chain
    and each of them score ``score``: right for every chain whose predecessors did, under
    either guess, and asking leaves the search exactly as it was. Score-blind methods are
    right whatever the scores; Optuna's methods cannot look ahead."""
    space = ChainSpace(12)
    options = {"chains": [str(c) for c in space.children(space.root)]} if method == "menu" else {}
    budget = 6 if method == "gp" else 40
    plain = run_search(searcher_class(method)(space, budget, seed=3, **options), synthetic)
    asked = [t.chain for t in plain]
    scores = [t.score for t in plain]
    search = DocumentSearch(searcher_class(method)(space, budget, seed=3, **options))
    checked = blind = 0
    for i, chain in enumerate(asked):
        assert search.next_chain() == chain
        for guess in (0.0, 1.0):
            ahead = search.chains_ahead(guess, 3)
            assert len(ahead) <= 3 and chain not in ahead
            for j, planned in enumerate(ahead):
                came_true = all(score == guess for score in scores[i : i + j + 1])
                if came_true:
                    assert planned == asked[i + j + 1]
                    checked += 1
                blind += planned == asked[i + j + 1]
        search.record(synthetic(chain))
    assert search.next_chain() is None
    if method in ("random-walk", "menu"):  # blind to scores: every chain planned is asked
        assert blind == 2 * (3 * (budget - 3) + 2 + 1)
    elif method == "mcts":
        assert checked > budget and 0.0 in scores and 1.0 in scores
    else:
        assert checked == blind == 0


def test_mcts_takes_back_every_visit_made_hypothetically():
    """The tree after a look-ahead is the tree before it: counts, split lists, random state."""
    searcher = MCTS(ChainSpace(12), 60, seed=0)
    run_search(searcher, synthetic)

    def state():
        return [
            (n.chain, n.visits, n.total, [c.chain for c in n._visited], list(n._unvisited))
            for n in _visited(searcher.root)
        ] + [searcher.rng.getstate()]

    before = state()
    with searcher.hypothetically():
        for _ in range(5):
            searcher.ask()
            searcher.tell(synthetic(searcher._leaf.chain))
    assert state() == before


def test_nsga2_evolves_after_its_first_generation():
    """Its first generation is random search; a small population evolves within the budget."""

    def chains(method: str, **options) -> list[Chain]:
        trials = run_search(searcher_class(method)(ChainSpace(12), 30, 0, **options), synthetic)
        return [t.chain for t in trials]

    random = chains("random")
    assert chains("nsga2") == random  # a population of 50: all 30 trials are its first
    evolved = chains("nsga2", population_size=6)
    assert evolved[:6] == random[:6] and evolved != random


def test_mcts_explores_more_than_one_branch():
    """PoLar's MCTS only ever evaluates one child of the root; ours widens and deepens."""
    searcher = MCTS(ChainSpace(12), 100, seed=0)
    run_search(searcher, synthetic)
    root_children, _ = searcher.root.split_children(searcher.space)
    assert len(root_children) >= 3
    depths = {n.depth() for child in root_children for n in _visited(child)}
    assert max(depths) >= 3


def _visited(node):
    yield node
    for child in node._visited:
        yield from _visited(child)


def test_mcts_keeps_each_nodes_children_split_by_visits_in_the_spaces_order():
    """Selection reads the split lists instead of sorting hundreds of children each step:
    they must stay exactly what splitting all the children again would give."""
    searcher = MCTS(ChainSpace(12), 100, seed=0)
    run_search(searcher, synthetic)
    checked = 0
    for node in _visited(searcher.root):
        if node._chains is None:
            continue
        visited, unvisited = node.split_children(searcher.space)
        chains = list(searcher.space.children(node.chain))
        assert [c.chain for c in visited] == [c for c in chains if c not in unvisited]
        assert [c.index for c in visited] == sorted(chains.index(c.chain) for c in visited)
        assert unvisited == [c for c in chains if c not in {n.chain for n in visited}]
        assert all(c.visits for c in visited)
        checked += 1
    assert checked >= 5


def test_mcts_length_penalty_steers_to_shorter_chains():
    def everything_right(chain):
        return Trial(chain, 1.0, True, {})

    short = run_search(MCTS(ChainSpace(12), 60, seed=0), everything_right)
    flat = run_search(MCTS(ChainSpace(12), 60, seed=0, length_penalty=0.0), everything_right)
    mean = lambda trials: sum(t.length for t in trials) / len(trials)  # noqa: E731
    assert mean(short) < mean(flat)


def test_pareto_front():
    chains = ["0-11", "0-4.6-11", "0-3.6-11", "1-11", "0-8"]
    front = pareto_front([synthetic(Chain.parse(c)) for c in chains])
    assert [(str(t.chain), t.score) for t in front] == [("0-3.6-11", 1.0), ("0-8", 0.0)]


def test_an_optuna_study_waits_to_be_archived_while_another_process_writes(tmp_path):
    """The archive waits for a writer of the store's database as the store's own writers do
    (Optuna's SQLite engine alone gives up after 5 s): a worker archives its study while the
    searching process writes a document."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    searcher = searcher_class("tpe")(ChainSpace(12), 6, seed=0)
    trials = run_search(searcher, synthetic)
    searcher.prepare_archive(url)
    writer = sqlite3.connect(tmp_path / "store.db", isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")  # holds the write lock for 6 s
    threading.Timer(6, writer.execute, ["COMMIT"]).start()
    searcher.archive(url, "document-0")
    archived = optuna.load_study(study_name="document-0", storage=url).trials
    assert [t.params for t in archived] == [t.params for t in searcher.study.trials]
    assert len(archived) == len(trials) == 6
    writer.close()


def test_unknown_method_and_bad_budget_fail_before_compute():
    with pytest.raises(ValueError, match="unknown method 'beam'"):
        SearchSettings(method="beam", budget=10)
    with pytest.raises(ValueError, match="at least 1 evaluation"):
        SearchSettings(method="mcts", budget=0)


# -- the lm-eval objective on a tiny model ---------------------------------------------------


@functools.cache
def task(task_dir: str, name: str):
    loaded = get_task_dict([name], task_index(task_dir))[name]
    loaded.set_config(key="num_fewshot", value=0)
    return loaded


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    return ColaLM(pretrained=tiny_llama_dir, device="cpu", batch_size=1)


def logged_samples(lm, task_dir: str, name: str, **cola_args) -> list[dict]:
    """lm-eval's own sample log of task ``name`` run through ``--model cola``."""
    out = lm_eval.simple_evaluate(
        model=ColaLM(pretrained=lm.pretrained, device="cpu", batch_size=1, **cola_args),
        tasks=[name],
        task_manager=task_index(task_dir),
        log_samples=True,
    )
    return out["samples"][name]


@pytest.mark.parametrize("name", TASKS)
def test_objective_scores_like_lm_eval(lm, task_dir, name):
    """A chain's score on a document equals lm-eval's own per-document metric for it."""
    chain = Chain.parse("0.1.1.3")
    objective = Objective(lm, task(task_dir, name))
    documents = task_documents(task(task_dir, name), None)
    scored = {d.doc_hash: objective.score(d, chain).metrics for d in documents}
    for sample in logged_samples(lm, task_dir, name, chain=str(chain)):
        for metric, value in scored[sample["doc_hash"]].items():
            assert json.loads(json.dumps(sample[metric])) == pytest.approx(value), metric


@pytest.mark.parametrize(
    "name, metric", [("cola_mc", "acc"), ("cola_mc", "acc_norm"), ("cola_gen", None)]
)
def test_the_answer_a_chain_gave_is_the_one_lm_eval_judged(lm, task_dir, name, metric):
    """A multiple-choice answer is the option the metric picks (right exactly when the metric
    says so); a generated one is the filtered text lm-eval logs."""
    chain = Chain.parse("0.1.1.3")
    objective = Objective(lm, task(task_dir, name), TaskSpec(name, metric=metric))
    documents = task_documents(task(task_dir, name), None)
    trials = {d.doc_hash: objective.score(d, chain) for d in documents}
    for sample in logged_samples(lm, task_dir, name, chain=str(chain)):
        trial = trials[sample["doc_hash"]]
        if name == "cola_gen":
            assert trial.response == sample["filtered_resps"][0]
            continue
        assert (int(trial.response) == int(sample["target"])) == bool(sample[metric])
        if metric == "acc":
            lls = [float(ll) for ll, _ in sample["filtered_resps"]]
            assert int(trial.response) == lls.index(max(lls))
    if name == "cola_mc":
        assert len({t.response for t in trials.values()}) > 1, "the tiny model varies"


@pytest.mark.parametrize("name", ["cola_mc", "cola_gen"])
def test_score_all_passes_distinct_documents_and_keeps_the_order(lm, task_dir, name):
    """Any proposals, a document several times among them: each pass holds distinct
    documents, at most ``at_once``, and every trial is the proposal's own score."""
    objective = Objective(lm, task(task_dir, name))
    documents = task_documents(task(task_dir, name), None)[:3]
    chains = [Chain.parse("0.1.1.3"), Chain.parse("0.2.3"), Chain.identity(4)]
    proposals = [Proposal(d, c) for c in chains for d in documents][::-1]
    passes = []
    score_many = objective.score_many

    def noting(batch):
        passes.append([p.document.doc_hash for p in batch])
        return score_many(batch)

    objective.score_many = noting
    trials = objective.score_all(proposals, at_once=2)
    assert all(len(set(p)) == len(p) <= 2 for p in passes) and sum(map(len, passes)) == 9
    objective.score_many = score_many
    for proposal, trial in zip(proposals, trials, strict=True):
        alone = objective.score(proposal.document, proposal.chain)
        assert (trial.chain, trial.metrics) == (proposal.chain, alone.metrics)


def test_prefix_cache_gives_identical_searches_with_fewer_layer_applications(lm, task_dir):
    """MCTS on a multiple-choice document, with and without the hidden-state prefix cache."""
    mc = task(task_dir, "cola_mc")
    document = task_documents(mc, None)[1]
    runs = {}
    for megabytes in (0, 64):
        objective = Objective(lm, mc, prefix_cache_mb=megabytes)
        before = lm.executor.work.token_layer_applications
        trials = run_search(
            MCTS(ChainSpace(4), 30, seed=0), functools.partial(objective.score, document)
        )
        runs[megabytes] = (trials, lm.executor.work.token_layer_applications - before)
    (plain, plain_cost), (cached, cached_cost) = runs[0], runs[64]
    assert [(t.chain, t.score, t.metrics) for t in plain] == [
        (t.chain, t.score, t.metrics) for t in cached
    ]
    assert cached_cost < plain_cost


def test_task_without_gold_answer_and_unknown_metric_are_refused(lm, task_dir):
    mc = task(task_dir, "cola_mc")
    with pytest.raises(TaskError, match="has no metric 'f1'"):
        Objective(lm, mc, TaskSpec("cola_mc", metric="f1"))
    with pytest.raises(TaskError, match="has no filter 'strict'"):
        Objective(lm, mc, TaskSpec("cola_mc", filter_name="strict"))
    target = mc.config.doc_to_target
    mc.config.doc_to_target = None
    try:
        with pytest.raises(TaskError, match="no gold answer"):
            Objective(lm, mc)
    finally:
        mc.config.doc_to_target = target


def test_a_graded_metric_judges_a_chain_against_the_full_model_scored_first(lm, task_dir):
    """On perplexity a chain is correct where it scores at least as well as the full model on
    the same document; the objective scores the full model first where no caller did."""
    text = task(task_dir, "cola_text")
    objective, documents = Objective(lm, text), task_documents(text, None)
    chains = [Chain.parse(c) for c in ("0.1.1.3", "3", "2.2")]
    trials = objective.score_all([Proposal(d, c) for c in chains for d in documents])
    assert set(objective.references) == {d.doc_hash for d in documents}
    judged = [
        t.score >= objective.references[p.document.doc_hash]
        for t, p in zip(trials, [Proposal(d, c) for c in chains for d in documents], strict=True)
    ]
    assert [t.correct for t in trials] == judged and not all(judged)
    full = [objective.score(d, objective.identity) for d in documents]
    assert all(t.correct for t in full)


def test_a_run_records_its_task_spec_whole_and_keeps_the_names_of_earlier_releases(
    lm, task_dir, tmp_path
):
    spec = TaskSpec("cola_mc", metric="acc_norm", num_fewshot=1)
    loaded = spec.load(task_dir)
    settings = SearchSettings(method="mcts", budget=3, task=spec, limit=2)
    with Store(str(tmp_path / "cola.db")) as store:
        run_id = SearchRun(lm, loaded, store, settings).run()
    with Store(str(tmp_path / "cola.db"), read_only=True).session() as session:
        run = session.get(Run, run_id)
        back = TaskSpec.stored(run.task.name, run.task.split, run.settings)
        name, config = run.name, run.task.config_hash
    assert back == dataclasses.replace(spec, split="test")
    assert config_hash(back.load(task_dir)) == config == config_hash(loaded)
    earlier = {  # the settings a run was named by before TaskSpec, field by field
        "method": "mcts", "budget": 3, "seed": 0, "space": {}, "method_options": {},
        "metric": "acc_norm", "filter_name": None, "num_fewshot": 1, "max_gen_toks": None,
    }  # fmt: skip
    assert name == default_run_name("cola_mc", "mcts", lm.identity.fingerprint, config, earlier)


# -- runs: store, oracle re-evaluation, shards, resume ---------------------------------------


def search(lm, task_dir, store_path, name="cola_mc", shard=(0, 1), how=None, **settings):
    """A search run into the store at ``store_path``; ``how`` is SearchRun's speed options."""
    settings = {"method": "mcts", "budget": 10, **settings}
    with Store(str(store_path)) as store:
        run = SearchRun(lm, task(task_dir, name), store, SearchSettings(**settings), **(how or {}))
        return run.run(shard)


def evaluations(store_path, run_id) -> set[tuple]:
    with Store(str(store_path), read_only=True).session() as session:
        rows = session.execute(
            select(Evaluation.document_id, Evaluation.chain, Evaluation.score).where(
                Evaluation.run_id == run_id
            )
        )
        return set(rows.all())


@pytest.mark.parametrize("name", TASKS)
def test_searched_chains_reevaluate_the_same_through_lm_eval(lm, task_dir, tmp_path, name):
    run_id = search(lm, task_dir, tmp_path / "cola.db", name=name, budget=8)
    with Store(str(tmp_path / "cola.db"), read_only=True).session() as session:
        picks = {p.doc_hash: p for p in queries.pick(session, [run_id])}
    chains = f"store:{tmp_path / 'cola.db'};run={run_id}"
    objective = Objective(lm, task(task_dir, name))
    for sample in logged_samples(lm, task_dir, name, chains=chains):
        metric = json.loads(json.dumps(sample[objective.metric]))
        expected = picks[sample["doc_hash"]].score
        if objective.binary:
            assert metric == expected
        else:
            assert metric[0] / metric[1] == pytest.approx(expected)


def scored(store_path, run_id) -> list[tuple]:
    with Store(str(store_path), read_only=True).session() as session:
        rows = session.execute(
            select(
                Evaluation.document_id,
                Evaluation.chain,
                Evaluation.correct,
                Evaluation.response,
                Evaluation.score,
            )
            .where(Evaluation.run_id == run_id)
            .order_by(Evaluation.document_id, Evaluation.chain)
        )
        return [tuple(row) for row in rows]


@pytest.mark.parametrize("name", TASKS)
def test_parallel_documents_store_what_one_at_a_time_stores(lm, task_dir, tmp_path, name):
    """Same seeds, same result: the store after --parallel_docs 3 holds the rows one document
    at a time writes (chains and correctness equal, scores within 1e-5), with a third of the
    forward passes for a scoring task."""
    calls = []
    for path, how in [("one.db", {}), ("many.db", {"parallel_docs": 3, "prefix_cache_mb": 64})]:
        before = lm.executor.work.forward_calls
        search(lm, task_dir, tmp_path / path, name=name, budget=12, how=how)
        calls.append(lm.executor.work.forward_calls - before)
    one, many = scored(tmp_path / "one.db", 1), scored(tmp_path / "many.db", 1)
    assert [row[:4] for row in many] == [row[:4] for row in one]
    assert [row[4] for row in many] == pytest.approx([row[4] for row in one], abs=1e-5)
    if name != "cola_text":
        assert all(row[3] is not None for row in one), "every answer is stored"
    if name == "cola_mc":
        assert calls[1] <= calls[0] / 2


@pytest.mark.parametrize(
    ("parallel_docs", "rows_per_step", "depth"), [(1, 32, 1), (1, 32, 3), (3, 32, 3), (3, 2, 3)]
)
def test_looking_ahead_stores_what_a_search_without_it_stores_in_fewer_passes(
    lm, task_dir, tmp_path, monkeypatch, parallel_docs, rows_per_step, depth
):
    """Generated answers: the chains an MCTS will ask next if the pending one scores as most
    did, scored beside it, give the same evaluations (chains, correctness, answers, scores)
    and about the same work, in fewer forward passes, also where guesses fail (a chain here
    is right when it skips layer 1, so each document's chains score both ways). When the
    decoding batch holds fewer rows than the documents, no chain goes ahead: it would take
    another document's row."""
    monkeypatch.setattr(lm_eval_cola.lm, "ROWS_PER_STEP", rows_per_step)
    judged = Objective.trial

    def skipping_layer_1_is_right(self, proposal, *args) -> Trial:
        right = 1 not in proposal.chain.layers
        return dataclasses.replace(judged(self, proposal, *args), score=float(right), correct=right)

    monkeypatch.setattr(Objective, "trial", skipping_layer_1_is_right)
    progress = []
    monkeypatch.setattr(SearchProgress, "scored", lambda self, n: progress.append(n))
    work = []
    for path, look_ahead in [("ahead.db", depth), ("plain.db", 0)]:
        how = {"prefix_cache_mb": 64, "parallel_docs": parallel_docs, "look_ahead": look_ahead}
        before = dataclasses.replace(lm.executor.work)
        search(lm, task_dir, tmp_path / path, name="cola_gen", budget=16, how=how)
        spent = lm.executor.work - before
        work.append((spent.forward_calls, spent.token_layer_applications))
    evaluations = scored(tmp_path / "plain.db", 1)
    assert scored(tmp_path / "ahead.db", 1) == evaluations
    assert sum(progress) == 2 * len(evaluations)  # the bar counts what is recorded
    assert {row[2] for row in evaluations} == {False, True}
    (ahead_calls, ahead_tokens), (plain_calls, plain_tokens) = work
    if rows_per_step <= parallel_docs:
        assert work[0] == work[1]
        return
    assert ahead_calls < plain_calls
    assert ahead_tokens <= plain_tokens * 1.05  # chains ahead resume from the cache


def test_a_plan_ahead_that_comes_true_is_followed_not_made_again(
    lm, task_dir, tmp_path, monkeypatch
):
    """Where every chain scores what the guess says (here: all wrong), the chains planned
    ahead are the ones asked, so the search plans again only when all it planned is in
    flight: a plan costs a hypothetical search step per chain, and making one per evaluation
    cost as much as a tenth of an ARC evaluation at depth 20 and budget 200."""
    judged = Objective.trial

    def always_wrong(self, proposal, *args) -> Trial:
        return dataclasses.replace(judged(self, proposal, *args), score=0.0, correct=False)

    monkeypatch.setattr(Objective, "trial", always_wrong)
    planned = DocumentSearch.chains_ahead
    plans = []

    def counted(self, score, count):
        plans.append(planned(self, score, count))
        return plans[-1]

    monkeypatch.setattr(DocumentSearch, "chains_ahead", counted)
    how = {"prefix_cache_mb": 64, "look_ahead": 6}
    search(lm, task_dir, tmp_path / "ahead.db", name="cola_gen", budget=16, how=how)
    evaluations = scored(tmp_path / "ahead.db", 1)
    assert len(evaluations) == 16 * len({row[0] for row in evaluations})
    assert 0 < sum(map(len, plans)) <= 3 * len(evaluations)  # 6 an evaluation before


@pytest.mark.parametrize("name", ["cola_mc", "cola_gen"])
def test_a_search_records_its_work_and_reaches_the_physical_limit(lm, task_dir, tmp_path, name):
    """With a prefix cache large enough, each distinct (chain prefix, token) is computed once:
    the token-layer applications the store records per document equal its limit (for
    generation: each prefix once over the prompt, plus every chain's own decoding)."""
    how = {"prefix_cache_mb": 64}
    run_id = search(lm, task_dir, tmp_path / "cola.db", name=name, budget=20, how=how)
    with Store(str(tmp_path / "cola.db"), read_only=True).session() as session:
        stats = queries.stats(session, run_id)
        computed = session.execute(
            select(Evaluation.document_id, func.sum(Evaluation.token_layer_applications))
            .where(Evaluation.run_id == run_id)
            .group_by(Evaluation.document_id)
        )
        limits = session.execute(select(RunDocument.document_id, RunDocument.token_layer_limit))
        computed, limits = dict(computed.all()), dict(limits.all())
    assert stats.token_layer_limit == sum(limits.values()) > 0
    if name == "cola_gen":
        assert computed == limits
        return
    # The last document repeats the first one's prompt and choices: its packed row is the same,
    # so it reuses the first one's prefixes and needs less than a document of its own.
    *unique, repeated = sorted(limits)
    assert {d: computed[d] for d in unique} == {d: limits[d] for d in unique}
    assert computed[repeated] < limits[repeated]


def test_optuna_studies_are_read_from_the_store_url_by_optuna_itself(lm, task_dir, tmp_path):
    """What ``optuna-dashboard <store URL>`` relies on: every document's study is in the store's
    database, complete, with a trial for every chain the store recorded."""
    path = tmp_path / "cola.db"
    run_id = search(lm, task_dir, path, method="tpe", budget=6, limit=3)
    url = Store(str(path), read_only=True).url_for_studies()
    names = optuna.get_all_study_names(storage=url)
    assert len(names) == 3 and all(name.startswith("cola_mc-tpe-") for name in names)
    recorded = {row[0] for row in evaluations(path, run_id)}
    assert len(recorded) == 3
    for name in names:
        trials = optuna.load_study(study_name=name, storage=url).trials
        assert len(trials) >= 6 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        assert trials[0].params["edit0_op"] == 0  # the full model first, as every method


def test_shards_split_the_documents_of_one_run(lm, task_dir, tmp_path):
    whole = search(lm, task_dir, tmp_path / "whole.db")
    first = search(lm, task_dir, tmp_path / "split.db", shard=(0, 2))
    second = search(lm, task_dir, tmp_path / "split.db", shard=(1, 2))
    assert first == second
    assert evaluations(tmp_path / "split.db", first) == evaluations(tmp_path / "whole.db", whole)
    with Store(str(tmp_path / "split.db"), read_only=True).session() as session:
        assert len(session.scalars(select(RunDocument)).all()) == len(
            task_documents(task(task_dir, "cola_mc"), None)
        )


def test_a_larger_limit_grows_the_run_and_searches_only_the_new_documents(lm, task_dir, tmp_path):
    whole = search(lm, task_dir, tmp_path / "whole.db")
    grown = search(lm, task_dir, tmp_path / "grown.db", limit=3)
    assert _status(tmp_path / "grown.db", grown) == ("finished", 3)
    before = evaluations(tmp_path / "grown.db", grown)
    assert search(lm, task_dir, tmp_path / "grown.db", limit=5) == grown
    assert _status(tmp_path / "grown.db", grown) == ("finished", 5)
    assert before < evaluations(tmp_path / "grown.db", grown)  # the first 3 kept, not redone
    assert search(lm, task_dir, tmp_path / "grown.db") == grown
    assert evaluations(tmp_path / "grown.db", grown) == evaluations(tmp_path / "whole.db", whole)
    n = len(task_documents(task(task_dir, "cola_mc"), None))
    assert _status(tmp_path / "grown.db", grown) == ("finished", n)
    search(lm, task_dir, tmp_path / "grown.db", limit=2)  # a smaller limit never shrinks it
    assert _status(tmp_path / "grown.db", grown) == ("finished", n)


def _status(path: Path, run_id: int) -> tuple[str, int]:
    with Store(str(path), read_only=True).session() as session:
        run = session.get(Run, run_id)
        return run.status, run.n_documents


def test_a_killed_search_resumes_and_equals_an_uninterrupted_one(
    tiny_llama_dir, task_dir, tmp_path
):
    """SIGKILL a real ``cola search`` mid-run, run the same command again, compare."""
    command = [
        sys.executable, "-m", "lm_eval_cola", "search", "--model_args",
        f"pretrained={tiny_llama_dir}", "--device", "cpu", "--tasks", "cola_mc",
        "--include_path", task_dir, "--method", "tpe", "--budget", "12", "--parallel_docs", "2",
    ]  # fmt: skip
    killed = tmp_path / "killed.db"
    process = subprocess.Popen([*command, "--store", str(killed)], stderr=subprocess.PIPE)
    _wait_for_documents(killed, 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = _done(killed)
    assert 0 < done_before < 7, "the kill must land mid-run"
    subprocess.run([*command, "--store", str(killed)], check=True, capture_output=True)
    subprocess.run(
        [*command, "--store", str(tmp_path / "whole.db")], check=True, capture_output=True
    )
    assert evaluations(killed, 1) == evaluations(tmp_path / "whole.db", 1)
    assert _done(killed) == 7


def _done(path: Path) -> int:
    with Store(str(path), read_only=True).session() as session:
        return len(session.scalars(select(RunDocument)).all())


def _wait_for_documents(path: Path, count: int, process: subprocess.Popen) -> None:
    for _ in range(600):
        if process.poll() is not None:
            raise AssertionError(process.stderr.read().decode()[-3000:])
        if path.exists():
            try:
                if _done(path) >= count:
                    return
            except Exception:  # the store may still be being created
                pass
        time.sleep(0.1)
    raise AssertionError("the search did not record documents in time")


def test_cli_refuses_bad_input_before_loading_a_model(tmp_path):
    base = [sys.executable, "-m", "lm_eval_cola", "search", "--store", str(tmp_path / "x.db")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args, message in [
        (["--tasks", "no_such_task"], "unknown task(s) no_such_task"),
        (["--tasks", "arc_easy", "--budget", "0"], "at least 1 evaluation"),
        (["--tasks", "arc_easy", "--shard", "2/2"], "--shard 2/2"),
        (["--tasks", "arc_easy", "--method_args", "colour=red"], "colour"),
        (["--tasks", "arc_easy", "--workers", "2", "--device", "cuda"], "on a GPU"),
        (["--tasks", "arc_easy", "--look_ahead", "-1"], "--look_ahead -1: decode 0 or more"),
        (["--tasks", "arc_easy", "--parallel_docs", "0"], "--parallel_docs 0: search at least 1"),
    ]:
        done = subprocess.run([*base, *args], capture_output=True, text=True, env=env)
        assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]


def test_cli_look_ahead_reaches_the_search(tiny_llama_dir, task_dir, tmp_path, monkeypatch):
    """``cola search --look_ahead N`` searches with N chains ahead (it changes speed only, so
    the stored results cannot show it)."""
    depths = []
    made = SearchRun.__init__

    def spied(self, *args, **kwargs) -> None:
        made(self, *args, **kwargs)
        depths.append(self.look_ahead)

    monkeypatch.setattr(SearchRun, "__init__", spied)
    argv = ["search", "--model_args", f"pretrained={tiny_llama_dir}", "--device", "cpu",
            "--tasks", "cola_gen", "--include_path", task_dir, "--limit", "2", "--budget", "3",
            "--store", str(tmp_path / "ahead.db")]  # fmt: skip
    assert main([*argv, "--look_ahead", "3"]) == 0
    assert main(argv) == 0
    assert depths == [3, LOOK_AHEAD]


def test_the_bar_counts_evaluations_before_the_first_document_finishes(
    tiny_llama_dir, task_dir, tmp_path
):
    """With documents searched in parallel they all finish late; the bar must move before."""
    command = [
        sys.executable, "-m", "lm_eval_cola", "search", "--model_args",
        f"pretrained={tiny_llama_dir}", "--device", "cpu", "--tasks", "cola_mc",
        "--include_path", task_dir, "--budget", "6", "--parallel_docs", "4",
        "--store", str(tmp_path / "bar.db"),
    ]  # fmt: skip
    env = {**os.environ, "TQDM_MININTERVAL": "0", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    states = [
        (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        for m in re.finditer(
            r"Searching cola_mc.*? (\d+)/(\d+) \[.*?documents=(\d+)/7", done.stderr
        )
    ]
    assert states[0] == (0, 7 * 6, 0)
    before_any_document = [n for n, _, finished in states if finished == 0]
    assert max(before_any_document) >= 4, done.stderr[-2000:]  # a pass over 4 documents
    assert states[-1][0] == states[-1][1] and states[-1][2] == 7
