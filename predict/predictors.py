"""Predictors: choose a document's chain from its prompt alone, trained on searched chains.

Most predictors pick one of the training set's candidate chains (the identity is always one),
so they only ever run chains that were measured on the training documents:

- ``static``: the one candidate with the best mean score over the training documents, for
  every document (a searched, fixed pruning or looping of the model; needs no features);
- ``knn``: the candidate with the best similarity-weighted mean score over the ``k`` training
  documents whose mean-pooled prompt states are nearest (cosine, after centring);
- ``network``: in the spirit of PoLar, learnable candidate queries cross-attend to the
  projected prompt states, a small transformer mixes them, and a linear head scores each
  candidate; trained with torch to predict which candidates answer correctly (binary
  cross-entropy), keeping the epoch with the best loss on held-out training documents.

``router`` (:mod:`lm_eval_cola.predict.router`) is Dr.LLM's: per-layer routers that build the
chain while the prompt runs.

``program`` is PoLar's own head: one query per layer, the same network, and two outputs per
layer, whether a segment starts there and the segment's operation (skip, keep, repeat once;
see :mod:`programs`). Trained on the correct candidates that are programs, it composes chains
no training document ran.

A new predictor is one class with ``fit`` and ``predict``, registered with
:func:`register_predictor`. Every predictor is saved as one torch file (tensors and plain
types only, loaded with ``weights_only=True``) that records the model, task, split, feature
settings and the content hashes of its training documents.
"""

from __future__ import annotations

import functools
import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from tqdm import tqdm

from lm_eval_cola.chain import Chain
from lm_eval_cola.errors import ColaError
from lm_eval_cola.fingerprint import ModelIdentity
from lm_eval_cola.predict import PREDICTORS
from lm_eval_cola.predict.features import FeatureSpec, pooled
from lm_eval_cola.predict.programs import MAX_SEGMENT, OPERATIONS, decode, longest, parse
from lm_eval_cola.predict.training_set import TrainingDataError, TrainingSet

if TYPE_CHECKING:
    from lm_eval_cola.lm import ChainLM

FORMAT_VERSION = 1


@dataclass
class PredictorInfo:
    """What a predictor was trained for and on: saved with it and checked when it is used."""

    kind: str
    model: dict[str, Any]  # ModelIdentity fields
    task: str
    split: str | None
    metric: str | None
    candidates: list[str]
    static_chain: str  # the best static chain on the training documents: the baseline
    features: dict[str, int]  # FeatureSpec fields
    training_hashes: list[str]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(**self.features)


class Predictor(ABC):
    """Predicts a document's chain from its prompt states."""

    kind: ClassVar[str]
    #: False for predictors that ignore the prompt (no hidden states are computed for them).
    reads_prompt: ClassVar[bool] = True
    #: True for predictors that learn each document's target path (``TrainingSet.routes``),
    #: which costs a routed forward pass per training document to build.
    reads_routes: ClassVar[bool] = False

    def __init__(self, info: PredictorInfo) -> None:
        self.info = info
        self.candidates = [Chain.parse(c) for c in info.candidates]

    @classmethod
    @abstractmethod
    def fit(cls, data: TrainingSet, info: PredictorInfo, **options) -> Predictor:
        """Train on ``data``; ``info`` is filled in except for ``kind`` and ``options``."""

    @abstractmethod
    def predict(self, states: torch.Tensor | None) -> Chain:
        """The chain for a document with these prompt states."""

    def own_layers(self, lm: ChainLM, prompt: str) -> float:
        """What choosing a document's chain costs, in decoder-layer applications over the
        prompt: the layers its prompt states take."""
        return self.info.spec.layer if self.reads_prompt else 0

    def chains_for(
        self, lm: ChainLM, prompt: str, states: torch.Tensor | None, k: int = 1
    ) -> list[Chain]:
        """Its ``k`` best chains for a document (its prompt, and its prompt states when it
        reads them), best first: the first is its prediction. Predictors that do not rank
        chains give that one (an evaluation's oracle@k reads the rest)."""
        return [self.predict(states)]

    @abstractmethod
    def bounds(self) -> Iterator[Chain]:
        """Chains that every chain it predicts is within: checked against the model before
        any compute (a chain too long or of a layer the model lacks is refused then)."""

    @abstractmethod
    def tensors(self) -> dict[str, Any]:
        """What :meth:`restore` needs, as tensors and plain types."""

    @abstractmethod
    def restore(self, saved: dict[str, Any]) -> None:
        """Inverse of :meth:`tensors`."""


