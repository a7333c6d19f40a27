"""``--model cola``: lm-eval's HFLM with its decoder layers run as chains.

HFLM keeps doing everything it does (tokenising, batching, the one-token logits cache, auto
batch size, data parallelism, peft, gguf). This backend only decides, per request, which chain
the model runs: ``chain=`` for every document, ``chains=`` for a per-document source. Requests
are grouped by chain *before* HFLM sees them, so HFLM's batching and logits cache never mix
two chains, and results are put back in the order lm-eval asked for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
import transformers
from lm_eval.api.instance import Instance
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from lm_eval_cola.chain import Chain
from lm_eval_cola.executor import ChainExecutor
from lm_eval_cola.fingerprint import identify
from lm_eval_cola.sources import ChainSource, ChainSourceError, open_source, requests_by_document

logger = logging.getLogger("lm_eval.cola")


class MissingChainError(ChainSourceError):
    """``strict_chains=True`` and a document has no chain in the source."""


@register_model("cola")
class ColaLM(HFLM):
    """HFLM whose decoder layers run as a chain, one for all documents or one per document.

    Model args added to HFLM's: ``chain`` (one chain, e.g. ``0-11.11-29``), ``chains`` (a
    per-document source, e.g. ``chains.jsonl``), ``strict_chains`` (a document missing from
    the source is an error instead of running ``chain``, or the full model), and
    ``max_chain_length`` (default: 4 x the model's depth). Without ``pretrained`` the embedded
    SmolLM2-135M-Instruct is used.
    """

    def __init__(
        self,
        pretrained: str | transformers.PreTrainedModel | None = None,
        chain: str | int | Sequence[int] | None = None,
        chains: str | None = None,
        strict_chains: bool = False,
        max_chain_length: int | None = None,
        **kwargs,
    ) -> None:
        self.static_chain = Chain.parse(chain) if chain is not None else None
        self.source: ChainSource | None = open_source(chains) if chains is not None else None
        self.strict_chains = bool(strict_chains)
        self.max_chain_length = max_chain_length
        name = None
        if pretrained is None:
            from lm_eval_cola.default_model import DISPLAY_NAME, default_model_path

            pretrained, name = default_model_path(), DISPLAY_NAME
        if isinstance(pretrained, str):
            self._validate_chains(_depth_from_config(pretrained, kwargs))
        super().__init__(pretrained=pretrained, **kwargs)
        self.executor = ChainExecutor(self.model)
        self.executor.check(self.device)
        name = name or (pretrained if isinstance(pretrained, str) else self.model.name_or_path)
        self.identity = identify(self.model, name, kwargs.get("revision"), self.executor.n_layers)
        if self.source is not None:
            self.source.bind(self.identity)
        self._validate_chains(self.executor.n_layers)

    def _validate_chains(self, n_layers: int) -> None:
        """Every chain this run can use fits the model; raised before any compute."""
        if self.static_chain is not None:
            self.static_chain.validate(n_layers, self.max_chain_length)
        if self.source is not None:
            self.source.validate(n_layers, self.max_chain_length)

    # -- the three request types, each dispatched by chain -------------------------------------

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False):
        return self._dispatch(HFLM.loglikelihood, requests, disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False):
        return self._dispatch(HFLM.loglikelihood_rolling, requests, disable_tqdm)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False):
        return self._dispatch(HFLM.generate_until, requests, disable_tqdm)

    def _dispatch(self, method: Callable, requests: list[Instance], disable_tqdm: bool) -> list:
        """Run ``method`` once per chain group and return results in request order."""
        chains = self._chains_for(requests)
        groups: dict[str, list[int]] = {}
        for index, chain in enumerate(chains):
            groups.setdefault(_key(chain), []).append(index)
        keys = self._keys_on_all_ranks(groups)
        if len(keys) <= 1:  # one chain: exactly HFLM's own path, collectives included
            with self.executor.apply(chains[0] if chains else None):
                return method(self, requests, disable_tqdm=disable_tqdm)
        results: list = [None] * len(requests)
        progress = tqdm(
            keys,
            desc=f"Running {method.__name__} requests by chain",
            disable=disable_tqdm or self.rank != 0,
        )
        with self._independent_groups():
            for key in progress:
                indices = groups.get(key, [])
                if not indices:
                    continue
                with self.executor.apply(chains[indices[0]]):
                    outputs = method(self, [requests[i] for i in indices], disable_tqdm=True)
                for index, output in zip(indices, outputs, strict=True):
                    results[index] = output
        return results

    def _chains_for(self, requests: list[Instance]) -> list[Chain | None]:
        """The chain of each request; ``None`` runs the model unchanged."""
        if self.source is None:
            return [self.static_chain] * len(requests)
        documents = requests_by_document(requests)
        self.source.prepare(documents, self)
        found = {key: self.source.lookup(*key) for key in documents}
        self._report_missing({key for key, chain in found.items() if chain is None}, len(found))
        chain_of = {
            id(request): found[key] if found[key] is not None else self.static_chain
            for key, group in documents.items()
            for request in group
        }
        return [chain_of[id(request)] for request in requests]

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
        saved = (self.batch_size_per_gpu, self._world_size)
        if self.batch_size_per_gpu == "auto":
            self.batch_size_per_gpu = self._detect_batch_size()
            logger.info("Batch size for all chain groups: %d", self.batch_size_per_gpu)
        self._world_size = 1
        try:
            yield
        finally:
            self.batch_size_per_gpu, self._world_size = saved

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
            dbdict.conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{table}" (key TEXT PRIMARY KEY, value BLOB)'
            )
            dbdict.conn.commit()
            dbdict.tablename = table
            logger.info("Request cache table for this model and chain set: %s", table)
        super().set_cache_hook(cache_hook)

    def cache_namespace(self) -> str:
        identity = {
            "model": self.identity.fingerprint,
            "chain": str(self.static_chain) if self.static_chain else None,
            "chains": self.source.fingerprint() if self.source else None,
            "strict": self.strict_chains,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def load(model_args: str = "", device: str | None = None) -> ColaLM:
    """A ``cola`` model for the project's own commands (search, predict): ``model_args`` as in
    ``--model_args``, on ``device`` (default: CUDA when there is one, else the CPU), with the
    batch size of one document that the search objective sets itself."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return ColaLM.create_from_arg_string(model_args, {"device": device, "batch_size": 1})


def _key(chain: Chain | None) -> str:
    return "" if chain is None else str(chain)


def _depth_from_config(pretrained: str, kwargs: dict) -> int:
    """The model's depth from its config alone, so bad chains fail before weights load."""
    config = transformers.AutoConfig.from_pretrained(
        pretrained,
        revision=kwargs.get("revision", "main"),
        trust_remote_code=kwargs.get("trust_remote_code", False),
        gguf_file=kwargs.get("gguf_file"),
        subfolder=kwargs.get("subfolder", ""),
    )
    return config.get_text_config().num_hidden_layers
