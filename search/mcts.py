"""The CoLa paper's Monte Carlo Tree Search over chains (Section 3, Algorithm 1, Appendix B).

The root is the full model; a child applies one action of the :class:`ChainSpace`. Each
simulation descends from the root by

    UCB(P) = Q(P) / v(P) + c * sqrt(ln V / v(P)) - lambda * |P| / N

over the children already visited, and evaluates one new child: at a node none of whose
children has been visited, or, with probability ``explore`` (0.1), at any node on the way down,
a random *unvisited* child is chosen instead. The reward is the task's score; it is added to
every node on the path. Unlike the public PoLar code, where unvisited children score -inf and
are only reached one level below a visited one, every unvisited child of every node on the path
can be drawn, so the search widens at the root as well as deepening along good branches.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager

from lm_eval_cola.chain import Chain
from lm_eval_cola.scoring import Trial
from lm_eval_cola.search.base import Searcher, register_searcher
from lm_eval_cola.search.space import ChainSpace


class Node:
    __slots__ = ("_chains", "_unvisited", "_visited", "chain", "index", "parent", "total", "visits")

    def __init__(self, chain: Chain, parent: Node | None, index: int = 0) -> None:
        self.chain, self.parent, self.index = chain, parent, index
        self.visits, self.total = 0, 0.0
        self._chains: list[Chain] | None = None
        self._visited: list[Node] = []
        self._unvisited: list[Chain] = []

    def split_children(self, space: ChainSpace) -> tuple[list[Node], list[Chain]]:
        """The children visited (nodes) and the chains of those not yet visited, each in the
        space's order. A node has hundreds of children, most never evaluated: only a visited
        child becomes a node, and the split is kept as visits come in rather than sorted
        again at every selection step."""
        if self._chains is None:
            self._chains = list(space.children(self.chain))
            self._unvisited = list(self._chains)
        return self._visited, self._unvisited

    def child(self, chain: Chain) -> Node:
        """A node for one of this node's unvisited chains, joined to it on its first visit."""
        return Node(chain, self, self._chains.index(chain))

    def visit(self, score: float) -> tuple[int, float, int | None]:
        """Count a simulation through this node; returns what :meth:`unvisit` needs to take it
        back (the counts before, and where a first visit took its chain from the unvisited)."""
        before, place = (self.visits, self.total), None
        if not self.visits and self.parent is not None:
            place = self.parent._unvisited.index(self.chain)
            del self.parent._unvisited[place]
            bisect.insort(self.parent._visited, self, key=lambda node: node.index)
        self.visits += 1
        self.total += score
        return (*before, place)

    def unvisit(self, visits: int, total: float, place: int | None) -> None:
        """Take back the last :meth:`visit`, whose return value is given."""
        self.visits, self.total = visits, total
        if place is not None:
            self.parent._visited.remove(self)
            self.parent._unvisited.insert(place, self.chain)

    def depth(self) -> int:
        return 0 if self.parent is None else 1 + self.parent.depth()


@register_searcher
class MCTS(Searcher):
    name = "mcts"
    looks_ahead = True

    def __init__(
        self,
        space: ChainSpace,
        budget: int,
        seed: int,
        c: float = math.sqrt(2),
        length_penalty: float = 5.0,
        explore: float = 0.1,
    ) -> None:
        super().__init__(space, budget, seed)
        self.c, self.length_penalty, self.explore = c, length_penalty, explore
        self.rng = random.Random(seed)
        self.root = Node(space.root, None)
        self._leaf: Node | None = None
        #: the visits to take back on leaving :meth:`hypothetically`, while in it
        self._journal: list[tuple[Node, tuple[int, float, int | None]]] | None = None

    @contextmanager
    def hypothetically(self) -> Iterator[None]:
        """As :meth:`Searcher.hypothetically`, taking back each visit made inside (the tree
        holds every visited node's children: too much to copy at every evaluation)."""
        state, leaf, self._journal = self.rng.getstate(), self._leaf, []
        try:
            yield
        finally:
            for node, undo in reversed(self._journal):
                node.unvisit(*undo)
            self.rng.setstate(state)
            self._leaf, self._journal = leaf, None

    def ask(self) -> Chain:
        self._leaf = self._select() if self.root.visits else self.root
        return self._leaf.chain

    def _select(self) -> Node:
        node = self.root
        while True:
            visited, unvisited = node.split_children(self.space)
            if unvisited and (not visited or self.rng.random() < self.explore):
                return node.child(self.rng.choice(unvisited))
            if not visited:  # no action left: a complete chain, evaluated again from the memo
                return node
            node = max(visited, key=lambda child: self.ucb(child, node.visits))

    def ucb(self, node: Node, parent_visits: int) -> float:
        exploit = node.total / node.visits
        explore = self.c * math.sqrt(math.log(parent_visits) / node.visits)
        return exploit + explore - self.length_penalty * len(node.chain) / self.space.n_layers

    def tell(self, trial: Trial) -> None:
        node = self._leaf
        while node is not None:
            undo = node.visit(trial.score)
            if self._journal is not None:
                self._journal.append((node, undo))
            node = node.parent
