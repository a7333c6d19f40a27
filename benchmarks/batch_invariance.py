"""Which operations of a decoding step give a row the same bits whatever shares its call?

Batched decoding of many chains (issue 27) is only exact if a row's arithmetic does not depend
on its company. For each operation of a SmolLM2 decoding step (its shapes, float32), the row
under test is computed in a call of ``--rows`` rows beside random companions, and compared
with the same row

- at the same place of a call of the same shape beside other companions,
- at every other place of such a call (threads may split a call by rows), and
- alone: a call of one row (attention: its KV cache padded to the same length and masked).

Attention reads a KV cache of the row's own length ``--kv_length``, padded to ``--kv_pad``
and masked, as a batch of chains at different depths of their generation would be; it runs
both as PyTorch's fused ``scaled_dot_product_attention`` and as eager matmul + softmax (what
transformers' ``eager`` attention does). The last line runs the whole embedded model.

Example:

    python benchmarks/batch_invariance.py --rows 16
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

#: SmolLM2-135M's shapes
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 576, 1536, 9, 3, 64, 49152


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16, help="rows per call in company")
    parser.add_argument("--kv_length", type=int, default=70, help="the row's KV-cache length")
    parser.add_argument("--kv_pad", type=int, default=96, help="the padded length in company")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, one row "
          f"against {args.rows} rows a call")  # fmt: skip
    print(f"{'operation':36s} {'other company':>14s} {'other places':>13s} {'alone':>10s}")
    for name, op, width in operations():
        report(name, *compare_places(functools.partial(per_row, op, width), args.rows))
    for name, fused in (
        ("attention, fused SDPA", True),
        ("attention, eager matmul+softmax", False),
    ):
        attend = functools.partial(attention, args=args, fused=fused)
        report(name, *compare_places(attend, args.rows))
    report("whole model, prompt rows (no cache)", *compare_places(model_rows(), args.rows))
    print("rows a call from which its first row's bits no longer change (against 128 rows):")
    for name, op, width in operations()[:4]:
        print(f"  {name:34s} {stable_from(op, width)}")
    name, op, width = operations()[1]
    print(f"places of a call of m rows whose bits differ from a call of 64 ({name}):")
    for rows, places in tile_tails(op, width).items():
        print(f"  m = {rows:2d}: {', '.join(map(str, places)) or 'none'}")
    print("attention over the same keys padded further (eager, masked): same bits?")
    print("  " + ", ".join(f"+{pad}: {word(same)}" for pad, same in padded_keys(args).items()))
    return 0


def operations() -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor], int]]:
    """(name, the operation on a (rows, width) input, width) for each per-row step."""
    weight = lambda n, k: torch.randn(n, k) / k**0.5  # noqa: E731
    q, up, down, head = (
        weight(HIDDEN, HIDDEN),
        weight(INTERMEDIATE, HIDDEN),
        weight(HIDDEN, INTERMEDIATE),
        weight(VOCAB, HIDDEN),
    )
    norm = torch.rand(HIDDEN) + 0.5
    cos, sin = torch.rand(HEAD_DIM), torch.rand(HEAD_DIM)
    return [
        ("linear (q projection)", lambda x: F.linear(x, q), HIDDEN),
        ("linear (MLP up)", lambda x: F.linear(x, up), HIDDEN),
        ("linear (MLP down)", lambda x: F.linear(x, down), INTERMEDIATE),
        ("linear (LM head)", lambda x: F.linear(x, head), HIDDEN),
        ("RMS norm", lambda x: rms_norm(x, norm), HIDDEN),
        ("SiLU-gated product", lambda x: F.silu(x) * x, INTERMEDIATE),
        ("rotary embedding", lambda x: rotate(x, cos, sin), HEAD_DIM),
        ("log-softmax over the vocabulary", lambda x: F.log_softmax(x, -1), VOCAB),
    ]


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def compare_places(compute: Callable[[int, int], torch.Tensor], rows: int) -> list[bool]:
    """``compute(rows, at)`` is the row under test computed at place ``at`` of a call of
    ``rows`` rows (companions drawn anew each call): (same bits beside other companions, at
    every other place, alone)."""
    first = compute(rows, 0)
    return [
        torch.equal(first, compute(rows, 0)),
        all(torch.equal(first, compute(rows, at)) for at in range(1, rows)),
        torch.equal(first, compute(1, 0)),
    ]


ROW_SEED = 1234


def the_row(*shape: int) -> torch.Tensor:
    """The row under test: the same values at every call."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(ROW_SEED))


