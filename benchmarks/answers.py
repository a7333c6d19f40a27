"""What answers do a run's chains give, the further they move from the full model?

Issue 25, point 7: on the generated-letter ARC tasks the combined space (skip + repeat) finds
fewer right chains per document than either single space. This script reads the answers a
store kept for every evaluated chain and sets the runs side by side, the chains grouped by
their number of edits from the full model (a skipped or a repeated block is one edit; counted
as the chains one edit closer, ``search.space.single_reversions``): how many are right, how
the answers spread over the options, how many are no option at all, and how many documents
some chain of at most that many edits corrects. Runs on the same documents compare directly.

Example:

    python benchmarks/answers.py --store results/gen.db \
        --runs gen-arc-easy-gold gen-arc-easy-skip-gold
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd

from lm_eval_cola.chain import Chain
from lm_eval_cola.search.space import single_reversions
from lm_eval_cola.store import frames

#: Chains this many edits or more from the full model share a row.
DEEPEST = 6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("Example:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--store", required=True, help="SQLite path or SQLAlchemy URL")
    parser.add_argument("--runs", nargs="+", required=True, help="run ids or names")
    args = parser.parse_args(argv)
    every = frames.chains(args.store, args.runs, pick=None)
    if every.empty:
        print("no evaluations in those runs")
        return 1
    depths = frames.runs(args.store).set_index("id")["n_layers"]
    every["edits"] = [
        len(single_reversions(Chain.parse(chain), depths[run]))
        for chain, run in zip(every["chain"], every["run_id"], strict=True)
    ]
    shared = set.intersection(*(set(e["doc_hash"]) for _, e in every.groupby("run_id")))
    every = every[every["doc_hash"].isin(shared)]
    print(f"{len(shared)} documents every run evaluated\n")
    for run_id, evaluations in every.groupby("run_id"):
        print(f"run {run_id}")
        print(by_edits(evaluations).to_string())
        print()
    return 0


def by_edits(evaluations: pd.DataFrame) -> pd.DataFrame:
    """Per number of edits: chains, share right, the answers' spread, and the originally wrong
    documents corrected by a chain of at most that many edits."""
    identity = evaluations[evaluations["edits"] == 0].set_index("doc_hash")["correct"]
    wrong = set(identity[~identity.astype(bool)].index)
    options = sorted(a for a in evaluations["response"].dropna().unique() if _is_option(a))
    rows = {}
    for edits, group in evaluations.groupby(evaluations["edits"].clip(upper=DEEPEST)):
        answers = group["response"].fillna("")
        within = evaluations[evaluations["edits"] <= edits]
        fixed = within[within["doc_hash"].isin(wrong) & within["correct"].astype(bool)]
        label = f"{edits}+" if edits == DEEPEST else str(edits)
        rows[label] = {
            "chains": len(group),
            "right": group["correct"].mean(),
            **{f"'{o}'": (answers == o).mean() for o in options},
            "no option": (~answers.map(_is_option)).mean(),
            "answers per document": group.groupby("doc_hash")["response"].nunique().mean(),
            "wrong -> right within": f"{fixed['doc_hash'].nunique()}/{len(wrong)}",
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "edits"
    shares = [c for c in table.columns if c.startswith("'") or c in ("right", "no option")]
    table[shares] = table[shares].map(lambda share: f"{100 * share:.1f}%")
    table["answers per document"] = table["answers per document"].map(lambda n: f"{n:.2f}")
    return table


def _is_option(answer: str | None) -> bool:
    return bool(answer) and len(answer.strip()) == 1 and answer.strip().isalpha()


if __name__ == "__main__":
    raise SystemExit(main())
