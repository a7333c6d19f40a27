"""Chain sources: where the chain for each (task, document) comes from.

A source answers one question, "which chain for this document of this task?", keyed by the
document's content hash (the ``doc_hash`` lm-eval writes to its sample logs), never by
``doc_id`` alone, which changes meaning under ``--samples``. Sources register under a name
with :func:`register_source`, and ``chains=NAME:ARGUMENT`` in ``--model_args`` opens one; a
bare path ending in ``.jsonl`` opens a :class:`JsonlChains`.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from lm_eval_cola.chain import Chain, ChainError
from lm_eval_cola.errors import ColaError
from lm_eval_cola.fingerprint import ModelIdentity
from lm_eval_cola.registry import Registry
from lm_eval_cola.tasks import doc_hash


def document_keys(requests: Iterable) -> list[tuple[str, str]]:
    """Each request's (task, document hash), each document hashed once: a document's requests
    (its choices, its rolling windows) all run its one chain."""
    hashes: dict[int, str] = {}
    keys = []
    for request in requests:
        if id(request.doc) not in hashes:
            hashes[id(request.doc)] = doc_hash(request.doc)
        keys.append((request.task_name, hashes[id(request.doc)]))
    return keys


class ChainSourceError(ColaError, ValueError):
    """A chain source that cannot be opened or does not fit the model; the message names the fix."""


class ChainSource(ABC):
    """Maps (task name, document hash) to the chain that document runs through."""

    @abstractmethod
    def lookup(self, task: str, doc_hash: str) -> Chain | None:
        """The stored chain, or ``None`` when the source has none for this document."""

    @abstractmethod
    def chains(self) -> Iterator[tuple[str, Chain]]:
        """Every chain the source can return, with where it comes from, for validation."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Changes whenever any answer of :meth:`lookup` could change (keys result caches)."""

    def bind(self, model: ModelIdentity) -> None:
        """Called once the model has loaded, before any compute: refuse chains of other models."""

    def prepare(self, documents: Mapping[tuple[str, str], list], lm) -> None:
        """Called with each batch's requests by (task, document hash) before :meth:`lookup`;
        sources that compute chains from the input (predictors) compute them here with the
        loaded model."""

    def validate(self, n_layers: int, max_length: int | None = None) -> None:
        for where, chain in self.chains():
            try:
                chain.validate(n_layers, max_length)
            except ChainError as err:
                raise ChainSourceError(f"{where}: {err}") from None


#: Every chain source by name (``chains=NAME:ARGUMENT``).
SOURCES: Registry[ChainSource] = Registry(
    "chain source",
    {
        "store": "lm_eval_cola.store.source:StoreChains",
        "predictor": "lm_eval_cola.predict.source:PredictedChains",
    },
)


def register_source(name: str):
    """Class decorator: make ``chains=<name>:<argument>`` open this source."""
    return SOURCES.register(name)


def open_source(spec: str) -> ChainSource:
    """Open the source named by a ``chains=`` value, before any model is loaded."""
    kind, sep, argument = spec.partition(":")
    if sep and kind in SOURCES:
        return SOURCES.get(kind)(argument)
    if spec.endswith(".jsonl"):
        return JsonlChains(spec)
    known = ", ".join(f"'{name}:...'" for name in SOURCES)
    raise ChainSourceError(
        f"unknown chain source '{spec}': use a path ending in .jsonl or one of {known}"
    )


@register_source("jsonl")
class JsonlChains(ChainSource):
    """Chains from a JSON-lines file, one document a line.

    Each line holds ``task``, ``doc_hash`` and ``chain`` (text form or JSON list); other
    fields, such as ``doc_id``, are kept for people and ignored here.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ChainSourceError(f"chains file '{path}' does not exist")
        raw = self.path.read_bytes()
        self._fingerprint = hashlib.sha256(raw).hexdigest()
        self._first_line: dict[Chain, int] = {}
        self._chains = self._read(raw.decode("utf-8").splitlines())

    def _read(self, lines: list[str]) -> dict[tuple[str, str], Chain]:
        table: dict[tuple[str, str], Chain] = {}
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{self.path}:{number}"
            try:
                row = json.loads(line)
                key = (str(row["task"]), str(row["doc_hash"]))
                chain = Chain.parse(row["chain"])
            except json.JSONDecodeError as err:
                raise ChainSourceError(f"{where}: not a JSON object ({err.msg})") from None
            except (KeyError, TypeError):
                raise ChainSourceError(
                    f"{where}: each line needs 'task', 'doc_hash' and 'chain' fields"
                ) from None
            except ChainError as err:
                raise ChainSourceError(f"{where}: {err}") from None
            if table.get(key, chain) != chain:
                raise ChainSourceError(
                    f"{where}: document {key[1][:12]}... of task '{key[0]}' already has "
                    f"chain '{table[key]}'; keep one chain per document"
                )
            table[key] = chain
            self._first_line.setdefault(chain, number)
        return table

    def lookup(self, task: str, doc_hash: str) -> Chain | None:
        return self._chains.get((task, doc_hash))

    def chains(self) -> Iterator[tuple[str, Chain]]:
        for chain, number in self._first_line.items():
            yield f"{self.path}:{number}", chain

    def fingerprint(self) -> str:
        return f"jsonl:{self._fingerprint}"

    def __len__(self) -> int:
        return len(self._chains)

    def __str__(self) -> str:
        return f"chains file '{self.path}'"