def per_row(op, width: int, rows: int, at: int) -> torch.Tensor:
    batch = torch.randn(rows, width)
    batch[at] = the_row(width)
    return op(batch)[at]


def attention(rows: int, at: int, args: argparse.Namespace, fused: bool) -> torch.Tensor:
    """One decoding query against its KV cache, padded to ``kv_pad`` and masked."""
    pad, length = args.kv_pad, args.kv_length
    query, keys, values = (
        torch.randn(rows, HEADS, 1, HEAD_DIM),
        *torch.randn(2, rows, KV_HEADS, pad, HEAD_DIM).unbind(0),
    )
    query[at] = the_row(HEADS, 1, HEAD_DIM)
    keys[at, :, :length], values[at, :, :length] = the_row(2, KV_HEADS, length, HEAD_DIM)
    mask = torch.ones(rows, 1, 1, pad, dtype=torch.bool)
    mask[at, ..., length:] = False
    if fused:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)[
            at
        ]
    keys, values = (t.repeat_interleave(HEADS // KV_HEADS, 1) for t in (keys, values))
    scores = (query @ keys.transpose(-1, -2) / HEAD_DIM**0.5).masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, -1) @ values)[at]


def model_rows() -> Callable[[int, int], torch.Tensor]:
    """The embedded SmolLM2's last-position logits of a prompt row among others of its length."""
    from transformers import AutoModelForCausalLM

    from lm_eval_cola.default_model import default_model_path

    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)
    prompt = torch.randint(0, 1000, (12,), generator=torch.Generator().manual_seed(ROW_SEED))

    @torch.no_grad()
    def compute(rows: int, at: int) -> torch.Tensor:
        ids = torch.randint(0, 1000, (rows, 12))
        ids[at] = prompt
        return model(input_ids=ids).logits[at, -1]

    return compute


def stable_from(op, width: int, most: int = 128) -> int:
    """The smallest row count ``m`` such that the row's bits in a call of any count from ``m``
    to ``most`` equal those in a call of ``most`` rows."""
    reference = per_row(op, width, most, 0)
    stable = most
    for rows in range(most - 1, 0, -1):
        if not torch.equal(per_row(op, width, rows, 0), reference):
            break
        stable = rows
    return stable


def tile_tails(op, width: int, most: int = 16) -> dict[int, list[int]]:
    """For calls of 1 to ``most`` rows, the places whose bits differ from a call of 64: the
    kernel works in tiles of rows, and a partial last tile takes another path."""
    reference = per_row(op, width, 64, 0)
    return {
        rows: [at for at in range(rows) if not torch.equal(per_row(op, width, rows, at), reference)]
        for rows in range(1, most + 1)
    }


def padded_keys(args: argparse.Namespace) -> dict[int, bool]:
    """A query over its ``kv_length`` keys, against the same keys padded by more (masked)."""
    length = args.kv_length
    query = the_row(1, HEADS, 1, HEAD_DIM)
    keys, values = the_row(2, 1, KV_HEADS, length, HEAD_DIM).unbind(0)

    def attend(pad: int) -> torch.Tensor:
        shape = (1, KV_HEADS, length + pad, HEAD_DIM)
        k, v = torch.zeros(shape), torch.zeros(shape)
        k[:, :, :length], v[:, :, :length] = keys, values
        k, v = (t.repeat_interleave(HEADS // KV_HEADS, 1) for t in (k, v))
        mask = torch.zeros(1, 1, 1, length + pad)
        mask[..., length:] = torch.finfo(torch.float32).min
        scores = query @ k.transpose(-1, -2) / HEAD_DIM**0.5 + mask
        return torch.softmax(scores, -1) @ v

    reference = attend(0)
    return {pad: torch.equal(reference, attend(pad)) for pad in (1, 3, 8, 26, 90)}


def word(same: bool) -> str:
    return "same" if same else "DIFFERENT"


def report(name: str, company: bool, places: bool, alone: bool) -> None:
    print(f"{name:36s} {word(company):>14s} {word(places):>13s} {word(alone):>10s}")


if __name__ == "__main__":
    raise SystemExit(main())
