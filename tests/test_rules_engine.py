"""Tests for rule evaluation (dicomnode.rules.engine) over DictSeries."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomnode.rules import (
    ORIENTATION_COSINE_THRESHOLD,
    And,
    CheckComparison,
    Comparison,
    DictSeries,
    FieldRef,
    Level,
    Literal,
    Match,
    Operator,
    SelectStatement,
    SeriesClause,
    SeriesRef,
    SeriesView,
    evaluate,
    evaluate_series_level,
    orientation_label,
    parse,
    preference_key,
)
from dicomnode.rules import engine as engine_module

FIELD_STATEMENT = """SELECT study FROM patient
  WHERE series NAMED "T1w" HAS SeriesDescription = "T1w"
  ALSO WHERE series NAMED "T2w" HAS SeriesDescription = "T2w"
  ALSO WHERE series NAMED "FLAIR" HAS SeriesDescription = "FLAIR"
  ALSO WHERE series NAMED "T1wCE" HAS SeriesDescription = "T1wCE"
"""


def series(
    key: str, num_images: int = 10, number: int | None = None, **attrs: object
) -> DictSeries:
    return DictSeries(key, attrs, num_images=num_images, series_number=number)


def keys(match: Match) -> list[tuple[str, str]]:
    return [(name, s.key) for name, s in match.bindings]


def one(condition: str, item: SeriesView) -> Match:
    return evaluate(parse(f"SELECT study WHERE HAS {condition}"), [item])


# -- the field statement ------------------------------------------------------------


def brain_study() -> list[DictSeries]:
    return [
        series("s-t1", 176, 3, SeriesDescription="T1w", FrameOfReferenceUID="1.2.3"),
        series("s-t2", 40, 4, SeriesDescription="T2w", FrameOfReferenceUID="1.2.3"),
        series("s-flair", 40, 5, SeriesDescription="FLAIR", FrameOfReferenceUID="1.2.3"),
        series("s-t1ce", 176, 7, SeriesDescription="T1wCE", FrameOfReferenceUID="1.2.3"),
        series("s-loc", 3, 1, SeriesDescription="localizer", FrameOfReferenceUID="9.9"),
    ]


@pytest.mark.parametrize("seed", range(8))
def test_field_statement_binds_in_clause_order_whatever_the_input_order(seed: int) -> None:
    stmt = parse(FIELD_STATEMENT)
    study = brain_study()
    random.Random(seed).shuffle(study)
    match = evaluate(stmt, study)
    assert match.matched and bool(match)
    assert keys(match) == [
        ("T1w", "s-t1"),
        ("T2w", "s-t2"),
        ("FLAIR", "s-flair"),
        ("T1wCE", "s-t1ce"),
    ]
    assert match.keys == ["s-t1", "s-t2", "s-flair", "s-t1ce"]
    assert match.series("FLAIR").key == "s-flair"
    assert match.alternatives == {"T1w": [], "T2w": [], "FLAIR": [], "T1wCE": []}
    assert match.explanation[-1] == "result: matched"


def test_field_statement_missing_series_does_not_match() -> None:
    study = [s for s in brain_study() if s.key != "s-flair"]
    match = evaluate(parse(FIELD_STATEMENT), study)
    assert not match.matched
    assert match.bindings == []
    assert match.candidates["FLAIR"] == []
    assert match.alternatives["T1w"] == ["s-t1"]
    assert match.explanation[-1] == 'result: no match (no series satisfies "FLAIR")'
    with pytest.raises(KeyError):
        match.series("T1w")


# -- choice among candidates --------------------------------------------------------


def test_ambiguity_most_images_wins_and_alternatives_are_recorded() -> None:
    stmt = parse('SELECT study WHERE SERIES NAMED "T1w" HAS SeriesDescription regexp "T1"')
    study = [
        series("small", 20, 9, SeriesDescription="T1 fast"),
        series("big", 176, 2, SeriesDescription="T1 MPRAGE"),
        series("other", 300, 1, SeriesDescription="T2"),
    ]
    match = evaluate(stmt, study)
    assert keys(match) == [("T1w", "big")]
    assert match.alternatives == {"T1w": ["small"]}
    assert match.candidates == {"T1w": ["big", "small"]}
    assert 'binding "T1w" -> big (alternatives: small)' in match.explanation


def test_ties_break_on_highest_series_number_then_key() -> None:
    stmt = parse('SELECT study WHERE SERIES NAMED "x" HAS Modality = MR')
    study = [
        series("b", 10, None, Modality="MR"),
        series("a", 10, None, Modality="MR"),
        series("c", 10, 2, Modality="MR"),
        series("d", 10, 5, Modality="MR"),
    ]
    match = evaluate(stmt, study)
    assert match.candidates["x"] == ["d", "c", "a", "b"]
    assert keys(match) == [("x", "d")]
    assert sorted(study, key=preference_key)[0].key == "d"


def test_series_number_defaults_from_attributes() -> None:
    stmt = parse('SELECT study WHERE SERIES NAMED "x" HAS Modality = MR')
    study = [DictSeries("a", {"Modality": "MR", "SeriesNumber": "3"}),
             DictSeries("b", {"Modality": "MR", "SeriesNumber": 12})]  # fmt: skip
    assert keys(evaluate(stmt, study)) == [("x", "b")]


def test_one_series_never_binds_two_names() -> None:
    stmt = parse(
        'SELECT study WHERE SERIES NAMED "a" HAS Modality = MR '
        'ALSO WHERE SERIES NAMED "b" HAS Modality = MR'
    )
    only = [series("s1", 10, Modality="MR")]
    match = evaluate(stmt, only)
    assert not match.matched
    assert match.candidates == {"a": ["s1"], "b": ["s1"]}
    assert "no assignment gives every name its own series" in match.explanation[-1]
    two = [series("s1", 10, Modality="MR"), series("s2", 20, Modality="MR")]
    match = evaluate(stmt, two)
    assert keys(match) == [("a", "s2"), ("b", "s1")]
    assert match.alternatives == {"a": ["s1"], "b": ["s2"]}


def test_assignment_backtracks_to_find_a_valid_binding() -> None:
    # "a" prefers s-big, but s-big is the only series "b" can have.
    stmt = parse(
        'SELECT study WHERE SERIES NAMED "a" HAS Modality = MR '
        'ALSO WHERE SERIES NAMED "b" HAS Modality = MR AND NumImages > 100'
    )
    study = [series("s-big", 200, Modality="MR"), series("s-small", 20, Modality="MR")]
    match = evaluate(stmt, study)
    assert keys(match) == [("a", "s-small"), ("b", "s-big")]


def test_many_clauses_without_a_matching_fail_fast() -> None:
    clauses = " ".join(f'ALSO WHERE SERIES NAMED "n{i}" HAS Modality = MR' for i in range(1, 12))
    stmt = parse(f'SELECT study WHERE SERIES NAMED "n0" HAS Modality = MR {clauses}')
    study = [series(f"s{i}", 10, i, Modality="MR") for i in range(11)]  # 12 names, 11 series
    assert not evaluate(stmt, study).matched


# -- CHECK --------------------------------------------------------------------------

CHECK_STATEMENT = """SELECT study
WHERE SERIES NAMED "T1w" HAS SeriesDescription regexp "^T1"
ALSO WHERE SERIES NAMED "FLAIR" HAS SeriesDescription = FLAIR
CHECK T1w@FrameOfReferenceUID = FLAIR@FrameOfReferenceUID
"""


def test_check_frame_of_reference_match() -> None:
    study = [
        series("t1", 176, SeriesDescription="T1w", FrameOfReferenceUID="1.2.3"),
        series("flair", 40, SeriesDescription="FLAIR", FrameOfReferenceUID="1.2.3"),
    ]
    match = evaluate(parse(CHECK_STATEMENT), study)
    assert match.matched
    assert keys(match) == [("T1w", "t1"), ("FLAIR", "flair")]
    assert match.checks[0].holds
    assert (
        '  T1w@FrameOfReferenceUID = FLAIR@FrameOfReferenceUID: got ["1.2.3"] vs ["1.2.3"] -> true'
        in match.explanation
    )


def test_check_frame_of_reference_non_match() -> None:
    study = [
        series("t1", 176, SeriesDescription="T1w", FrameOfReferenceUID="1.2.3"),
        series("flair", 40, SeriesDescription="FLAIR", FrameOfReferenceUID="4.5.6"),
    ]
    match = evaluate(parse(CHECK_STATEMENT), study)
    assert not match.matched
    assert match.bindings == []
    assert len(match.checks) == 1 and not match.checks[0].holds
    text = "\n".join(match.explanation)
    assert 'got ["1.2.3"] vs ["4.5.6"] -> false' in text
    assert "CHECK failed for all 1 possible bindings" in text


def test_check_tries_other_bindings_in_preference_order() -> None:
    study = [
        series("t1-big", 300, SeriesDescription="T1 other", FrameOfReferenceUID="9.9"),
        series("t1-small", 176, SeriesDescription="T1w", FrameOfReferenceUID="1.2.3"),
        series("flair", 40, SeriesDescription="FLAIR", FrameOfReferenceUID="1.2.3"),
    ]
    match = evaluate(parse(CHECK_STATEMENT), study)
    assert keys(match) == [("T1w", "t1-small"), ("FLAIR", "flair")]
    assert [c.holds for c in match.checks] == [False, True]
    assert match.checks[0].binding == (("T1w", "t1-big"), ("FLAIR", "flair"))
    assert match.alternatives["T1w"] == ["t1-big"]


def test_check_with_literal_and_missing_attribute() -> None:
    stmt = parse(
        'SELECT study WHERE SERIES NAMED "a" HAS Modality = MR '
        'CHECK a@StudyDate >= 20200101 AND NOT a@PatientSex = "F"'
    )
    dated = series("s", 10, Modality="MR", StudyDate="20210304")
    assert evaluate(stmt, [dated]).matched
    undated = series("s", 10, Modality="MR")
    match = evaluate(stmt, [undated])
    assert not match.matched
    assert "a@StudyDate >= 20200101: got <missing> -> false (attribute missing)" in "\n".join(
        match.explanation
    )


def test_check_numeric_between_series() -> None:
    stmt = parse(
        'SELECT study WHERE SERIES NAMED "pre" HAS SeriesDescription = pre '
        'ALSO WHERE SERIES NAMED "post" HAS SeriesDescription = post '
        "CHECK pre@AcquisitionTime < post@AcquisitionTime AND pre@SliceThickness = "
        "post@SliceThickness"
    )
    study = [
        series("1", SeriesDescription="pre", AcquisitionTime="101500", SliceThickness="1"),
        series("2", SeriesDescription="post", AcquisitionTime="103000", SliceThickness="1.0"),
    ]
    assert evaluate(stmt, study).matched


def test_check_gives_up_after_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "MAX_CHECKED_BINDINGS", 3)
    stmt = parse(
        'SELECT study WHERE SERIES NAMED "a" HAS Modality = MR '
        'ALSO WHERE SERIES NAMED "b" HAS Modality = MR CHECK a@SeriesNumber > b@SeriesNumber '
        "AND a@SeriesNumber < 0"
    )
    study = [series(f"s{i}", 10, i, Modality="MR", SeriesNumber=i) for i in range(4)]
    match = evaluate(stmt, study)
    assert not match.matched and len(match.checks) == 3
    assert "gave up" in match.explanation[-1]


# -- value semantics ----------------------------------------------------------------


def test_missing_attribute_is_false_never_an_error() -> None:
    item = series("s", 10, Modality="MR")
    for condition in [
        'SeriesDescription = "x"',
        'SeriesDescription containing "x"',
        'SeriesDescription regexp "."',
        "SliceThickness > 1",
        "SliceThickness approx 1",
        "SliceSpacing > 1",
        "Orientation = AXIAL",
        "IsVolume = true",
        "(0029,1010) = 1",
    ]:
        match = one(condition, item)
        assert not match.matched, condition
        assert any(
            "got <missing> -> false (attribute missing)" in line for line in match.explanation
        )
    assert one('NOT SeriesDescription = "x"', item).matched


def test_non_numeric_value_in_numeric_comparison_is_false_with_note() -> None:
    item = series("s", 10, SliceThickness="thick")
    match = one("SliceThickness > 1", item)
    assert not match.matched
    assert (
        '    SliceThickness > 1: got ["thick"] -> false (non-numeric value "thick")'
        in match.explanation
    )
    assert match.trace[0].conditions[0].note == 'non-numeric value "thick"'


def test_explanation_contains_compared_values() -> None:
    match = one('SeriesDescription = "T1w"', series("s", 10, 4, SeriesDescription="T2w"))
    assert '    SeriesDescription = "T1w": got ["T2w"] -> false' in match.explanation
    assert "  series s [#4, 10 images]: false" in match.explanation
    result = match.trace[0].conditions[0]
    assert (result.condition, result.got, result.result) == (
        'SeriesDescription = "T1w"',
        ("T2w",),
        False,
    )


def test_padding_is_stripped_and_comparison_is_exact() -> None:
    item = series("s", SeriesDescription=" T1w  ", SeriesInstanceUID="1.2.3\x00")
    assert one('SeriesDescription = "T1w"', item).matched
    assert one('SeriesInstanceUID = "1.2.3"', item).matched
    assert not one('SeriesDescription = "t1w"', item).matched
    assert not one('SeriesDescription = "T1"', item).matched


def test_multi_valued_equals_every_containing_one() -> None:
    item = series("s", ImageType="ORIGINAL\\PRIMARY\\M")
    same = series("t", ImageType=["M", "M"])
    assert not one('ImageType = "ORIGINAL"', item).matched
    assert one('ImageType containing "PRIMARY"', item).matched
    assert not one('ImageType containing "DERIVED"', item).matched
    assert one('ImageType = "M"', same).matched
    assert one('ImageType regexp "^PRIM"', item).matched


def test_containing_is_a_case_insensitive_substring_test() -> None:
    t1 = series("s", SeriesDescription="T1 MPRAGE sag")
    assert one('SeriesDescription containing "t1"', t1).matched
    assert one('SeriesDescription containing "mprage"', t1).matched
    assert one('SeriesDescription containing "T1 MP"', t1).matched
    assert not one('SeriesDescription containing "T2"', t1).matched
    assert not one('SeriesDescription = "T1"', t1).matched  # = stays exact
    colin = series("c", SeriesDescription="sT1W_3D_TFE")
    assert one('SeriesDescription containing "T1"', colin).matched
    multi = series("m", ImageType="ORIGINAL\\PRIMARY\\AXIAL")
    assert one('ImageType containing "prim"', multi).matched  # any one value
    assert not one('ImageType containing "DERIVED"', multi).matched
    numbered = series("n", SeriesNumber="1203")
    assert one("SeriesNumber containing 20", numbered).matched  # the literal's text


def test_regexp_is_unanchored_and_case_sensitive() -> None:
    item = series("s", SeriesDescription="ax T1 mprage")
    assert one('SeriesDescription regexp "T1"', item).matched
    assert not one('SeriesDescription regexp "^T1"', item).matched
    assert not one('SeriesDescription regexp "MPRAGE"', item).matched
    assert one('SeriesDescription regexp "[Mm][Pp]RAGE|mprage$"', item).matched


def test_numeric_comparisons() -> None:
    item = series("s", 120, SliceThickness="1.50", PixelSpacing="0.5\\0.6", EchoTime="  30 ")
    assert one("SliceThickness < 2", item).matched
    assert one("SliceThickness >= 1.5", item).matched
    assert not one("SliceThickness > 1.5", item).matched
    assert one("SliceThickness approx 1.50001", item).matched
    assert one("PixelSpacing < 1", item).matched  # every value
    assert not one("PixelSpacing > 0.55", item).matched
    assert one("EchoTime <= 30", item).matched
    assert one("NumImages > 100 AND NumSlices <= 120", item).matched
    assert one("NumImages = 120", item).matched


def test_bare_number_equals_numerically_quoted_equals_exactly() -> None:
    item = series("s", SeriesNumber="05")
    assert one("SeriesNumber = 5", item).matched
    assert not one('SeriesNumber = "5"', item).matched
    assert one('SeriesNumber = "05"', item).matched


def test_derived_fields() -> None:
    item = DictSeries(
        "s",
        {"ImageOrientationPatient": [1, 0, 0, 0, 1, 0]},
        num_images=60,
        slice_spacing=2.5,
        is_volume=True,
    )
    assert item.orientation == "AXIAL"
    assert one("Orientation = AXIAL", item).matched
    assert one("Orientation = sagittal", item).matched is False
    assert one("Orientation regexp 'AX|COR'", item).matched
    assert one("SliceSpacing approx 2.5 AND SliceSpacing < 3", item).matched
    assert one("IsVolume = true", item).matched
    assert one("IsVolume = 1", item).matched
    assert not one("IsVolume = false", item).matched
    flat = DictSeries("f", {}, is_volume=False)
    assert one("IsVolume = 0", flat).matched


def test_tags_and_private_tags() -> None:
    item = DictSeries("s", {"(0008,103E)": "T1w", "(0029,1010)": "secret"})
    assert item.values("SeriesDescription") == ["T1w"]
    assert one("(0008,103e) = T1w", item).matched
    assert one("SeriesDescription = T1w", item).matched
    assert one('(0029,1010) = "secret"', item).matched


def test_study_values_fallback() -> None:
    stmt = parse('SELECT study WHERE HAS PatientAge = "045Y" AND Modality = MR')
    item = series("s", Modality="MR")
    study = {"PatientAge": ["045Y"], "Modality": ["CT"]}
    assert evaluate(stmt, [item], study.get).matched
    assert not evaluate(stmt, [item]).matched


def test_custom_series_view_implementation() -> None:
    @dataclass
    class IndexRow:
        key: str
        attrs: dict[str, list[str]] = field(default_factory=dict)
        num_images: int = 1
        orientation: str | None = None
        slice_spacing: float | None = None
        is_volume: bool | None = None
        series_number: int | None = None

        def values(self, field: str) -> list[str] | None:
            return self.attrs.get(field)

    row = IndexRow("uid", {"Modality": ["MR"]}, num_images=5)
    assert isinstance(row, SeriesView)
    match = evaluate(parse("SELECT study WHERE HAS Modality = MR AND NumImages = 5"), [row])
    assert match.matched and match.bindings[0][1] is row


def test_duplicate_series_keys_are_rejected() -> None:
    with pytest.raises(ValueError, match="share the key 'x'"):
        evaluate(parse("SELECT study WHERE HAS Modality = MR"), [series("x"), series("x")])


def test_no_series_at_all() -> None:
    match = evaluate(parse("SELECT study WHERE HAS Modality = MR"), [])
    assert not match.matched and "  (no series)" in match.explanation


# -- SELECT series ------------------------------------------------------------------


def test_series_level_gives_one_match_per_series() -> None:
    stmt = parse('SELECT series FROM study WHERE SERIES NAMED "MR" HAS Modality == "MR"')
    study = [
        series("a", 10, Modality="MR"),
        series("b", 30, Modality="MR"),
        series("c", 50, Modality="CT"),
    ]
    matches = evaluate_series_level(stmt, study)
    assert [keys(m) for m in matches] == [[("MR", "b")], [("MR", "a")]]
    assert all(m.matched for m in matches)


def test_series_level_requires_the_rest_of_the_statement() -> None:
    stmt = parse(
        'SELECT series WHERE SERIES NAMED "T1" HAS SeriesDescription regexp T1 '
        'ALSO WHERE SERIES NAMED "ref" HAS SeriesDescription = ref '
        "CHECK T1@FrameOfReferenceUID = ref@FrameOfReferenceUID"
    )
    study = [
        series("t1a", SeriesDescription="T1a", FrameOfReferenceUID="1"),
        series("t1b", SeriesDescription="T1b", FrameOfReferenceUID="2"),
        series("r", SeriesDescription="ref", FrameOfReferenceUID="1"),
    ]
    matches = evaluate_series_level(stmt, study)
    assert [keys(m) for m in matches] == [[("T1", "t1a"), ("ref", "r")]]


# -- DictSeries validation ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"key": ""}, ValueError, "key must be"),
        ({"key": "k", "attributes": {"NotAKeyword": 1}}, ValueError, "neither a DICOM keyword"),
        ({"key": "k", "attributes": {"NumImages": 1}}, ValueError, "neither a DICOM keyword"),
        ({"key": "k", "attributes": {"Modality": b"MR"}}, TypeError, "binary"),
        ({"key": "k", "attributes": {"Modality": True}}, TypeError, "booleans"),
        ({"key": "k", "attributes": {"Modality": [["MR"]]}}, TypeError, "nested"),
        ({"key": "k", "num_images": -1}, ValueError, "num_images"),
        ({"key": "k", "num_images": 1.5}, TypeError, "num_images"),
        ({"key": "k", "orientation": "axial"}, ValueError, "orientation must be"),
        ({"key": "k", "slice_spacing": float("nan")}, ValueError, "slice_spacing"),
        ({"key": "k", "is_volume": 1}, TypeError, "is_volume"),
        ({"key": "k", "series_number": "3"}, TypeError, "series_number"),
    ],
)
def test_dict_series_validates(kwargs: dict[str, object], error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        DictSeries(**kwargs)  # type: ignore[arg-type]


def test_dict_series_from_datasets() -> None:
    from pydicom.dataset import Dataset

    datasets = []
    for index in range(5):
        ds = Dataset()
        ds.SeriesInstanceUID = "1.2.3.4"
        ds.SeriesDescription = "T1w"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.SeriesNumber = 7
        ds.InstanceNumber = 5 - index
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [index * 1.2, 0, 0]
        ds.PatientName = "Doe^Jane"
        ds.ImageComments = "a\\b comment"
        datasets.append(ds)
    item = DictSeries.from_datasets(datasets)
    assert item.key == "1.2.3.4" and item.num_images == 5 and item.series_number == 7
    assert item.orientation == "SAGITTAL"
    assert item.slice_spacing == pytest.approx(1.2)
    assert item.values("ImageType") == ["ORIGINAL", "PRIMARY"]
    assert item.values("PatientName") == ["Doe^Jane"]
    assert item.values("ImageComments") == ["a\\b comment"]  # LT is never split
    assert item.is_volume is None
    with pytest.raises(ValueError):
        DictSeries.from_datasets([])


# -- property-based -----------------------------------------------------------------

_KEYWORDS = ["SeriesDescription", "Modality", "ImageType", "SliceThickness", "PixelSpacing",
             "FrameOfReferenceUID", "SeriesNumber", "StudyDate", "(0029,1010)"]  # fmt: skip
_VALUE = st.one_of(
    st.none(),
    st.text(max_size=12),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.one_of(st.text(max_size=6), st.integers(-5, 5)), max_size=4),
    st.sampled_from(["1.5", " 2 ", "T1w", "MR", "1\\2\\x", "", "\\", "nan", "1e400"]),
)
_SERIES = st.builds(
    DictSeries,
    key=st.text(min_size=1, max_size=4),
    attributes=st.dictionaries(st.sampled_from(_KEYWORDS), _VALUE, max_size=6),
    num_images=st.integers(0, 500),
    orientation=st.sampled_from([None, "AXIAL", "SAGITTAL", "CORONAL", "OBLIQUE"]),
    slice_spacing=st.one_of(st.none(), st.floats(0, 20)),
    is_volume=st.sampled_from([None, True, False]),
    series_number=st.one_of(st.none(), st.integers(-3, 30)),
)
_STATEMENTS = [
    parse(
        'SELECT study WHERE SERIES NAMED "a" HAS SeriesDescription = "T1w" OR Modality = MR '
        'ALSO WHERE SERIES NAMED "b" HAS NOT ImageType containing "M" AND SliceThickness > 1 '
        "ALSO WHERE HAS SeriesDescription regexp '[0-9]' OR PixelSpacing approx 1.5 "
        "CHECK a@FrameOfReferenceUID = b@FrameOfReferenceUID OR a@SliceThickness < "
        "series3@SliceThickness OR b@ImageType containing a@ImageType"
    ),
    parse(
        "SELECT series WHERE HAS NumImages >= 2 AND Orientation = AXIAL OR IsVolume = true "
        "OR SliceSpacing <= 3 OR (0029,1010) = 5 OR SeriesNumber = 5 OR StudyDate = '1.5' "
        "CHECK series1@StudyDate >= 1 OR NOT series1@SeriesDescription regexp 'x'"
    ),
]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_SERIES, max_size=5, unique_by=lambda s: s.key), st.sampled_from(_STATEMENTS))
def test_random_series_never_crash_evaluate(items: list[DictSeries], stmt: object) -> None:
    from dicomnode.rules import SelectStatement

    assert isinstance(stmt, SelectStatement)
    match = evaluate(stmt, items)
    assert isinstance(match.explanation, list) and match.explanation
    if match.matched:
        bound = [s.key for _, s in match.bindings]
        assert len(set(bound)) == len(bound) == len(stmt.clauses)
        assert [name for name, _ in match.bindings] == list(stmt.names)
    shuffled = list(reversed(items))
    assert keys(evaluate(stmt, shuffled)) == keys(match)
    for result in evaluate_series_level(stmt, items):
        assert result.matched


# -- orientation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("iop", "label"),
    [
        ([1, 0, 0, 0, 1, 0], "AXIAL"),
        ([1, 0, 0, 0, -1, 0], "AXIAL"),
        ([0, 1, 0, 0, 0, -1], "SAGITTAL"),
        ([1, 0, 0, 0, 0, -1], "CORONAL"),
        ([2, 0, 0, 0, 3, 0], "AXIAL"),  # not unit length
        # tilted 20 degrees about x: cos 0.94 >= 0.9 stays AXIAL
        ([1, 0, 0, 0, 0.9397, 0.3420], "AXIAL"),
        # tilted 30 degrees: cos 0.866 < 0.9 is OBLIQUE
        ([1, 0, 0, 0, 0.8660, 0.5], "OBLIQUE"),
        ([0.7071, 0.7071, 0, 0, 0, -1], "OBLIQUE"),
    ],
)
def test_orientation_label(iop: list[float], label: str) -> None:
    assert orientation_label(iop) == label


@pytest.mark.parametrize(
    "iop",
    [
        [1, 0, 0, 0, 1],
        [1, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, float("nan"), 0],
        ["a"] * 6,
    ],
)
def test_orientation_label_rejects_invalid(iop: list[float]) -> None:
    with pytest.raises(ValueError, match="ImageOrientationPatient"):
        orientation_label(iop)


def test_orientation_threshold_is_documented_constant() -> None:
    assert ORIENTATION_COSINE_THRESHOLD == 0.9


# -- hand-built syntax trees are validated --------------------------------------------


def test_nodes_validate_on_construction() -> None:
    field_ref = FieldRef("SeriesDescription", 0x0008103E, False)
    with pytest.raises(ValueError, match="invalid regular expression"):
        Comparison(field_ref, Operator.REGEXP, Literal("(", None, True))
    with pytest.raises(ValueError, match="needs a number"):
        Comparison(field_ref, Operator.LT, Literal("x", None, True))
    with pytest.raises(ValueError, match="derived"):
        FieldRef("NumImages", None, False)
    leaf = Comparison(field_ref, Operator.EQ, Literal("x", None, True))
    with pytest.raises(ValueError, match="at least two"):
        And((leaf,))
    clause = SeriesClause("a", False, leaf)
    with pytest.raises(ValueError, match="non-empty tuple"):
        SelectStatement(Level.STUDY, None, ())
    with pytest.raises(ValueError, match="duplicate"):
        SelectStatement(Level.STUDY, None, (clause, clause))
    ref = SeriesRef("zz", field_ref)
    with pytest.raises(ValueError, match="unknown series 'zz'"):
        SelectStatement(
            Level.STUDY,
            None,
            (clause,),
            CheckComparison(ref, Operator.EQ, Literal("x", None, True)),
        )
    regexp = Comparison(field_ref, Operator.REGEXP, Literal("^T1", None, True))
    assert regexp.pattern is not None  # compiled when not given
    stmt = SelectStatement(Level.STUDY, None, (SeriesClause("a", False, regexp),))
    assert evaluate(stmt, [series("s", SeriesDescription="T1w")]).matched
