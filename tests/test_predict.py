"""Predicted chains: training sets from the store, the predictors (PoLar's programs
included), the ``predictor:`` source in lm-eval, and held-out evaluation that refuses leaks."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
from sqlalchemy import select

from lm_eval_cola import sampling
from lm_eval_cola.chain import Chain
from lm_eval_cola.fingerprint import identify
from lm_eval_cola.lm import ColaLM
from lm_eval_cola.predict import predictors as P
from lm_eval_cola.predict import pruning, selection
from lm_eval_cola.predict.dataset import build_training_set, routable, tie_shares
from lm_eval_cola.predict.evaluate import SAMPLING_TEMPERATURES, LeakError, evaluate
from lm_eval_cola.predict.features import FeatureSpec, PromptStates, prompt_of
from lm_eval_cola.predict.programs import KEEP, MAX_SEGMENT, REPEAT, SKIP, decode, longest, parse
from lm_eval_cola.predict.training_set import RoutePath, TrainingDataError, TrainingSet
from lm_eval_cola.scoring import Objective
from lm_eval_cola.search.runner import SearchRun, SearchSettings
from lm_eval_cola.sources import ChainSourceError, open_source
from lm_eval_cola.statistics import mcnemar, paired_interval
from lm_eval_cola.store.schema import Document, Evaluation, Task
from lm_eval_cola.store.store import Store
from lm_eval_cola.tasks import load_tasks, task_documents, task_index

SPEC = FeatureSpec(layer=2, max_tokens=64)
#: Training options of each predictor in the fixture (small, for speed).
OPTIONS = {
    "static": {},
    "knn": {"k": 3},
    "network": {"epochs": 5},
    "program": {"epochs": 5},
    "router": {"epochs": 5},
}


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    return ColaLM(pretrained=tiny_llama_dir, device="cpu", batch_size=1)


def split_task(task_dir: str, split: str | None = None):
    return load_tasks("cola_split", task_dir, split=split)["cola_split"]


@pytest.fixture(scope="module")
def trained(lm, task_dir, tmp_path_factory):
    """A store with an MCTS run on the train split, and every predictor trained on it."""
    folder = tmp_path_factory.mktemp("predict")
    with Store(str(folder / "cola.db")) as store:
        settings = SearchSettings(method="mcts", budget=12)
        run_id = SearchRun(lm, split_task(task_dir, "train"), store, settings).run()
        data = build_training_set(lm, store, [run_id], 6, SPEC, task_dir)
    predictors = {kind: P.train(kind, data, lm.identity, **o) for kind, o in OPTIONS.items()}
    paths = {kind: P.save(p, folder / f"{kind}.pt") for kind, p in predictors.items()}
    return folder / "cola.db", run_id, data, paths, predictors


def test_search_on_a_train_split_records_that_split(trained):
    store, _, data, _, _ = trained
    with Store(str(store), read_only=True).session() as session:
        assert session.scalars(select(Task.split)).all() == ["train"]
    assert data.split == "train" and len(data.doc_hashes) == 14


def test_training_table_is_complete_and_measured(lm, task_dir, trained):
    """Stored scores are reused, the rest are evaluated: every cell equals the objective."""
    _, _, data, _, _ = trained
    assert data.candidates[0] == Chain.identity(lm.executor.n_layers)
    assert data.filled > 0 and not torch.isnan(data.scores).any()
    objective = Objective(lm, split_task(task_dir, "train"))
    documents = {d.doc_hash: d for d in task_documents(split_task(task_dir, "train"), None)}
    for i, doc_hash in enumerate(data.doc_hashes):
        for j, chain in enumerate(data.candidates):
            trial = objective.score(documents[doc_hash], chain)
            assert (trial.score, trial.correct) == (data.scores[i, j], data.correct[i, j])


def test_a_training_set_builds_only_what_its_kinds_read(lm, task_dir, trained):
    """Static reads neither prompt states nor router paths, so neither is computed for it
    (same table); a kind that reads them refuses such a set with the fix."""
    store, run_id, full, _, _ = trained
    data = build_training_set(
        lm, Store(str(store), read_only=True), [run_id], 6, SPEC, task_dir, kinds=["static"]
    )
    assert data.states is None and data.routes is None
    assert data.candidates == full.candidates and torch.equal(data.scores, full.scores)
    assert P.train("static", data, lm.identity).predict(None) == P.train(
        "static", full, lm.identity
    ).predict(None)
    for kind in ("knn", "router"):
        with pytest.raises(TrainingDataError, match=f"build it with '{kind}' among its kinds"):
            P.train(kind, data, lm.identity)
    routers_only = build_training_set(
        lm, Store(str(store), read_only=True), [run_id], 6, SPEC, task_dir, kinds=["router"]
    )
    assert routers_only.states is None
    for mine, theirs in zip(routers_only.routes, full.routes, strict=True):
        assert (mine is None and theirs is None) or (
            torch.equal(mine.runs, theirs.runs) and torch.equal(mine.states, theirs.states)
        )


def test_training_refuses_runs_of_another_model_or_a_changed_task(lm, task_dir, trained, tmp_path):
    store, run_id, _, _, _ = trained
    other = ColaLM(pretrained=lm.pretrained, device="cpu", batch_size=1)
    with torch.no_grad():
        other.model.lm_head.weight.mul_(2)
    other.identity = identify(other.model, "changed", None, other.executor.n_layers)
    with pytest.raises(TrainingDataError, match="not for the loaded"):
        build_training_set(other, Store(str(store), read_only=True), [run_id], 4, SPEC, task_dir)
    changed = tmp_path / "tasks"
    changed.mkdir()
    text = (Path(task_dir) / "cola_split.yaml").read_text().replace("Q: ", "Question: ")
    (changed / "cola_split.yaml").write_text(text)
    with pytest.raises(TrainingDataError, match="configured differently"):
        build_training_set(lm, Store(str(store), read_only=True), [run_id], 4, SPEC, str(changed))


def test_router_paths_follow_each_documents_shortest_right_chain(trained):
    """A router's target is the shortest routable chain right on that document among all its
    search found and the candidates scored on it, not among the candidates alone."""
    store, _, data, _, _ = trained
    right: dict[str, set[str]] = {h: set() for h in data.doc_hashes}
    with Store(str(store), read_only=True).session() as session:
        found = select(Document.doc_hash, Evaluation.chain).join(Document)
        for doc_hash, chain in session.execute(found.where(Evaluation.correct.is_(True))):
            right[doc_hash].add(chain)
    from_search_only = 0
    for i, doc_hash in enumerate(data.doc_hashes):
        candidates = {str(c) for c, ok in zip(data.candidates, data.correct[i], strict=True) if ok}
        paths = [routable(Chain.parse(c), 4) for c in right[doc_hash] | candidates]
        paths = [p for p in paths if p is not None]
        route = data.routes[i]
        if not paths:
            assert route is None
            continue
        assert route.runs.tolist() in paths and int(route.runs.sum()) == min(map(sum, paths))
        tied = [p for p in dict.fromkeys(map(tuple, paths)) if sum(p) == sum(route.runs)]
        assert (route.ties is None) == (len(tied) == 1)
        shortest_candidate = min(
            (sum(p) for c in candidates if (p := routable(Chain.parse(c), 4))), default=99
        )
        from_search_only += int(route.runs.sum()) < shortest_candidate
    assert from_search_only > 0, "no document's target came from its own search: test is moot"


def synthetic(n: int = 40) -> TrainingSet:
    """Two clusters of prompt states; candidate 1 answers cluster A, candidate 2 cluster B."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(2, 8, generator=generator) * 3
    states, correct = [], []
    for i in range(n):
        cluster = i % 2
        states.append(centres[cluster] + 0.3 * torch.randn(5, 8, generator=generator))
        correct.append([False, cluster == 0, cluster == 1])
    candidates = [Chain.identity(4), Chain.parse("0.2.3"), Chain.parse("0.1.1.2.3")]
    return TrainingSet(
        task="t", split="train", metric="acc", doc_hashes=[f"h{i}" for i in range(n)],
        candidates=candidates, scores=torch.tensor(correct, dtype=torch.float32),
        correct=torch.tensor(correct), states=states, spec=FeatureSpec(layer=1), filled=0,
    )  # fmt: skip


