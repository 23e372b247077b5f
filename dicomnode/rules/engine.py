"""Evaluate a parsed select statement over the series of one study.

Semantics
---------
* Each series clause is evaluated against every series. A missing attribute makes
  its comparison false (never an error); ``NOT`` negates the result as usual.
* Attributes are read with :meth:`SeriesView.values`; when a series lacks one, the
  optional ``study_values`` callable is asked (study/patient-level attributes the
  index keeps once per study).
* A study matches when every clause binds exactly one series, no series binds two
  clauses, and the ``CHECK`` (if any) holds for the binding.
* Preference among the series that satisfy a clause (:func:`preference_key`): most
  images first, then highest SeriesNumber (series without one last), then key
  (ascending). Bindings are searched depth-first in clause order, trying each
  clause's candidates in preference order and skipping candidates that would leave
  a later clause without any series (checked with a bipartite matching), so the
  first binding found is the preferred one and a valid binding is always found
  when one exists. If the CHECK fails for it, the next bindings are tried in the
  same order, up to :data:`MAX_CHECKED_BINDINGS`.
* The result does not depend on the order the series are given in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from .compare import compare_fields, compare_literal
from .fields import IS_VOLUME, NUM_IMAGES, ORIENTATION, SLICE_SPACING
from .nodes import (
    And,
    CheckComparison,
    Comparison,
    Expr,
    FieldRef,
    Literal,
    Not,
    Or,
    SelectStatement,
    SeriesRef,
    quote,
)
from .series import DictSeries, SeriesView, orientation_label

__all__ = [
    "MAX_CHECKED_BINDINGS",
    "CheckResult",
    "ConditionResult",
    "DictSeries",
    "Match",
    "SeriesResult",
    "SeriesView",
    "StudyValues",
    "evaluate",
    "evaluate_series_level",
    "orientation_label",
    "preference_key",
]

MAX_CHECKED_BINDINGS = 1000
"""Most complete bindings whose CHECK is evaluated before giving up on a study."""

_EXPLAINED_CHECKS = 10  # CHECK attempts rendered in Match.explanation

StudyValues = Callable[[str], "list[str] | None"]
"""Look up a study/patient-level attribute by canonical field name."""


@dataclass(frozen=True)
class ConditionResult:
    """The outcome of one comparison.

    Attributes:
        condition: The comparison in canonical text (``SeriesDescription = "T1w"``).
        got: The values compared (left side), ``None`` when missing.
        result: Whether the comparison held.
        note: Why it is false beyond a mismatch (missing, non-numeric), if so.
        against: The right side's values for ``name@Field`` on both sides in a
            CHECK, else ``None``.
        against_field: Whether the right side is a field (then ``against`` is
            meaningful even when ``None``).
    """

    condition: str
    got: tuple[str, ...] | None
    result: bool
    note: str | None = None
    against: tuple[str, ...] | None = None
    against_field: bool = False

    def __str__(self) -> str:
        text = f"{self.condition}: got {_render(self.got)}"
        if self.against_field:
            text += f" vs {_render(self.against)}"
        text += f" -> {'true' if self.result else 'false'}"
        if self.note:
            text += f" ({self.note})"
        return text


@dataclass(frozen=True)
class SeriesResult:
    """One clause evaluated against one series."""

    clause: str
    series_key: str
    matched: bool
    conditions: tuple[ConditionResult, ...]


@dataclass(frozen=True)
class CheckResult:
    """The CHECK evaluated for one complete binding (name, series key)."""

    binding: tuple[tuple[str, str], ...]
    holds: bool
    conditions: tuple[ConditionResult, ...]


@dataclass(frozen=True)
class Match:
    """The outcome of evaluating a statement over one study's series.

    Attributes:
        matched: Whether every clause is bound and the CHECK holds.
        bindings: ``(name, series)`` in the statement's clause order (the model's
            input channel order); empty when not matched.
        alternatives: For each name, the keys of the other series that satisfied
            its clause, in preference order (all of them when not matched).
        explanation: Human-readable trace, one line per entry.
        candidates: For each name, the keys of every series that satisfied its
            clause, in preference order.
        trace: Every clause evaluated against every series, in clause order then
            preference order.
        checks: The CHECK evaluations tried, in the order they were tried.
    """

    matched: bool
    bindings: list[tuple[str, SeriesView]]
    alternatives: dict[str, list[str]]
    explanation: list[str]
    candidates: dict[str, list[str]] = field(default_factory=dict)
    trace: list[SeriesResult] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.matched

    @property
    def keys(self) -> list[str]:
        """The bound series keys, in clause order."""
        return [series.key for _, series in self.bindings]

    def series(self, name: str) -> SeriesView:
        """The series bound to ``name``.

        Raises:
            KeyError: If ``name`` is not bound.
        """
        for bound, series in self.bindings:
            if bound == name:
                return series
        raise KeyError(f"no series bound to {name!r}")


def preference_key(series: SeriesView) -> tuple[int, int, int, str]:
    """Sort key for candidates: most images, highest SeriesNumber (None last), key."""
    number = series.series_number
    return (-series.num_images, 0 if number is not None else 1, -(number or 0), series.key)


def evaluate(
    stmt: SelectStatement,
    series: Sequence[SeriesView],
    study_values: StudyValues | None = None,
) -> Match:
    """Evaluate ``stmt`` over the series of one study.

    Args:
        stmt: A parsed statement.
        series: The study's series, in any order.
        study_values: Optional fallback for attributes a series does not carry.

    Returns:
        The :class:`Match` (see the module doc for the semantics).

    Raises:
        ValueError: If two series share a key.
    """
    return _Evaluation(stmt, series, study_values).study_match()


def evaluate_series_level(
    stmt: SelectStatement,
    series: Sequence[SeriesView],
    study_values: StudyValues | None = None,
) -> list[Match]:
    """Evaluate ``stmt`` for ``SELECT series``: one :class:`Match` per selected series.

    A series is selected when it satisfies the first clause and the rest of the
    statement (other clauses, CHECK) can be bound around it, i.e. the study
    matches with that series bound to the first clause. Matches come in
    preference order; only matched results are returned.

    Raises:
        ValueError: If two series share a key.
    """
    evaluation = _Evaluation(stmt, series, study_values)
    first = stmt.clauses[0].name
    matches = []
    for candidate in evaluation.candidates[first]:
        match = evaluation.study_match(fixed=candidate)
        if match.matched:
            matches.append(match)
    return matches


# -- implementation -----------------------------------------------------------------


def _render(values: Sequence[str] | None) -> str:
    if values is None:
        return "<missing>"
    return "[" + ", ".join(quote(v) for v in values) + "]"


def _derived_values(series: SeriesView, name: str) -> list[str] | None:
    if name == NUM_IMAGES:
        return [str(series.num_images)]
    if name == ORIENTATION:
        return None if series.orientation is None else [str(series.orientation)]
    if name == SLICE_SPACING:
        return None if series.slice_spacing is None else [repr(float(series.slice_spacing))]
    if name == IS_VOLUME:
        return None if series.is_volume is None else ["true" if series.is_volume else "false"]
    raise AssertionError(f"unknown derived field {name}")  # pragma: no cover


class _Evaluation:
    def __init__(
        self,
        stmt: SelectStatement,
        series: Sequence[SeriesView],
        study_values: StudyValues | None,
    ) -> None:
        if not isinstance(stmt, SelectStatement):
            raise TypeError(f"stmt must be a SelectStatement, got {type(stmt).__name__}")
        seen: set[str] = set()
        for item in series:
            if item.key in seen:
                raise ValueError(f"two series share the key {item.key!r}")
            seen.add(item.key)
        self.stmt = stmt
        self.study_values = study_values
        self.series = sorted(series, key=preference_key)
        self.by_key = {s.key: s for s in self.series}
        self.trace: list[SeriesResult] = []
        self.candidates: dict[str, list[SeriesView]] = {}
        for clause in stmt.clauses:
            satisfied = []
            for item in self.series:
                conditions: list[ConditionResult] = []
                ok = self._eval(clause.condition, self._leaf_for(item), conditions)
                self.trace.append(SeriesResult(clause.name, item.key, ok, tuple(conditions)))
                if ok:
                    satisfied.append(item)
            self.candidates[clause.name] = satisfied

    # -- attribute access --------------------------------------------------------

    def values(self, series: SeriesView, ref: FieldRef) -> list[str] | None:
        if ref.derived:
            return _derived_values(series, ref.name)
        found = series.values(ref.name)
        if not found and self.study_values is not None:
            found = self.study_values(ref.name)
        return [str(v) for v in found] if found else None

    # -- boolean evaluation (all leaves evaluated, for a complete trace) ----------

    def _eval(
        self,
        expr: Expr,
        leaf: Callable[[Expr], ConditionResult],
        out: list[ConditionResult],
    ) -> bool:
        if isinstance(expr, And):
            results = [self._eval(op, leaf, out) for op in expr.operands]
            return all(results)
        if isinstance(expr, Or):
            results = [self._eval(op, leaf, out) for op in expr.operands]
            return any(results)
        if isinstance(expr, Not):
            return not self._eval(expr.operand, leaf, out)
        result = leaf(expr)
        out.append(result)
        return result.result

    def _leaf_for(self, series: SeriesView) -> Callable[[Expr], ConditionResult]:
        return lambda expr: self._leaf(expr, series)

    def _check_leaf_for(self, bound: Mapping[str, SeriesView]) -> Callable[[Expr], ConditionResult]:
        return lambda expr: self._check_leaf(expr, bound)

    def _leaf(self, expr: Expr, series: SeriesView) -> ConditionResult:
        assert isinstance(expr, Comparison)
        got = self.values(series, expr.left)
        result, note = compare_literal(expr.op, got, expr.right, expr.pattern)
        return ConditionResult(str(expr), None if got is None else tuple(got), result, note)

    def _check_leaf(self, expr: Expr, bound: Mapping[str, SeriesView]) -> ConditionResult:
        assert isinstance(expr, CheckComparison)
        got = self.values(bound[expr.left.series], expr.left.field)
        got_t = None if got is None else tuple(got)
        if isinstance(expr.right, SeriesRef):
            other = self.values(bound[expr.right.series], expr.right.field)
            result, note = compare_fields(expr.op, got, other)
            other_t = None if other is None else tuple(other)
            return ConditionResult(str(expr), got_t, result, note, other_t, True)
        assert isinstance(expr.right, Literal)
        result, note = compare_literal(expr.op, got, expr.right, expr.pattern)
        return ConditionResult(str(expr), got_t, result, note)

    # -- binding search ----------------------------------------------------------

    def _feasible(self, names: Sequence[str], used: set[str]) -> bool:
        """Whether the clauses ``names`` can each get a distinct unused series."""
        owner: dict[str, str] = {}

        def augment(name: str, visited: set[str]) -> bool:
            for candidate in self.candidates[name]:
                key = candidate.key
                if key in used or key in visited:
                    continue
                visited.add(key)
                if key not in owner or augment(owner[key], visited):
                    owner[key] = name
                    return True
            return False

        return all(augment(name, set()) for name in names)

    def _bindings(self, fixed: SeriesView | None) -> Iterator[list[SeriesView]]:
        names = list(self.stmt.names)
        chosen: list[SeriesView] = []
        used: set[str] = set()

        def descend(index: int) -> Iterator[list[SeriesView]]:
            if index == len(names):
                yield list(chosen)
                return
            options = self.candidates[names[index]]
            if index == 0 and fixed is not None:
                options = [fixed]
            for candidate in options:
                if candidate.key in used:
                    continue
                used.add(candidate.key)
                if self._feasible(names[index + 1 :], used):
                    chosen.append(candidate)
                    yield from descend(index + 1)
                    chosen.pop()
                used.discard(candidate.key)

        return descend(0)

    def study_match(self, fixed: SeriesView | None = None) -> Match:
        names = list(self.stmt.names)
        checks: list[CheckResult] = []
        binding: list[SeriesView] | None = None
        exhausted = False
        for attempt in self._bindings(fixed):
            if self.stmt.check is None:
                binding = attempt
                break
            if len(checks) >= MAX_CHECKED_BINDINGS:
                exhausted = True
                break
            bound = dict(zip(names, attempt, strict=True))
            conditions: list[ConditionResult] = []
            holds = self._eval(self.stmt.check, self._check_leaf_for(bound), conditions)
            checks.append(
                CheckResult(tuple((n, s.key) for n, s in bound.items()), holds, tuple(conditions))
            )
            if holds:
                binding = attempt
                break
        candidates = {n: [s.key for s in self.candidates[n]] for n in names}
        if binding is None:
            alternatives = {n: list(keys) for n, keys in candidates.items()}
            bindings: list[tuple[str, SeriesView]] = []
        else:
            bindings = list(zip(names, binding, strict=True))
            alternatives = {n: [k for k in candidates[n] if k != s.key] for n, s in bindings}
        explanation = self._explain(candidates, bindings, alternatives, checks, exhausted, fixed)
        return Match(
            matched=binding is not None,
            bindings=bindings,
            alternatives=alternatives,
            explanation=explanation,
            candidates=candidates,
            trace=list(self.trace),
            checks=checks,
        )

    # -- explanation -------------------------------------------------------------

    def _describe(self, key: str) -> str:
        series = self.by_key[key]
        number = "" if series.series_number is None else f"#{series.series_number}, "
        return f"series {key} [{number}{series.num_images} images]"

    def _explain(
        self,
        candidates: dict[str, list[str]],
        bindings: list[tuple[str, SeriesView]],
        alternatives: dict[str, list[str]],
        checks: list[CheckResult],
        exhausted: bool,
        fixed: SeriesView | None,
    ) -> list[str]:
        lines: list[str] = []
        for clause in self.stmt.clauses:
            lines.append(f"clause {quote(clause.name)}: {clause.condition}")
            if not self.series:
                lines.append("  (no series)")
            for result in self.trace:
                if result.clause != clause.name:
                    continue
                verdict = "true" if result.matched else "false"
                lines.append(f"  {self._describe(result.series_key)}: {verdict}")
                lines.extend(f"    {condition}" for condition in result.conditions)
        for name, keys in candidates.items():
            lines.append(f"candidates for {quote(name)}: {_render(keys)}")
        if fixed is not None:
            lines.append(f"series level: {quote(self.stmt.names[0])} fixed to {fixed.key}")
        for check in checks[:_EXPLAINED_CHECKS]:
            pairs = ", ".join(f"{quote(n)}={k}" for n, k in check.binding)
            lines.append(f"CHECK with {pairs}: {'true' if check.holds else 'false'}")
            lines.extend(f"  {condition}" for condition in check.conditions)
        if len(checks) > _EXPLAINED_CHECKS:
            lines.append(f"... {len(checks) - _EXPLAINED_CHECKS} more bindings tried")
        if bindings:
            for name, series in bindings:
                others = alternatives[name]
                extra = f" (alternatives: {', '.join(others)})" if others else ""
                lines.append(f"binding {quote(name)} -> {series.key}{extra}")
            lines.append("result: matched")
        else:
            lines.append(f"result: no match ({self._why_not(candidates, checks, exhausted)})")
        return lines

    def _why_not(
        self, candidates: dict[str, list[str]], checks: list[CheckResult], exhausted: bool
    ) -> str:
        empty = [name for name, keys in candidates.items() if not keys]
        if empty:
            return "no series satisfies " + ", ".join(quote(n) for n in empty)
        if exhausted:
            return f"CHECK failed for the first {MAX_CHECKED_BINDINGS} bindings; gave up"
        if checks:
            return f"CHECK failed for all {len(checks)} possible bindings"
        return "no assignment gives every name its own series"
