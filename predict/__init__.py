"""Chain predictors: trained from a store's searched chains, used as a chain source.

``PREDICTORS`` names every kind (``cola predict train --kinds``); importing this package costs
nothing, the predictors themselves load on first use.
"""

from lm_eval_cola.registry import Registry

_PREDICTORS = "lm_eval_cola.predict.predictors"
PREDICTORS = Registry(
    "predictor",
    {
        "static": f"{_PREDICTORS}:StaticPredictor",
        "knn": f"{_PREDICTORS}:NeighboursPredictor",
        "network": f"{_PREDICTORS}:NetworkPredictor",
        "program": f"{_PREDICTORS}:ProgramPredictor",
        "router": "lm_eval_cola.predict.router:RouterPredictor",
    },
)
