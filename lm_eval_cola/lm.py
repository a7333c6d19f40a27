"""``--model cola``: lm-eval's HFLM with its decoder layers run as chains.

HFLM keeps doing everything it does (tokenising, the one-token logits cache, auto batch size,
data parallelism, peft, gguf). This backend decides, per request, which chain the model runs:
``chain=`` for every document, ``chains=`` for a per-document source, and runs them in one of
two ways (:meth:`ColaLM.run_requests`, the one place requests run under chains):

- by chain: requests are grouped by chain *before* HFLM sees them and each group runs through
  HFLM's own code, so batching and its logits cache never mix two chains. Without a chain, or
  with the identity chain, results are exactly those of ``--model hf``.
- packed (``shared_context``, the default with ``chains=``, and the search's way): each
  document's loglikelihood requests run as one row in which their shared context is computed
  once (:mod:`lm_eval_cola.packing`), and rows of different chains share a batch
  (:meth:`ChainExecutor.apply_rows`). Log-likelihoods equal the grouped path's up to float
  rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
import transformers
import xxhash
from lm_eval.api.instance import Instance
from lm_eval.api.model import CacheHook
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from lm_eval_cola.chain import Chain
from lm_eval_cola.errors import one_line
from lm_eval_cola.executor import ChainExecutor, PrefixCache, Work
from lm_eval_cola.executor.decoding import ROWS_PER_STEP, BatchedDecoding, Generation
from lm_eval_cola.fingerprint import (
    ModelIdentity,
    identify,
    is_sampled,
    reregister_hint,
    sampled_fingerprint,
)
from lm_eval_cola.model_args import (
    ModelArgsError,
    check_names,
    depth_from_config,
    open_chains,
    parse,
    validate_chains,
)
from lm_eval_cola.packing import PackedBatch, PackedRow, pack
from lm_eval_cola.sources import ChainSourceError, document_keys

logger = logging.getLogger("lm_eval.cola")
#: Packed rows remembered per model, by their requests (a search packs each document once).
PACKED_ROWS_KEPT = 4096


@dataclass(frozen=True)
class RunOptions:
    """How :meth:`ColaLM.run_requests` computes.

    ``shared_context``: a document's loglikelihood requests run as one packed row, their shared
    context computed once, and rows of different chains share batches; off, requests run
    through HFLM's own code, one chain group at a time. ``prefix_cache``: packed rows, and each
    forward step of generation requests (prompt and decoding steps), resume from the deepest
    chain prefix already computed on the same tokens (a search's memory), with the results of
    a fresh run. ``one_batch``:
    all requests in one forward pass (per chain group where chains cannot mix), so a
    document sees the same batch whatever else runs: the search's documents in parallel.
    ``batch_invariant``: generation requests of every chain decode together, each row's
    tokens those it would get alone (with a prefix cache, resumed as above).
    ``share_calls``: packed rows share layer and LM-head calls, which reads each layer's
    weights once for all of them (faster, the search's way), but rounds each row's numbers as
    part of a larger product; off, each row is computed as if alone, bit for bit, whatever else
    is in its batch.
    """

    shared_context: bool = True
    prefix_cache: PrefixCache | None = None
    one_batch: bool = False
    share_calls: bool = False
    #: generation decodes in mixed-chain, batch-invariant batches (:mod:`..executor.decoding`)
    batch_invariant: bool = False


@dataclass
class RunResult:
    """lm-eval's outputs, one per request, and the work each document cost."""

    outputs: list
    work: dict[Hashable, Work]
    #: with a prefix cache, the keys of the decoding steps each document's generations ran,
    #: one per distinct token history (what a search's physical limit counts)
    decode_steps: dict[Hashable, list[str]] = dataclasses.field(default_factory=dict)


@dataclass
class _GenerationSteps:
    """Generations resume each forward step from ``cache``; ``keys`` names every decoding step
    they ran, in order (what a search's physical limit counts)."""

    cache: PrefixCache
    keys: list[str] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class _Dispatch:
    """What the requests being dispatched ask of HFLM's own loops, for a block's duration:
    a batch size, a world of one (chain groups run apart on each rank), and generation reuse.
    HFLM reads its batch size and world size through public properties, which consult it."""

    batch_size: int | None = None
    world_size: int | None = None
    steps: _GenerationSteps | None = None
    decoding: _MixedDecoding | None = None


@dataclass
class _MixedDecoding:
    """One wave of generation requests decoding together (``batch_invariant``): each prompt's
    chain and documents, the prompts of the batch HFLM is generating, and the generations of
    each batch HFLM asked for, with their documents. HFLM's ``generate_until`` runs twice: it
    encodes the prompts and asks for generations (``replay`` off: they are made, not decoded),
    and, once they are decoded, asks again and is handed their tokens (``replay`` on)."""

    chains: dict[str, Chain]
    documents: dict[str, list[Hashable]]
    batch: tuple[str, ...] = ()
    batches: list[tuple[list[Generation], list[Hashable]]] = dataclasses.field(default_factory=list)
    replay: bool = False


@dataclass(eq=False)
class Submission:
    """Generation requests handed to a :class:`GenerationStream` together (a document's, under
    its chain): their waves, and how many of their generations are still decoding."""

    requests: Sequence[Instance]
    documents: Sequence[Hashable] | None
    waves: list[tuple[list[int], _MixedDecoding]] = dataclasses.field(default_factory=list)
    pending: int = 0


class GenerationStream:
    """Generation requests of every chain decoding together as they come (the batch-invariant
    mode): requests submitted while others decode are prefilled in the others' decoding steps
    (:class:`BatchedDecoding`), so a search can start a document's next chain as soon as its
    last one is decoded, without waiting for the other documents'. HFLM's own
    ``generate_until`` encodes the prompts and turns the tokens into answers, so an answer is
    the one ``lm_eval`` gives."""

    def __init__(self, lm: ColaLM, cache: PrefixCache | None = None) -> None:
        self.lm = lm
        self.decoding = BatchedDecoding(lm.executor, lm._finished, cache, lm._rows_per_step())
        self._submissions: dict[Generation, Submission] = {}
        self._empty: list[Submission] = []

    def submit(
        self,
        requests: Sequence[Instance],
        chains: Sequence[Chain | None],
        documents: Sequence[Hashable] | None = None,
    ) -> Submission:
        """Queue ``requests`` (request ``i`` under ``chains[i]``; ``documents`` names each one's
        document, for the work counts); a later :meth:`step` reports them decoded."""
        refuse_sampling(requests)
        identity = Chain.identity(self.lm.executor.n_layers)
        submission = Submission(requests, documents)
        for wave in _waves(requests, chains):
            decoding = _MixedDecoding({}, {})
            for index in wave:
                context = requests[index].args[0]
                decoding.chains[context] = chains[index] or identity
                owner = documents[index] if documents is not None else None
                decoding.documents.setdefault(context, []).append(owner)
            with (
                _dispatching(decoding=decoding, batch_size=len(wave), world_size=1),
                self.lm.quiet_cache(),
            ):
                HFLM.generate_until(self.lm, [requests[i] for i in wave], disable_tqdm=True)
            submission.waves.append((wave, decoding))
            for generations, _ in decoding.batches:
                self.decoding.submit(generations)
                self._submissions |= dict.fromkeys(generations, submission)
                submission.pending += len(generations)
        if not submission.pending:
            self._empty.append(submission)
        return submission

    @property
    def busy(self) -> bool:
        """Whether any submission is still decoding."""
        return bool(self.decoding.unfinished or self._empty)

    @property
    def room(self) -> int:
        """Generations a submission now would add without making any wait for a row."""
        return self.decoding.room

    def step(self) -> list[Submission]:
        """One forward step (:meth:`BatchedDecoding.step`); returns the submissions it
        finished."""
        finished, self._empty = self._empty, []
        for generation in self.decoding.step() if self.decoding.unfinished else ():
            submission = self._submissions.pop(generation)
            submission.pending -= 1
            if not submission.pending:
                finished.append(submission)
        return finished

    def result(self, submission: Submission, disable_tqdm: bool = True) -> RunResult:
        """A decoded submission's answers, and its documents' work and decoding steps."""
        documents = submission.documents
        result = RunResult([None] * len(submission.requests), {d: Work() for d in documents or ()})
        for wave, decoding in submission.waves:
            for generations, owners in decoding.batches:
                for generation, owner in zip(generations, owners, strict=True):
                    if owner is not None:
                        result.work[owner] = result.work[owner] + generation.work
                        result.decode_steps.setdefault(owner, []).extend(generation.step_keys)
            replay = dataclasses.replace(decoding, batches=list(decoding.batches), replay=True)
            with _dispatching(decoding=replay, batch_size=len(wave), world_size=1):
                found = HFLM.generate_until(
                    self.lm, [submission.requests[i] for i in wave], disable_tqdm
                )
            for index, output in zip(wave, found, strict=True):
                result.outputs[index] = output
        return result


#: The dispatch in force (a frozen value: safe as the default)
_DISPATCH: ContextVar[_Dispatch] = ContextVar("cola_dispatch", default=_Dispatch())  # noqa: B039


@contextlib.contextmanager
def _dispatching(**changes) -> Iterator[_Dispatch]:
    """Within the block, requests are dispatched with ``changes`` (:class:`_Dispatch`)."""
    token = _DISPATCH.set(dataclasses.replace(_DISPATCH.get(), **changes))
    try:
        yield _DISPATCH.get()
    finally:
        _DISPATCH.reset(token)


class ChainLM(Protocol):
    """What search, controls and predictors need of the model: a ``cola`` backend
    (:class:`ColaLM` is the one implementation; tests may stand in their own)."""

    executor: ChainExecutor
    identity: ModelIdentity
    device: torch.device

    #: :meth:`ColaLM.run_requests`
    run_requests: Callable[..., RunResult]

    def generation_stream(self, cache: PrefixCache | None = None) -> GenerationStream: ...

    def packed_row(self, pairs: list[tuple[str, str]]) -> PackedRow: ...

    def tok_encode(self, string: str, **kwargs) -> list[int]: ...


class MissingChainError(ChainSourceError):
    """``strict_chains=True`` and a document has no chain in the source."""


@register_model("cola")
class ColaLM(HFLM):
    """HFLM whose decoder layers run as a chain, one for all documents or one per document.

    Model args added to HFLM's: ``chain`` (one chain, e.g. ``0-11.11-29``), ``chains`` (a
    per-document source, e.g. ``chains.jsonl``), ``strict_chains`` (a document missing from
    the source is an error instead of running ``chain``, or the full model), and
    ``max_chain_length`` (default: 4 x the model's depth), ``shared_context`` (a
    document's loglikelihood requests as one packed row; default: on with ``chains``), and
    ``batch_invariant`` (generation decodes greedily in mixed-chain batches, as searches do;
    default: the mode a ``chains=store:`` source was searched in, else off). Without
    ``pretrained`` the embedded SmolLM2-135M-Instruct is used.
    """

    def __init__(
        self,
        pretrained: str | transformers.PreTrainedModel | None = None,
        chain: str | int | Sequence[int] | None = None,
        chains: str | None = None,
        strict_chains: bool = False,
        max_chain_length: int | None = None,
        shared_context: bool | None = None,
        batch_invariant: bool | None = None,
        **kwargs,
    ) -> None:
        check_names(kwargs)
        self.static_chain, self.source = open_chains(chain, chains)
        self.strict_chains = bool(strict_chains)
        self.max_chain_length = max_chain_length
        self.shared_context = self.source is not None if shared_context is None else shared_context
        self._rows: OrderedDict[tuple, PackedRow] = OrderedDict()
        self._auto_batch_size: int | None = None
        name = None
        if pretrained is None:
            from lm_eval_cola.default_model import DISPLAY_NAME, default_model_path

            pretrained, name = default_model_path(), DISPLAY_NAME
        if isinstance(pretrained, str):
            self._validate_chains(depth_from_config(pretrained, kwargs))
        super().__init__(pretrained=pretrained, **kwargs)
        self.executor = ChainExecutor(self.model)
        self.executor.check(self.device)
        name = name or (pretrained if isinstance(pretrained, str) else self.model.name_or_path)
        self.identity = identify(self.model, name, kwargs.get("revision"), self.executor.n_layers)
        if self.source is not None:
            self.source.bind(self.identity)
        self.batch_invariant = decoding_mode(batch_invariant, self.source)
        self._validate_chains(self.executor.n_layers)

    def _validate_chains(self, n_layers: int) -> None:
        """Every chain this run can use fits the model; raised before any compute."""
        validate_chains(self.static_chain, self.source, n_layers, self.max_chain_length)

    # -- the three request types, each run under the documents' chains ------------------------

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False):
        return self._run("loglikelihood", requests, disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False):
        return self._run("loglikelihood_rolling", requests, disable_tqdm)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False):
        return self._run("generate_until", requests, disable_tqdm)

    def _run(self, request_type: str, requests: list[Instance], disable_tqdm: bool) -> list:
        chains, documents = self._chains_for(requests)
        options = RunOptions(
            shared_context=self.shared_context, batch_invariant=self.batch_invariant
        )
        result = self.run_requests(request_type, requests, chains, options, documents, disable_tqdm)
        return result.outputs

    def run_requests(
        self,
        request_type: str,
        requests: Sequence[Instance],
        chains: Sequence[Chain | None],
        options: RunOptions | None = None,
        documents: Sequence[Hashable] | None = None,
        disable_tqdm: bool = True,
    ) -> RunResult:
        """Run lm-eval ``requests`` of one type, request ``i`` under ``chains[i]`` (``None``:
        the model unchanged), and return lm-eval's outputs with the work each document cost.

        ``documents`` names the document of each request, which packing and the work counts
        need (default: task and ``doc_hash`` for packing; without it the by-chain way counts no
        work). A document's requests must share a chain. The only way this package runs requests:
        ``--model cola``, the search and the predictors all come through here.
        """
        options = options or RunOptions()
        if request_type == "loglikelihood" and options.shared_context:
            documents = document_keys(requests) if documents is None else documents
            return self._packed_loglikelihood(requests, chains, documents, options, disable_tqdm)
        if request_type == "generate_until" and options.batch_invariant:
            return self._decoded_together(requests, chains, documents, options, disable_tqdm)
        steps = None
        if request_type == "generate_until" and options.prefix_cache is not None:
            steps = _GenerationSteps(options.prefix_cache)
        with _dispatching(steps=steps):
            return self._by_chain(request_type, requests, chains, documents, options, disable_tqdm)

    def _packed_loglikelihood(
        self,
        requests: Sequence[Instance],
        chains: Sequence[Chain | None],
        documents: Sequence[Hashable],
        options: RunOptions,
        disable_tqdm: bool,
    ) -> RunResult:
        """Each document's requests as one packed row (:mod:`lm_eval_cola.packing`), rows of
        different chains in one batch (:meth:`ChainExecutor.apply_rows`)."""
        members: dict[Hashable, list[int]] = {}
        for index, document in enumerate(documents):
            members.setdefault(document, []).append(index)
        chain_of = {doc: _one_chain(doc, [chains[i] for i in idx]) for doc, idx in members.items()}
        identity = Chain.identity(self.executor.n_layers)
        rows = {
            doc: self.packed_row([requests[i].args for i in idx]) for doc, idx in members.items()
        }
        outputs: list = [None] * len(requests)
        work: dict[Hashable, Work] = {}
        batches = self._row_batches(rows, chain_of, members, options.one_batch)
        for batch_docs in tqdm(
            batches,
            desc="Running loglikelihood requests, one packed row a document",
            disable=disable_tqdm or self.rank != 0,
        ):
            batch = PackedBatch([rows[doc] for doc in batch_docs], 0, self.device)
            batch_chains = [chain_of[doc] or identity for doc in batch_docs]
            with self.executor.apply_rows(
                batch, batch_chains, options.prefix_cache, options.share_calls
            ) as run:
                logprobs = self._packed_logprobs(batch, options.share_calls)
            for doc, answers, spent in zip(
                batch_docs, batch.scores(logprobs), run.work, strict=True
            ):
                work[doc] = spent
                for index, answer in zip(members[doc], answers, strict=True):
                    outputs[index] = answer
                    self.cache_hook.add_partial("loglikelihood", requests[index].args, answer)
        return RunResult(outputs, work)

    def _packed_logprobs(self, batch: PackedBatch, share_calls: bool) -> torch.Tensor:
        """Log-probabilities at the batch's read positions, rows one after another, as HFLM
        computes them. The LM head sees only those positions, gathered from the kept ones by
        hooks: in one call (``share_calls``) or in a call a row. What the model does after the
        head (soft-capping, scaling) is per logit, so it applies unchanged."""
        keep = {"logits_to_keep": batch.keep} if self.executor.keeps_logits else {}
        head = self.model.get_output_embeddings()
        read: list[torch.Tensor] = []

        def gather(_module, args):
            read.append(batch.gather(args[0])[None])
            return (read[0] if share_calls else read[0][:, :0],)

        def row_by_row(module, _args, output):
            if share_calls:
                return output
            spans = zip(batch.read_starts, batch.read_starts[1:], strict=False)
            return torch.cat([module.forward(read[0][:, a:b]) for a, b in spans], dim=1)

        handles = [
            head.register_forward_pre_hook(gather),
            head.register_forward_hook(row_by_row),
        ]
        try:
            with (
                torch.no_grad(),
                torch.autocast(
                    device_type=self.device.type,
                    dtype=self.mixed_precision_dtype,
                    enabled=self.mixed_precision_dtype is not None,
                ),
            ):
                logits = self.model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.mask(None, self.model.dtype),
                    position_ids=batch.position_ids,
                    use_cache=False,
                    **keep,
                ).logits
        finally:
            for handle in handles:
                handle.remove()
        return F.log_softmax(logits.flatten(0, -2), dim=-1, dtype=self.softmax_dtype)

    def packed_row(self, pairs: list[tuple[str, str]]) -> PackedRow:
        """The packed row of a document's requests, tokenized as HFLM tokenizes them
        (remembered: a search packs the same document once per chain it tries)."""
        key = tuple(pairs)
        row = self._rows.get(key)
        if row is None:
            row = pack([self._request_tokens(*pair) for pair in pairs], self.max_length)
            self._rows[key] = row
            if len(self._rows) > PACKED_ROWS_KEPT:
                self._rows.popitem(last=False)
        return row

    def _request_tokens(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's ``TemplateLM.loglikelihood`` tokenization: an empty context becomes the
        prefix token (BOS or EOS), unless the continuation already starts with it."""
        if context == "":
            tokens = self.tok_encode(continuation, add_special_tokens=False)
            if self.prefix_token_id != tokens[0]:
                return [self.prefix_token_id], tokens
            return tokens[:1], tokens[1:]
        return self._encode_pair(context, continuation)

    def _row_batches(
        self,
        rows: dict[Hashable, PackedRow],
        chain_of: dict[Hashable, Chain | None],
        members: dict[Hashable, list[int]],
        one_batch: bool,
    ) -> list[list[Hashable]]:
        """Documents in batches: rows whose chains can share a forward pass (one layer-type
        signature), longest first, up to the batch size in requests; all in one with
        ``one_batch``."""
        identity = Chain.identity(self.executor.n_layers)
        groups: dict[tuple, list[Hashable]] = {}
        for doc, chain in chain_of.items():
            groups.setdefault(self.executor.signature(chain or identity), []).append(doc)
        if one_batch:
            return list(groups.values())
        size, batches = self._requests_per_batch(), []
        for docs in groups.values():
            current, count = [], 0
            for doc in sorted(docs, key=lambda d: -len(rows[d])):
                if current and count + len(members[doc]) > size:
                    batches.append(current)
                    current, count = [], 0
                current.append(doc)
                count += len(members[doc])
            batches.append(current)
        return batches

    def _requests_per_batch(self) -> int:
        if self.batch_size == "auto":
            if self._auto_batch_size is None:
                self._auto_batch_size = self._detect_batch_size()
            return self._auto_batch_size
        return int(self.batch_size)

    @property
    def batch_size(self):
        """HFLM's batch size, unless the requests being dispatched set one (:class:`_Dispatch`)."""
        return _DISPATCH.get().batch_size or super().batch_size

    @property
    def world_size(self):
        """HFLM's world size, unless the requests being dispatched run as a world of one."""
        world = _DISPATCH.get().world_size
        return super().world_size if world is None else world

    def _by_chain(
        self,
        request_type: str,
        requests: Sequence[Instance],
        chains: Sequence[Chain | None],
        documents: Sequence[Hashable] | None,
        options: RunOptions,
        disable_tqdm: bool,
    ) -> RunResult:
        """HFLM's own method once per chain group, results back in request order. Work is
        shared among a group's documents by their number of requests."""
        method = getattr(super(), request_type)  # HFLM's own, bound to this model
        groups: dict[str, list[int]] = {}
        for index, chain in enumerate(chains):
            groups.setdefault(_key(chain), []).append(index)
        keys = self._keys_on_all_ranks(groups)
        result = RunResult([None] * len(requests), {doc: Work() for doc in documents or ()})
        if len(keys) <= 1 and not options.one_batch:  # exactly HFLM's path, collectives included
            with (
                self._accounted(documents, result),
                self.executor.apply(chains[0] if chains else None),
            ):
                result.outputs = method(list(requests), disable_tqdm=disable_tqdm)
            return result
        progress = tqdm(
            keys,
            desc=f"Running {request_type} requests by chain",
            disable=disable_tqdm or self.rank != 0,
        )
        with self._independent_groups():
            for key in progress:
                indices = groups.get(key, [])
                if not indices:
                    continue
                group = [documents[i] for i in indices] if documents is not None else None
                with (
                    self._accounted(group, result),
                    self.executor.apply(chains[indices[0]]),
                    _dispatching(**_one_batch(len(indices), options.one_batch)),
                ):
                    found = method([requests[i] for i in indices], disable_tqdm=True)
                for index, output in zip(indices, found, strict=True):
                    result.outputs[index] = output
        return result

    @contextlib.contextmanager
    def _accounted(self, documents: Sequence[Hashable] | None, result: RunResult) -> Iterator[None]:
        """What the block spends, shared among the documents of its requests (a share per
        request), and the decoding steps it runs, noted for each of them."""
        steps = _DISPATCH.get().steps
        before = dataclasses.replace(self.executor.work)
        first_step = len(steps.keys) if steps else 0
        yield
        _share(self.executor.work - before, documents, result.work)
        if steps is None:
            return
        for document in set(documents or ()):
            result.decode_steps.setdefault(document, []).extend(steps.keys[first_step:])

    def _decoded_together(
        self,
        requests: Sequence[Instance],
        chains: Sequence[Chain | None],
        documents: Sequence[Hashable] | None,
        options: RunOptions,
        disable_tqdm: bool,
    ) -> RunResult:
        """Generation requests of every chain decoded together (:class:`GenerationStream`)."""
        stream = self.generation_stream(options.prefix_cache)
        submission = stream.submit(requests, chains, documents)
        generations = stream.decoding.unfinished
        with tqdm(
            total=generations, desc="Decoding", disable=self.rank != 0 or generations < 64
        ) as bar:
            while stream.busy:
                stream.step()
                bar.update(generations - stream.decoding.unfinished - bar.n)
        return stream.result(submission, disable_tqdm)

    def generation_stream(self, cache: PrefixCache | None = None) -> GenerationStream:
        """Generation requests decoding together as they come (:class:`GenerationStream`)."""
        return GenerationStream(self, cache)

    @contextlib.contextmanager
    def quiet_cache(self) -> Iterator[None]:
        """Within the block, lm-eval's request cache hears nothing (HFLM's first pass of a
        :class:`GenerationStream` answers every request with nothing yet)."""
        saved, self.cache_hook = self.cache_hook, CacheHook(None)
        try:
            yield
        finally:
            self.cache_hook = saved

    def tok_batch_encode(self, strings: list[str], *args, **kwargs):
        """HFLM's; generation requests decoding together note which prompts the batch holds
        (HFLM generates the batch it has just encoded)."""
        decoding = _DISPATCH.get().decoding
        if decoding is not None:
            decoding.batch = tuple(strings)
        return super().tok_batch_encode(strings, *args, **kwargs)

    def _decode_batch(
        self, decoding: _MixedDecoding, context: torch.Tensor, mask: torch.Tensor | None,
        max_length: int, stop: list[str],
    ) -> torch.Tensor:  # fmt: skip
        """HFLM's batch of prompts (left-padded), each to decode under its own chain: on the
        first pass, its generations are made (and the prompts returned, nothing generated
        yet); on the replay, their tokens returned as ``generate`` returns them: prompts,
        then the tokens, padded."""
        if decoding.replay:
            generations, _ = decoding.batches.pop(0)
            return self._generated(context, generations)
        width = context.shape[1]
        generations, owners = [], []
        for row, text in enumerate(decoding.batch):
            prompt = context[row] if mask is None else context[row][mask[row].bool()]
            generations.append(
                Generation(prompt.tolist(), decoding.chains[text], max_length - width, stop=stop)
            )
            owners.append(decoding.documents[text].pop(0))
        decoding.batches.append((generations, owners))
        return context

    def _generated(self, context: torch.Tensor, generations: list[Generation]) -> torch.Tensor:
        width = context.shape[1]
        longest = max(len(g.tokens) for g in generations)
        output = torch.full((len(generations), width + longest), self.tokenizer.pad_token_id)
        output[:, :width] = context
        for row, generation in enumerate(generations):
            output[row, width : width + len(generation.tokens)] = torch.tensor(generation.tokens)
        return output

    def _finished(self, generation: Generation) -> bool:
        """Whether a generation is done: its last token is an EOS of the model's generation
        config, or its text holds one of its stop sequences (as lm-eval's stopping criteria
        read it)."""
        eos = self.model.generation_config.eos_token_id
        if generation.tokens[-1] in (eos if isinstance(eos, list) else [eos]):
            return True
        text = self.tok_decode(generation.tokens, skip_special_tokens=False)
        return any(sequence in text for sequence in generation.stop)

    def _rows_per_step(self) -> int:
        """Generations decoded together: the batch size when it is a number above the default."""
        size = super().batch_size
        return max(int(size), ROWS_PER_STEP) if str(size).isdigit() else ROWS_PER_STEP

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        """HFLM's generation; with a prefix cache (dispatched by :meth:`run_requests`) under a
        chain, each forward step (the prompt's prefill, then each decoding step) resumes from
        the deepest prefix of the chain computed on the same tokens
        (:meth:`ChainExecutor.reuse_generation`), and the result is that of a fresh run."""
        dispatch = _DISPATCH.get()
        if dispatch.decoding is not None:
            mask = generation_kwargs.get("attention_mask")
            return self._decode_batch(dispatch.decoding, context, mask, max_length, stop)
        steps = dispatch.steps
        if steps is None or self.executor.chain is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        key = _prompt_key(context, generation_kwargs.get("attention_mask"))
        with self.executor.reuse_generation(steps.cache, key) as reuse:
            output = super()._model_generate(context, max_length, stop, **generation_kwargs)
        steps.keys += reuse.decode_keys
        return output

    def _chains_for(
        self, requests: list[Instance]
    ) -> tuple[list[Chain | None], list[Hashable] | None]:
        """The chain of each request (``None`` runs the model unchanged) and its document
        (hashed only where a source needs it)."""
        if self.source is None:
            return [self.static_chain] * len(requests), None
        documents = document_keys(requests)
        grouped: dict[Hashable, list[Instance]] = {}
        for request, document in zip(requests, documents, strict=True):
            grouped.setdefault(document, []).append(request)
        self.source.prepare(grouped, self)
        found = {key: self.source.lookup(*key) for key in grouped}
        self._report_missing({key for key, chain in found.items() if chain is None}, len(found))
        chains = [found[key] if found[key] is not None else self.static_chain for key in documents]
        return chains, documents

    def _report_missing(self, missing: set[tuple[str, str]], n_docs: int) -> None:
        if not missing:
            logger.info("%s: chains found for all %d documents", self.source, n_docs)
            return
        task, hashed = sorted(missing)[0]
        if self.strict_chains:
            raise MissingChainError(
                f"{self.source} has no chain for {len(missing)} of {n_docs} documents "
                f"(first: task '{task}', doc_hash {hashed}); add them, or drop strict_chains "
                "to run those documents with the default chain"
            )
        fallback = f"chain '{self.static_chain}'" if self.static_chain else "the full model"
        logger.warning(
            "%s has no chain for %d of %d documents; they run %s",
            self.source,
            len(missing),
            n_docs,
            fallback,
        )

    def _keys_on_all_ranks(self, groups: dict[str, list[int]]) -> list[str]:
        """The sorted union of chain groups over data-parallel ranks, so all ranks agree."""
        local = sorted(groups)
        if self.world_size <= 1:
            return local
        gathered: list[list[str] | None] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, local)
        return sorted({key for keys in gathered for key in keys or []})

    @contextlib.contextmanager
    def _independent_groups(self) -> Iterator[None]:
        """Let each chain group run as a single process with a fixed batch size.

        HFLM's auto batch size and rolling-window padding issue collective calls. Ranks may hold
        different groups, so inside groups no collective may run: an ``auto`` batch size is
        detected once here (on every rank), and each group sees a world of one.
        """
        size = None
        if self.batch_size == "auto":
            size = self._detect_batch_size()
            logger.info("Batch size for all chain groups: %d", size)
        with _dispatching(batch_size=size, world_size=1):
            yield

    # -- lm-eval's --use_cache -------------------------------------------------------------------

    def set_cache_hook(self, cache_hook) -> None:
        """Keep ``--use_cache`` results of this model and these chains apart from all others.

        lm-eval keys its request cache on the request text alone. When the cache is on, this
        moves it into a table named for the weights fingerprint and the chain configuration,
        so a cached result is only ever reused by the same model running the same chains.
        """
        dbdict = getattr(cache_hook, "dbdict", None)
        if dbdict is not None:
            table = f"cola_{self.cache_namespace()}"
            self._warn_of_sampled_cache(dbdict, table)
            dbdict.conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{table}" (key TEXT PRIMARY KEY, value BLOB)'
            )
            dbdict.conn.commit()
            dbdict.tablename = table
            logger.info("Request cache table for this model and chain set: %s", table)
        super().set_cache_hook(cache_hook)

    def cache_namespace(self, fingerprint: str | None = None) -> str:
        """The request-cache table's name for these weights and chains; ``fingerprint``
        replaces the weights' own, to find tables written under another scheme."""
        fingerprint = fingerprint or self.identity.fingerprint
        identity = {
            "model": fingerprint,
            "chain": str(self.static_chain) if self.static_chain else None,
            "chains": self.source.fingerprint() if self.source else None,
            "strict": self.strict_chains,
        }
        if not is_sampled(fingerprint):  # tables of the sampled scheme predate the option
            identity["shared_context"] = self.shared_context
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]

    def reregister_cache(self, path: str, sampled: str) -> str:
        """Rename the request-cache file's table of these weights and chains, written under the
        weights' ``sampled`` fingerprint (an earlier release's scheme), to today's name for it;
        returns what it did, in words."""
        old, new = f"cola_{self.cache_namespace(sampled)}", f"cola_{self.cache_namespace()}"
        with contextlib.closing(sqlite3.connect(path)) as connection, connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
            if old not in tables:
                return f"cache '{path}': no table of these weights and chains under the old name"
            if new in tables:
                return f"cache '{path}': {new} exists already; {old} is left as it is"
            connection.execute(f'ALTER TABLE "{old}" RENAME TO "{new}"')
        return f"cache '{path}': table {old} renamed {new}"

    def _warn_of_sampled_cache(self, dbdict, table: str) -> None:
        """Say so when this cache holds these weights' results under the sampled scheme."""
        old = f"cola_{self.cache_namespace(sampled_fingerprint(self.model))}"
        query = "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?"
        if dbdict.conn.select_one(query, (old,)) and not dbdict.conn.select_one(query, (table,)):
            hint = reregister_hint(f"--use_cache {dbdict.filename}")
            logger.warning(
                "the request cache %s holds results of this run under table %s, which are not "
                "reused: %s", dbdict.filename, old, hint,
            )  # fmt: skip


