"""Unguided baselines: chains chosen with no label in the loop, on the same space and budget.

A search that is told the gold answer picks chains by it; these do not look at scores at all
(``tell`` is ignored), so whatever they get right is what chance, or a fixed list, gives:

- ``random-walk``: the full model, then random chains of the space whose lengths follow a given
  distribution (the gold search's own, so that length alone cannot explain a difference). A
  chain is a random walk of 1 to :data:`MAX_ACTIONS` actions from the full model, drawn again
  until it has the length drawn for it; the document's seed makes it reproducible.
- ``menu``: the full model, then a fixed list of chains in order, the same for every document
  (the chains right on the most training documents: ``cola controls menu``).

Both are ordinary search methods, so their runs use the search's store, prefix cache, parallel
documents and resume; ``@k`` of such a run reads its first ``k`` chains after the full model.
``source`` names the run the lengths or the menu came from; it is recorded with the run's
settings and used for nothing else.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from lm_eval_cola.chain import Chain
from lm_eval_cola.scoring import Trial
from lm_eval_cola.search.base import Searcher, register_searcher
from lm_eval_cola.search.space import ChainSpace

#: The longest random walk, in actions (MCTS's chains are 2-4 actions deep on average).
MAX_ACTIONS = 6
#: Walks tried for one drawn length before any chain of the walk's length is taken.
TRIES = 200


@register_searcher
class RandomWalks(Searcher):
    """The full model, then distinct random chains with lengths drawn from ``lengths``."""

    name = "random-walk"
    looks_ahead = True

    def __init__(
        self,
        space: ChainSpace,
        budget: int,
        seed: int,
        lengths: Mapping[int | str, float] | None = None,
        source: str = "",
    ) -> None:
        super().__init__(space, budget, seed)
        weights = {int(n): float(w) for n, w in (lengths or {}).items()}
        # lengths outside the space cannot be drawn; none at all leaves the length free
        usable = {n: w for n, w in weights.items() if space.lower <= n <= space.upper and w > 0}
        self.lengths, self.weights = list(usable), list(usable.values())
        self.rng = random.Random(seed)
        self.asked: set[Chain] = set()

    def ask(self) -> Chain:
        chain = self._draw() if self.asked else self.space.root
        self.asked.add(chain)
        return chain

    def tell(self, trial: Trial) -> None:
        """Ignored: the chains do not depend on any score."""

    def _draw(self) -> Chain:
        """A new chain of a drawn length (any length of the space without ``lengths``)."""
        for _ in range(TRIES):
            target = self.rng.choices(self.lengths, self.weights)[0] if self.lengths else None
            chain = self._walk()
            if chain not in self.asked and (target is None or len(chain) == target):
                return chain
        return self._walk()

    def _walk(self) -> Chain:
        chain = self.space.root
        for _ in range(self.rng.randint(1, MAX_ACTIONS)):
            actions = self.space.actions(chain)
            if not actions:
                break
            chain = self.rng.choice(actions).apply(chain)
        return chain


@register_searcher
class Menu(Searcher):
    """The full model, then ``chains`` in their order, whatever their scores."""

    name = "menu"
    looks_ahead = True

    def __init__(
        self,
        space: ChainSpace,
        budget: int,
        seed: int,
        chains: Sequence[str],
        source: str = "",
    ) -> None:
        super().__init__(space, budget, seed)
        menu = [Chain.parse(c) for c in chains]
        self.queue = [space.root, *(c for c in dict.fromkeys(menu) if c != space.root)]

    def ask(self) -> Chain:
        if not self.queue:  # a menu shorter than the budget: the search stops on repeats
            return self.space.root
        return self.queue.pop(0)

    def tell(self, trial: Trial) -> None:
        """Ignored: the menu is fixed before any document is seen."""
