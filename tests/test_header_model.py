"""One DICOM header model: ingest, the index's geometry verdict, rule readiness and the volume
reader see the same frames and give the same verdict.

The node runs in-process on a real SQLite index and raw store (no association: the files are
ingested as the SCP hands them over); the volume reader reads the stored files.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import testdata
from conftest import NodeFactory, write_model_card
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from sqlalchemy import select

from dicomnode.completion import series_verdict
from dicomnode.config import load_config
from dicomnode.dicom.frames import FrameGeometry, FrameSource, frames_from_index
from dicomnode.dicom.header import ImageHeader
from dicomnode.inference.volume import VolumeError, read_series
from dicomnode.node import Node
from dicomnode.rules.series import DictSeries
from dicomnode.store.tables import Instance, Job, Series, utcnow

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
MIXED = "frames have more than one orientation"

RULES = """rules:
  - name: mr-now
    select: SELECT study WHERE series NAMED "MR" HAS Modality = "MR"
    model: body
"""


@pytest.fixture
def node(node_factory: NodeFactory, tmp_path: Path) -> Iterator[Node]:
    """An in-process, unstarted node with one rule on any MR series."""
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "main.yaml").write_text(RULES)
    write_model_card(tmp_path / "models" / "body", [("MR", "MR")])
    running = node_factory(start=False, rules_dir=str(folder),
                           models_dir=str(tmp_path / "models"))
    made = Node(load_config(running.config_path))
    yield made
    made.index.dispose()


def two_stack_mr(folder: Path, *, shared_orientation: bool) -> Path:
    """One Enhanced MR object holding two stacks of 6 frames, axial then sagittal, each
    frame with its own Plane Orientation; the frames keep the positions
    :func:`testdata.multiframe_mr` gives them (3 mm apart along z), so that read with one
    orientation they would be one regular stack. ``shared_orientation`` leaves the writer's
    axial Plane Orientation in the Shared Functional Groups as well (a macro in both places,
    as some converters write): the index of earlier releases read only that one and called
    the series whole, the volume reader read the per-frame ones and failed the job."""
    path = testdata.multiframe_mr(folder, frames=12, rows=16, columns=16)[0]
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    if not shared_orientation:
        del shared.PlaneOrientationSequence
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        orientation = Dataset()
        orientation.ImageOrientationPatient = list(AXIAL if k < 6 else SAGITTAL)
        item.PlaneOrientationSequence = DicomSequence([orientation])
        content = item.FrameContentSequence[0]
        content.StackID = "1" if k < 6 else "2"
        content.InStackPositionNumber = k % 6 + 1
        content.DimensionIndexValues = [1 if k < 6 else 2, k % 6 + 1]
    ds.save_as(path)
    return path


def _ingest(node: Node, paths: list[Path]) -> int:
    study_pk = -1
    for path in paths:
        staged = node.files.tmp / path.name
        shutil.copyfile(path, staged)
        study_pk = node.store.ingest(staged, calling_ae_title="TESTSCU").study_pk
    return study_pk


def _settle(node: Node, study_pk: int) -> Series:
    """Settle and complete the study as the node does (its listeners fire the rules)."""
    assert study_pk in node.completion.check(now=utcnow() + dt.timedelta(minutes=1))
    with node.index.session() as session:
        return session.scalars(select(Series).where(Series.study_pk == study_pk)).one()


@pytest.mark.parametrize("shared_orientation", [False, True],
                         ids=["per-frame-orientation", "shared-and-per-frame-orientation"])
def test_a_two_orientation_enhanced_mr_gets_one_verdict_from_every_stage(
        node: Node, tmp_path: Path, shared_orientation: bool) -> None:
    source = two_stack_mr(tmp_path / "mr", shared_orientation=shared_orientation)
    study_pk = _ingest(node, [source])

    # the index: settled, not whole, for the reason the volume reader gives
    series = _settle(node, study_pk)
    assert series.geometry_dirty is False
    assert series.geometry_whole is False
    assert series.geometry_reason == MIXED

    # rule readiness: the rule matches but no job fires, and it says why
    with node.index.session() as session:
        assert session.scalars(select(Job)).all() == []
    firings = node.trigger.on_study(study_pk, trigger="manual")
    assert [(f.rule, f.matched, f.job_id) for f in firings] == [("mr-now", True, None)]
    assert firings[0].reason == f"series MR (series {series.id}) is not whole: {MIXED}"

    # the volume reader, on the stored file: the same reason
    with node.index.session() as session:
        stored = session.scalars(select(Instance)).one()
        assert stored.number_of_frames == 12
    with pytest.raises(VolumeError, match=MIXED):
        read_series([node.files.root / stored.file_path])


def test_frames_that_differ_in_orientation_are_indexed_per_frame(node: Node,
                                                                 tmp_path: Path) -> None:
    source = two_stack_mr(tmp_path / "mr", shared_orientation=True)
    _ingest(node, [source])
    header = ImageHeader.from_dataset(pydicom.dcmread(source, stop_before_pixels=True))
    assert header.frame_source is FrameSource.FUNCTIONAL_GROUPS
    assert [f.orientation for f in header.frames] == [AXIAL] * 6 + [SAGITTAL] * 6
    with node.index.session() as session:
        row = session.scalars(select(Instance)).one()
        assert row.image_orientation_patient == list(AXIAL)
        assert row.frame_geometry == {"orientations": [list(AXIAL)] * 6 + [list(SAGITTAL)] * 6}
        assert row.frame_positions is not None and len(row.frame_positions) == 12
        assert all(len(p) == 3 for p in row.frame_positions)
        indexed = frames_from_index(
            number_of_frames=row.number_of_frames, position=row.image_position_patient,
            orientation=row.image_orientation_patient, pixel_spacing=row.pixel_spacing,
            frame_positions=row.frame_positions, frame_geometry=row.frame_geometry)
    assert [(f.position, f.orientation, f.pixel_spacing) for f in indexed] == [
        (f.position, f.orientation, f.pixel_spacing) for f in header.frames]


def test_a_regular_enhanced_mr_and_a_ct_give_the_same_geometry_as_before(
        node: Node, tmp_path: Path) -> None:
    mr = testdata.multiframe_mr(tmp_path / "mr", frames=8, rows=16, columns=16)
    ct = testdata.synthetic_ct(tmp_path / "ct", slices=6, rows=16, columns=16,
                               study_uid=pydicom.dcmread(mr[0]).StudyInstanceUID)
    study_pk = _ingest(node, mr + ct)
    assert study_pk in node.completion.check(now=utcnow() + dt.timedelta(minutes=1))
    with node.index.session() as session:
        rows = {s.modality: s for s in session.scalars(
            select(Series).where(Series.study_pk == study_pk)).all()}
        instances = {m: session.scalars(select(Instance).where(
            Instance.series_pk == s.id)).all() for m, s in rows.items()}
    expected = {"MR": (8, 3.0), "CT": (6, 1.25)}
    for modality, files in (("MR", mr), ("CT", ct)):
        series = rows[modality]
        volume = read_series(files)
        assert (series.geometry_whole, series.geometry_reason, series.orientation) == (
            volume.geometry.whole, volume.geometry.reason, volume.geometry.orientation)
        assert series.geometry_whole and series.orientation == "AXIAL"
        frames, spacing = expected[modality]
        assert volume.geometry.frames == frames
        assert series.slice_spacing == pytest.approx(spacing)
        assert volume.geometry.slice_spacing == pytest.approx(spacing)
        verdict = series_verdict(list(instances[modality]))
        assert verdict == volume.geometry
        # nothing new is stored for regular images
        assert all(i.frame_geometry is None for i in instances[modality])
    assert all(i.frame_positions is None for i in instances["CT"])
    (enhanced,) = instances["MR"]
    assert enhanced.frame_positions == [[-11.25, -11.25, 3.0 * k] for k in range(8)]


def test_rule_views_of_files_read_enhanced_frames_through_the_model(tmp_path: Path) -> None:
    path = testdata.multiframe_mr(tmp_path / "mr", frames=5, rows=16, columns=16)[0]
    view = DictSeries.from_datasets([pydicom.dcmread(path, stop_before_pixels=True)])
    assert view.orientation == "AXIAL"
    assert view.slice_spacing == pytest.approx(3.0)
    mixed = two_stack_mr(tmp_path / "mixed", shared_orientation=False)
    assert DictSeries.from_datasets([pydicom.dcmread(mixed)]).orientation == "AXIAL"


def test_unreadable_values_are_problems_with_precise_messages() -> None:
    ds = Dataset()
    ds.Rows, ds.Columns = 4, 4
    ds.ImagePositionPatient = [0.0, 1.0]
    ds.ImageOrientationPatient = list(AXIAL)
    ds.PixelSpacing = [0.5, 0.0]
    header = ImageHeader.from_dataset(ds)
    assert header.frame_source is FrameSource.SINGLE_FRAME
    assert [str(p) for p in header.problems] == [
        "ImagePositionPatient has 2 values, expected 3",
        "PixelSpacing must be positive, got [0.5, 0.0]"]
    assert header.frames == (FrameGeometry(orientation=AXIAL),)

    enhanced = Dataset()
    enhanced.NumberOfFrames = 3
    item = Dataset()
    item.PlanePositionSequence = DicomSequence([Dataset()])
    item.PlanePositionSequence[0].ImagePositionPatient = [1.0, 2.0]
    enhanced.PerFrameFunctionalGroupsSequence = DicomSequence([Dataset(), item])
    problems = [str(p) for p in ImageHeader.from_dataset(enhanced).problems]
    assert problems == ["2 Per-frame Functional Groups items for NumberOfFrames 3",
                        "frame 2: ImagePositionPatient has 2 values, expected 3"]


@pytest.mark.parametrize(("values", "message"), [
    ({"position": (0.0, 1.0)}, "position has 2 values, expected 3"),
    ({"orientation": (1.0, 0.0, 0.0, 0.0, float("nan"), 0.0)}, "orientation values must be finite"),
    ({"pixel_spacing": (1.0, -1.0)}, "pixel_spacing must be positive, got [1.0, -1.0]"),
    ({"slice_thickness": 0.0}, "slice_thickness must be positive, got 0.0"),
])
def test_frame_geometry_refuses_invalid_values(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        FrameGeometry(**values)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_index_columns_of_an_earlier_release_are_read() -> None:
    frames = frames_from_index(
        number_of_frames=2, position=None, orientation=list(AXIAL), pixel_spacing=[1.0, 1.0],
        frame_positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 1.0, *SAGITTAL]], frame_geometry=None)
    assert [f.orientation for f in frames] == [AXIAL, SAGITTAL]
    with pytest.raises(ValueError, match="frame_geometry orientations must list 2 frames"):
        frames_from_index(number_of_frames=2, position=None, orientation=None,
                          pixel_spacing=None, frame_positions=[[0.0, 0.0, 0.0]] * 2,
                          frame_geometry={"orientations": [list(AXIAL)]})


def test_frames_with_their_own_pixel_spacing_get_one_verdict(node: Node, tmp_path: Path) -> None:
    path = testdata.multiframe_mr(tmp_path / "mr", frames=8, rows=16, columns=16)[0]
    ds = pydicom.dcmread(path)
    for item in list(ds.PerFrameFunctionalGroupsSequence)[4:]:
        measures = Dataset()
        measures.PixelSpacing = [1.0, 1.0]
        measures.SliceThickness = 3.0
        item.PixelMeasuresSequence = DicomSequence([measures])
    ds.save_as(path)
    study_pk = _ingest(node, [path])
    series = _settle(node, study_pk)
    assert (series.geometry_whole, series.geometry_reason) == (
        False, "frames have more than one pixel spacing")
    with node.index.session() as session:
        row = session.scalars(select(Instance)).one()
        assert row.frame_geometry == {"pixel_spacings": [[1.5, 1.5]] * 4 + [[1.0, 1.0]] * 4}
    with pytest.raises(VolumeError, match="frames have more than one pixel spacing"):
        read_series([path])