def default_device() -> str:
    """Where a model goes when no ``--device`` is given: CUDA when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(model_args: str = "", device: str | None = None) -> ColaLM:
    """A ``cola`` model for the project's own commands (search, predict): ``model_args`` as in
    ``--model_args``, on ``device`` (default: CUDA when there is one, else the CPU). A search
    sets each scoring pass's batch itself; a ``batch_size`` above ``ROWS_PER_STEP`` widens a
    generation search's decoding steps (a GPU's calls cost about the same for many more rows)."""
    device = device or default_device()
    try:  # the model args are checked in ColaLM.__init__ before the weights load
        args = {"batch_size": 1, **parse(model_args)}
        return ColaLM.create_from_arg_obj(args, {"device": device})
    except OSError as err:  # weights or tokenizer files that cannot be read
        raise ModelArgsError(f"the model cannot be loaded: {one_line(err)}") from err


def decoding_mode(batch_invariant: bool | None, source) -> bool:
    """``batch_invariant`` as given, else the mode the chain source's chains were searched in
    (a stored oracle re-evaluates as it was found); a contradiction is refused."""
    searched = getattr(source, "batch_invariant", None)
    if batch_invariant is None:
        return bool(searched)
    if searched is not None and bool(batch_invariant) != searched:
        mode = "batch-invariant" if searched else "HF's own"
        raise ModelArgsError(
            f"batch_invariant={batch_invariant}: the chains of {source} were searched with "
            f"{mode} decoding and re-evaluate only that way; drop batch_invariant"
        )
    return bool(batch_invariant)


def refuse_sampling(requests: Sequence[Instance]) -> None:
    """Batch-invariant decoding is greedy: a request that samples is refused before any compute."""
    for request in requests:
        kwargs = request.args[1] if len(request.args) > 1 else {}
        sampled = (
            float(kwargs.get("temperature") or 0.0) > 0 and kwargs.get("do_sample") is not False
        )
        if kwargs.get("do_sample") or sampled:
            raise ModelArgsError(
                f"task {request.task_name}: its generation samples ({kwargs}), and "
                "batch_invariant decodes greedily; drop batch_invariant for sampled tasks"
            )


def _waves(requests: Sequence[Instance], chains: Sequence[Chain | None]) -> list[list[int]]:
    """Request indices in waves within which a prompt has one chain (HFLM's batch names
    its rows by prompt), in request order."""
    waves: list[tuple[dict[str, Chain | None], list[int]]] = []
    for index, (request, chain) in enumerate(zip(requests, chains, strict=True)):
        context = request.args[0]
        wave = next((w for w in waves if w[0].get(context, chain) == chain), None)
        if wave is None:
            wave = ({}, [])
            waves.append(wave)
        wave[0][context] = chain
        wave[1].append(index)
    return [indices for _, indices in waves]


def _prompt_key(context: torch.Tensor, attention_mask: torch.Tensor | None) -> str:
    """Names a generation batch's prompt tokens and padding, for the prefix cache."""
    digest = xxhash.xxh3_128()
    for tensor in (context, attention_mask):
        if tensor is not None:
            digest.update(repr(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().numpy().tobytes())
    return f"generate:{digest.hexdigest()}"


def _one_batch(requests: int, wanted: bool) -> dict[str, int]:
    """A chain group's dispatch: all its requests in one batch when ``wanted``, so every
    chain sees the same batch; else the batch size in force."""
    return {"batch_size": max(requests, 1)} if wanted else {}


def _key(chain: Chain | None) -> str:
    return "" if chain is None else str(chain)


def _one_chain(document: Hashable, chains: list[Chain | None]) -> Chain | None:
    if len(set(chains)) > 1:
        raise ValueError(f"document {document} has requests under different chains")
    return chains[0]


def _share(spent: Work, documents: Sequence[Hashable] | None, work: dict[Hashable, Work]) -> None:
    """Add ``spent`` to the documents of the requests that spent it, a share per request."""
    if not documents:
        return
    for field in dataclasses.fields(Work):
        share, rest = divmod(getattr(spent, field.name), len(documents))
        for position, document in enumerate(documents):
            total = getattr(work[document], field.name) + share + (position < rest)
            setattr(work[document], field.name, total)
