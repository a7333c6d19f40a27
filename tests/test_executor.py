"""The chain executor on tiny random models of every supported family.

``COLA_TEST_DEVICE`` (default ``cpu``) and ``COLA_TEST_DTYPE`` (default ``float32``) run the
same checks on a GPU or in half precision (``benchmarks/gpu_check.sh`` does both).
"""

import copy
import dataclasses
import os
import random

import pytest
import torch
import transformers
from transformers import LogitsProcessor, LogitsProcessorList

from lm_eval_cola.chain import Chain, ChainError
from lm_eval_cola.executor import (
    ChainExecutor,
    PrefixCache,
    UnsupportedModelError,
    Work,
    prefix_cache,
)
from lm_eval_cola.executor.positions import ChainPosition
from lm_eval_cola.executor.rows import layer_calls, lowest_first_calls
from lm_eval_cola.packing import PackedBatch, pack
from tests.tiny_models import FAMILIES, tiny_model

pytestmark = pytest.mark.internals  # run on every transformers line (tox.ini)

ATTENTION = ["eager", "sdpa"]
#: Gemma 2's attention soft-capping has no SDPA kernel in transformers 5 (it refuses to load).
NO_SDPA = {"gemma2"}
#: Skips, repeats (single layers and blocks) and re-orderings of a 4-layer model.
CHAINS = ["0.1.1.3.2.2", "3.2.1.0", "0.2-3x2", "1.3"]
DEVICE = torch.device(os.environ.get("COLA_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("COLA_TEST_DTYPE", "float32"))


def build(family: str, **overrides):
    return tiny_model(family, **overrides).to(DEVICE, DTYPE)


def padded_batch(seed: int = 0, length: int = 20):
    """Two prompts, the second left-padded by 5 tokens: longer than the sliding window (8)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ids[1, :5] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


EOS, PAD = 2, 0


def greedy_without_cache(model, ids, mask, new_tokens: int):
    """Reference decoding: the whole sequence re-run at every step, no KV cache at all.

    Rows that emitted EOS continue with padding and decoding stops once all have, as in
    ``generate``.
    """
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        token = logits[:, -1].argmax(-1).masked_fill(finished, PAD)
        finished |= token == EOS
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(token[:, None])], dim=1)
        if finished.all():
            break
    return ids


def greedy_with_cache(model, ids, mask, new_tokens: int):
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )


@pytest.fixture(
    params=[(f, a) for f in FAMILIES for a in ATTENTION if not (f in NO_SDPA and a == "sdpa")],
    ids=lambda p: "-".join(p),
)
def model(request):
    family, attention = request.param
    return build(family, attn_implementation=attention)


@torch.no_grad()
def test_identity_chain_is_bit_identical(model):
    executor = ChainExecutor(model)
    ids, mask = padded_batch()
    expected = model(ids, attention_mask=mask).logits
    with executor.apply(Chain.identity(executor.n_layers)):
        got = model(ids, attention_mask=mask).logits
    assert torch.equal(got, expected)
    assert torch.equal(model(ids).logits, _run(executor, Chain.identity(4), ids))


def _run(executor, chain, ids):
    with executor.apply(chain):
        return executor.model(ids).logits


def materialise(model, chain: Chain):
    """The oracle: a new model whose layers are deep copies laid out in chain order.

    This is what mergekit's passthrough would write to disk; stock HF code then runs it.
    """
    built = copy.deepcopy(model)
    layers = [copy.deepcopy(model.model.layers[i]) for i in chain]
    for position, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    built.model.layers = torch.nn.ModuleList(layers)
    built.config.num_hidden_layers = len(chain)
    if getattr(built.config, "layer_types", None) is not None:
        built.config.layer_types = [model.config.layer_types[i] for i in chain]
    return built


@torch.no_grad()
@pytest.mark.parametrize("chain", CHAINS)
def test_chain_equals_a_materialised_model(model, chain):
    """Logits and KV-cached generation are bit-identical to a model rebuilt in chain order."""
    executor = ChainExecutor(model)
    oracle = materialise(model, Chain.parse(chain))
    ids, mask = padded_batch()
    with executor.apply(Chain.parse(chain)):
        logits = model(ids, attention_mask=mask).logits
        generated = greedy_with_cache(model, ids, mask, 10)
    assert torch.equal(logits, oracle(ids, attention_mask=mask).logits)
    assert torch.equal(generated, greedy_with_cache(oracle, ids, mask, 10))


@torch.no_grad()
@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.skipif(
    torch.float32 != DTYPE,
    reason="cached and uncached decoding run different kernels; in half precision even the "
    "stock model's tokens may differ, so this comparison is float32-only (the materialised "
    "oracle test covers half precision)",
)
def test_cached_generation_equals_uncached_greedy(model, chain):
    executor = ChainExecutor(model)
    ids, mask = padded_batch()
    with executor.apply(Chain.parse(chain)):
        cached = greedy_with_cache(model, ids, mask, 10)
        uncached = greedy_without_cache(model, ids, mask, 10)
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_a_shared_cache_slot_would_be_caught(monkeypatch):
    """The generation test has teeth: PoLar's bug (repeats share a KV slot) makes it fail."""
    model = build("llama")
    monkeypatch.setattr(ChainPosition, "forward", lambda self, *a, **k: self.layer(*a, **k))
    executor = ChainExecutor(model)
    ids, mask = padded_batch()
    with executor.apply(Chain.parse("0.1.1.1.2.3")):
        uncached = greedy_without_cache(model, ids, mask, 10)
        try:
            cached = greedy_with_cache(model, ids, mask, 10)
        except RuntimeError as err:  # some versions notice the doubled cache slot and fail
            assert "size of tensor" in str(err)
            return
    assert not torch.equal(cached, uncached)


@torch.no_grad()
def test_chains_change_the_output_and_are_deterministic(model):
    executor = ChainExecutor(model)
    ids, _ = padded_batch()
    base = model(ids).logits
    for chain in CHAINS:
        first = _run(executor, Chain.parse(chain), ids)
        assert not torch.equal(first, base)
        assert torch.equal(first, _run(executor, Chain.parse(chain), ids))


@torch.no_grad()
def test_base_model_is_unchanged_after_any_run(model):
    executor = ChainExecutor(model)
    layers = model.model.layers
    config = model.config.to_dict()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    indices = [
        m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
    ]
    ids, mask = padded_batch()
    with executor.apply(Chain.parse("3.3.0.1")):
        greedy_with_cache(model, ids, mask, 4)
    with pytest.raises(RuntimeError, match="boom"), executor.apply(Chain.parse("2.2")):
        raise RuntimeError("boom")
    assert model.model.layers is layers
    assert model.config.to_dict() == config
    assert [
        m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
    ] == indices
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert list(model.state_dict()) == list(weights)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_identity_is_exact_in_half_precision(dtype):
    model = tiny_model("llama").to(DEVICE, dtype)
    executor = ChainExecutor(model)
    ids, mask = padded_batch()
    expected = model(ids, attention_mask=mask).logits
    with executor.apply(Chain.identity(4)):
        assert torch.equal(model(ids, attention_mask=mask).logits, expected)
        assert greedy_with_cache(model, ids, mask, 3).shape[0] == 2


@torch.no_grad()
def test_counts_layer_and_token_layer_applications():
    executor = ChainExecutor(build("llama"))
    ids, _ = padded_batch()
    _run(executor, Chain.parse("0.1.1.1.3"), ids)
    assert executor.work.layer_applications == 5 * 2
    assert executor.work.token_layer_applications == 5 * 2 * 20
    assert executor.work.forward_calls == 1
    assert executor.work.layer_calls == 5


def test_out_of_range_and_nested_chains_are_refused():
    executor = ChainExecutor(tiny_model("llama"))
    with (
        pytest.raises(ChainError, match=r"layer 4 .* out of range"),
        executor.apply(Chain.parse("0-4")),
    ):
        pass
    with (
        pytest.raises(RuntimeError, match="do not nest"),
        executor.apply(Chain.parse("0")),
        executor.apply(Chain.parse("1")),
    ):
        pass


def test_a_model_without_a_layer_list_is_refused():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(UnsupportedModelError, match=r"model\.model\.layers"):
        ChainExecutor(transformers.GPT2LMHeadModel(config))


def test_a_model_that_ignores_the_layer_list_is_caught(monkeypatch):
    model = tiny_model("llama")
    executor = ChainExecutor(model)
    layers = model.model.layers

    def forward_over_own_layers(input_ids, **kwargs):
        hidden = model.model.embed_tokens(input_ids)
        rope = model.model.rotary_emb(hidden, torch.arange(input_ids.shape[1])[None])
        for layer in layers:  # a model that iterates a list of its own, not decoder.layers
            layer(hidden, position_embeddings=rope)

    monkeypatch.setattr(model, "forward", forward_over_own_layers)
    with pytest.raises(UnsupportedModelError, match="does not run its layers"):
        executor.check()


def test_check_passes_on_every_family():
    for family in FAMILIES:
        ChainExecutor(build(family)).check()


# -- rows of different chains in one batch (packed documents) ---------------------------------

#: Chains of several lengths, with repeats, skips and re-orderings. Rows of one batch must share
#: a layer-type signature: for the families with two layer types, some of these do.
ROW_CHAINS = ["0.1.1.3.2.2", "3.2.1.0", "0-3", "1.3", "1.0.3.2", "2.3.0.1", "0.0.2.2", "2.1.0.3"]


def documents(seed: int = 0) -> list[list[tuple[list[int], list[int]]]]:
    """Multiple-choice-like documents: a shared context longer than the sliding window (8),
    continuations of 1-4 tokens, two sharing their first token, and one request of its own."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, 128, (n,), generator=generator).tolist()

    found = []
    for d in range(4):
        context = tokens(11 + 3 * d)
        choices = [tokens(k) for k in (1, 2, 3, 4)]
        choices[3][0] = choices[2][0]
        found.append([(context, c) for c in choices] + [(tokens(4), tokens(2))])
    return found


def mixed_chains(executor: ChainExecutor) -> list[Chain]:
    """The largest set of ROW_CHAINS that can share a batch on this model."""
    groups: dict[tuple, list[Chain]] = {}
    for chain in map(Chain.parse, ROW_CHAINS):
        groups.setdefault(executor.signature(chain), []).append(chain)
    return max(groups.values(), key=len)


def packed_scores(executor, rows, chains, cache=None):
    """(per row, per request) log-likelihoods of one batch of rows under their chains."""
    batch = PackedBatch(rows, 0, DEVICE)
    with executor.apply_rows(batch, chains, cache) as run:
        logits = executor.model(
            input_ids=batch.input_ids,
            attention_mask=batch.mask(None, DTYPE),
            position_ids=batch.position_ids,
            use_cache=False,
            logits_to_keep=batch.keep,
        ).logits
    scores = batch.scores(torch.log_softmax(batch.gather(logits).float(), dim=-1))
    return [[value for value, _ in row] for row in scores], run.work


def request_scores(model, chain, requests):
    """HFLM's way: each request alone, its continuation scored from its own row's logits."""
    executor, found = ChainExecutor(model), []
    for context, continuation in requests:
        ids = torch.tensor([(context + continuation)[:-1]], device=DEVICE)
        with executor.apply(chain):
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        targets = torch.tensor(continuation, device=DEVICE)
        picked = logprobs[ids.shape[1] - len(continuation) :]
        found.append(float(picked.gather(1, targets[:, None]).sum()))
    return found


TOLERANCE = 1e-4 if torch.float32 == DTYPE else 0.1


def row_states(executor, rows, chains, share_calls: bool) -> list[torch.Tensor]:
    """Each row's hidden states after its chain (the decoder only, no LM head)."""
    batch = PackedBatch(rows, 0, DEVICE)
    with executor.apply_rows(batch, chains, share_calls=share_calls):
        states = executor.decoder(
            input_ids=batch.input_ids,
            attention_mask=batch.mask(None, DTYPE),
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state
    return [states[r, batch.width - len(row) :] for r, row in enumerate(rows)]


@torch.no_grad()
@pytest.mark.parametrize("share_calls", [False, True], ids=["call-a-row", "shared-calls"])
def test_a_row_in_a_mixed_batch_is_the_row_alone(model, share_calls):
    """Computed a call a row (the backend's default), a row is bit for bit what it is alone,
    whatever shares its batch; rows sharing calls differ only by float rounding."""
    executor = ChainExecutor(model)
    chains = mixed_chains(executor)
    rows = [pack(requests, 256) for requests in documents()]
    chains = [chains[i % len(chains)] for i in range(len(rows))]
    together = row_states(executor, rows, chains, share_calls)
    for row, chain, state in zip(rows, chains, together, strict=True):
        (alone,) = row_states(executor, [row], [chain], share_calls)
        if share_calls:
            torch.testing.assert_close(state, alone, rtol=0, atol=TOLERANCE / 10)
        else:
            assert torch.equal(state, alone), chain


@torch.no_grad()
def test_mixed_chain_batch_equals_each_chain_alone_and_per_request_scores(model):
    """Rows with different chains (of different lengths) in one batch score what each row
    scores alone, and what HFLM's request-per-row layout scores (shared context run once)."""
    executor = ChainExecutor(model)
    docs = documents()
    chains = mixed_chains(executor)
    assert len(chains) >= 3
    chains = [chains[i % len(chains)] for i in range(len(docs))]
    rows = [pack(requests, 256) for requests in docs]
    together, _ = packed_scores(executor, rows, chains)
    for requests, row, chain, scores in zip(docs, rows, chains, together, strict=True):
        alone, _ = packed_scores(executor, [row], [chain])
        assert scores == pytest.approx(alone[0], abs=TOLERANCE / 10), chain
        assert scores == pytest.approx(request_scores(model, chain, requests), abs=TOLERANCE)


@torch.no_grad()
def test_a_packed_row_shares_its_context(model):
    executor = ChainExecutor(model)
    requests = documents()[0]
    row = pack(requests, 256)
    per_request = sum(len(c) + len(x) - 1 for c, x in requests)
    assert len(row) < per_request
    _, work = packed_scores(executor, [row], [Chain.parse("0.1.1.3")])
    assert work[0].token_layer_applications == 4 * len(row)
    assert executor.work.padding_token_layers == 0


@torch.no_grad()
def test_a_row_that_fell_behind_catches_up_instead_of_running_alone():
    """Two rows run 0-3; a third repeats layer 1. Running the layer most rows need next would
    take 2 until the end and leave the third alone for 1, 2, 3 (7 calls); the lowest layer
    first lets it catch up at 2 (5 calls), each call reading a layer's weights once."""
    model = build("llama")
    executor = ChainExecutor(model)
    rows = [pack(requests, 256) for requests in documents()[:3]]
    chains = [Chain.parse("0-3"), Chain.parse("0-3"), Chain.parse("0.1.1.2.3")]
    row_states(executor, rows, chains, share_calls=True)  # the executor's first-use check
    calls = []
    for index, layer in enumerate(executor.layers):
        layer.register_forward_hook(lambda *_, index=index: calls.append(index))
    row_states(executor, rows, chains, share_calls=True)
    assert calls == [0, 1, 1, 2, 3]


@torch.no_grad()
def test_a_repeat_waits_for_a_row_that_comes_back_to_its_layer():
    """One row runs layer 1 twice, the other 1-2 twice, then 3. Lowest layer first runs the
    first row's repeat of 1 alone and the second's later (6 calls); looking one call ahead
    runs 2 first, so that both rows' second 1 share a call (5 calls)."""
    model = build("llama")
    executor = ChainExecutor(model)
    rows = [pack(requests, 256) for requests in documents()[:2]]
    chains = [Chain.parse("1.1"), Chain.parse("1.2.1.2.3")]
    row_states(executor, rows, chains, share_calls=True)  # the executor's first-use check
    calls = []
    for index, layer in enumerate(executor.layers):
        layer.register_forward_hook(lambda *_, index=index: calls.append(index))
    before = executor.work.layer_calls
    row_states(executor, rows, chains, share_calls=True)
    assert calls == [1, 2, 1, 2, 3]
    assert executor.work.layer_calls - before == 5
    assert lowest_first_calls(chains, [0, 0]) == 6


def _search_like_chain(rng: random.Random, depth: int) -> Chain:
    """The identity with blocks skipped and repeated, as the search space edits it."""
    layers, i = [], 0
    while i < depth:
        block = list(range(i, min(i + rng.randint(1, 4), depth)))
        edit = rng.random()
        layers += [] if edit < 0.15 else block * (rng.randint(2, 3) if edit < 0.3 else 1)
        i += len(block)
    return Chain.derived(tuple(layers or [0]))


def test_layer_calls_run_every_row_s_chain_in_order_in_no_more_calls_than_lowest_first():
    rng = random.Random(0)
    fewer = 0
    for _ in range(200):
        chains = [_search_like_chain(rng, 30) for _ in range(rng.randint(1, 24))]
        start = [rng.randint(0, len(chain)) for chain in chains]
        ran: list[list[int]] = [[] for _ in chains]
        calls = 0
        for layer, rows, positions in layer_calls(chains, start):
            calls += 1
            for r in rows:
                assert positions[r] == start[r] + len(ran[r])
                ran[r].append(layer)
        assert [tuple(run) for run in ran] == [
            c.layers[s:] for c, s in zip(chains, start, strict=True)
        ]
        before = lowest_first_calls(chains, start)
        assert calls <= before
        fewer += calls < before
    assert fewer > 100


#: Chains as a search explores them: each shares a prefix with an earlier one.
SEARCH_ORDER = ["0-3", "0-2", "0.1.1.2.3", "0.1.1.3", "0.1.2.2.3", "0-3.3", "0.2.3"]


@torch.no_grad()
def test_prefix_cache_gives_identical_scores_and_computes_each_prefix_once():
    model = build("llama")
    rows = [pack(requests, 256) for requests in documents()[:2]]
    plain, cached = ChainExecutor(model), ChainExecutor(model)
    for executor in (plain, cached):
        executor.check()
        executor.work = Work()
    cache = PrefixCache(max_mb=64)
    prefixes: set[tuple[int, ...]] = set()
    for chain in map(Chain.parse, SEARCH_ORDER):
        expected, _ = packed_scores(plain, rows, [chain, chain])
        got, _ = packed_scores(cached, rows, [chain, chain], cache)
        for row_got, row_expected in zip(got, expected, strict=True):
            assert row_got == pytest.approx(row_expected, abs=1e-6), chain
        prefixes |= {chain.layers[:end] for end in range(1, len(chain) + 1)}
    assert cache.hits > 0
    limit = len(prefixes) * sum(len(row) for row in rows)  # each prefix once over each row
    work = cached.work
    assert work.token_layer_applications - work.padding_token_layers == limit
    assert plain.work.token_layer_applications > 2 * limit


@torch.no_grad()
def test_prefix_cache_is_keyed_by_row_content_and_bounded():
    model = build("llama")
    executor = ChainExecutor(model)
    first, other = (pack(requests, 256) for requests in documents()[:2])
    one_output = (
        len(first) * model.config.hidden_size * torch.tensor([], dtype=DTYPE).element_size()
    )
    cache = PrefixCache(max_mb=2.5 * one_output / 2**20)  # room for two layer outputs
    chain = Chain.parse("0-3")
    scores, _ = packed_scores(executor, [first], [chain], cache)
    assert cache.bytes <= cache.max_bytes and len(cache) == 2 and cache.hits == 0
    packed_scores(executor, [other], [chain], cache)
    assert cache.hits == 0  # another row never reuses these states
    again, _ = packed_scores(executor, [first], [chain], PrefixCache(64))
    assert again == scores


def test_freed_memory_is_returned_at_most_once_every_interval(monkeypatch):
    """Trimming after every forward pass cost a long search a tenth of its time (the trim,
    then the page faults that take the pages back): it runs once an interval."""
    trims = []
    monkeypatch.setattr(prefix_cache, "_malloc_trim", lambda: trims.append)
    monkeypatch.setattr(prefix_cache, "_last_trim", -float("inf"))
    for _ in range(3):
        prefix_cache.return_freed_memory(every_s=3600)
    assert trims == [0]
    prefix_cache.return_freed_memory(every_s=0)
    assert trims == [0, 0]


def test_rows_of_different_layer_types_are_refused():
    executor = ChainExecutor(build("gemma3_text"))
    rows = [pack(requests, 256) for requests in documents()[:2]]
    with pytest.raises(ValueError, match="layer-type signature"):
        packed_scores(executor, rows, [Chain.parse("0-3"), Chain.parse("1-3")])


def generate_scored(model, ids, mask, new_tokens: int = 8, forced: list[int] | None = None):
    """Greedy tokens and the raw logits they were picked from, bit for bit; ``forced``: the
    tokens to generate whatever the logits (so chains can share a token history)."""
    processors = LogitsProcessorList([ForcedTokens(forced, ids.shape[1])] if forced else [])
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=EOS,
        pad_token_id=PAD,
        logits_processor=processors,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.logits)


class ForcedTokens(LogitsProcessor):
    def __init__(self, tokens: list[int], prompt_length: int) -> None:
        self.tokens, self.prompt_length = tokens, prompt_length

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.tokens[input_ids.shape[1] - self.prompt_length]] = 0
        return forced


def prefill_work(executor: ChainExecutor) -> int:
    return executor.work.token_layer_applications - executor.work.decode_token_layers


def distinct_steps(chain: Chain, sequences: torch.Tensor, prompt: int) -> set[tuple]:
    """(chain prefix, token history) of each decoding step: the physical limit's units."""
    histories = [
        sequences[:, : prompt + t].cpu().numpy().tobytes()
        for t in range(1, len(sequences[0]) - prompt)
    ]
    return {(chain.layers[:end], h) for h in histories for end in range(1, len(chain) + 1)}


@torch.no_grad()
@pytest.mark.parametrize("forced", [None, [5, 9, 9, 17, 5, 3, 40, 7]], ids=["greedy", "forced"])
def test_generation_with_reused_steps_equals_a_fresh_run(model, forced):
    """Every family: a generation whose prompt prefill and decoding steps resume from cached
    chain prefixes gives the tokens and logits of a fresh run, bit for bit; over the search,
    each prefix of the prompt is computed once, and each (chain prefix, token history) of a
    decoding step once, so a chain seen before computes nothing. Forced tokens give every
    chain the same history: their decoding steps are then shared up to the edit."""
    fresh, reused = ChainExecutor(model), ChainExecutor(model)
    fresh.check()
    ids, mask = padded_batch(length=12)
    cache = PrefixCache(max_mb=64)
    prefixes: set[tuple[int, ...]] = set()
    steps: set[tuple] = set()
    for chain in map(Chain.parse, [*SEARCH_ORDER, "0.1.1.3"]):
        with fresh.apply(chain):
            expected = generate_scored(model, ids, mask, forced=forced)
        before = dataclasses.replace(reused.work)
        with reused.apply(chain), reused.reuse_generation(cache, "prompt"):
            got = generate_scored(model, ids, mask, forced=forced)
        assert torch.equal(got[0], expected[0]), chain
        assert torch.equal(got[1], expected[1]), chain
        spent = reused.work - before
        new = {chain.layers[:end] for end in range(1, len(chain) + 1)} - prefixes
        assert spent.token_layer_applications - spent.decode_token_layers == len(new) * ids.numel()
        new_steps = distinct_steps(chain, got[0], ids.shape[1]) - steps
        assert spent.decode_token_layers == len(new_steps) * ids.shape[0], chain
        prefixes, steps = prefixes | new, steps | new_steps
    assert cache.hits >= len(SEARCH_ORDER)  # all but the first chain resumed
    assert 0 < reused.work.decode_token_layers < fresh.work.decode_token_layers


@torch.no_grad()
def test_a_prefill_is_reused_only_for_its_own_prompt():
    """The reuse test has teeth: a prefill stored for one prompt really is replayed (filed
    under another prompt's key, it changes that prompt's tokens), so keys must name the prompt,
    as ``ColaLM`` does with the tokens and padding."""
    model = build("llama")
    executor = ChainExecutor(model)
    ids, mask = padded_batch(length=12)
    other, _ = padded_batch(seed=1, length=12)
    with executor.apply(Chain.parse("0-2.2")):
        expected = generate_scored(model, other, mask)
    cache = PrefixCache(max_mb=64)
    with executor.apply(Chain.parse("0-3")), executor.reuse_generation(cache, "one key for all"):
        generate_scored(model, ids, mask)
    with executor.apply(Chain.parse("0-2.2")), executor.reuse_generation(cache, "one key for all"):
        wrong = generate_scored(model, other, mask)
    assert not torch.equal(wrong[1], expected[1])
    with executor.apply(Chain.parse("0-2.2")), executor.reuse_generation(cache, "other prompt"):
        assert torch.equal(generate_scored(model, other, mask)[1], expected[1])


def by_state(layer: int, hidden: torch.Tensor) -> int:
    """A decision rule that reads the hidden state (skip, run or repeat by its mean), as a
    router does; first and last layers always run."""
    if layer in (0, 3):
        return 1
    return int(hidden.float().mean().abs().mul(1e4).floor()) % 3


ROUTES = {"program": lambda layer, _hidden: [1, 0, 2, 1][layer], "by state": by_state}


@torch.no_grad()
@pytest.mark.parametrize("decide", list(ROUTES.values()), ids=list(ROUTES))
def test_a_routed_chain_equals_the_same_chain_given_explicitly(model, decide):
    """A chain decided layer by layer during the forward pass gives the logits of that chain
    applied outright, bit for bit, and of its materialised stack in KV-cached generation."""
    executor = ChainExecutor(model)
    if len(set(getattr(model.config, "layer_types", None) or ())) > 1:
        with (
            pytest.raises(UnsupportedModelError, match="mixes layer types"),
            executor.route(decide),
        ):
            pass
        return
    ids = padded_batch(length=12)[0][:1]
    seen: list[int] = []

    def noting(layer: int, hidden: torch.Tensor) -> int:
        seen.append(layer)
        return decide(layer, hidden)

    with executor.route(noting) as routing:
        routed = model(ids).logits
    chain = routing.chain
    assert seen == [0, 1, 2, 3]
    assert torch.equal(routed, _run(executor, chain, ids))
    with executor.route(decide) as routing:
        got = generate_scored(model, ids, torch.ones_like(ids))
    assert routing.chain == chain
    expected = generate_scored(materialise(model, chain), ids, torch.ones_like(ids))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_routing_refuses_batches_and_impossible_decisions():
    model = build("llama")
    executor = ChainExecutor(model)
    ids = padded_batch(length=12)[0]
    with pytest.raises(ValueError, match="for one prompt, not 2"), executor.route(by_state):
        model(ids)
    with pytest.raises(ValueError, match="chose 3 runs"), executor.route(lambda _l, _h: 3):
        model(ids[:1])
