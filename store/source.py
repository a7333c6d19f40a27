"""``chains=store:...``: oracle chains picked from a store, one per document.

The value is the store (SQLite path or SQLAlchemy URL) followed by ``;``-separated options,
since lm-eval splits ``--model_args`` on commas::

    chains=store:cola.db                          every run of the loaded model, pick=best
    chains=store:cola.db;run=3+4;pick=shortest-correct
    chains=store:postgresql://host/cola;run=arc-mcts;on_mismatch=skip

``run`` takes run ids or names joined by ``+`` (default: all runs of the loaded model);
``pick`` is one of :data:`queries.PICKS`; ``on_mismatch`` says what to do with a named run that
was searched on other weights: ``error`` (default) or ``skip`` it. The pick is made in SQL
when the model has loaded and its fingerprint is known; documents are matched by content hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator

from sqlalchemy import select

from lm_eval_cola.chain import Chain
from lm_eval_cola.fingerprint import ModelIdentity, mismatch, reregister_hint
from lm_eval_cola.sources import ChainSource, ChainSourceError
from lm_eval_cola.store import queries
from lm_eval_cola.store.engine import StoreError
from lm_eval_cola.store.queries import sampled_scheme
from lm_eval_cola.store.schema import Model, Run, decoded_batch_invariantly
from lm_eval_cola.store.store import Store

logger = logging.getLogger("lm_eval.cola")
OPTIONS = {"run", "pick", "on_mismatch"}


class StoreChains(ChainSource):
    def __init__(self, argument: str) -> None:
        location, *options = argument.split(";")
        self.location = location
        self.options = _parse_options(options)
        self.policy = self.options.get("pick", "best")
        if self.policy not in queries.PICKS:
            raise ChainSourceError(f"pick={self.policy}: choose one of {', '.join(queries.PICKS)}")
        self.on_mismatch = self.options.get("on_mismatch", "error")
        if self.on_mismatch not in ("error", "skip"):
            raise ChainSourceError(f"on_mismatch={self.on_mismatch}: choose error or skip")
        try:
            self.store = Store(location, read_only=True)
            self.runs = self._named_runs(self.options.get("run"))
        except StoreError as err:
            raise ChainSourceError(str(err)) from None
        self._chains: dict[tuple[str, str], Chain] = {}
        self._fingerprint = ""
        #: whether its runs' generations decoded batch-invariantly (``None``: none generates)
        self.batch_invariant: bool | None = None

    def _named_runs(self, spec: str | None) -> list[Run]:
        """The runs named by ``run=``, all of which must exist (checked before the model loads)."""
        if spec is None:
            return []
        runs = []
        with self.store.session() as session:
            for token in spec.split("+"):
                run_id = queries.find_run(session, token)
                if run_id is None:
                    raise ChainSourceError(f"{self.store} has no run '{token}'")
                runs.append(session.get(Run, run_id))
        return runs

    def bind(self, model: ModelIdentity) -> None:
        with self.store.session() as session:
            runs = self.runs or list(
                session.scalars(
                    select(Run).join(Model).where(Model.fingerprint == model.fingerprint)
                )
            )
            run_ids = [run.id for run in runs if self._matches(session, run, model)]
            if not run_ids:
                stale = session.scalars(select(Model.name).where(sampled_scheme())).all()
                hint = ""
                if stale:
                    hint = f"; its runs of {', '.join(stale)}: " + reregister_hint(
                        f"--store {self.location}"
                    )
                raise ChainSourceError(
                    f"{self.store} has no run of this model ({model.name}, fingerprint "
                    f"{model.fingerprint[:17]}); search it first, or load the model it holds" + hint
                )
            self.batch_invariant = _decoding([session.get(Run, run_id) for run_id in run_ids])
            picks = queries.pick(session, run_ids, self.policy)
        self._chains = {(p.task, p.doc_hash): Chain.parse(p.chain) for p in picks}
        self._fingerprint = hashlib.sha256(
            json.dumps(sorted((*k, str(c)) for k, c in self._chains.items())).encode()
        ).hexdigest()
        logger.info(
            "%s: picked %d chains (%s) from runs %s", self.store, len(picks), self.policy, run_ids
        )
        runs = "+".join(map(str, run_ids))
        logger.warning(
            "chains=store: every pick was chosen by the gold answer, so the accuracy reported is "
            "an oracle, not a prediction: set it beside its controls with cola db stats --store "
            "%s --run %s",
            self.location,
            runs,
        )

    def _matches(self, session, run: Run, model: ModelIdentity) -> bool:
        stored = session.get(Model, run.model_id)
        what = f"run {run.id} ({run.name or run.method}) of {self.store}"
        problem = mismatch(what, stored.name, stored.fingerprint, model, f"--store {self.location}")
        if problem and self.on_mismatch == "error":
            raise ChainSourceError(problem)
        if problem:
            logger.warning("%s; skipping it (on_mismatch=skip)", problem)
        return not problem

    def lookup(self, task: str, doc_hash: str) -> Chain | None:
        return self._chains.get((task, doc_hash))

    def chains(self) -> Iterator[tuple[str, Chain]]:
        for (task, doc_hash), chain in self._chains.items():
            yield f"{self.store}, task {task}, document {doc_hash[:12]}", chain

    def fingerprint(self) -> str:
        return f"store:{self._fingerprint}"

    def __str__(self) -> str:
        return str(self.store)


def _decoding(runs: list[Run]) -> bool | None:
    """How the runs' generations decoded: batch-invariantly or not (``None``: no run of a
    generation task); runs of both modes cannot be re-evaluated together."""
    modes = {
        decoded_batch_invariantly(run.settings)
        for run in runs
        if run.task.output_type == "generate_until"
    }
    if len(modes) > 1:
        names = ", ".join(str(run.id) for run in runs)
        raise ChainSourceError(
            f"runs {names} decoded their generations in different modes (--decoding); "
            "name runs of one mode with run=..."
        )
    return modes.pop() if modes else None


def _parse_options(options: list[str]) -> dict[str, str]:
    parsed = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in OPTIONS:
            raise ChainSourceError(
                f"bad store option '{option}': use {', '.join(sorted(OPTIONS))} as key=value, "
                "joined by ';' (e.g. chains=store:cola.db;run=3;pick=best)"
            )
        parsed[key] = value
    return parsed
