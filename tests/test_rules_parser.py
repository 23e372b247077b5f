"""Tests for the select-language lexer and parser (dicomnode.rules.parser)."""

from __future__ import annotations

import dataclasses
import pickle
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomnode.rules import (
    And,
    CheckComparison,
    Comparison,
    Level,
    Not,
    Operator,
    Or,
    RuleSyntaxError,
    SelectStatement,
    SeriesRef,
    parse,
)
from dicomnode.rules.lexer import TokenKind, tokenize

FIELD_STATEMENT = """SELECT study FROM patient
  WHERE series NAMED "T1w" HAS SeriesDescription = "T1w"
  ALSO WHERE series NAMED "T2w" HAS SeriesDescription = "T2w"
  ALSO WHERE series NAMED "FLAIR" HAS SeriesDescription = "FLAIR"
  ALSO WHERE series NAMED "T1wCE" HAS SeriesDescription = "T1wCE"
"""


def cond(text: str):  # type: ignore[no-untyped-def]
    """The condition of a one-clause statement."""
    return parse(f"SELECT study WHERE HAS {text}").clauses[0].condition


def error_of(text: str, source: str = "<string>") -> RuleSyntaxError:
    with pytest.raises(RuleSyntaxError) as info:
        parse(text, source=source)
    return info.value


# -- valid statements ---------------------------------------------------------------


def test_field_statement_parses_in_clause_order() -> None:
    stmt = parse(FIELD_STATEMENT)
    assert isinstance(stmt, SelectStatement)
    assert stmt.select is Level.STUDY
    assert stmt.from_level is Level.PATIENT
    assert stmt.names == ("T1w", "T2w", "FLAIR", "T1wCE")
    assert stmt.check is None
    first = stmt.clauses[0].condition
    assert isinstance(first, Comparison)
    assert first.left.name == "SeriesDescription"
    assert first.op is Operator.EQ
    assert first.right.text == "T1w" and first.right.quoted


