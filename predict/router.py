"""Dr.LLM's routers: one small network per layer decides, from the hidden state entering that
layer, whether to skip it, run it, or run it twice, while the prompt runs.

The chain is built during the prompt's own forward pass (:meth:`ChainExecutor.route`): at
layer ``i`` the router sees the hidden state the chain so far produced, windowed mean-pooled
(:func:`windowed_mean`), and its choice decides the next positions. So the only extra cost is
the routers themselves, a bottleneck MLP per visited layer (:meth:`RouterPredictor.own_layers`).

Training follows Dr.LLM with the data this project stores: each training document's target
path is the shortest chain found right on it (by its own search, or among the candidates scored
on it) that routers can express (each layer 0, 1 or 2 times, in order; :func:`routable`), and
the hidden states entering each layer along that path (teacher forcing) are the inputs
(:attr:`TrainingSet.routes`). The per-layer classes are very unbalanced (most layers run once),
so the loss is Dr.LLM's focal loss with class weights by inverse frequency; ``loss="ce"`` and
``balance=False`` give the plain cross-entropy to compare.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lm_eval_cola.chain import Chain
from lm_eval_cola.executor import MAX_ROUTED_RUNS
from lm_eval_cola.predict.features import run_routed, windowed_mean
from lm_eval_cola.predict.predictors import (
    Predictor,
    PredictorInfo,
    TrainingOptions,
    fit_network,
    register_predictor,
)
from lm_eval_cola.predict.training_set import TrainingSet

if TYPE_CHECKING:
    from lm_eval_cola.lm import ChainLM

#: the router's classes: how many times the layer runs
ACTIONS = MAX_ROUTED_RUNS + 1


class Routers(nn.Module):
    """One bottleneck MLP per layer: normalised pooled state -> ``width`` -> 3 logits."""

    def __init__(self, hidden: int, n_layers: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(hidden), nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, ACTIONS)
            )
            for _ in range(n_layers)
        )

    def forward(self, layer: int, pooled: torch.Tensor) -> torch.Tensor:
        return self.layers[layer](pooled)


#: routers trained otherwise than by Dr.LLM's recipe, which the benchmarks compare with it:
#: plain unweighted cross-entropy, and targets shared among equally short right chains
ROUTER_VARIANTS = {
    "router-ce": {"loss": "ce", "balance": False},
    "router-ties": {"targets": "ties"},
}


@dataclass(frozen=True)
class RouterOptions:
    """Dr.LLM's defaults: focal loss (gamma 2) with class weights, 25 epochs."""

    loss: str = "focal"  # or "ce"
    gamma: float = 2.0
    balance: bool = True  # class weights by inverse frequency, per layer
    targets: str = "path"  # or "ties": every decision on a shortest right chain (RoutePath.ties)
    width: int = 128
    epochs: int = 25
    lr: float = 1e-3
    batch_size: int = 32
    held_out: float = 0.2
    seed: int = 0