def test_each_predictor_learns_what_it_can_from_the_training_set(lm):
    data = synthetic()
    static = P.train("static", data, lm.identity)
    assert static.predict(None) == Chain.parse("0.2.3")  # a tie on the mean: the shorter one
    expected = [data.candidates[1 if i % 2 == 0 else 2] for i in range(len(data.states))]
    for kind in ("knn", "network", "program"):
        predictor = P.train(kind, data, lm.identity)
        assert [predictor.predict(s) for s in data.states] == expected, kind


def synthetic_routes(n: int = 40) -> TrainingSet:
    """Two clusters of states entering each layer: cluster A's path skips layer 2, cluster
    B's runs layer 1 twice (every other layer runs once): unbalanced classes, as in searches."""
    data = synthetic(n)
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(2, 4, 8, generator=generator)
    paths = [torch.tensor([1, 1, 0, 1]), torch.tensor([1, 2, 1, 1])]
    data.routes = [
        RoutePath(paths[i % 2], centres[i % 2] + 0.3 * torch.randn(4, 8, generator=generator))
        for i in range(n)
    ]
    return data


@pytest.mark.parametrize(("loss", "balance"), [("focal", True), ("ce", False)])
def test_routers_learn_each_layers_decision(lm, loss, balance):
    """Dr.LLM's focal loss with class weights, and plain cross-entropy: each layer's router
    gives each cluster its own path's decision."""
    data = synthetic_routes()
    router = P.train("router", data, lm.identity, loss=loss, balance=balance, epochs=60)
    for route in data.routes:
        decided = [int(router.network(layer, route.states[layer]).argmax()) for layer in range(4)]
        assert decided == route.runs.tolist()


