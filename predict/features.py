"""What a predictor sees of a document: the base model's own hidden states of its prompt.

A predictor must choose a chain from the input alone, before any chain runs. Its input is what
the base model computes for the document's prompt (the context of the document's first
lm-eval request, exactly as the task builds it, chat template and few-shot examples included):
the hidden states after the model's first ``layer`` decoder layers, through its final norm,
for the prompt's last ``max_tokens`` tokens. Computing them costs ``layer`` layer applications
per document, which every evaluation reports next to the chain's own layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from lm_eval.api.instance import Instance

from lm_eval_cola.chain import Chain

if TYPE_CHECKING:
    from lm_eval_cola.lm import ChainLM
from lm_eval_cola.executor import Routing


@dataclass(frozen=True)
class FeatureSpec:
    """Which hidden states a predictor reads."""

    layer: int
    max_tokens: int = 256
    #: windows of Dr.LLM's windowed mean pooling (routers)
    windows: int = 8

    def as_dict(self) -> dict:
        return asdict(self)


def prompt_of(instances: Sequence[Instance]) -> str:
    """The document's prompt: the context its requests share (the whole text for rolling tasks)."""
    first = min(instances, key=lambda instance: instance.idx)
    return first.args[0]


class PromptStates:
    """Computes a prompt's hidden states with a loaded ``cola`` model (a :class:`ColaLM`)."""

    def __init__(self, lm: ChainLM, spec: FeatureSpec) -> None:
        if not 1 <= spec.layer <= lm.executor.n_layers:
            raise ValueError(
                f"feature layer {spec.layer}: choose 1..{lm.executor.n_layers} for this model"
            )
        self.lm, self.spec = lm, spec
        self.prefix = Chain.parse(list(range(spec.layer)))

    @torch.no_grad()
    def __call__(self, prompt: str) -> torch.Tensor:
        """(tokens, hidden size) float32 on the CPU. Only the decoder runs, not the LM head."""
        tokens = self.lm.tok_encode(prompt)[-self.spec.max_tokens :] or [0]
        ids = torch.tensor([tokens], device=self.lm.device)
        with self.lm.executor.apply(self.prefix):
            states = self.lm.executor.decoder(input_ids=ids).last_hidden_state
        return states[0].float().cpu()


@torch.no_grad()
def run_routed(lm: ChainLM, prompt: str, decide: Callable[[int, torch.Tensor], int]) -> Routing:
    """Runs ``prompt`` through the decoder while ``decide(layer, hidden)`` chooses how often
    each layer runs (a router's view of the prompt); returns the routing it made."""
    ids = torch.tensor([lm.tok_encode(prompt) or [0]], device=lm.device)
    with lm.executor.route(decide) as routing:
        lm.executor.decoder(input_ids=ids)
    return routing


def pooled(states: torch.Tensor) -> torch.Tensor:
    """The mean of the prompt's token states."""
    return states.mean(dim=0)


def windowed_mean(states: torch.Tensor, windows: int) -> torch.Tensor:
    """Dr.LLM's pooling of (tokens, hidden) states: the mean of the means of ``windows``
    contiguous windows of tokens (fewer for short prompts), so each part of the prompt weighs
    the same whatever its length."""
    parts = states.tensor_split(min(windows, states.shape[0]))
    return torch.stack([part.mean(dim=0) for part in parts]).mean(dim=0)