@register_predictor
class RouterPredictor(Predictor):
    kind = "router"
    #: its input is the routed forward pass itself, not the shared prompt states
    reads_prompt = False
    reads_routes = True

    def __init__(self, info: PredictorInfo) -> None:
        super().__init__(info)
        self.options = RouterOptions(**info.options)
        self.network: Routers | None = None

    @property
    def n_layers(self) -> int:
        return int(self.info.model["n_layers"])

    @classmethod
    def fit(cls, data: TrainingSet, info: PredictorInfo, **options) -> RouterPredictor:
        settings = RouterOptions(**options)
        info.options = asdict(settings)
        predictor = cls(info)
        documents = [i for i, route in enumerate(data.routes) if route is not None]
        if not documents:
            raise ValueError(
                "no training document has a right chain that routers can express (each "
                "layer skipped, run or run twice, in order)"
            )
        if settings.targets not in ("path", "ties"):
            raise ValueError(f"router targets '{settings.targets}': choose 'path' or 'ties'")
        routes = [data.routes[i] for i in documents]
        states = torch.stack([route.states for route in routes])  # (docs, layers, d)
        tied = settings.targets == "ties"
        targets = torch.stack([route.targets(tied) for route in routes])  # (docs, layers, 3)
        weights = _class_weights(targets) if settings.balance else torch.ones(targets.shape[1:])
        loss = functools.partial(_loss, settings=settings, weights=weights)

        def loss_on(network: Routers, indices: list[int]) -> torch.Tensor:
            return loss(network, states[indices], targets[indices])

        build = functools.partial(Routers, states.shape[-1], predictor.n_layers, settings.width)
        training = TrainingOptions(
            **{k: getattr(settings, k) for k in ("epochs", "lr", "batch_size", "held_out", "seed")}
        )
        predictor.network = fit_network(build, len(documents), loss_on, training)
        return predictor

    def decide(self, layer: int, hidden: torch.Tensor) -> int:
        """Runs of ``layer`` for the hidden state entering it (a :meth:`ChainExecutor.route`
        decision)."""
        pooled = windowed_mean(hidden[0].float(), self.info.spec.windows).cpu()
        with torch.no_grad():
            return int(self.network(layer, pooled).argmax())

    def route(self, lm: ChainLM, prompt: str) -> Chain:
        """The chain the routers build while ``prompt`` runs through the model; the full
        model if they skip every layer."""
        routing = run_routed(lm, prompt, self.decide)
        return routing.chain if len(routing.layers) else Chain.identity(self.n_layers)

    def chains_for(
        self, lm: ChainLM, prompt: str, states: torch.Tensor | None, k: int = 1
    ) -> list[Chain]:
        return [self.route(lm, prompt)]

    def predict(self, states: torch.Tensor | None) -> Chain:
        raise TypeError("a router decides while the prompt runs: use chains_for(lm, prompt, None)")

    def bounds(self):
        yield Chain.derived(tuple(layer for layer in range(self.n_layers) for _ in range(2)))

    def own_layers(self, lm: ChainLM, prompt: str) -> float:
        """The routers' multiply-adds (one call per layer, on one pooled vector) as a share of
        one decoder layer's over the prompt (its weights once per token)."""
        hidden, width = self.network.layers[0][1].in_features, self.options.width
        routers = self.n_layers * (hidden * width + width * ACTIONS)
        layer = sum(p.numel() for p in lm.executor.layers[0].parameters())
        return routers / (layer * max(len(lm.tok_encode(prompt)), 1))

    def tensors(self) -> dict[str, Any]:
        return {"network": self.network.state_dict()}

    def restore(self, saved: dict[str, Any]) -> None:
        state = saved["network"]
        hidden = state["layers.0.1.weight"].shape[1]
        self.network = Routers(hidden, self.n_layers, self.options.width)
        self.network.load_state_dict(state)
        self.network.eval()


def _class_weights(targets: torch.Tensor) -> torch.Tensor:
    """(layers, 3): per layer, each class weighted by the inverse of its frequency there
    (absent classes 0), normalised to mean 1 over the examples; ``targets`` is
    (documents, layers, 3), a class's frequency its summed share."""
    counts = targets.sum(0)
    weights = torch.where(counts > 0, targets.shape[0] / (ACTIONS * counts.clamp_min(1e-9)), 0.0)
    return weights


def _loss(
    network: Routers,
    states: torch.Tensor,
    targets: torch.Tensor,
    settings: RouterOptions,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Focal (or plain) cross-entropy over every (document, layer), class-weighted, against
    target shares (one-hot for a single path)."""
    total, norm = torch.zeros(()), torch.zeros(())
    for layer in range(states.shape[1]):
        log_p = torch.log_softmax(network(layer, states[:, layer]), dim=-1)
        focus = (1 - log_p.exp()) ** settings.gamma if settings.loss == "focal" else 1.0
        weight = targets[:, layer] * weights[layer]  # (docs, 3)
        # per document first: with one-hot targets, exactly the gathered class's term
        total = total - (weight * focus * log_p).sum(-1).sum()
        norm = norm + weight.sum(-1).sum()
    return total / norm.clamp_min(1e-9)