class CandidatePredictor(Predictor):
    """Chooses one of ``info.candidates``."""

    @abstractmethod
    def choose(self, states: torch.Tensor | None) -> int:
        """The index of the candidate for a document with these prompt states."""

    def ranking(self, states: torch.Tensor | None) -> list[int]:
        """Candidate indices best first: only the chosen one, unless the predictor ranks."""
        return [self.choose(states)]

    def predict(self, states: torch.Tensor | None) -> Chain:
        return self.candidates[self.choose(states)]

    def chains_for(
        self, lm: ChainLM, prompt: str, states: torch.Tensor | None, k: int = 1
    ) -> list[Chain]:
        return [self.candidates[i] for i in self.ranking(states)[:k]]

    def bounds(self) -> Iterator[Chain]:
        yield from self.candidates


def register_predictor(cls: type[Predictor]) -> type[Predictor]:
    """Class decorator: make ``--kinds KIND`` (the class's ``kind``) train this predictor."""
    return PREDICTORS.register(cls.kind)(cls)


def train(kind: str, data: TrainingSet, model: ModelIdentity, **options) -> Predictor:
    """Fit the predictor ``kind`` on ``data`` for ``model``."""
    predictor = PREDICTORS.get(kind)
    if (predictor.reads_prompt and data.states is None) or (
        predictor.reads_routes and data.routes is None
    ):
        raise TrainingDataError(
            f"'{kind}' reads what this training set was built without (prompt states or "
            f"router paths); build it with '{kind}' among its kinds"
        )
    info = PredictorInfo(
        kind=kind,
        model=asdict(model),
        task=data.task,
        split=data.split,
        metric=data.metric,
        candidates=[str(c) for c in data.candidates],
        static_chain=str(data.candidates[best_static(data)]),
        features=data.spec.as_dict(),
        training_hashes=list(data.doc_hashes),
        options=options,
    )
    return predictor.fit(data, info, **options)


def within_depth(kind: str, data: TrainingSet, max_depth: float, n_layers: int) -> TrainingSet:
    """What a ``kind`` predictor held to ``max_depth`` of the model's layers may choose from:
    the candidates that, with the layers its prompt states take, run at most that many."""
    predictor = PREDICTORS.get(kind)
    if not issubclass(predictor, CandidatePredictor):
        raise ValueError(
            f"a depth budget bounds the predictors that choose among candidates; '{kind}' "
            "composes its own chains"
        )
    own = data.spec.layer if predictor.reads_prompt else 0
    budget = math.floor(max_depth * n_layers + 1e-9)
    if own and budget - own < min(map(len, data.candidates)):
        raise ValueError(
            f"'{kind}' reads {own} layers of prompt states, which leaves {budget - own} of the "
            f"{budget} layers that {max_depth:.0%} of the model allows, fewer than any candidate"
        )
    return data.within(budget - own)


def best_static(data: TrainingSet) -> int:
    """The candidate with the best mean score; the shorter one among equals."""
    means = data.scores.mean(dim=0).tolist()
    return max(range(len(means)), key=lambda j: (means[j], -len(data.candidates[j]), -j))


def save(predictor: Predictor, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "info": asdict(predictor.info),
        "tensors": predictor.tensors(),
    }
    torch.save(payload, path)
    return path


class PredictorFileError(ColaError, ValueError):
    """A predictor file that cannot be read; the message names it and the fix."""


def load(path: str | Path) -> Predictor:
    path = Path(path)
    if not path.is_file():
        raise PredictorFileError(f"predictor file '{path}' does not exist; see cola predict train")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        info = PredictorInfo(**payload["info"])
    except Exception as err:  # any unreadable file is the same problem for the user
        raise PredictorFileError(
            f"'{path}' is not a predictor saved by cola predict train ({err})"
        ) from None
    if payload.get("format") != FORMAT_VERSION or info.kind not in PREDICTORS:
        raise PredictorFileError(
            f"'{path}' holds predictor '{info.kind}' in format {payload.get('format')}; this "
            f"release reads format {FORMAT_VERSION} ({', '.join(PREDICTORS)}); train it again"
        )
    predictor = PREDICTORS.get(info.kind)(info)
    predictor.restore(payload["tensors"])
    return predictor