def test_ast_is_frozen() -> None:
    stmt = parse(FIELD_STATEMENT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stmt.select = Level.SERIES  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stmt.clauses[0].name = "x"  # type: ignore[misc]
    assert isinstance(stmt.clauses, tuple)


def test_from_is_optional_and_levels_recorded() -> None:
    stmt = parse('SELECT series WHERE SERIES HAS Modality = "MR"')
    assert stmt.select is Level.SERIES and stmt.from_level is None
    assert parse('SELECT patient FROM study WHERE HAS Modality = "MR"').select is Level.PATIENT


def test_keywords_are_case_insensitive() -> None:
    upper = parse(
        'SELECT STUDY FROM PATIENT WHERE SERIES NAMED "a" HAS Modality = "MR" '
        'AND NOT NumImages > 3 OR Modality CONTAINING "CT"'
    )
    mixed = parse(
        'sElEcT study fRoM Patient wHeRe sErIeS nAmEd "a" hAs Modality = "MR" '
        'and not NumImages > 3 Or Modality containing "CT"'
    )
    assert upper == mixed


def test_field_names_are_case_sensitive_with_suggestion() -> None:
    err = error_of('SELECT study WHERE HAS seriesdescription = "x"')
    assert "unknown field 'seriesdescription'" in err.message
    assert "did you mean 'SeriesDescription'" in err.message


def test_double_equals_is_equals() -> None:
    assert cond('Modality == "MR"') == cond('Modality = "MR"')


@pytest.mark.parametrize(
    ("text", "op"),
    [
        ("NumImages < 5", Operator.LT),
        ("NumImages > 5", Operator.GT),
        ("NumImages <= 5", Operator.LE),
        ("NumImages >= 5", Operator.GE),
        ("SliceThickness approx 1.5", Operator.APPROX),
        ('ImageType containing "ORIGINAL"', Operator.CONTAINING),
        ("SeriesDescription regexp 'T1'", Operator.REGEXP),
    ],
)
def test_operators(text: str, op: Operator) -> None:
    node = cond(text)
    assert isinstance(node, Comparison) and node.op is op


def test_precedence_and_binds_tighter_than_or() -> None:
    node = cond('Modality = "A" OR Modality = "B" AND Modality = "C"')
    assert isinstance(node, Or)
    left, right = node.operands
    assert isinstance(left, Comparison) and left.right.text == "A"
    assert isinstance(right, And)
    assert [c.right.text for c in right.operands] == ["B", "C"]  # type: ignore[union-attr]


def test_precedence_not_binds_tighter_than_and() -> None:
    node = cond('NOT Modality = "A" AND Modality = "B"')
    assert isinstance(node, And)
    assert isinstance(node.operands[0], Not)
    assert isinstance(node.operands[1], Comparison)


def test_parentheses_override_precedence() -> None:
    node = cond('(Modality = "A" OR Modality = "B") AND Modality = "C"')
    assert isinstance(node, And)
    assert isinstance(node.operands[0], Or)
    node = cond('NOT (Modality = "A" OR Modality = "B")')
    assert isinstance(node, Not) and isinstance(node.operand, Or)


def test_ror_style_not_with_parentheses() -> None:
    node = cond("NumImages > 10 AND NOT(NumImages > 200)")
    assert isinstance(node, And) and isinstance(node.operands[1], Not)


def test_same_operators_are_flattened() -> None:
    assert cond('(Modality = "A" AND Modality = "B") AND Modality = "C"') == cond(
        'Modality = "A" AND Modality = "B" AND Modality = "C"'
    )


@pytest.mark.parametrize(
    ("written", "value"),
    [
        ('"T1w"', "T1w"),
        ("'T1w'", "T1w"),
        (r'"say \"hi\""', 'say "hi"'),
        (r"'it\'s'", "it's"),
        (r'"back\\slash"', "back\\slash"),
        (r'"tab\tnew\nline"', "tab\tnew\nline"),
        (r"'\d+'", r"\d+"),  # unknown escapes are kept for regular expressions
        ('"single \' inside"', "single ' inside"),
        ("'double \" inside'", 'double " inside'),
        ('""', ""),
    ],
)
def test_quoting_and_escapes(written: str, value: str) -> None:
    node = cond(f"SeriesDescription = {written}")
    assert isinstance(node, Comparison)
    assert node.right.text == value and node.right.quoted


def test_bare_values_and_numbers() -> None:
    node = cond("Modality = MR")
    assert isinstance(node, Comparison)
    assert node.right.text == "MR" and not node.right.quoted and node.right.number is None
    for written, number in [("5", 5.0), ("-1.5", -1.5), ("1e3", 1000.0), (".5", 0.5), ("+2", 2.0)]:
        node = cond(f"SliceThickness > {written}")
        assert isinstance(node, Comparison)
        assert node.right.number == number and node.right.text == written


def test_quoted_number_is_accepted_by_numeric_operators() -> None:
    node = cond("SliceThickness < '2.5'")
    assert isinstance(node, Comparison) and node.right.number == 2.5


@pytest.mark.parametrize(
    ("written", "name", "tag"),
    [
        ("(0008,103E)", "SeriesDescription", 0x0008103E),
        ("(0008,103e)", "SeriesDescription", 0x0008103E),
        ("( 0018 , 0050 )", "SliceThickness", 0x00180050),
        ('("0x0018","0x0050")', "SliceThickness", 0x00180050),  # ror's spelling
        ("(0029,1010)", "(0029,1010)", 0x00291010),  # private: no keyword
    ],
)
def test_tags(written: str, name: str, tag: int) -> None:
    node = cond(f"{written} = 1")
    assert isinstance(node, Comparison)
    assert node.left.name == name and node.left.tag == tag and not node.left.derived
    assert node.left.text == written


def test_derived_fields_and_alias() -> None:
    node = cond("NumSlices > 10")
    assert isinstance(node, Comparison)
    assert node.left.name == "NumImages" and node.left.derived and node.left.tag is None
    node = cond("Orientation = axial")
    assert isinstance(node, Comparison) and node.right.text == "AXIAL"
    node = cond("IsVolume = 1")
    assert isinstance(node, Comparison) and node.right.text == "true"
    node = cond("IsVolume = FALSE")
    assert isinstance(node, Comparison) and node.right.text == "false"
    node = cond("SliceSpacing approx 3")
    assert isinstance(node, Comparison) and node.left.derived


def test_regexp_is_compiled_once() -> None:
    node = cond(r"SeriesDescription regexp '^T1.*\d$'")
    assert isinstance(node, Comparison) and node.pattern is not None
    assert node.pattern.search("T1 MPRAGE 3")


def test_auto_names() -> None:
    stmt = parse(
        'SELECT study WHERE HAS Modality = "MR" '
        'ALSO WHERE SERIES NAMED "x" HAS Modality = "CT" '
        'ALSO WHERE SERIES HAS Modality = "PT"'
    )
    assert stmt.names == ("series1", "x", "series3")
    assert [c.auto_named for c in stmt.clauses] == [True, False, True]


def test_check_between_named_series_and_with_literal() -> None:
    stmt = parse(
        'SELECT study WHERE SERIES NAMED "T1w" HAS Modality = MR '
        'ALSO WHERE SERIES NAMED "FLAIR" HAS Modality = MR '
        "CHECK T1w@FrameOfReferenceUID = FLAIR@FrameOfReferenceUID "
        'AND NOT T1w@SeriesDescription regexp "CE" OR FLAIR@NumImages > 10'
    )
    check = stmt.check
    assert isinstance(check, Or)
    both = check.operands[0]
    assert isinstance(both, And)
    first = both.operands[0]
    assert isinstance(first, CheckComparison)
    assert first.left == SeriesRef("T1w", first.left.field)
    assert isinstance(first.right, SeriesRef) and first.right.series == "FLAIR"
    assert first.left.field.name == "FrameOfReferenceUID"
    literal = check.operands[1]
    assert isinstance(literal, CheckComparison) and literal.right.text == "10"  # type: ignore[union-attr]


def test_check_with_quoted_name_and_auto_name() -> None:
    stmt = parse(
        'SELECT study WHERE SERIES NAMED "T1 post" HAS Modality = MR '
        'ALSO WHERE HAS Modality = MR CHECK "T1 post"@StudyDate < series2@StudyDate'
    )
    check = stmt.check
    assert isinstance(check, CheckComparison)
    assert check.left.series == "T1 post"
    assert isinstance(check.right, SeriesRef) and check.right.series == "series2"


def test_comments_and_whitespace() -> None:
    stmt = parse(
        "# protocol for the brain model\n"
        "SELECT study -- the whole study\n"
        "\tWHERE SERIES NAMED 'a' HAS Modality = MR  # trailing\r\n"
    )
    assert stmt.names == ("a",)


def test_str_roundtrips() -> None:
    text = (
        'SELECT study FROM patient WHERE SERIES NAMED "T1 w" HAS (Modality = MR OR '
        'Modality = "C\\"T") AND NOT NOT (0029,1010) regexp "\\\\d" AND NumSlices >= 3 '
        "ALSO WHERE HAS Orientation = sagittal AND IsVolume = 0 "
        'CHECK "T1 w"@FrameOfReferenceUID = series2@FrameOfReferenceUID OR series2@StudyDate < 2'
    )
    stmt = parse(text)
    again = parse(str(stmt))
    assert again == stmt
    assert str(again) == str(stmt)


def test_str_quotes_series_names_that_are_keywords() -> None:
    stmt = parse(
        'SELECT study WHERE SERIES NAMED "check" HAS Modality = MR '
        'ALSO WHERE SERIES NAMED "and" HAS Modality = MR '
        'CHECK "check"@Modality = "and"@Modality'
    )
    assert '"check"@Modality = "and"@Modality' in str(stmt)
    assert parse(str(stmt)) == stmt


def test_source_and_text_recorded() -> None:
    stmt = parse(FIELD_STATEMENT, source="rules/brain.sel")
    assert stmt.source == "rules/brain.sel" and stmt.text == FIELD_STATEMENT


def test_tokenizer_positions() -> None:
    tokens = tokenize('SELECT study\n  WHERE HAS (0008,103e) == "x"')
    kinds = [t.kind for t in tokens]
    assert kinds == [
        TokenKind.KEYWORD,
        TokenKind.KEYWORD,
        TokenKind.KEYWORD,
        TokenKind.KEYWORD,
        TokenKind.TAG,
        TokenKind.OP,
        TokenKind.STRING,
        TokenKind.EOF,
    ]
    where = tokens[2]
    assert (where.line, where.column, where.value) == (2, 3, "WHERE")
    assert tokens[4].value == "(0008,103E)"
    assert tokens[5].value == "="


# -- errors -------------------------------------------------------------------------


def test_error_on_line_one_has_position_and_caret() -> None:
    err = error_of('SELECT study WHERE HAS Foo = "x"', source="brain.sel")
    assert (err.source, err.line, err.column, err.token) == ("brain.sel", 1, 24, "Foo")
    lines = str(err).splitlines()
    assert lines[0] == "brain.sel:1:24: unknown field 'Foo'"
    assert lines[1] == 'SELECT study WHERE HAS Foo = "x"'
    assert lines[2] == " " * 23 + "^~~"
    assert lines[2].index("^") == lines[1].index("Foo")


def test_error_on_line_three_points_at_that_line() -> None:
    text = (
        "SELECT study FROM patient\n"
        '  WHERE series NAMED "T1w" HAS SeriesDescription = "T1w"\n'
        '  ALSO WHERE series NAMED "T2w" HAS SeriesDescripton = "T2w"\n'
        '  ALSO WHERE series NAMED "FLAIR" HAS SeriesDescription = "FLAIR"\n'
    )
    err = error_of(text, source="rule.txt")
    assert (err.line, err.column, err.token) == (3, 37, "SeriesDescripton")
    assert "did you mean 'SeriesDescription'" in err.message
    lines = str(err).splitlines()
    assert lines[0].startswith("rule.txt:3:37: unknown field 'SeriesDescripton'")
    assert lines[1] == text.splitlines()[2]
    assert lines[2] == " " * 36 + "^" + "~" * (len("SeriesDescripton") - 1)


def test_caret_keeps_tabs_for_alignment() -> None:
    err = error_of('SELECT study\n\tWHERE HAS Foo = "x"')
    assert err.line == 2
    assert str(err).splitlines()[2] == "\t          ^~~"


@pytest.mark.parametrize(
    ("text", "line", "column", "fragment"),
    [
        ('SELECT study WHERE HAS Modality = "MR', 1, 35, "unterminated string"),
        ("SELECT study WHERE HAS Modality = 'MR\nALSO", 1, 35, "unterminated string"),
        ('SELECT project WHERE HAS Modality = "MR"', 1, 8, "expected patient, study or series"),
        ('SELECT study FROM world WHERE HAS Modality = "MR"', 1, 19, "expected patient, study"),
        ('FETCH study WHERE HAS Modality = "MR"', 1, 1, "starts with SELECT"),
        ('SELECT study HAS Modality = "MR"', 1, 14, "expected WHERE"),
        ('SELECT study WHERE Modality = "MR"', 1, 20, "expected HAS"),
        ('SELECT study WHERE NAMED "x" HAS Modality = "MR"', 1, 20, "NAMED must follow SERIES"),
        ('SELECT study WHERE SERIES NAMED HAS Modality = "MR"', 1, 33, "expected a series name"),
        ('SELECT study WHERE SERIES NAMED "" HAS Modality = "MR"', 1, 33, "must not be empty"),
        ('SELECT study WHERE HAS Modality "MR"', 1, 33, "expected an operator"),
        ("SELECT study WHERE HAS Modality =", 1, 34, "expected a value"),
        ("SELECT study WHERE HAS Modality = AND", 1, 35, "got keyword 'AND'"),
        ('SELECT study WHERE HAS Modality = "MR" AND', 1, 43, "expected a field"),
        ('SELECT study WHERE HAS "Modality" = "MR"', 1, 24, "not quoted"),
        ('SELECT study WHERE HAS (Modality = "MR"', 1, 40, "expected ')'"),
        ('SELECT study WHERE HAS Modality = "MR")', 1, 39, "unexpected ')'"),
        ('SELECT study WHERE HAS Modality = "MR" Modality', 1, 40, "unexpected 'Modality'"),
        ("SELECT study WHERE HAS NumImages > abc", 1, 36, "compares numbers"),
        ("SELECT study WHERE HAS NumImages > 'abc'", 1, 36, "compares numbers"),
        ("SELECT study WHERE HAS Modality = 3D", 1, 35, "invalid number '3D'"),
        ("SELECT study WHERE HAS NumImages > 1e999", 1, 36, "out of range"),
        ("SELECT study WHERE HAS (0018,005) = 1", 1, 24, "invalid tag"),
        ("SELECT study WHERE HAS Modality != MR", 1, 33, "unexpected character '!'"),
        ("SELECT study WHERE HAS Modality = MR;", 1, 37, "unexpected character ';'"),
        ("SELECT study WHERE HAS SeriesDescription regexp 'T1('", 1, 49, "invalid regular"),
        ("SELECT study WHERE HAS SeriesDescription regexp '*'", 1, 49, "invalid regular"),
        ("SELECT study WHERE HAS Orientation = diagonal", 1, 38, "Orientation is one of"),
        ("SELECT study WHERE HAS Orientation > 1", 1, 38, "not numeric"),
        ("SELECT study WHERE HAS IsVolume = maybe", 1, 35, "true, false, 1 or 0"),
        ("SELECT study WHERE HAS IsVolume containing true", 1, 44, "= only"),
        ("SELECT study WHERE HAS a@Modality = MR", 1, 24, "belong in CHECK"),
        ("SELECT study WHERE HAS Modality = MR CHECK", 1, 43, "expected name@Field"),
        ("SELECT study WHERE HAS Modality = MR CHECK Modality = MR", 1, 44, "expected name@"),
        ("", 1, 1, "starts with SELECT"),
    ],
)
def test_errors_are_positioned(text: str, line: int, column: int, fragment: str) -> None:
    err = error_of(text)
    assert fragment in err.message, err.message
    assert (err.line, err.column) == (line, column), str(err)
    assert str(err).startswith(f"<string>:{line}:{column}: ")


def test_duplicate_series_names() -> None:
    err = error_of(
        'SELECT study WHERE SERIES NAMED "a" HAS Modality = MR\n'
        'ALSO WHERE SERIES NAMED "a" HAS Modality = CT'
    )
    assert (err.line, err.column, err.token) == (2, 25, '"a"')
    assert "duplicate series name 'a' (first used at line 1, column 33)" in err.message


def test_explicit_name_colliding_with_auto_name() -> None:
    err = error_of(
        'SELECT study WHERE HAS Modality = MR ALSO WHERE SERIES NAMED "series1" HAS Modality = CT'
    )
    assert "automatic name" in err.message and err.column == 62
    err = error_of(
        'SELECT study WHERE SERIES NAMED "series2" HAS Modality = MR ALSO WHERE HAS Modality = CT'
    )
    assert "automatic name 'series2'" in err.message and err.token == "WHERE"


def test_check_unknown_name() -> None:
    err = error_of(
        'SELECT study\nWHERE SERIES NAMED "T1w" HAS Modality = MR\nCHECK T1W@StudyDate = "1"'
    )
    assert (err.line, err.column, err.token) == (3, 7, "T1W")
    assert "unknown series 'T1W'" in err.message and "did you mean 'T1w'" in err.message


def test_check_regexp_needs_literal() -> None:
    err = error_of(
        'SELECT study WHERE SERIES NAMED "a" HAS Modality = MR '
        "ALSO WHERE SERIES NAMED b HAS Modality = MR CHECK a@Modality regexp b@Modality"
    )
    assert "literal pattern" in err.message


def test_deep_nesting_is_a_syntax_error() -> None:
    err = error_of("SELECT study WHERE HAS " + "(" * 500 + "Modality = MR" + ")" * 500)
    assert "nested" in err.message
    err = error_of("SELECT study WHERE HAS " + "NOT " * 500 + "Modality = MR")
    assert "nested" in err.message


def test_error_pickles_and_keeps_fields() -> None:
    err = error_of('SELECT study WHERE HAS Foo = "x"', source="f.sel")
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, RuleSyntaxError)
    assert str(again) == str(err)
    assert (again.line, again.column, again.token, again.source) == (1, 24, "Foo", "f.sel")


