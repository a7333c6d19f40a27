"""``chains=predictor:PATH``: chains predicted per document from its prompt, by a trained
predictor (``cola predict train``), for any lm-eval run of the model it was trained for.

Before a batch of requests runs, the source computes each new document's prompt states with
the loaded model (the identity prefix of the predictor's feature layer) and asks the predictor
for its chain. Documents of other tasks get no chain (they run the default, as the log says).
A predictor trained on other weights is refused when the model loads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from lm_eval.api.instance import Instance

from lm_eval_cola.chain import Chain
from lm_eval_cola.fingerprint import ModelIdentity, require_match
from lm_eval_cola.predict.features import PromptStates, prompt_of
from lm_eval_cola.predict.predictors import PredictorFileError, file_digest, load
from lm_eval_cola.sources import ChainSource, ChainSourceError

if TYPE_CHECKING:
    from lm_eval_cola.lm import ChainLM

logger = logging.getLogger("lm_eval.cola")


class PredictedChains(ChainSource):
    def __init__(self, path: str) -> None:
        try:
            self.predictor = load(path)
        except PredictorFileError as err:
            raise ChainSourceError(str(err)) from None
        self.path, self._digest = path, file_digest(path)
        self._chains: dict[tuple[str, str], Chain] = {}
        self.feature_layer_applications = 0

    def bind(self, model: ModelIdentity) -> None:
        trained = self.predictor.info.model
        what, option = f"predictor '{self.path}'", f"--predictors {self.path}"
        name, fingerprint = trained["name"], trained["fingerprint"]
        require_match(what, name, fingerprint, model, option, ChainSourceError)

    def prepare(self, documents: Mapping[tuple[str, str], list[Instance]], lm: ChainLM) -> None:
        task = self.predictor.info.task
        new = [key for key in documents if key[0] == task and key not in self._chains]
        if not new:
            return
        encode = PromptStates(lm, self.predictor.info.spec) if self.predictor.reads_prompt else None
        before = lm.executor.work.layer_applications
        for key in new:
            prompt = prompt_of(documents[key])
            states = encode(prompt) if encode else None
            self._chains[key] = self.predictor.chains_for(lm, prompt, states)[0]
        self.feature_layer_applications += lm.executor.work.layer_applications - before
        logger.info(
            "%s: predicted chains for %d documents (%d layer applications for prompt states)",
            self, len(new), lm.executor.work.layer_applications - before,
        )  # fmt: skip

    def lookup(self, task: str, doc_hash: str) -> Chain | None:
        return self._chains.get((task, doc_hash))

    def chains(self) -> Iterator[tuple[str, Chain]]:
        for chain in self.predictor.bounds():
            yield f"predictor '{self.path}'", chain

    def fingerprint(self) -> str:
        return f"predictor:{self._digest}"

    def __str__(self) -> str:
        return f"predictor '{self.path}' ({self.predictor.info.kind})"
