"""Batch-invariant decoding: generations of many chains decoded together, each row's tokens (and
logits, bit for bit) those it gets alone, resumed from a prefix cache, or from HF's greedy
decoding without a KV cache."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from sqlalchemy import select

from lm_eval_cola.chain import Chain
from lm_eval_cola.executor import ChainExecutor, PrefixCache
from lm_eval_cola.executor.decoding import ROWS_PER_STEP, BatchedDecoding, Generation
from lm_eval_cola.lm import ColaLM, RunOptions, load, refuse_sampling
from lm_eval_cola.model_args import ModelArgsError
from lm_eval_cola.scoring import Objective, Proposal, ScoringStream
from lm_eval_cola.search.runner import SearchRun, SearchSettings
from lm_eval_cola.store.schema import Evaluation
from lm_eval_cola.store.store import Store
from lm_eval_cola.tasks import task_documents
from tests.test_search import search, task
from tests.tiny_models import FAMILIES, tiny_model

pytestmark = pytest.mark.internals
NEW_TOKENS = 8


def decode(
    executor, chains, prompts, rows_per_step, cache=None, new_tokens=NEW_TOKENS
) -> list[Generation]:
    generations = [
        Generation(prompt, chain, new_tokens, keep_logits=True)
        for prompt, chain in zip(prompts, chains, strict=True)
    ]
    BatchedDecoding(executor, lambda _: False, cache, rows_per_step).run(generations)
    return generations


def same_bits(a: list[Generation], b: list[Generation]) -> bool:
    return all(
        x.tokens == y.tokens and all(map(torch.equal, x.logits, y.logits))
        for x, y in zip(a, b, strict=True)
    )


def mixed(executor: ChainExecutor, seed: int = 0):
    """Chains of several lengths, repeats and skips (one layer-type signature), and prompts
    of several lengths, one per chain."""
    rng = random.Random(seed)
    n = executor.n_layers
    chains = [Chain.identity(n)] + [
        Chain(tuple(rng.randrange(n) for _ in range(rng.randrange(2, 2 * n)))) for _ in range(8)
    ]
    chains = [c for c in chains if executor.signature(c) == executor.signature(chains[0])]
    prompts = [[rng.randrange(3, 128) for _ in range(rng.randrange(2, 45))] for _ in chains]
    return chains, prompts


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_a_chain_decodes_the_same_alone_beside_others_and_from_a_prefix_cache(model_type):
    executor = ChainExecutor(tiny_model(model_type))
    chains, prompts = mixed(executor)
    alone = [decode(executor, [c], [p], 1)[0] for c, p in zip(chains, prompts, strict=True)]
    assert same_bits(alone, decode(executor, chains, prompts, 16))
    assert same_bits(alone, decode(executor, chains, prompts, 3))  # a step of 1-3 rows too
    cache = PrefixCache(256)
    assert same_bits(alone, decode(executor, chains, prompts, 5, cache))
    hits = cache.hits
    assert same_bits(alone, decode(executor, chains, prompts, 16, cache))  # resumed
    assert cache.hits > hits
    small = PrefixCache(0.02)  # room for a few steps: entries evicted under the generations
    assert same_bits(alone, decode(executor, chains, prompts, 16, small))
    assert same_bits(alone, decode(executor, chains, prompts, 16, small))
    assert 0 < small.bytes <= small.max_bytes


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_a_one_token_prompt_decodes_the_same_alone_and_beside_long_prompts(model_type):
    """A prompt of one token runs as a decoding step does (one token a row), alone or beside
    longer prompts: the same bits either way."""
    executor = ChainExecutor(tiny_model(model_type))
    chains, prompts = mixed(executor, seed=2)
    prompts[0] = prompts[0][:1]
    alone = [decode(executor, [c], [p], 1)[0] for c, p in zip(chains, prompts, strict=True)]
    assert same_bits(alone, decode(executor, chains, prompts, 16))


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@pytest.mark.parametrize("cached", [False, True])
def test_a_generation_submitted_while_others_decode_prefills_in_their_steps(model_type, cached):
    """Generations of several lengths, one submitted at every step: each prompt is prefilled
    in the forward pass that takes the others' decoding steps (one pass a step), and every
    generation gets the bits it gets alone."""
    executor = ChainExecutor(tiny_model(model_type))
    chains, prompts = mixed(executor, seed=3)
    lengths = [2 + i % 5 for i in range(len(chains))]
    alone = [
        decode(executor, [c], [p], 1, new_tokens=k)[0]
        for c, p, k in zip(chains, prompts, lengths, strict=True)
    ]
    cache = PrefixCache(256) if cached else None
    decoding = BatchedDecoding(executor, lambda _: False, cache, 4)
    generations = [
        Generation(p, c, k, keep_logits=True)
        for c, p, k in zip(chains, prompts, lengths, strict=True)
    ]
    before, steps, finished = executor.work.forward_calls, 0, []
    for generation in generations:
        decoding.submit([generation])
        finished += decoding.step()
        steps += 1
    while decoding.unfinished:
        finished += decoding.step()
        steps += 1
    assert executor.work.forward_calls - before == steps
    assert steps < len(generations) + max(lengths)  # prompts rode in decoding steps
    assert sorted(map(id, finished)) == sorted(map(id, generations))
    assert same_bits(alone, generations)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_batch_invariant_decoding_equals_uncached_greedy_decoding(model_type):
    """The same tokens as HF's greedy ``generate`` without a KV cache, under each chain
    (repeated layers included), logits equal to float rounding."""
    model = tiny_model(model_type)
    executor = ChainExecutor(model)
    chains, prompts = mixed(executor, seed=1)
    for chain, prompt, generation in zip(
        chains, prompts, decode(executor, chains, prompts, 8), strict=True
    ):
        with executor.apply(chain):
            reference = model.generate(
                torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                use_cache=False, output_scores=True, return_dict_in_generate=True,
                pad_token_id=0, eos_token_id=None,
            )  # fmt: skip
        assert reference.sequences[0, len(prompt) :].tolist() == generation.tokens
        for expected, logits in zip(reference.scores, generation.logits, strict=True):
            torch.testing.assert_close(logits, expected[0], rtol=0, atol=1e-5)


def test_a_generation_stops_where_it_is_finished_and_at_its_length():
    executor = ChainExecutor(tiny_model("llama"))
    chains, prompts = mixed(executor)
    done: list[Generation] = []
    generations = [
        Generation(p, c, 3 + i) for i, (p, c) in enumerate(zip(prompts, chains, strict=True))
    ]
    BatchedDecoding(executor, lambda g: g.tokens[-1] % 2 == 0, None, 4).run(
        generations, done.append
    )
    assert sorted(map(id, done)) == sorted(map(id, generations))
    for generation in generations:
        *before, last = generation.tokens
        assert all(t % 2 for t in before)
        assert last % 2 == 0 or len(generation.tokens) == generation.max_new_tokens


def test_prompts_of_any_lengths_prefill_in_one_pass_padded_to_whole_tiles_only():
    """No prompt is padded to a longer one's length: each layer call lays the prompts end to
    end, each left-padded to a multiple of 4 tokens, and one forward pass takes them all."""
    executor = ChainExecutor(tiny_model("llama"))
    n = executor.n_layers
    lengths = [3, 17, 40, 61]
    chains = [Chain.identity(n), Chain(tuple(range(n)) * 2), Chain((0,)), Chain.identity(n)]
    decode(executor, chains[:1], [[3]], 1, new_tokens=1)  # the executor's first pass checks it
    before = dataclasses.replace(executor.work)
    decode(executor, chains, [list(range(3, 3 + k)) for k in lengths], 16, new_tokens=1)
    work = executor.work - before
    assert work.forward_calls == 1
    tiled = [-(-k // 4) * 4 for k in lengths]
    applied = sum(t * len(c) for t, c in zip(tiled, chains, strict=True))
    assert work.token_layer_applications == applied
    assert work.padding_token_layers == applied - sum(
        k * len(c) for k, c in zip(lengths, chains, strict=True)
    )


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    return ColaLM(pretrained=tiny_llama_dir, device="cpu", batch_size=1)


def test_a_search_model_s_batch_size_widens_its_decoding_steps(tiny_llama_dir):
    """``cola search --model_args batch_size=N`` (N above the default) sets the rows of a
    generation search's decoding steps, where a GPU has room for many chains ahead; without
    it, or below the default, the default stands."""
    assert load(f"pretrained={tiny_llama_dir}", "cpu")._rows_per_step() == ROWS_PER_STEP
    wide = load(f"pretrained={tiny_llama_dir},batch_size={4 * ROWS_PER_STEP}", "cpu")
    assert wide._rows_per_step() == 4 * ROWS_PER_STEP
    narrow = load(f"pretrained={tiny_llama_dir},batch_size=2", "cpu")
    assert narrow._rows_per_step() == ROWS_PER_STEP


def test_the_backend_generates_as_hf_generate_does_with_chains_per_document(lm, task_dir):
    """``batch_invariant``: HFLM's own tokenizing, stopping and post-processing, the
    documents' chains decoded together; the same text as HF's decoding a chain at a time."""
    documents = task_documents(task(task_dir, "cola_gen"), None)
    requests = [i for d in documents for i in d.instances]
    chains = [Chain.parse(c) for c in ("0.1.1.3", "0.2.3", "0-3", "3.3.1")][: len(requests)]
    chains += [None] * (len(requests) - len(chains))
    names = [d.doc_hash for d in documents for _ in d.instances]
    hf = lm.run_requests("generate_until", requests, chains, RunOptions(), names)
    invariant = RunOptions(batch_invariant=True, prefix_cache=PrefixCache(64))
    together = lm.run_requests("generate_until", requests, chains, invariant, names)
    assert together.outputs == hf.outputs
    assert all(together.work[d].token_layer_applications > 0 for d in names)
    assert all(len(together.decode_steps[d]) > 0 for d in names)


def test_sampled_generation_is_refused_in_batch_invariant_mode(lm, task_dir):
    documents = task_documents(task(task_dir, "cola_gen"), None)
    request = documents[0].instances[0]
    request.arguments = (request.args[0], {**request.args[1], "do_sample": True})
    with pytest.raises(ModelArgsError, match="decodes greedily"):
        refuse_sampling([request])


def answers(store_path, run_id) -> list[tuple]:
    with Store(str(store_path), read_only=True).session() as session:
        rows = session.execute(
            select(Evaluation.document_id, Evaluation.chain, Evaluation.response,
                   Evaluation.score).where(Evaluation.run_id == run_id)
        )  # fmt: skip
        return sorted(rows.all())


def test_a_search_gives_the_same_answers_one_or_many_documents_at_a_time(lm, task_dir, tmp_path):
    how = {"prefix_cache_mb": 64}
    one = search(lm, task_dir, tmp_path / "one.db", name="cola_gen", budget=12, how=how)
    many = search(
        lm, task_dir, tmp_path / "many.db", name="cola_gen", budget=12,
        how={**how, "parallel_docs": 16},
    )  # fmt: skip
    bare = search(lm, task_dir, tmp_path / "bare.db", name="cola_gen", budget=12)
    expected = answers(tmp_path / "one.db", one)
    assert len(expected) > 12
    assert answers(tmp_path / "many.db", many) == expected == answers(tmp_path / "bare.db", bare)


def test_a_scoring_stream_scores_a_document_s_next_chain_while_others_decode(lm, task_dir):
    """A document's next chain joins while the others' generations decode, and every trial is
    the one the chain scores alone (answer, metrics, decoding steps)."""
    objective = Objective(lm, task(task_dir, "cola_gen"), prefix_cache_mb=64, batch_invariant=True)
    documents = task_documents(task(task_dir, "cola_gen"), None)
    rng = random.Random(0)
    queue = {
        d.doc_hash: [Chain(tuple(rng.randrange(4) for _ in range(rng.randrange(1, 9))))
                     for _ in range(6)]
        for d in documents
    }  # fmt: skip
    stream = objective.stream()
    for document in documents:
        stream.submit(Proposal(document, queue[document.doc_hash].pop()), document)
    trials, joined_in_flight = [], 0
    while stream.pending:
        for document, trial in stream.finished():
            trials.append((document, trial))
            if queue[document.doc_hash]:
                joined_in_flight += bool(stream.pending)
                stream.submit(Proposal(document, queue[document.doc_hash].pop()), document)
    assert len(trials) == 6 * len(documents) and joined_in_flight > 0
    for document, trial in trials:
        alone = objective.score(document, trial.chain)
        assert (trial.response, trial.metrics, trial.decode_steps) == (
            alone.response, alone.metrics, alone.decode_steps,
        )  # fmt: skip


def test_a_scoring_stream_scores_two_chains_of_one_document_at_once(lm, task_dir):
    """A search scores the chain it will ask next beside the pending one: both trials are the
    ones each chain scores alone, whichever finishes first (they share the document's
    requests, filled for each just before it is judged)."""
    objective = Objective(lm, task(task_dir, "cola_gen"), prefix_cache_mb=64, batch_invariant=True)
    documents = task_documents(task(task_dir, "cola_gen"), None)
    stream = objective.stream()
    assert stream.overlaps
    chains = [Chain((0, 1, 2, 3)), Chain((0, 1, 1, 2)), Chain((0, 3)), Chain((2, 2, 2, 3, 3))]
    for document in documents:
        for chain in chains:
            stream.submit(Proposal(document, chain), document)
    trials = []
    while stream.pending:
        trials += stream.finished()
    assert len(trials) == len(chains) * len(documents)
    responses = set()
    for document, trial in trials:
        alone = objective.score(document, trial.chain)
        assert (trial.response, trial.metrics, trial.decode_steps) == (
            alone.response, alone.metrics, alone.decode_steps,
        )  # fmt: skip
        responses.add(trial.response)
    assert len(responses) > 1


@pytest.mark.parametrize(
    ("name", "decoding", "streams"),
    [("cola_gen", "batch_invariant", True), ("cola_gen", "hf", False), ("cola_mc", None, False)],
)
def test_a_search_moves_a_document_on_while_the_others_decode(
    lm, task_dir, tmp_path, monkeypatch, name, decoding, streams
):
    """A search submits a document's next chain while other documents' proposals are still
    decoding (batch-invariant generation); scoring that does not stream takes its documents'
    steps together, so nothing is in flight when a document moves on."""
    left, in_flight = [0], []  # proposals still in flight when the stream last handed some back
    submit, finished = ScoringStream.submit, ScoringStream.finished

    def noting_submit(stream, proposal, tag=None):
        in_flight.append(left[0])
        submit(stream, proposal, tag)

    def noting_finished(stream):
        done = finished(stream)
        left[0] = len(stream.pending)
        return done

    monkeypatch.setattr(ScoringStream, "submit", noting_submit)
    monkeypatch.setattr(ScoringStream, "finished", noting_finished)
    search(lm, task_dir, tmp_path / "cola.db", name=name, budget=8, decoding=decoding,
           how={"parallel_docs": 3})  # fmt: skip
    assert len(in_flight) > 3 and (max(in_flight) > 0) == streams


def test_a_run_records_its_decoding_and_grows_only_in_it(lm, task_dir, tmp_path):
    path = tmp_path / "cola.db"
    search(lm, task_dir, path, name="cola_gen", budget=4, how={"run_name": "gen"}, limit=1)
    with Store(str(path)) as store:
        assert store.run_settings("gen")["decoding"] == "batch_invariant"
        settings = SearchSettings("mcts", 4, limit=2, decoding="hf")
        run = SearchRun(lm, task(task_dir, "cola_gen"), store, settings, run_name="gen")
        with pytest.raises(ValueError, match="searched with --decoding batch_invariant"):
            run.run()
    # a multiple-choice task generates nothing: it records no decoding
    search(lm, task_dir, path, name="cola_mc", budget=4, how={"run_name": "mc"}, limit=1)
    assert "decoding" not in Store(str(path), read_only=True).run_settings("mc")


def test_stored_chains_re_evaluate_in_the_mode_they_were_searched_in(lm, task_dir, tmp_path):
    path = tmp_path / "cola.db"
    run_id = search(lm, task_dir, path, name="cola_gen", budget=4)
    chains = f"store:{path};run={run_id}"
    assert ColaLM(pretrained=lm.pretrained, device="cpu", chains=chains).batch_invariant
    with pytest.raises(ModelArgsError, match="re-evaluate only that way"):
        ColaLM(pretrained=lm.pretrained, device="cpu", chains=chains, batch_invariant=False)