def test_non_string_input_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        parse(b"SELECT study")  # type: ignore[arg-type]


# -- property-based -----------------------------------------------------------------

_SOUP = [
    "SELECT", "select", "study", "series", "patient", "FROM", "WHERE", "ALSO", "SERIES",
    "NAMED", "HAS", "CHECK", "AND", "or", "NOT", "containing", "regexp", "approx",
    "=", "==", "<", ">", "<=", ">=", "(", ")", "@", ",", "!", ";", "\\", "\n", "\t",
    '"T1w"', "'x'", '"unterminated', "'\\'", "5", "-1.5", "1e999", "3D", ".", "..",
    "SeriesDescription", "Modality", "NumImages", "NumSlices", "Orientation", "AXIAL",
    "IsVolume", "true", "SliceSpacing", "(0008,103E)", "(0029,1010)", "(12", "T1w@Modality",
    "Foo", "#", "--", "é", "'('", "'[a-'", "T1w", "FrameOfReferenceUID",
]  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_SOUP), max_size=30), st.sampled_from([" ", "", "\n"]))
def test_token_soup_only_raises_rule_syntax_error(tokens: list[str], sep: str) -> None:
    try:
        parse(sep.join(tokens))
    except RuleSyntaxError as err:
        assert err.line >= 1 and err.column >= 1
        str(err)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_arbitrary_text_only_raises_rule_syntax_error(text: str) -> None:
    try:
        parse(text)
    except RuleSyntaxError as err:
        str(err)


