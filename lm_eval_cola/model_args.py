"""The ``cola`` backend's model args, and every check of them that needs no weights.

``lm_eval`` builds its model only after it has indexed every task, and HFLM hands an argument
it does not know to the model class, which fails once the weights have loaded, naming no valid
argument. So the backend's arguments are checked here first, from the model's config alone:
their names (a near miss of a known one gets "did you mean"), the chain's syntax and range,
the chain source's files. :class:`~lm_eval_cola.lm.ColaLM` runs the same checks, and ``cola``'s
commands and the stock ``lm_eval`` CLI (through ``_hook``) run :func:`preflight` as soon as
they have read their arguments.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lm_eval_cola.chain import Chain
from lm_eval_cola.errors import ColaError

#: What ``--model cola`` adds to HFLM's arguments.
COLA_ARGS = (
    "chain",
    "chains",
    "strict_chains",
    "max_chain_length",
    "shared_context",
    "batch_invariant",
)


class ModelArgsError(ColaError, ValueError):
    """A model arg that cannot be what was meant; the message names the fix."""


def parse(text: str) -> dict[str, Any]:
    """``--model_args`` text (``k=v,k2=v2``) as lm-eval reads it."""
    from lm_eval.utils import simple_parse_args_string

    return simple_parse_args_string(text)


def known_names() -> tuple[str, ...]:
    """The backend's own arguments and HFLM's."""
    from lm_eval.models.huggingface import HFLM

    parameters = inspect.signature(HFLM.__init__).parameters.values()
    named = (p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self")
    return (*COLA_ARGS, *named)


def check_names(args: Mapping[str, Any]) -> None:
    """Refuse a name that is a near miss of a known argument. Other unknown names pass: HFLM
    hands them to ``from_pretrained`` (``attn_implementation``, ``low_cpu_mem_usage``, ...)."""
    known = known_names()
    for name in args:
        close = [] if name in known else difflib.get_close_matches(name, known, 1, 0.75)
        if close:
            raise ModelArgsError(
                f"unknown model arg '{name}': did you mean '{close[0]}'? (--model cola takes "
                f"HFLM's arguments and {', '.join(COLA_ARGS)})"
            )


def open_chains(chain: Any, chains: str | None):
    """The one chain (``chain=``) and the per-document source (``chains=``), read and opened,
    both ``None`` when not given."""
    from lm_eval_cola.sources import open_source

    static = Chain.parse(chain) if chain is not None else None
    source = open_source(chains) if chains is not None else None
    return static, source


def validate_chains(static: Chain | None, source, n_layers: int, max_length: int | None) -> None:
    """Every chain the run can use fits a model ``n_layers`` deep, within the length cap."""
    if static is not None:
        static.validate(n_layers, max_length)
    if source is not None:
        source.validate(n_layers, max_length)


def depth_from_config(pretrained: str, args: Mapping[str, Any]) -> int:
    """The model's depth from its config alone, so bad chains fail before weights load."""
    import transformers

    path_like = pretrained.startswith(("/", "./", "../", "~"))
    if path_like and not Path(pretrained).expanduser().exists():
        raise ModelArgsError(
            f"pretrained={pretrained}: no such folder; give a model folder or a hub id"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(
            pretrained,
            revision=args.get("revision") or "main",
            trust_remote_code=args.get("trust_remote_code", False),
            gguf_file=args.get("gguf_file"),
            subfolder=args.get("subfolder") or "",
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelArgsError(f"pretrained={pretrained}: cannot read its config: {first}") from None
    return config.get_text_config().num_hidden_layers


def pretrained_path(args: Mapping[str, Any]):
    """``pretrained``, or the embedded default model's folder (built on first use)."""
    if args.get("pretrained") is not None:
        return args["pretrained"]
    from lm_eval_cola.default_model import default_model_path

    return default_model_path()


def preflight(args: Mapping[str, Any]) -> None:
    """Every check of ``--model cola``'s arguments that the weights are not needed for."""
    check_names(args)
    static, source = open_chains(args.get("chain"), args.get("chains"))
    pretrained = pretrained_path(args)
    if isinstance(pretrained, str):
        depth = depth_from_config(pretrained, args)
        validate_chains(static, source, depth, args.get("max_chain_length"))
