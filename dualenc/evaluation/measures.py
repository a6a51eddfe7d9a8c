"""Score runs against qrels: a thin wrapper over ir-measures (no metric is computed here).

Measures are ir-measures values written as strings (``nDCG@10``, ``RR(rel=2)@10``, ``R(rel=2)@1000``), and
every result dict is keyed by exactly those strings. ``ir_measures.calc_aggregate`` / ``iter_calc`` pick the
provider (pytrec_eval for nDCG/R/AP, the official MS MARCO scorer for cut-off RR).

Queries the run does not rank (``missing_as_zero``):
    ir-measures (since 0.3.0) evaluates over the query ids of the qrels: a qrels query that the run lacks
    gets the measure's ``DEFAULT`` value, 0, from ir-measures itself. So the mean divides by the number of
    qrels queries, which is also the official MS MARCO scorer's convention. A qrels query with no
    relevant document (or none at the measure's ``rel`` level) is kept in the mean whether or not the run
    ranks it; it scores 0 either way. ``missing_as_zero=True`` (the default) is exactly this behaviour.
    ``missing_as_zero=False`` is trec_eval's behaviour without ``-c``: the qrels are first restricted to
    the queries the run contains, so the mean covers only ranked queries.

Query ids in the run that are not in the qrels are ignored by ir-measures, as by trec_eval and pyserini.
:func:`check_run_queries` warns about them and about judged queries the run lacks (counting both), and
rejects a run that shares no query with the qrels (a run on the wrong topics file is a common mistake), or,
with ``strict=True``, any unjudged run query.
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from dualenc.errors import InputError

if TYPE_CHECKING:  # imported where a measure is parsed or computed: `import dualenc.training` stays light
    import ir_measures

logger = logging.getLogger(__name__)

PRESETS: dict[str, list[str]] = {
    "msmarco-dev": ["RR@10", "R@1000"],
    "trec-dl": ["nDCG@10", "RR(rel=2)@10", "R(rel=2)@1000"],
    "beir": ["nDCG@10", "R@100"],
}

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]
MeasureSpec = str | Sequence[str]


def _split_spec(spec: str) -> list[str]:
    """Split on commas and whitespace outside brackets, so ``RR(rel=2, judged_only=True)@10`` stays whole."""
    tokens: list[str] = []
    current: list[str] = []
    depth = 0
    for char in spec:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if depth <= 0 and (char == "," or char.isspace()):
            tokens.append("".join(current))
            current = []
        else:
            current.append(char)
    tokens.append("".join(current))
    return [token for token in tokens if token]


def _parse_one(token: str) -> ir_measures.Measure:
    """Parse one ir-measures string; ``InputError`` naming the token if it is not a usable measure."""
    import ir_measures

    hint = f"use ir-measures syntax such as nDCG@10 or RR(rel=2)@10, or a preset: {', '.join(PRESETS)}"
    try:
        measure = ir_measures.parse_measure(token)
        measure.validate_params()  # ir-measures reports bad parameters with AssertionError
    except (ValueError, NameError, TypeError, AssertionError) as err:
        raise InputError(f"bad measure '{token}': {err} ({hint})") from err
    if not ir_measures.DefaultPipeline.supports(measure):
        raise InputError(f"measure '{token}' is not supported by any installed ir-measures provider")
    return measure


def parse_measures(spec: MeasureSpec) -> list[ir_measures.Measure]:
    """Turn a preset name or a list of ir-measures strings into measures.

    Args:
        spec: a preset name (see :data:`PRESETS`), a string of measures separated by spaces or commas
            (``"nDCG@10 RR(rel=2)@10"``), or a sequence of such strings. Preset names may appear among
            the tokens; duplicates are dropped, first occurrence kept.

    Returns:
        The measures, in the order given.

    Raises:
        InputError: a token is neither a preset nor a supported ir-measures measure, or ``spec`` is empty.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    tokens: list[str] = []
    for item in items:
        for token in _split_spec(str(item)):
            tokens.extend(PRESETS.get(token.lower(), [token]))
    if not tokens:
        raise InputError(f"no measures given in {spec!r}")
    measures: list[ir_measures.Measure] = []
    for token in tokens:
        measure = _parse_one(token)
        if measure not in measures:
            measures.append(measure)
    return measures


def _restrict_qrels(qrels: Qrels, run: Run, missing_as_zero: bool) -> Qrels:
    """The qrels ir-measures should average over (see the module docstring)."""
    if not qrels:
        raise InputError("the qrels are empty: nothing to evaluate against")
    if missing_as_zero:
        return qrels
    kept = {qid: docs for qid, docs in qrels.items() if qid in run}
    if not kept:
        raise InputError("the run ranks none of the qrels queries (missing_as_zero=False leaves nothing)")
    return kept