def reregister(path: str | Path, sampled: str, identity: ModelIdentity) -> str:
    """Move the predictor file trained under its model's ``sampled`` fingerprint (an earlier
    release's scheme) to ``identity``'s; returns what it did, in words."""
    predictor = load(path)
    trained = predictor.info.model["fingerprint"]
    if trained == identity.fingerprint:
        return f"predictor '{path}': already registered for these weights"
    if trained != sampled:
        raise ValueError(
            f"predictor '{path}' was trained for other weights (fingerprint {trained[:17]}); "
            "give the model args of the model it was trained for"
        )
    predictor.info.model["fingerprint"] = identity.fingerprint
    save(predictor, path)
    return f"predictor '{path}': re-registered for {identity.name}"


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- the predictors ------------------------------------------------------------------------------


@register_predictor
class StaticPredictor(CandidatePredictor):
    kind = "static"
    reads_prompt = False

    @classmethod
    def fit(cls, data: TrainingSet, info: PredictorInfo, **options) -> StaticPredictor:
        return cls(info)

    def choose(self, states: torch.Tensor | None) -> int:
        return self.info.candidates.index(self.info.static_chain)

    def tensors(self) -> dict[str, Any]:
        return {}

    def restore(self, saved: dict[str, Any]) -> None:
        pass


@register_predictor
class NeighboursPredictor(CandidatePredictor):
    kind = "knn"

    def __init__(self, info: PredictorInfo) -> None:
        super().__init__(info)
        self.k = int(info.options.get("k", 5))
        self.centre = self.keys = self.scores = torch.empty(0)

    @classmethod
    def fit(cls, data: TrainingSet, info: PredictorInfo, k: int = 5) -> NeighboursPredictor:
        info.options = {"k": k}
        predictor = cls(info)
        means = torch.stack([pooled(s) for s in data.states])
        # Centred: a few huge hidden dimensions would otherwise make every prompt look alike.
        predictor.centre = means.mean(dim=0)
        predictor.keys = nn.functional.normalize(means - predictor.centre, dim=1)
        predictor.scores = data.scores.clone()
        return predictor

    def choose(self, states: torch.Tensor | None) -> int:
        return self.ranking(states)[0]

    def ranking(self, states: torch.Tensor | None) -> list[int]:
        query = nn.functional.normalize(pooled(states) - self.centre, dim=0)
        weights, nearest = (self.keys @ query).topk(min(self.k, len(self.keys)))
        weights = weights.clamp_min(0) + 1e-6
        value = (weights[:, None] * self.scores[nearest]).sum(0) / weights.sum()
        prior = self.scores.mean(dim=0)  # among equals: the better chain overall, then shorter

        def rank(j: int) -> tuple:
            return round(value[j].item(), 9), prior[j].item(), -len(self.candidates[j])

        # a stable sort: among equal ranks, the first candidate, as ``max`` would choose
        return sorted(range(len(self.candidates)), key=rank, reverse=True)

    def tensors(self) -> dict[str, Any]:
        return {"centre": self.centre, "keys": self.keys, "scores": self.scores}

    def restore(self, saved: dict[str, Any]) -> None:
        self.centre, self.keys, self.scores = saved["centre"], saved["keys"], saved["scores"]