def test_tied_targets_share_each_decision_among_the_agreeing_shortest_paths():
    """Followed path [1, 0, 1, 1]; two other shortest paths: [1, 1, 0, 1] leaves it at layer 1,
    [0, 1, 1, 1] at layer 0, so layer 0 is split 1:2 and layer 1 is split among the two paths
    that ran layer 0, and from layer 2 on only the followed path agrees."""
    shares = tie_shares([[1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1]])
    expected = [[1 / 3, 2 / 3, 0], [1 / 2, 1 / 2, 0], [0, 1, 0], [0, 1, 0]]
    assert torch.allclose(shares, torch.tensor(expected))
    route = RoutePath(torch.tensor([1, 0, 1, 1]), torch.zeros(4, 8), shares)
    assert torch.equal(route.targets(), shares)
    assert route.targets().sum(-1).tolist() == pytest.approx([1, 1, 1, 1])


def test_routers_on_tied_targets_keep_to_a_shortest_chain(lm):
    """Cluster A's documents may skip layer 2 or layer 3 (two equally short right chains):
    on one-hot targets half of them teach each, on tied targets every router learns that
    skipping either is right, and each decision it makes stays on a shortest right chain."""
    data = synthetic_routes()
    two_ways = tie_shares([[1, 1, 0, 1], [1, 1, 1, 0]])
    data.routes = [
        RoutePath(r.runs, r.states, two_ways if i % 2 == 0 else None)
        for i, r in enumerate(data.routes)
    ]
    router = P.train("router", data, lm.identity, targets="ties", epochs=60)
    assert router.info.options["targets"] == "ties"
    for route in data.routes:
        decided = [int(router.network(layer, route.states[layer]).argmax()) for layer in range(4)]
        allowed = route.targets()
        assert all(allowed[layer, d] > 0 for layer, d in enumerate(decided)), decided
    with pytest.raises(ValueError, match="choose 'path' or 'ties'"):
        P.train("router", data, lm.identity, targets="soft")


@pytest.mark.parametrize(
    ("chain", "runs"),
    [("0-3", [1, 1, 1, 1]), ("0.1.1.3", [1, 2, 0, 1]), ("1.2", [0, 1, 1, 0]),
     ("0.1.1.1.3", None), ("0.2.1.3", None), ("0.1.2.1", None)],
)  # fmt: skip
def test_routers_express_ordered_chains_of_at_most_two_runs_a_layer(chain, runs):
    assert routable(Chain.parse(chain), 4) == runs


@pytest.mark.parametrize(
    ("chain", "segments"),
    [
        ("0-9", [(0, 4, KEEP), (4, 8, KEEP), (8, 10, KEEP)]),
        ("0-2.7-9", [(0, 3, KEEP), (3, 7, SKIP), (7, 10, KEEP)]),
        ("0-3.2-3.4-9", [(0, 2, KEEP), (2, 4, REPEAT), (4, 8, KEEP), (8, 10, KEEP)]),
        ("0-3.0-3.8-9", [(0, 4, REPEAT), (4, 8, SKIP), (8, 10, KEEP)]),
        ("0-11.9-12.10-29", None),  # overlapping repeats
        ("0-4.4.4.5-9", None),  # a layer run three times
        ("0-6.2-9", None),  # a repeated block longer than a segment
        ("9.0-8", None),  # reordered
    ],
)
def test_chains_parse_into_programs_of_the_fewest_segments(chain, segments):
    n_layers = 30 if chain.endswith("29") else 10
    program = parse(Chain.parse(chain), n_layers)
    if segments is None:
        assert program is None
        return
    assert program.segments() == segments
    assert program.chain() == Chain.parse(chain)