def evaluate(
    qrels: Qrels, run: Run, measures: MeasureSpec = "trec-dl", *, missing_as_zero: bool = True
) -> dict[str, float]:
    """Mean of each measure over the queries (see the module docstring for which queries count).

    Args:
        qrels: ``{query_id: {doc_id: relevance}}``.
        run: ``{query_id: {doc_id: score}}``; higher scores rank first.
        measures: anything :func:`parse_measures` accepts; default the TREC DL preset.
        missing_as_zero: count qrels queries that the run lacks as 0 (MS MARCO convention); if False,
            average over the qrels queries the run contains.

    Returns:
        ``{measure string: mean value}``, keys exactly ir-measures' strings, in the order given.
    """
    parsed = parse_measures(measures)
    used = _restrict_qrels(qrels, run, missing_as_zero)
    import ir_measures

    values = ir_measures.calc_aggregate(parsed, used, run)
    return {str(measure): float(values[measure]) for measure in parsed}


def evaluate_per_query(
    qrels: Qrels, run: Run, measures: MeasureSpec = "trec-dl", *, missing_as_zero: bool = True
) -> dict[str, dict[str, float]]:
    """Per-query values of each measure, from ``ir_measures.iter_calc``.

    Args:
        qrels, run, measures, missing_as_zero: as in :func:`evaluate`.

    Returns:
        ``{query_id: {measure string: value}}`` for every query that counts in :func:`evaluate`'s mean,
        in qrels order; each inner dict follows the order of the measures.
    """
    parsed = parse_measures(measures)
    used = _restrict_qrels(qrels, run, missing_as_zero)
    by_query: dict[str, dict[str, float]] = {}
    import ir_measures

    for metric in ir_measures.iter_calc(parsed, used, run):
        by_query.setdefault(metric.query_id, {})[str(metric.measure)] = float(metric.value)
    names = [str(measure) for measure in parsed]
    return {qid: {name: by_query[qid][name] for name in names} for qid in used if qid in by_query}


def _first_line_of(path: str | os.PathLike, query_ids: set[str]) -> tuple[str, int] | None:
    """First ``(query_id, 1-based line)`` of a TREC or MS MARCO run file with a query id in ``query_ids``."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split(maxsplit=1)
            if fields and fields[0] in query_ids:
                return fields[0], line_no
    return None


def check_run_queries(
    run: Run,
    qrels: Qrels,
    *,
    run_path: str | os.PathLike | None = None,
    qrels_path: str | os.PathLike | None = None,
    strict: bool = False,
    missing_as_zero: bool = True,
) -> list[str]:
    """Check that a run and qrels are about the same queries; warn about the queries only one of them has.

    Run queries that the qrels do not judge (the TREC DL 2020 topics file has 200 topics, 54 judged) are
    ignored by ir-measures, as by trec_eval and pyserini: a warning gives their count. Judged queries that
    the run lacks count 0 (``missing_as_zero``, see the module docstring): a warning gives their count too.

    Args:
        run: ``{query_id: {doc_id: score}}``.
        qrels: ``{query_id: {doc_id: relevance}}``.
        run_path: the run's file, named in messages; re-read only to find the line of an unjudged id.
        qrels_path: the qrels' file, named in messages.
        strict: refuse unjudged run queries instead of warning (``dualenc evaluate --strict``).
        missing_as_zero: as in :func:`evaluate`; only then do missing judged queries get a warning.

    Returns:
        The warnings, each also logged (``logging.WARNING``).

    Raises:
        InputError: the run or qrels is empty; they share no query id; or (``strict``) a run query id is
            not in the qrels: the message names the first such id, its line in ``run_path``, and the qrels.
    """
    qrels_name = f"qrels {qrels_path}" if qrels_path is not None else "qrels"
    if not run:
        raise InputError("the run ranks no query", path=run_path)
    if not qrels:
        raise InputError("the qrels judge no query", path=qrels_path)
    unknown = [qid for qid in run if qid not in qrels]
    if len(unknown) == len(run):
        raise InputError(
            f"no query id of the run ({len(run)} queries, e.g. '{unknown[0]}') is in the {qrels_name} "
            f"({len(qrels)} queries, e.g. '{next(iter(qrels))}'): wrong topics/qrels pair?",
            path=run_path,
        )
    warnings = []
    if unknown:
        qid, line = _first_unknown(unknown, run_path)
        where = f"'{qid}'" + (f" on line {line}" if line is not None else "")
        if strict:
            raise InputError(
                f"query id '{qid}' is not in the {qrels_name} ({len(unknown)} of {len(run)} run queries are "
                "unjudged; without --strict they are ignored with a warning)",
                path=run_path,
                line=line,
            )
        many = len(unknown) > 1
        count, verb = (f"{len(unknown)} run queries have", "are") if many else ("1 run query has", "is")
        warnings.append(f"{count} no judgments in the {qrels_name} and {verb} ignored (first: {where})")
    ranked = len(run) - len(unknown)
    if missing_as_zero and ranked < len(qrels):
        warnings.append(
            f"the run ranks {ranked} of {len(qrels)} judged queries; the other {len(qrels) - ranked} count 0"
        )
    for message in warnings:
        logger.warning("%s", message)
    return warnings


def _first_unknown(unknown: list[str], run_path: str | os.PathLike | None) -> tuple[str, int | None]:
    """The first unjudged query id in file order and its line, when the run's file is known."""
    found = _first_line_of(run_path, set(unknown)) if run_path is not None else None
    return found if found is not None else (unknown[0], None)