_FIELDS = st.sampled_from(
    ["SeriesDescription", "Modality", "ImageType", "SliceThickness", "(0008,103E)",
     "(0029,1010)", "NumImages", "NumSlices", "SliceSpacing", "Orientation", "IsVolume",
     "FrameOfReferenceUID", "Bogus"]
)  # fmt: skip
_OPS = st.sampled_from(["=", "==", "containing", "regexp", "<", ">", "<=", ">=", "approx"])
_VALUES = st.one_of(
    st.sampled_from(["5", "-2.5", "MR", "true", "0", "AXIAL", "'[unclosed'", "'T1.*'"]),
    st.text(max_size=8).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.text(alphabet="abc'\"\\ \n", max_size=6).map(lambda s: "'" + s + "'"),
)


@st.composite
def _conditions(draw: st.DrawFn, depth: int = 0) -> str:
    if depth < 3 and draw(st.booleans()):
        left = draw(_conditions(depth + 1))
        right = draw(_conditions(depth + 1))
        joiner = draw(st.sampled_from(["AND", "OR", "and", "or"]))
        text = f"{left} {joiner} {right}"
        return f"({text})" if draw(st.booleans()) else text
    prefix = draw(st.sampled_from(["", "", "NOT ", "not "]))
    return f"{prefix}{draw(_FIELDS)} {draw(_OPS)} {draw(_VALUES)}"