def test_decoding_bounds_segments_and_the_longest_program():
    program = decode(torch.full((10,), -5.0), torch.tensor([[0.0, 1.0, 0.0]] * 10))
    assert [b for b, _, _ in program.segments()] == list(range(0, 10, MAX_SEGMENT))
    assert program.chain() == Chain.identity(10)
    repeat = decode(torch.full((3,), 5.0), torch.tensor([[0.0, 0.0, 1.0]] * 3))
    assert repeat.chain() == Chain.parse("0.0.1.1.2.2")
    assert decode(torch.zeros(3), torch.tensor([[1.0, 0.0, 0.0]] * 3)).chain() is None
    assert longest(10) == Chain.parse("0-3.0-3.4-7.4-7.8-9.8-9")


def test_program_predictor_needs_a_correct_program_and_never_runs_an_empty_chain(lm):
    data = synthetic()
    data.correct[:, :] = False
    with pytest.raises(ValueError, match="no training document has a correct candidate"):
        P.train("program", data, lm.identity)
    predictor = P.train("program", synthetic(), lm.identity)
    with torch.no_grad():  # a network that skips every layer
        predictor.network.head.bias[:] = torch.tensor([5.0, 9.0, 0.0, 0.0])
        predictor.network.head.weight.zero_()
    assert predictor.predict(synthetic().states[0]) == Chain.identity(4)


def test_predictors_round_trip_through_their_files(lm, task_dir, trained):
    """The file gives back the predictor that was saved: the same choices, and, for the
    networks (routers included), the same weights (a retrained one could differ)."""
    _, _, data, paths, predictors = trained
    documents = {d.doc_hash: d for d in task_documents(split_task(task_dir, "train"), None)}
    prompts = [prompt_of(documents[h].instances) for h in data.doc_hashes]
    for kind, path in paths.items():
        original, loaded = predictors[kind], P.load(path)
        assert loaded.info == original.info
        assert _same(loaded.tensors(), original.tensors()), kind
        assert loaded.info.training_hashes == data.doc_hashes
        pairs = list(zip(prompts, data.states, strict=True))
        predicted = [original.chains_for(lm, p, s)[0] for p, s in pairs]
        assert [loaded.chains_for(lm, p, s)[0] for p, s in pairs] == predicted, kind


