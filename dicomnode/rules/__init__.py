"""The rule engine: a select language (compatible with ``ror``) and its evaluation.

Parse once with :func:`parse`, then :func:`evaluate` the statement over the series
of each study (seen through :class:`SeriesView`)::

    from dicomnode.rules import DictSeries, evaluate, parse

    stmt = parse('SELECT study WHERE SERIES NAMED "T1w" HAS SeriesDescription = "T1w"')
    match = evaluate(stmt, [DictSeries("1.2.3", {"SeriesDescription": "T1w"})])
    match.matched, match.bindings, match.explanation

Nothing here touches a database or the network.
"""

from .compare import as_number, strip_padding
from .engine import (
    MAX_CHECKED_BINDINGS,
    CheckResult,
    ConditionResult,
    Match,
    SeriesResult,
    StudyValues,
    evaluate,
    evaluate_series_level,
    preference_key,
)
from .errors import RuleSyntaxError
from .fields import DERIVED_FIELDS, ORIENTATIONS, canonical_field
from .nodes import (
    And,
    CheckComparison,
    Comparison,
    Expr,
    FieldRef,
    Level,
    Literal,
    Location,
    Not,
    Operator,
    Or,
    SelectStatement,
    SeriesClause,
    SeriesRef,
)
from .parser import auto_name, parse
from .series import ORIENTATION_COSINE_THRESHOLD, DictSeries, SeriesView, orientation_label

__all__ = [
    "DERIVED_FIELDS",
    "MAX_CHECKED_BINDINGS",
    "ORIENTATIONS",
    "ORIENTATION_COSINE_THRESHOLD",
    "And",
    "CheckComparison",
    "CheckResult",
    "Comparison",
    "ConditionResult",
    "DictSeries",
    "Expr",
    "FieldRef",
    "Level",
    "Literal",
    "Location",
    "Match",
    "Not",
    "Operator",
    "Or",
    "RuleSyntaxError",
    "SelectStatement",
    "SeriesClause",
    "SeriesRef",
    "SeriesResult",
    "SeriesView",
    "StudyValues",
    "as_number",
    "auto_name",
    "canonical_field",
    "evaluate",
    "evaluate_series_level",
    "orientation_label",
    "parse",
    "preference_key",
    "strip_padding",
]