@st.composite
def _statements(draw: st.DrawFn) -> str:
    level = draw(st.sampled_from(["patient", "study", "series", "PROJECT"]))
    parts = [f"SELECT {level}"]
    if draw(st.booleans()):
        parts.append(f"FROM {draw(st.sampled_from(['patient', 'study', 'series']))}")
    names = []
    for index in range(draw(st.integers(1, 3))):
        head = "WHERE" if index == 0 else "ALSO WHERE"
        named = draw(st.sampled_from(["", "SERIES ", 'SERIES NAMED "a" ', "SERIES NAMED b ",
                                      'series named "series1" ']))  # fmt: skip
        names.append(named)
        parts.append(f"{head} {named}HAS {draw(_conditions())}")
    if draw(st.booleans()):
        left = draw(st.sampled_from(["a", "b", "series1", "zz"]))
        right = draw(st.sampled_from(["a@Modality", "series2@NumImages", "5", '"x"']))
        parts.append(f"CHECK {left}@{draw(_FIELDS)} {draw(_OPS)} {right}")
    return draw(st.sampled_from([" ", "\n", "\n  "])).join(parts)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_statements())
def test_valid_ish_statements_parse_or_raise_rule_syntax_error(text: str) -> None:
    try:
        stmt = parse(text)
    except RuleSyntaxError as err:
        rendered = str(err)
        assert re.match(r"<string>:\d+:\d+: ", rendered)
        lines = re.split(r"\r\n|\n|\r", text)  # only these end a line
        assert err.source_line == lines[err.line - 1]
        return
    assert parse(str(stmt)) == stmt