def _same(a, b) -> bool:
    """Equal saved states: tensors bit for bit, containers item by item."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_a_broken_predictor_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a predictor")
    with pytest.raises(ChainSourceError, match="not a predictor saved by cola predict train"):
        open_source(f"predictor:{bad}")
    with pytest.raises(ChainSourceError, match="does not exist"):
        open_source(f"predictor:{tmp_path / 'missing.pt'}")


@pytest.mark.parametrize("kind", list(OPTIONS))
def test_lm_eval_runs_each_document_with_its_predicted_chain(lm, task_dir, trained, kind):
    _, _, _, paths, _ = trained
    predictor = P.load(paths[kind])
    out = lm_eval.simple_evaluate(
        model=ColaLM(
            pretrained=lm.pretrained, chains=f"predictor:{paths[kind]}", device="cpu", batch_size=1
        ),
        tasks=["cola_split"],
        task_manager=task_index(task_dir),
        log_samples=True,
    )
    task = split_task(task_dir)
    objective, encode = Objective(lm, task), PromptStates(lm, SPEC)
    documents = {d.doc_hash: d for d in task_documents(task, None)}
    samples = out["samples"]["cola_split"]
    assert len(samples) == 8
    for sample in samples:
        document = documents[sample["doc_hash"]]
        prompt = prompt_of(document.instances)
        chain = predictor.chains_for(lm, prompt, encode(prompt))[0]
        assert sample["acc"] == objective.score(document, chain).score


def test_predictor_of_other_weights_is_refused_when_the_model_loads(trained, tiny_llama_dir):
    _, _, _, paths, _ = trained
    predictor = P.load(paths["knn"])
    predictor.info.model["fingerprint"] = "xxh3:" + "0" * 32  # other weights
    forged = paths["knn"].with_name("forged.pt")
    P.save(predictor, forged)
    with pytest.raises(ChainSourceError, match=r"was made for .* not for the loaded"):
        ColaLM(pretrained=tiny_llama_dir, chains=f"predictor:{forged}", device="cpu", batch_size=1)


def test_evaluation_refuses_training_documents_but_prediction_allows_them(lm, task_dir, trained):
    _, _, data, paths, _ = trained
    predictors = [P.load(p) for p in paths.values()]
    with pytest.raises(LeakError, match="14 of the 14 evaluation documents were used to train"):
        evaluate(lm, split_task(task_dir, "train"), predictors)
    knn = predictors[1]
    assert knn.predict(data.states[0]) in data.candidates  # predicting a training document: fine
    cli = [sys.executable, "-m", "lm_eval_cola", "predict", "evaluate", "--predictors",
           *map(str, paths.values()), "--tasks", "cola_split", "--split", "train",
           "--include_path", task_dir, "--model_args", "pretrained=/nonexistent"]  # fmt: skip
    refused = subprocess.run(cli, capture_output=True, text=True)
    assert refused.returncode == 2 and "were used to train" in refused.stderr  # before loading


def test_held_out_evaluation_reports_against_identity_and_static(lm, task_dir, trained):
    _, _, _, paths, _ = trained
    results = evaluate(lm, split_task(task_dir), [P.load(p) for p in paths.values()])
    task = split_task(task_dir)
    objective = Objective(lm, task)
    documents = task_documents(task, None)
    identity = sum(objective.score(d, Chain.identity(4)).correct for d in documents) / 8
    # routers: 4 MLPs (hidden x 128 + 128 x 3 multiply-adds) against one layer's weights a token
    layer = sum(p.numel() for p in lm.executor.layers[0].parameters())
    router = 4 * (lm.model.config.hidden_size * 128 + 128 * 3) / layer
    tokens = [len(lm.tok_encode(prompt_of(d.instances))) for d in documents]
    for result in results:
        assert result.documents == 8 and result.identity_accuracy == identity
        reads = result.predictor not in ("static", "router")
        assert result.feature_layers == (SPEC.layer if reads else 0)
        assert result.layers_run == result.mean_chain_length + result.predictor_layers
        own = sum(router / t for t in tokens) / 8 if result.predictor == "router" else None
        assert result.predictor_layers == pytest.approx(own or result.feature_layers)
        assert result.delta == result.accuracy - identity
        assert result.delta_low <= result.delta <= result.delta_high
        assert result.in_domain and result.task == "cola_split"
    static = next(r for r in results if r.predictor == "static")
    chain = Chain.parse(static.static_chain)
    measured = sum(objective.score(d, chain).correct for d in documents) / 8
    assert static.accuracy == static.static_accuracy == measured  # scored here, independently
    assert static.differs_from_identity == float(chain != Chain.identity(4))


def test_paired_interval_and_mcnemar_on_known_cases():
    right, wrong = [True] * 6, [False] * 6
    assert paired_interval(right, wrong) == (1.0, 1.0)
    assert paired_interval(right, right) == (0.0, 0.0)
    assert mcnemar(right, right) == 1.0
    assert mcnemar(wrong, right) == pytest.approx(2 / 2**6)  # 6 losses, no win
    chosen = [True] * 30 + [False] * 70
    reference = [False] * 10 + [True] * 20 + [False] * 70  # 10 wins, 0 losses
    low, high = paired_interval(chosen, reference)
    assert 0 < low < 0.1 < high < 0.2
    assert mcnemar(chosen, reference) == pytest.approx(2 / 2**10)


def test_oracle_at_k_is_reported_apart_and_measured(lm, task_dir, trained):
    """oracle@k (any of a ranking predictor's k best chains right) is its own field, checked
    here against the objective; the accuracy stays that of the first chain alone."""
    _, _, _, paths, _ = trained
    predictors = [P.load(p) for p in paths.values()]
    results = {r.predictor: r for r in evaluate(lm, split_task(task_dir), predictors, k=3)}
    assert results["static"].oracle_at_k is None and results["program"].oracle_at_k is None
    task = split_task(task_dir)
    objective, documents = Objective(lm, task), task_documents(task, None)
    encode = PromptStates(lm, SPEC)
    for predictor in predictors[1:3]:  # knn, network: they rank the candidates
        result = results[predictor.info.kind]
        prompts = [prompt_of(d.instances) for d in documents]
        tops = [predictor.chains_for(lm, p, encode(p), 3) for p in prompts]
        assert all(len(top) == 3 and top[0] == predictor.predict(encode(p))
                   for top, p in zip(tops, prompts, strict=True))  # fmt: skip
        oracle = [
            any(objective.score(d, c).correct for c in top)
            for d, top in zip(documents, tops, strict=True)
        ]
        first = [objective.score(d, top[0]).correct for d, top in zip(documents, tops, strict=True)]
        assert result.oracle_at_k == sum(oracle) / 8 >= result.accuracy == sum(first) / 8
        fixed = [Chain.parse(c) for c in predictor.info.candidates[:3]]
        menu = [any(objective.score(d, c).correct for c in fixed) for d in documents]
        assert result.menu_at_k == sum(menu) / 8, "the same 3 chains for every document"


def test_out_of_domain_tasks_are_judged_with_their_own_metric(lm, task_dir, trained):
    """Predictors trained on one task are judged on another (a generation task here, scored
    by its own exact match), named out of domain."""
    _, _, _, paths, _ = trained
    task = load_tasks("cola_gen", task_dir)["cola_gen"]
    results = evaluate(lm, task, [P.load(paths["static"]), P.load(paths["knn"])])
    objective = Objective(lm, task)  # the task's default metric
    documents = task_documents(task, None)
    identity = [objective.score(d, Chain.identity(4)).correct for d in documents]
    for result in results:
        assert not result.in_domain and result.task == "cola_gen"
        assert result.documents == len(documents)
        assert result.identity_accuracy == sum(identity) / len(documents)
        assert result.delta_low <= result.delta <= result.delta_high

    def sampled_right(document, heat: float) -> bool:  # one of the model's own 5 samples
        seed = sampling.seed_for(0, document.doc_hash, heat)
        answers = sampling.sample(lm, document.instances[0], 5, heat, seed)
        return any(t.correct for t in objective.judge_outputs(document, answers))

    sampled = [[sampled_right(d, heat) for d in documents] for heat in SAMPLING_TEMPERATURES]
    best = max(sum(hits) for hits in sampled) / len(documents)
    assert {r.sampling_at_k for r in results} == {best}, "one baseline for every predictor"
    scored = evaluate(lm, split_task(task_dir), [P.load(paths["static"])])
    assert scored[0].sampling_at_k is None, "a log-likelihood task has no samples"


def test_settings_that_cannot_mean_what_they_say_are_skipped_with_a_note(caplog):
    grid = selection.GRIDS["knn"]
    with caplog.at_level(logging.INFO, logger="lm_eval.cola"):
        kept = selection.meaningful("knn", grid, 8)
    assert kept == [{"k": 1}, {"k": 3}, {"k": 5}]
    (note,) = caplog.messages
    assert (
        note
        == "knn: skipped k=10, k=20, k=50: more neighbours than the 8 documents it is fitted on"
    )
    assert selection.meaningful("knn", grid, 0) == [{"k": 1}]  # never nothing to try
    assert (
        selection.meaningful("network", selection.GRIDS["network"], 2) == selection.GRIDS["network"]
    )


def test_hyper_parameters_are_chosen_on_a_validation_split_of_the_training_documents(lm):
    """Each setting trains on the fit part and is judged, from the score table, on held-out
    training documents; the best one wins (the first among equals)."""
    data = synthetic()
    noisy = [i for i in range(40) if i % 5 == 0]  # a fifth of the labels swapped
    data.correct[noisy] = data.correct[noisy][:, [0, 2, 1]]
    data.scores = data.correct.float()
    fit_rows, held_rows = selection.split(len(data.doc_hashes))
    assert sorted(fit_rows + held_rows) == list(range(40)) and len(held_rows) == 8
    best, tried = selection.select("knn", data, lm.identity)
    assert [options for options, _ in tried] == [o for o in selection.GRIDS["knn"] if o["k"] <= 32]
    held = selection.subset(data, held_rows)
    for options, accuracy in tried:
        knn = P.train("knn", selection.subset(data, fit_rows), lm.identity, **options)
        chosen = [knn.predict(s) for s in held.states]
        right = [bool(held.correct[i, data.candidates.index(c)]) for i, c in enumerate(chosen)]
        assert accuracy == sum(right) / 8
    assert best == max(tried, key=lambda item: item[1])[0]
    assert best == {"k": 5} and dict(tried[0][0]) == {"k": 1}  # one neighbour follows the noise
    assert tried[0][1] < max(accuracy for _, accuracy in tried)


def test_pruning_removes_a_layer_a_step_the_best_scoring_of_the_best_ranked(lm, task_dir, trained):
    """Layers are ranked by the search's paired evidence (the model less one layer against the
    full model, on the same documents), and each step keeps the best-scoring removal among
    the ``width`` best-ranked layers left, its trials measured on the pruning documents."""
    store, run_id, _, _, _ = trained
    effects = pruning.skip_effects(Store(str(store), read_only=True), [run_id], 4)
    with Store(str(store), read_only=True).session() as session:
        rows = session.execute(select(Evaluation.document_id, Evaluation.chain, Evaluation.score))
        by_doc: dict[int, dict[str, float]] = {}
        for doc, chain, score in rows:
            by_doc.setdefault(doc, {})[chain] = score
    for layer in range(4):
        name = str(pruning.without(range(4), layer))
        paired = [s[name] - s["0-3"] for s in by_doc.values() if name in s and "0-3" in s]
        assert effects.get(layer) == (sum(paired) / len(paired) if paired else None)
    assert effects, "the search never skipped a single layer: test is moot"
    task = split_task(task_dir, "train")
    objective, documents = Objective(lm, task), task_documents(task, 6)
    path = pruning.prune(objective, documents, effects, 2, width=2, desc=None)
    kept = list(range(4))
    for chain, trials in path:
        ranked = sorted(kept, key=lambda layer: -effects.get(layer, -99))[:2]
        means = {
            layer: sum(objective.score(d, pruning.without(kept, layer)).score for d in documents)
            for layer in ranked
        }
        removed = next(layer for layer in ranked if pruning.without(kept, layer) == chain)
        assert means[removed] == max(means.values())
        assert [t.score for t in trials] == [objective.score(d, chain).score for d in documents]
        kept.remove(removed)
    assert [len(chain) for chain, _ in path] == [3, 2]


def test_a_depth_budget_keeps_candidates_that_fit_with_the_predictors_own_layers(
    lm, task_dir, trained
):
    store, run_id, _, _, _ = trained
    data = build_training_set(
        lm, Store(str(store), read_only=True), [run_id], 3, SPEC, task_dir, prune_to=2
    )
    assert {3, 2} <= {len(c) for c in data.candidates} and not torch.isnan(data.scores).any()
    documents = {d.doc_hash: d for d in task_documents(split_task(task_dir, "train"), None)}
    objective = Objective(lm, split_task(task_dir, "train"))
    j = next(j for j, c in enumerate(data.candidates) if len(c) == 2)
    for i, doc_hash in enumerate(data.doc_hashes):
        trial = objective.score(documents[doc_hash], data.candidates[j])
        assert (trial.score, trial.correct) == (data.scores[i, j], data.correct[i, j])
    short = P.within_depth("static", data, 0.5, 4)
    assert short.candidates and all(len(c) <= 2 for c in short.candidates)
    static = P.train("static", short, lm.identity)
    assert len(static.predict(None)) <= 2 and static.info.static_chain == str(static.predict(None))
    with pytest.raises(ValueError, match="reads 2 layers of prompt states"):
        P.within_depth("knn", data, 0.5, 4)  # 2 of 4 layers allowed, 2 taken by its features
    with pytest.raises(ValueError, match="composes its own chains"):
        P.within_depth("router", data, 0.5, 4)
    with pytest.raises(TrainingDataError, match="--prune_to 1"):
        data.within(1)


def test_a_depth_budget_that_is_not_a_share_is_refused_before_loading(tmp_path):
    cli = [sys.executable, "-m", "lm_eval_cola", "predict", "train", "--store",
           str(tmp_path / "none.db"), "--run", "1", "--output_dir", str(tmp_path),
           "--max_depth", "0", "--model_args", "pretrained=/nonexistent"]  # fmt: skip
    refused = subprocess.run(cli, capture_output=True, text=True)
    assert refused.returncode == 2 and "--max_depth 0.0: give a share" in refused.stderr
