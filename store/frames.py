"""A chain store as pandas DataFrames: the questions ``cola db`` answers, for notebooks and scripts.

Every function takes a :class:`Store`, or a store's path or URL, which is then opened read-only
(a mistyped path is an error, never a new empty store) and closed afterwards. The questions are
answered in SQL (``queries.py``): only the answers come into Python, never a run's evaluations,
except where the evaluations are the answer (:func:`chains`, :func:`tables`). A run is given by
id or by name; an unknown one is an error, never an empty frame.
"""

from __future__ import annotations

import contextlib
import math
import os
import types
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import fields, replace

import pandas as pd

from lm_eval_cola.store import compare as comparing
from lm_eval_cola.store import controls as controls_queries
from lm_eval_cola.store import queries
from lm_eval_cola.store.engine import StoreError, StoreReadOnly, translated
from lm_eval_cola.store.store import Store

StoreLike = Store | str | os.PathLike
RunLike = int | str


@contextlib.contextmanager
def opened(store: StoreLike) -> Iterator[Store]:
    """``store`` itself, or the store at that path or URL, opened read-only for the block."""
    if isinstance(store, Store):
        yield store
        return
    with Store(os.fspath(store), read_only=True) as read_only:
        yield read_only


def resolve_runs(store: Store, runs: RunLike | Sequence[RunLike]) -> list[int]:
    """The ids of runs given by id or name (one, or a list), all of which must exist."""
    runs = _listed(runs, int | str)
    with store.session() as session:
        found = {run: queries.find_run(session, run) for run in runs}
    missing = [f"'{run}'" for run, run_id in found.items() if run_id is None]
    if missing:
        raise StoreError(f"{store} has no run {', '.join(missing)}")
    return list(dict.fromkeys(found.values()))


def runs(store: StoreLike) -> pd.DataFrame:
    """Every run: what it searched, its status, its progress (``done`` of ``n_documents``),
    its original and oracle accuracies, and its controls (or the run it controls), so that no
    oracle is listed without them."""
    with opened(store) as opened_store, opened_store.session() as session:
        frame = _frame(queries.run_summaries(session), queries.RunSummary)
        roles = controls_queries.roles(session)
    frame.insert(
        frame.columns.get_loc("oracle_accuracy") + 1,
        "controls",
        frame["id"].map(roles).astype(object),
    )
    return frame


def chains(
    store: StoreLike, run_ids: RunLike | Sequence[RunLike], pick: str | None = "best"
) -> pd.DataFrame:
    """The chain picked for each document by ``pick`` (a :data:`queries.PICKS` policy) over
    the runs, or with ``pick=None`` every evaluation of the runs; metrics as ``metrics.NAME``
    columns (prefixed, so a metric can never shadow a column)."""
    with opened(store) as opened_store:
        ids = resolve_runs(opened_store, run_ids)
        with opened_store.session() as session:
            rows = queries.evaluations(session, ids, pick)
    frame = _frame(rows, queries.EvaluationRow)
    metrics = pd.DataFrame(frame.pop("metrics").tolist(), index=frame.index)
    return frame.join(metrics.add_prefix("metrics."))


def run_stats(store: StoreLike, run_id: RunLike) -> queries.RunStats:
    """The CoLa paper's questions for one run, with the run's controls beside its oracle
    figures (or the gold run it controls); :func:`stats` and :func:`layer_rates` as frames,
    from a single computation."""
    with opened(store) as opened_store:
        (found,) = resolve_runs(opened_store, run_id)
        with opened_store.session() as session:
            stats = queries.stats(session, found)
            gold = controls_queries.gold_of(session, found)
            if gold != found:
                return replace(stats, control_of=gold)
            beside = controls_queries.controls(session, found)
    return replace(stats, controls=beside if beside.any else None)


def controls(store: StoreLike, run_id: RunLike) -> controls_queries.Controls:
    """A gold run (or any of its controls) with its controls: the decoy run of the same
    settings, and unguided runs (:mod:`lm_eval_cola.store.controls`)."""
    with opened(store) as opened_store:
        (found,) = resolve_runs(opened_store, run_id)
        with opened_store.session() as session:
            result = controls_queries.controls(session, found)
    if not result.any:
        raise ValueError(
            f"run {result.gold_run} has no controls yet: search the same settings with "
            "--target decoy, or run cola controls random / menu"
        )
    return result


def control_curves(
    store: StoreLike,
    run_id: RunLike,
    sampling: str | os.PathLike | Iterable[str | os.PathLike] = (),
) -> pd.DataFrame:
    """The controls figure's data (``cola plot --kind controls``), a row per curve and k: of
    the ``documents`` whose full model misses the curve's target, how many reach it within the
    first k chains (or samples), and the share; ``sampling``: a ``cola controls sampling`` file,
    or several (one per temperature, or per run).
    """
    samples = [controls_queries.read_samples(p) for p in _listed(sampling, str | os.PathLike)]
    with opened(store) as opened_store:
        (found,) = resolve_runs(opened_store, run_id)
        with opened_store.session() as session:
            result = controls_queries.control_curves(session, found, samples)
    rows = [
        (curve.label, curve.kind, k, reached, curve.documents)
        for curve in result.curves
        for k, reached in enumerate(curve.reached, start=1)
    ]
    frame = pd.DataFrame(rows, columns=["curve", "kind", "k", "reached", "documents"])
    frame["share"] = frame["reached"] / frame["documents"].where(frame["documents"] > 0)
    return frame


