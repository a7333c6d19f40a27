"""A document's loglikelihood requests packed into one row, so every shared token runs once.

HFLM runs each (context, continuation) request as a row of its own: a four-choice question runs
its question four times, under every chain a search tries. Here the inputs of a document's
requests are merged into a prefix tree: tokens that several requests share (the question, a
common start of two answers) are one node. The tree is laid out as one row in which each token
sits at its depth (position ids) and attends to its ancestors and itself only (a 4D mask), so
every request sees exactly the tokens and positions it sees in a row of its own, and its
log-likelihood equals HFLM's up to float rounding. Truncation from the left to the model's
length is HFLM's.

Nodes whose logits are read come last in a row, and a batch left-pads its rows, so all rows read
their logits from the batch's last positions (HF's ``logits_to_keep``); :meth:`PackedBatch.gather`
then picks exactly the read positions, so the LM head (per position as costly as several decoder
layers) runs on nothing else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

#: A request as HFLM tokenizes it: (context tokens, continuation tokens).
TokenPair = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True)
class Read:
    """Where one request's log-likelihood is read: the logits of ``nodes`` score ``targets``."""

    nodes: tuple[int, ...]
    targets: tuple[int, ...]


@dataclass
class PackedRow:
    """The prefix tree of one document's requests, laid out as one row."""

    tokens: list[int]
    positions: list[int]
    parents: list[int]  #: row index of each node's parent, -1 for a first token
    reads: list[Read]  #: one per request, in request order
    n_unread: int  #: nodes before the suffix whose logits are read
    key: str = field(init=False)  #: content digest: a prefix cache's key for this row
    _ancestors: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        digest = hashlib.blake2b(digest_size=16)
        for values in (self.tokens, self.positions, self.parents):
            digest.update(torch.tensor(values, dtype=torch.int64).numpy().tobytes())
        self.key = digest.hexdigest()

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_read(self) -> int:
        return len(self.tokens) - self.n_unread

    def ancestors(self) -> torch.Tensor:
        """(T, T) bool: ``[i, j]`` when node ``j`` is node ``i`` or one of its ancestors."""
        if self._ancestors is None:
            size = len(self.tokens)
            seen = torch.zeros(size, size, dtype=torch.bool)
            for node in sorted(range(size), key=self.positions.__getitem__):  # parents first
                if self.parents[node] >= 0:
                    seen[node] = seen[self.parents[node]]
                seen[node, node] = True
            self._ancestors = seen
        return self._ancestors


def pack(requests: Sequence[TokenPair], max_length: int) -> PackedRow:
    """One row for the requests, each truncated from the left to ``max_length`` as HFLM does."""
    nodes: dict[tuple[int, int], int] = {}  # (parent, token) -> node, in creation order
    tokens, parents, depths = [], [], []
    paths: list[tuple[list[int], tuple[int, ...]]] = []
    read = set()
    for context, continuation in requests:
        if not context or not continuation:
            raise ValueError("a loglikelihood request needs a context and a continuation token")
        sequence = (list(context) + list(continuation))[-(max_length + 1) :]
        path, parent = [], -1
        for depth, token in enumerate(sequence[:-1]):
            node = nodes.get((parent, token))
            if node is None:
                node = nodes[(parent, token)] = len(tokens)
                tokens.append(token)
                parents.append(parent)
                depths.append(depth)
            path.append(node)
            parent = node
        first = len(path) - len(continuation)
        paths.append((path[first:], tuple(continuation)))
        read.update(path[first:])
    order = [n for n in range(len(tokens)) if n not in read] + sorted(read)
    where = {node: index for index, node in enumerate(order)}
    return PackedRow(
        tokens=[tokens[n] for n in order],
        positions=[depths[n] for n in order],
        parents=[where[parents[n]] if parents[n] >= 0 else -1 for n in order],
        reads=[Read(tuple(where[n] for n in path), targets) for path, targets in paths],
        n_unread=len(tokens) - len(read),
    )


class PackedBatch:
    """Rows left-padded into model inputs; padding tokens attend to themselves only."""

    def __init__(self, rows: Sequence[PackedRow], pad_id: int, device: torch.device | str) -> None:
        self.rows = list(rows)
        self.lengths = [len(row) for row in rows]
        self.keys = [row.key for row in rows]
        self.width = width = max(self.lengths)
        #: the last positions every row reads its logits from (``logits_to_keep``)
        self.keep = max(row.n_read for row in rows)
        #: where each row's read nodes are among the kept positions, rows one after another
        self._read_rows = torch.tensor([r for r, row in enumerate(rows) for _ in range(row.n_read)])
        self._read_columns = torch.tensor(
            [self.keep - row.n_read + i for row in rows for i in range(row.n_read)]
        )
        #: where each row's read positions start among all of them; the last is their number
        self.read_starts = [0]
        for row in rows:
            self.read_starts.append(self.read_starts[-1] + row.n_read)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        allowed = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)
        for r, row in enumerate(rows):
            start = width - len(row)
            ids[r, start:] = torch.tensor(row.tokens)
            positions[r, start:] = torch.tensor(row.positions)
            allowed[r, start:, start:] = row.ancestors()
        self.device = torch.device(device)
        self.input_ids, self.position_ids = ids.to(device), positions.to(device)
        self._allowed = {None: allowed.to(device)}
        self._masks: dict[tuple[int | None, torch.dtype], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def allowed(self, window: int | None) -> torch.Tensor:
        """(B, T, T) bool: which keys each query sees; with a sliding ``window``, only keys fewer
        than ``window`` positions back (as transformers' sliding masks)."""
        if window not in self._allowed:
            distance = self.position_ids[:, :, None] - self.position_ids[:, None, :]
            self._allowed[window] = self._allowed[None] & (distance < window)
        return self._allowed[window]

    def mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`allowed` as a (B, 1, T, T) additive mask, the form models take."""
        key = (window, dtype)
        if key not in self._masks:
            allowed = self.allowed(window)
            additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            self._masks[key] = additive.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        return self._masks[key]

    def gather(self, kept: torch.Tensor) -> torch.Tensor:
        """(N, ...) from (B, W, ...) whose last ``keep`` columns are the kept positions: each
        row's read positions, rows one after another. Works on hidden states and logits."""
        offset = kept.shape[1] - self.keep
        rows, columns = self._read_rows.to(kept.device), self._read_columns.to(kept.device)
        return kept[rows, columns + offset]

    def scores(self, logprobs: torch.Tensor) -> list[list[tuple[float, bool]]]:
        """Per row, per request: (log-likelihood, whether greedy decoding gives the
        continuation), from log-probabilities at the read positions (:meth:`gather`)."""
        results = []
        for r, row in enumerate(self.rows):
            offset = self.read_starts[r] - row.n_unread
            found = []
            for read in row.reads:
                positions = torch.tensor([offset + node for node in read.nodes])
                targets = torch.tensor(read.targets, device=logprobs.device)
                picked = logprobs[positions.to(logprobs.device)]
                greedy = bool((picked.argmax(dim=-1) == targets).all())
                found.append((float(picked.gather(1, targets[:, None]).sum()), greedy))
            results.append(found)
        return results
