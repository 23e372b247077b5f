"""Recursive-descent parser for the select language (compatible with ``ror``).

Grammar (keywords case-insensitive; field names case-sensitive, as in DICOM)::

    statement   := SELECT level [FROM level] WHERE clause
                   (ALSO WHERE clause)* [CHECK check] <end>
    level       := PATIENT | STUDY | SERIES
    clause      := [SERIES [NAMED name]] HAS condition
    name        := string | identifier
    condition   := or
    or          := and (OR and)*
    and         := not (AND not)*
    not         := NOT not | '(' or ')' | comparison
    comparison  := field operator value
    field       := DICOM keyword | (gggg,eeee) | NumImages | NumSlices
                 | Orientation | SliceSpacing | IsVolume
    operator    := = | == | containing | regexp | < | > | <= | >= | approx
    value       := string | number | identifier          (MR, true, ...)
    check       := the same boolean structure over
                   ref operator (ref | value),  ref := name@field

Precedence: ``NOT`` binds tighter than ``AND``, which binds tighter than ``OR``.

A clause without ``NAMED`` is named ``series<N>``, N being its 1-based position
among the clauses (``WHERE`` is 1, the first ``ALSO WHERE`` is 2, ...).

Checks made while parsing (each raises :class:`RuleSyntaxError` at the token):
unknown keywords, levels and fields (with a suggestion when one is close),
duplicate series names, a ``CHECK`` naming an unknown series, numeric operators
without a number, invalid regular expressions, ``Orientation`` values other than
AXIAL/SAGITTAL/CORONAL/OBLIQUE (case-insensitive, stored upper case), ``IsVolume``
compared with anything but ``=`` and true/false/1/0, and nesting deeper than
:data:`MAX_DEPTH`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable

from .compare import as_number
from .errors import RuleSyntaxError
from .fields import IS_VOLUME, ORIENTATION, ORIENTATIONS, canonical_field, suggest_field
from .lexer import SourceText, Token, TokenKind, lex
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

__all__ = ["MAX_DEPTH", "auto_name", "parse"]

MAX_DEPTH = 64
"""Deepest nesting of parentheses and ``NOT`` accepted in one expression."""

_WORD_OPERATORS = {
    "CONTAINING": Operator.CONTAINING,
    "REGEXP": Operator.REGEXP,
    "APPROX": Operator.APPROX,
}
_LEVELS = {"PATIENT": Level.PATIENT, "STUDY": Level.STUDY, "SERIES": Level.SERIES}
_FIELD_HELP = (
    "a DICOM keyword, a (gggg,eeee) tag, NumImages, NumSlices, Orientation, "
    "SliceSpacing or IsVolume"
)
_OPERATOR_HELP = "=, ==, containing, regexp, <, >, <=, >= or approx"


def auto_name(index: int) -> str:
    """The name given to the ``index``-th clause (1-based) when it has no ``NAMED``."""
    if index < 1:
        raise ValueError(f"clause indices are 1-based, got {index}")
    return f"series{index}"


def parse(text: str, *, source: str = "<string>") -> SelectStatement:
    """Parse a select statement.

    Args:
        text: The statement.
        source: Where it came from, for error messages (a file name).

    Returns:
        The immutable syntax tree.

    Raises:
        RuleSyntaxError: If the statement is not valid; the error carries the
            position and renders the offending line with a caret.
        TypeError: If ``text`` is not a string.
    """
    src = SourceText(text, source)
    return _Parser(src, lex(src)).statement()


def _loc(token: Token) -> Location:
    return Location(token.line, token.column)


class _Parser:
    def __init__(self, src: SourceText, tokens: list[Token]) -> None:
        self.src = src
        self.tokens = tokens
        self.index = 0
        self.depth = 0
        self.names: dict[str, Location] = {}
        self.auto_names: set[str] = set()

    # -- token helpers -----------------------------------------------------------

    @property
    def token(self) -> Token:
        return self.tokens[self.index]

    def peek(self, ahead: int = 1) -> Token:
        return self.tokens[min(self.index + ahead, len(self.tokens) - 1)]

    def advance(self) -> Token:
        token = self.token
        if token.kind is not TokenKind.EOF:
            self.index += 1
        return token

    def at_keyword(self, *keywords: str) -> bool:
        return self.token.kind is TokenKind.KEYWORD and self.token.value in keywords

    def error(self, message: str, token: Token | None = None) -> RuleSyntaxError:
        return self.src.error_at_token(message, self.token if token is None else token)

    def expect_keyword(self, keyword: str, context: str) -> Token:
        if self.at_keyword(keyword):
            return self.advance()
        raise self.error(f"expected {keyword} {context}, got {self.token.describe()}")

    # -- statement ---------------------------------------------------------------

    def statement(self) -> SelectStatement:
        if not self.at_keyword("SELECT"):
            raise self.error(f"a select statement starts with SELECT, got {self.token.describe()}")
        self.advance()
        select = self.level("SELECT")
        from_level = None
        if self.at_keyword("FROM"):
            self.advance()
            from_level = self.level("FROM")
        self.expect_keyword("WHERE", "after the SELECT part")
        clauses = [self.clause(1)]
        while self.at_keyword("ALSO"):
            self.advance()
            self.expect_keyword("WHERE", "after ALSO")
            clauses.append(self.clause(len(clauses) + 1))
        check = None
        if self.at_keyword("CHECK"):
            self.advance()
            check = self.expression(self.check_comparison)
        if self.token.kind is not TokenKind.EOF:
            raise self.error(
                f"unexpected {self.token.describe()}; expected AND, OR, ALSO WHERE, CHECK "
                "or the end of the statement"
            )
        return SelectStatement(
            select=select,
            from_level=from_level,
            clauses=tuple(clauses),
            check=check,
            source=self.src.source,
            text=self.src.text,
        )

    def level(self, after: str) -> Level:
        token = self.token
        if token.kind is TokenKind.KEYWORD and token.value in _LEVELS:
            self.advance()
            return _LEVELS[token.value]
        raise self.error(f"expected patient, study or series after {after}, got {token.describe()}")

    def clause(self, index: int) -> SeriesClause:
        start = self.tokens[self.index - 1]  # the WHERE
        name, auto, name_token = auto_name(index), True, start
        if self.at_keyword("SERIES"):
            self.advance()
            if self.at_keyword("NAMED"):
                self.advance()
                name_token = self.token
                if name_token.kind not in (TokenKind.STRING, TokenKind.IDENT):
                    raise self.error(
                        f"expected a series name (a quoted string) after NAMED, "
                        f"got {name_token.describe()}"
                    )
                self.advance()
                name, auto = name_token.value, False
                if not name.strip():
                    raise self.error("a series name must not be empty", name_token)
        elif self.at_keyword("NAMED"):
            raise self.error('NAMED must follow SERIES: write WHERE SERIES NAMED "name" HAS')
        self.expect_keyword("HAS", "before the conditions of a series clause")
        if name in self.names:
            first = self.names[name]
            where = f"line {first.line}, column {first.column}"
            if auto:
                message = (
                    f"clause {index} has no NAMED, and its automatic name {name!r} is "
                    f"already used (at {where}); name this clause"
                )
            elif name in self.auto_names:
                message = (
                    f"duplicate series name {name!r}: it is the automatic name of the "
                    f"clause without NAMED at {where}"
                )
            else:
                message = f"duplicate series name {name!r} (first used at {where})"
            raise self.error(message, name_token)
        self.names[name] = _loc(name_token)
        if auto:
            self.auto_names.add(name)
        condition = self.expression(self.comparison)
        return SeriesClause(name=name, auto_named=auto, condition=condition, location=_loc(start))

    # -- boolean structure -------------------------------------------------------

    def expression(self, leaf: Callable[[], Expr]) -> Expr:
        operands = [self.conjunction(leaf)]
        while self.at_keyword("OR"):
            self.advance()
            operands.append(self.conjunction(leaf))
        return _flatten(Or, operands)

    def conjunction(self, leaf: Callable[[], Expr]) -> Expr:
        operands = [self.negation(leaf)]
        while self.at_keyword("AND"):
            self.advance()
            operands.append(self.negation(leaf))
        return _flatten(And, operands)

    def negation(self, leaf: Callable[[], Expr]) -> Expr:
        token = self.token
        if not (self.at_keyword("NOT") and self.peek().kind is not TokenKind.AT) and (
            token.kind is not TokenKind.LPAREN
        ):
            return leaf()
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"expression nested more than {MAX_DEPTH} levels deep")
        self.advance()
        if token.kind is TokenKind.KEYWORD:  # NOT
            result: Expr = Not(self.negation(leaf))
        else:
            result = self.expression(leaf)
            if self.token.kind is not TokenKind.RPAREN:
                raise self.error(
                    f"expected ')' to close the '(' at line {token.line}, column "
                    f"{token.column}, got {self.token.describe()}"
                )
            self.advance()
        self.depth -= 1
        return result

    # -- comparisons -------------------------------------------------------------

    def comparison(self) -> Expr:
        start = self.token
        if start.kind in (TokenKind.IDENT, TokenKind.STRING) and self.peek().kind is TokenKind.AT:
            raise self.error("name@Field references belong in CHECK, not in a series clause")
        field = self.field_ref()
        op = self.operator(field)
        value_token = self.token
        right = self.literal(field, op)
        return Comparison(
            left=field,
            op=op,
            right=right,
            pattern=self.pattern(op, right, value_token),
            location=_loc(start),
        )

    def check_comparison(self) -> Expr:
        start = self.token
        left = self.series_ref()
        op = self.operator(left.field)
        value_token = self.token
        right: SeriesRef | Literal
        if self.is_series_ref():
            right = self.series_ref()
            if op is Operator.REGEXP:
                raise self.error("regexp needs a literal pattern on its right", value_token)
            if op.is_numeric and right.field.name in (ORIENTATION, IS_VOLUME):
                raise self.error(f"{right.field.name} is not numeric", value_token)
            pattern = None
        else:
            right = self.literal(left.field, op)
            pattern = self.pattern(op, right, value_token)
        return CheckComparison(left=left, op=op, right=right, pattern=pattern, location=_loc(start))

    def is_series_ref(self) -> bool:
        kinds = (TokenKind.IDENT, TokenKind.STRING, TokenKind.KEYWORD)
        return self.token.kind in kinds and self.peek().kind is TokenKind.AT

    def series_ref(self) -> SeriesRef:
        token = self.token
        if not self.is_series_ref():
            raise self.error(
                f"expected name@Field (a field of a named series) in CHECK, got {token.describe()}"
            )
        name = token.value if token.kind is TokenKind.STRING else token.text
        if name not in self.names:
            known = ", ".join(self.names)
            close = difflib.get_close_matches(name, list(self.names), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise self.error(
                f"CHECK references unknown series {name!r} (known names: {known}){hint}", token
            )
        self.advance()  # name
        self.advance()  # @
        return SeriesRef(series=name, field=self.field_ref(), location=_loc(token))

    def field_ref(self) -> FieldRef:
        token = self.token
        if token.kind in (TokenKind.IDENT, TokenKind.TAG):
            resolved = canonical_field(token.value)
            if resolved is None:
                suggestion = suggest_field(token.value)
                hint = f"; did you mean {suggestion!r}?" if suggestion else ""
                raise self.error(f"unknown field {token.text!r}{hint}")
            self.advance()
            name, tag, derived = resolved
            return FieldRef(
                name=name, tag=tag, derived=derived, text=token.text, location=_loc(token)
            )
        if token.kind is TokenKind.KEYWORD:
            raise self.error(f"expected a field ({_FIELD_HELP}), got keyword {token.text!r}")
        if token.kind is TokenKind.STRING:
            raise self.error(f"expected a field ({_FIELD_HELP}); field names are not quoted")
        raise self.error(f"expected a field ({_FIELD_HELP}), got {token.describe()}")

    def operator(self, field: FieldRef) -> Operator:
        token = self.token
        if token.kind is TokenKind.OP:
            self.advance()
            return Operator(token.value)
        if token.kind is TokenKind.KEYWORD and token.value in _WORD_OPERATORS:
            self.advance()
            return _WORD_OPERATORS[token.value]
        raise self.error(
            f"expected an operator ({_OPERATOR_HELP}) after {field.text or field.name}, "
            f"got {token.describe()}"
        )

    def literal(self, field: FieldRef, op: Operator) -> Literal:
        token = self.token
        if token.kind is TokenKind.STRING:
            literal = Literal(token.value, as_number(token.value), True, _loc(token))
        elif token.kind is TokenKind.NUMBER:
            number = as_number(token.text)
            if number is None:
                raise self.error(f"number {token.text} is out of range")
            literal = Literal(token.text, number, False, _loc(token))
        elif token.kind is TokenKind.IDENT:
            literal = Literal(token.text, None, False, _loc(token))
        elif token.kind is TokenKind.KEYWORD:
            raise self.error(
                f"expected a value after {op.value}, got keyword {token.text!r} "
                "(quote it to use it as a value)"
            )
        else:
            raise self.error(
                f"expected a value (a quoted string or a number) after {op.value}, "
                f"got {token.describe()}"
            )
        literal = self.check_literal(field, op, literal, token)
        self.advance()
        return literal

    def check_literal(
        self, field: FieldRef, op: Operator, literal: Literal, token: Token
    ) -> Literal:
        if field.name == ORIENTATION:
            if op.is_numeric:
                raise self.error(
                    f"{ORIENTATION} is not numeric; use =, containing or regexp", token
                )
            if op is not Operator.REGEXP:
                label = literal.text.strip().upper()
                if label not in ORIENTATIONS:
                    raise self.error(
                        f"{ORIENTATION} is one of {', '.join(ORIENTATIONS)}, got {literal.text!r}",
                        token,
                    )
                return Literal(label, None, literal.quoted, literal.location)
            return literal
        if field.name == IS_VOLUME:
            if op is not Operator.EQ:
                raise self.error(f"{IS_VOLUME} compares with = only (true/false/1/0)", token)
            verdict = {"true": "true", "1": "true", "false": "false", "0": "false"}.get(
                literal.text.strip().lower()
            )
            if verdict is None:
                raise self.error(
                    f"{IS_VOLUME} compares with true, false, 1 or 0, got {literal.text!r}", token
                )
            return Literal(verdict, None, literal.quoted, literal.location)
        if op.is_numeric and literal.number is None:
            raise self.error(f"operator {op.value!r} compares numbers, got {literal.text!r}", token)
        return literal

    def pattern(self, op: Operator, literal: Literal, token: Token) -> re.Pattern[str] | None:
        if op is not Operator.REGEXP:
            return None
        try:
            return re.compile(literal.text)
        except (re.error, OverflowError, RecursionError, ValueError) as exc:
            raise self.error(f"invalid regular expression {literal.text!r}: {exc}", token) from None


def _flatten(kind: type[And] | type[Or], operands: list[Expr]) -> Expr:
    if len(operands) == 1:
        return operands[0]
    flat: list[Expr] = []
    for operand in operands:
        if isinstance(operand, kind):
            flat.extend(operand.operands)
        else:
            flat.append(operand)
    return kind(tuple(flat))