def compare(
    store: StoreLike,
    run_id: RunLike,
    other_run_id: RunLike,
    other_store: StoreLike | None = None,
    show: int = 10,
) -> comparing.Comparison:
    """Run ``run_id`` against ``other_run_id`` (of ``other_store``, default the same store)
    chain by chain on the documents both finished (:mod:`lm_eval_cola.store.compare`)."""
    if show < 0:
        raise ValueError(f"--show {show}: list 0 or more differing pairs")
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(opened(store))
        second = first if other_store is None else stack.enter_context(opened(other_store))
        (first_run,) = resolve_runs(first, run_id)
        (second_run,) = resolve_runs(second, other_run_id)
        a = stack.enter_context(first.session())
        b = a if second is first else stack.enter_context(second.session())
        return comparing.compare(a, first_run, b, second_run, show)


def stats(store: StoreLike, run_id: RunLike) -> pd.DataFrame:
    """One row: the run's documents, original and oracle accuracy, the shares of originally
    correct documents with a shorter correct chain and of originally wrong ones some chain
    corrects, and the mean length of the best chains against the model's depth."""
    return stats_frame(run_stats(store, run_id))


def layer_rates(store: StoreLike, run_id: RunLike) -> pd.DataFrame:
    """Per layer: how often the run's best chains apply it on average, and the share of them
    that skip it and that repeat it."""
    return layer_rates_frame(run_stats(store, run_id))


def stats_frame(result: queries.RunStats) -> pd.DataFrame:
    """The scalars of ``result`` as one row; a share of no documents (None) as NaN, so that
    the shares are float columns. The controls have a function of their own (:func:`controls`)."""
    beside = {"control_of", "controls"}
    scalars = {
        k: v for k, v in vars(result).items() if k not in beside and not isinstance(v, list | dict)
    }
    return pd.DataFrame([{k: math.nan if v is None else v for k, v in scalars.items()}])


def layer_rates_frame(result: queries.RunStats) -> pd.DataFrame:
    """The per-layer lists of ``result``, a row per layer."""
    return pd.DataFrame(
        {
            "layer": range(result.n_layers),
            "usage": result.usage,
            "skip_rate": result.skip_rate,
            "repeat_rate": result.repeat_rate,
        }
    )


def table(store: StoreLike, name: str) -> pd.DataFrame:
    """One whole table, JSON columns as their stored text (what an export writes)."""
    return tables(store, name)[name]


def tables(store: StoreLike, names: str | Iterable[str] | None = None) -> dict[str, pd.DataFrame]:
    """Whole tables (default: all; one name, or several), read in one transaction, so that
    they agree with each other even while a search is writing (a document's evaluations and
    its done mark)."""
    names = list(queries.TABLES) if names is None else _listed(names, str)
    unknown = sorted(set(names) - set(queries.TABLES))
    with opened(store) as opened_store:
        if unknown:
            raise StoreError(
                f"{opened_store} has no table {', '.join(unknown)}: its tables are "
                f"{', '.join(queries.TABLES)}"
            )
        with opened_store.session() as session:
            read = {name: queries.table(session, name) for name in names}
    return {name: pd.DataFrame(rows, columns=columns) for name, (columns, rows) in read.items()}


def sql(store: StoreLike, statement: str) -> pd.DataFrame:
    """The result of one SQL statement, run read-only: a path or URL is opened read-only (on
    SQLite the connection refuses writes, on PostgreSQL the transaction is read-only), and the
    transaction is rolled back in any case, also on a :class:`Store` opened for writing."""
    with opened(store) as opened_store:
        try:
            with translated(opened_store.url), opened_store.engine.connect() as connection:
                # no_parameters: the text goes to the driver as it is ('%' is not a placeholder)
                raw = connection.execution_options(no_parameters=True)
                result = raw.exec_driver_sql(statement)
                if not result.returns_rows:
                    return pd.DataFrame()
                return pd.DataFrame(result.all(), columns=list(result.keys()))
        except StoreReadOnly as err:
            raise StoreReadOnly(
                f"{opened_store} is opened read-only for SQL: queries can read it, not change "
                f"it ({getattr(err.__cause__, 'orig', err)})"
            ) from None


def _listed(given: object, one: type | types.UnionType) -> list:
    """``given`` as a list: one item of type ``one`` (a str is one name, not its letters), or
    several."""
    return [given] if isinstance(given, one) else list(given)


def _frame(items: list, kind: type) -> pd.DataFrame:
    """Dataclass instances of ``kind`` as rows, with its fields as columns even when empty."""
    return pd.DataFrame([vars(item) for item in items], columns=[f.name for f in fields(kind)])
