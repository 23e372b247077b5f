"""The immutable syntax tree of a select statement.

All nodes are frozen dataclasses. Source positions (:class:`Location`) are kept for
messages but excluded from equality, so two statements that mean the same thing
compare equal however they were laid out. ``str(node)`` renders canonical text
that :func:`~dicomnode.rules.parser.parse` reads back to an equal tree.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field as _field

from .lexer import KEYWORDS

__all__ = [
    "And",
    "CheckComparison",
    "Comparison",
    "Expr",
    "FieldRef",
    "Level",
    "Literal",
    "Location",
    "Not",
    "Operator",
    "Or",
    "SelectStatement",
    "SeriesClause",
    "SeriesRef",
    "iter_leaves",
    "quote",
]


def quote(text: str) -> str:
    """Render ``text`` as a double-quoted literal that the lexer reads back unchanged."""
    out = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    out = out.replace("\t", "\\t")
    return f'"{out}"'


@dataclass(frozen=True)
class Location:
    """A 1-based position in the statement's source."""

    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.line}:{self.column}"


_NOWHERE = Location(1, 1)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Level(enum.Enum):
    """An information-model level (``SELECT <level> FROM <level>``)."""

    PATIENT = "patient"
    STUDY = "study"
    SERIES = "series"


class Operator(enum.Enum):
    """A comparison operator.

    ``EQ`` (``=`` or ``==``): every value equals the literal. ``CONTAINING``: one of
    the values contains the literal, case-insensitively (between two fields: every
    value on the right is one of the values on the left). ``REGEXP``: ``re.search``
    finds the pattern in one of the values. ``LT``/``GT``/``LE``/``GE``: every value
    compares numerically. ``APPROX`` (from ``ror``): every value is within
    :data:`APPROX_TOLERANCE` of the number.
    """

    EQ = "="
    CONTAINING = "containing"
    REGEXP = "regexp"
    LT = "<"
    GT = ">"
    LE = "<="
    GE = ">="
    APPROX = "approx"

    @property
    def is_numeric(self) -> bool:
        """Whether the operator compares numbers."""
        return self in _NUMERIC


_NUMERIC = frozenset({Operator.LT, Operator.GT, Operator.LE, Operator.GE, Operator.APPROX})

APPROX_TOLERANCE = 1e-4
"""Absolute tolerance of the ``approx`` operator (as in ``ror``)."""


@dataclass(frozen=True)
class FieldRef:
    """A field of a series.

    Attributes:
        name: Canonical name (see :mod:`dicomnode.rules.fields`): a DICOM keyword,
            ``"(GGGG,EEEE)"`` for a tag without keyword, or a derived field.
        tag: The DICOM tag, ``None`` for derived fields.
        derived: Whether the field is computed per series (``NumImages``, ...).
        text: The field as written in the statement.
    """

    name: str
    tag: int | None
    derived: bool
    text: str = _field(default="", compare=False)
    location: Location = _field(default=_NOWHERE, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"FieldRef.name must be a non-empty string, got {self.name!r}")
        if self.derived != (self.tag is None):
            raise ValueError(
                f"FieldRef {self.name!r}: derived fields have no tag and DICOM fields have one"
            )

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Literal:
    """A value written in the statement.

    Attributes:
        text: The value (unescaped for strings; normalised for ``Orientation``,
            which is upper case, and ``IsVolume``, which is ``"true"``/``"false"``).
        number: The value as a number when it reads as one, else ``None``.
        quoted: Whether it was written as a quoted string.
    """

    text: str
    number: float | None
    quoted: bool
    location: Location = _field(default=_NOWHERE, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"Literal.text must be a string, got {type(self.text).__name__}")
        if self.number is not None and not math.isfinite(self.number):
            raise ValueError(f"Literal.number must be finite, got {self.number}")

    def __str__(self) -> str:
        return quote(self.text) if self.quoted else self.text


@dataclass(frozen=True)
class SeriesRef:
    """``name@Field`` in a ``CHECK``: a field of the series bound to ``name``."""

    series: str
    field: FieldRef
    location: Location = _field(default=_NOWHERE, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.series, str) or not self.series.strip():
            raise ValueError(f"SeriesRef.series must be a non-empty name, got {self.series!r}")

    def __str__(self) -> str:
        bare = _IDENTIFIER.fullmatch(self.series) and self.series.upper() not in KEYWORDS
        return f"{self.series if bare else quote(self.series)}@{self.field}"


@dataclass(frozen=True)
class Comparison:
    """``Field op value`` inside a ``WHERE ... HAS`` clause.

    ``pattern`` is the compiled regular expression for ``regexp``, else ``None``.
    """

    left: FieldRef
    op: Operator
    right: Literal
    pattern: re.Pattern[str] | None = _field(default=None, compare=False, repr=False)
    location: Location = _field(default=_NOWHERE, compare=False)

    def __post_init__(self) -> None:
        _check_comparison(self, self.right)

    def __str__(self) -> str:
        return f"{self.left} {self.op.value} {self.right}"


@dataclass(frozen=True)
class CheckComparison:
    """``name@Field op (name@Field | value)`` inside a ``CHECK``."""

    left: SeriesRef
    op: Operator
    right: SeriesRef | Literal
    pattern: re.Pattern[str] | None = _field(default=None, compare=False, repr=False)
    location: Location = _field(default=_NOWHERE, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.right, SeriesRef):
            if self.op is Operator.REGEXP:
                raise ValueError(f"{self}: regexp needs a literal pattern on its right")
        else:
            _check_comparison(self, self.right)

    def __str__(self) -> str:
        return f"{self.left} {self.op.value} {self.right}"


