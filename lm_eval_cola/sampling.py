"""The full model's own sampling: ``k`` answers to one generation request from one prefill.

The control that asks whether a chain search finds more right answers than the unmodified
model finds by sampling its own (sampling@k, ``cola controls sampling``). The prompt is
encoded and cut as HFLM's ``generate_until`` encodes and cuts it, prefilled once, and its KV
cache copied for the ``k`` rows; HFLM's own ``_model_generate`` then samples them with the
model's generation settings at the asked temperature and the request's stop sequences, and
each answer is cut at those as ``generate_until`` cuts it. So a sample is what ``lm_eval
--model hf --gen_kwargs do_sample=True,temperature=T`` gives, drawn from a seeded generator,
at a k-th of the prompt's cost.
"""

from __future__ import annotations

import hashlib
import inspect

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)


def sample(lm: HFLM, request: Instance, k: int, temperature: float, seed: int) -> list[str]:
    """``k`` answers the model samples to ``request`` at ``temperature`` (``0``: greedy, every
    answer the same), reproducible by ``seed``."""
    context, gen_kwargs = request.args
    kwargs = normalize_gen_kwargs(dict(gen_kwargs), lm.max_gen_toks)
    eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
    max_gen_toks = kwargs.pop("max_gen_toks")
    prompt, _ = lm.tok_batch_encode(
        [context], left_truncate_len=lm.max_length - max_gen_toks, truncation=lm.truncation
    )
    prompt = prompt.to(lm.device)
    cache = _cache_name(lm.model)
    with torch.no_grad():
        prefill = getattr(lm.model(prompt[:, :-1], use_cache=True), cache)
        prefill.batch_repeat_interleave(k)
        torch.manual_seed(seed)
        drawn = lm._model_generate(
            context=prompt.expand(k, -1),
            max_length=prompt.shape[1] + max_gen_toks,
            stop=until,
            attention_mask=torch.ones(k, prompt.shape[1], dtype=torch.long, device=lm.device),
            **{cache: prefill},
            **_drawing(kwargs, temperature),
        )
    return [_answer(lm, row[prompt.shape[1] :], until) for row in drawn.tolist()]


def seed_for(seed: int, doc_hash: str, temperature: float) -> int:
    """A seed per document and temperature: a document's samples are the same whatever else is
    sampled, before or after it (so a resumed run draws what a whole one does)."""
    digest = hashlib.sha256(f"{seed}/{doc_hash}/{temperature}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _answer(lm: HFLM, tokens: list[int], until: list[str]) -> str:
    """A continuation as ``generate_until`` returns it: after the last end-of-thinking token
    (when the model has one), cut at the first stop sequence."""
    think = lm.think_end_token
    if isinstance(think, int):
        ends = [i for i, token in enumerate(tokens) if token == think]
        if ends:
            tokens = tokens[ends[-1] + 1 :]
            return postprocess_generated_text(lm.tok_decode(tokens).lstrip(), until, None)
    text = lm.tok_decode(tokens)
    return postprocess_generated_text(text, until, think if isinstance(think, str) else None)


def _cache_name(model: torch.nn.Module) -> str:
    """What the model calls its KV cache (``past_key_values`` before transformers 5)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _drawing(kwargs: dict, temperature: float) -> dict:
    """The request's generation kwargs, sampling at ``temperature`` (greedy at 0)."""
    if temperature <= 0:
        return {**kwargs, "do_sample": False, "temperature": 0.0}
    return {**kwargs, "do_sample": True, "temperature": temperature}