class QueryNetwork(nn.Module):
    """Learnable queries (one per candidate, or per layer) cross-attend to the prompt states,
    a small transformer mixes them, and a linear head gives ``outputs`` logits per query."""

    def __init__(
        self, hidden: int, n_queries: int, width: int = 64, heads: int = 4, outputs: int = 1
    ) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, width))
        self.queries = nn.Parameter(torch.randn(n_queries, width) * 0.02)
        self.attend = nn.MultiheadAttention(width, heads, batch_first=True)
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.1, batch_first=True, norm_first=True
        )
        self.mix = nn.TransformerEncoder(block, 1, enable_nested_tensor=False)
        self.head = nn.Linear(width, outputs)

    def forward(self, states: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, hidden) states, (batch, tokens) True-at-padding -> (batch, queries,
        outputs)."""
        keys = self.project(states)
        queries = self.queries.expand(states.shape[0], -1, -1)
        attended, _ = self.attend(queries, keys, keys, key_padding_mask=padding)
        return self.head(self.mix(queries + attended))


def _batch(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(s.shape[0] for s in states)
    padded = torch.zeros(len(states), longest, states[0].shape[1])
    padding = torch.ones(len(states), longest, dtype=torch.bool)
    for i, s in enumerate(states):
        padded[i, : s.shape[0]] = s
        padding[i, : s.shape[0]] = False
    return padded, padding


@dataclass(frozen=True)
class TrainingOptions:
    """How the networks train (AdamW, minibatches of documents, early stopping)."""

    width: int = 64
    epochs: int = 40
    lr: float = 1e-3
    batch_size: int = 32
    held_out: float = 0.2  # share of training documents whose loss picks the epoch
    seed: int = 0


def fit_network(
    build: Callable[[], nn.Module],
    n_documents: int,
    loss_on: Callable[[nn.Module, list[int]], torch.Tensor],
    options: TrainingOptions,
) -> nn.Module:
    """A network built and trained (seeded, so training is repeatable) on minibatches of
    documents, as of the epoch with the best loss on the held-out documents."""
    generator = torch.Generator().manual_seed(options.seed)
    torch.manual_seed(options.seed)
    network = build()
    order = torch.randperm(n_documents, generator=generator).tolist()
    n_held = min(n_documents - 1, math.ceil(options.held_out * n_documents))
    held, fit_on = order[:n_held], order[n_held:]
    optimizer = torch.optim.AdamW(network.parameters(), lr=options.lr, weight_decay=0.01)
    best = (math.inf, {k: v.clone() for k, v in network.state_dict().items()})
    for _ in tqdm(range(options.epochs), desc="Training", unit="epoch", leave=False):
        network.train()
        shuffled = [fit_on[i] for i in torch.randperm(len(fit_on), generator=generator)]
        for start in range(0, len(shuffled), options.batch_size):
            optimizer.zero_grad()
            loss_on(network, shuffled[start : start + options.batch_size]).backward()
            optimizer.step()
        network.eval()
        with torch.no_grad():
            held_loss = loss_on(network, held or fit_on).item()
        if held_loss < best[0]:
            best = (held_loss, {k: v.clone() for k, v in network.state_dict().items()})
    network.load_state_dict(best[1])
    network.eval()
    return network


class NetworkBacked(Predictor):
    """A predictor whose state is one :class:`QueryNetwork`: saved and loaded the same way."""

    network: QueryNetwork

    @abstractmethod
    def network_shape(self, hidden: int) -> QueryNetwork:
        """A fresh network for prompt states of ``hidden`` dimensions."""

    @property
    def width(self) -> int:
        return int(self.info.options.get("width", TrainingOptions.width))

    def tensors(self) -> dict[str, Any]:
        hidden = self.network.project[0].normalized_shape[0]
        return {"hidden": hidden, "state": self.network.state_dict()}

    def restore(self, saved: dict[str, Any]) -> None:
        self.network = self.network_shape(int(saved["hidden"]))
        self.network.load_state_dict(saved["state"])
        self.network.eval()

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.network(*_batch([states]))[0]


@register_predictor
class NetworkPredictor(NetworkBacked, CandidatePredictor):
    kind = "network"

    def network_shape(self, hidden: int) -> QueryNetwork:
        return QueryNetwork(hidden, len(self.candidates), self.width)

    @classmethod
    def fit(cls, data: TrainingSet, info: PredictorInfo, **options) -> NetworkPredictor:
        settings = TrainingOptions(**options)
        info.options = asdict(settings)
        predictor = cls(info)
        target, loss_fn = data.correct.float(), nn.BCEWithLogitsLoss()

        def loss_on(network: QueryNetwork, indices: list[int]) -> torch.Tensor:
            logits = network(*_batch([data.states[i] for i in indices]))
            return loss_fn(logits.squeeze(-1), target[indices])

        build = functools.partial(predictor.network_shape, data.states[0].shape[1])
        predictor.network = fit_network(build, len(data.states), loss_on, settings)
        return predictor

    def choose(self, states: torch.Tensor | None) -> int:
        return int(self.logits(states).squeeze(-1).argmax())

    def ranking(self, states: torch.Tensor | None) -> list[int]:
        return self.logits(states).squeeze(-1).argsort(descending=True, stable=True).tolist()


@register_predictor
class ProgramPredictor(NetworkBacked):
    """PoLar: per layer, a segment-start logit and one logit per operation.

    Each training document's targets are its correct candidates that are programs; when one
    of them is shorter than the model, the full model's program counts ``identity_weight``
    (PoLar down-weights it: it would otherwise dominate). Documents without a correct program
    do not train it. Decoding is greedy, and a program that skips everything runs the full
    model.
    """

    kind = "program"

    @property
    def n_layers(self) -> int:
        return int(self.info.model["n_layers"])

    def network_shape(self, hidden: int) -> QueryNetwork:
        return QueryNetwork(hidden, self.n_layers, self.width, outputs=1 + len(OPERATIONS))

    @classmethod
    def fit(
        cls, data: TrainingSet, info: PredictorInfo, identity_weight: float = 0.1, **options
    ) -> ProgramPredictor:
        # From PoLar's grid: 1e-3 leaves the per-layer labels underfit on a few hundred documents.
        settings = TrainingOptions(**{"lr": 3e-3, **options})
        info.options = {**asdict(settings), "identity_weight": identity_weight}
        predictor = cls(info)
        examples = _program_examples(data, predictor.n_layers, identity_weight)
        if not examples:
            raise ValueError(
                "no training document has a correct candidate that is a program (segments of "
                f"at most {MAX_SEGMENT} layers, each skipped, kept or repeated once)"
            )
        documents = list(examples)

        def loss_on(network: QueryNetwork, indices: list[int]) -> torch.Tensor:
            # Each document is encoded once; its logits serve all of its correct programs.
            chosen = [documents[i] for i in indices]
            rows = [(k, *example) for k, d in enumerate(chosen) for example in examples[d]]
            encoded = network(*_batch([data.states[d] for d in chosen]))
            logits = encoded[torch.tensor([k for k, *_ in rows])]
            starts = torch.stack([start for _, start, _, _ in rows])
            operations = torch.stack([operation for _, _, operation, _ in rows])
            weights = torch.tensor([weight for *_, weight in rows])
            start_loss = nn.functional.binary_cross_entropy_with_logits(
                logits[..., 0], starts, reduction="none"
            ).mean(-1)
            operation_loss = nn.functional.cross_entropy(
                logits[..., 1:].transpose(1, 2), operations, reduction="none"
            )
            operation_loss = (operation_loss * starts).sum(-1) / starts.sum(-1)
            return ((start_loss + operation_loss) * weights).sum() / weights.sum()

        build = functools.partial(predictor.network_shape, data.states[0].shape[1])
        predictor.network = fit_network(build, len(documents), loss_on, settings)
        return predictor

    def predict(self, states: torch.Tensor | None) -> Chain:
        logits = self.logits(states)
        chain = decode(logits[:, 0], logits[:, 1:]).chain()
        return chain if chain is not None else Chain.identity(self.n_layers)

    def bounds(self) -> Iterator[Chain]:
        yield longest(self.n_layers)


def _program_examples(
    data: TrainingSet, n_layers: int, identity_weight: float
) -> dict[int, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """Per training document: (starts, operations, weight) of each correct program."""
    programs = [parse(chain, n_layers) for chain in data.candidates]
    identity = Chain.identity(n_layers)
    examples = {}
    for i, row in enumerate(data.correct.tolist()):
        valid = [j for j, ok in enumerate(row) if ok and programs[j] is not None]
        shorter = any(len(data.candidates[j]) < n_layers for j in valid)
        examples[i] = [
            (*programs[j].targets(), identity_weight if shorter and data.candidates[j] == identity
             else 1.0)
            for j in valid
        ]  # fmt: skip
    return {i: found for i, found in examples.items() if found}