def _check_comparison(node: Comparison | CheckComparison, right: Literal) -> None:
    """Validate a comparison with a literal; compile its pattern when not given."""
    if node.op.is_numeric and right.number is None:
        raise ValueError(f"{node}: operator {node.op.value!r} needs a number")
    if node.op is Operator.REGEXP and node.pattern is None:
        try:
            pattern = re.compile(right.text)
        except (re.error, OverflowError, RecursionError, ValueError) as exc:
            raise ValueError(f"{node}: invalid regular expression: {exc}") from None
        object.__setattr__(node, "pattern", pattern)


def _check_operands(kind: str, operands: tuple[Expr, ...]) -> None:
    if not isinstance(operands, tuple) or len(operands) < 2:
        raise ValueError(f"{kind} needs a tuple of at least two operands")


@dataclass(frozen=True)
class And:
    """All operands hold (two or more)."""

    operands: tuple[Expr, ...]

    def __post_init__(self) -> None:
        _check_operands("And", self.operands)

    def __str__(self) -> str:
        return " AND ".join(_wrap(op, Or) for op in self.operands)


@dataclass(frozen=True)
class Or:
    """At least one operand holds (two or more)."""

    operands: tuple[Expr, ...]

    def __post_init__(self) -> None:
        _check_operands("Or", self.operands)

    def __str__(self) -> str:
        return " OR ".join(str(op) for op in self.operands)


@dataclass(frozen=True)
class Not:
    """The operand does not hold."""

    operand: Expr

    def __str__(self) -> str:
        return f"NOT {_wrap(self.operand, (And, Or))}"


Expr = Comparison | CheckComparison | And | Or | Not
"""A boolean expression (``Comparison`` leaves in clauses, ``CheckComparison`` in CHECK)."""


def iter_leaves(expr: Expr) -> Iterator[Comparison | CheckComparison]:
    """The comparisons of an expression, left to right."""
    if isinstance(expr, (And, Or)):
        for operand in expr.operands:
            yield from iter_leaves(operand)
    elif isinstance(expr, Not):
        yield from iter_leaves(expr.operand)
    else:
        yield expr


def _wrap(expr: Expr, kinds: type | tuple[type, ...]) -> str:
    return f"({expr})" if isinstance(expr, kinds) else str(expr)


@dataclass(frozen=True)
class SeriesClause:
    """One ``WHERE``/``ALSO WHERE`` clause: a named series and its conditions.

    Attributes:
        name: The series name; ``series<N>`` (N the 1-based clause index) when the
            clause has no ``NAMED``.
        auto_named: Whether ``name`` was generated.
        condition: What the series must satisfy.
    """

    name: str
    auto_named: bool
    condition: Expr
    location: Location = _field(default=_NOWHERE, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"SeriesClause.name must be a non-empty name, got {self.name!r}")
        for leaf in iter_leaves(self.condition):
            if not isinstance(leaf, Comparison):
                raise ValueError(f"series clause {self.name!r} may hold Comparison leaves only")

    def __str__(self) -> str:
        head = "HAS" if self.auto_named else f"SERIES NAMED {quote(self.name)} HAS"
        return f"{head} {self.condition}"


@dataclass(frozen=True)
class SelectStatement:
    """A parsed select statement.

    Attributes:
        select: The level selected (``SELECT <level>``).
        from_level: The ``FROM <level>``, ``None`` when absent.
        clauses: The series clauses in statement order. This order is the order of
            :attr:`Match.bindings <dicomnode.rules.engine.Match.bindings>`, i.e.
            the model's input channel order.
        check: The ``CHECK`` expression, ``None`` when absent.
        source: Where the statement came from (a file name or ``"<string>"``).
        text: The statement as written.
    """

    select: Level
    from_level: Level | None
    clauses: tuple[SeriesClause, ...]
    check: Expr | None = None
    source: str = _field(default="<string>", compare=False)
    text: str = _field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.clauses, tuple) or not self.clauses:
            raise ValueError("a SelectStatement needs a non-empty tuple of clauses")
        names = [clause.name for clause in self.clauses]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate series names: {duplicates}")
        if self.check is not None:
            for leaf in iter_leaves(self.check):
                if not isinstance(leaf, CheckComparison):
                    raise ValueError("CHECK may hold CheckComparison leaves only")
                refs = [leaf.left] + ([leaf.right] if isinstance(leaf.right, SeriesRef) else [])
                for ref in refs:
                    if ref.series not in names:
                        raise ValueError(f"CHECK references unknown series {ref.series!r}")

    @property
    def names(self) -> tuple[str, ...]:
        """The series names in clause order."""
        return tuple(clause.name for clause in self.clauses)

    def clause(self, name: str) -> SeriesClause:
        """The clause named ``name``.

        Raises:
            KeyError: If no clause has that name.
        """
        for clause in self.clauses:
            if clause.name == name:
                return clause
        raise KeyError(f"no series clause named {name!r}; names are {list(self.names)}")

    def __str__(self) -> str:
        parts = [f"SELECT {self.select.value}"]
        if self.from_level is not None:
            parts.append(f"FROM {self.from_level.value}")
        for index, clause in enumerate(self.clauses):
            parts.append(("WHERE " if index == 0 else "ALSO WHERE ") + str(clause))
        if self.check is not None:
            parts.append(f"CHECK {self.check}")
        return "\n".join(parts)
