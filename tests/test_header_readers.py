"""The cheap header read gives the same index values as pydicom, on every file we have.

`read_header` reads common instances with `dicomnode.dicom.rawvalues` (no pydicom Dataset)
and everything else with pydicom (`read_header_pydicom`). Each file of the test corpus (the
generators of tools/testdata.py, in every transfer syntax they write, the files under
tests/data) and of pydicom's own test files is first checked as a received file is
(`check_dataset`); then both readers must give the same InstanceHeader, or the same refusal.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import testdata
from pydicom.data import get_testdata_files

from dicomnode.dicom.rawvalues import Unsupported, read_values
from dicomnode.receive.validate import DatasetError, check_dataset
from dicomnode.store.header import (
    _KEYWORDS,
    HeaderError,
    InstanceHeader,
    read_header,
    read_header_pydicom,
)

ROOT = Path(__file__).resolve().parents[1]


def _corpus(out: Path) -> Iterator[Path]:
    ct = testdata.synthetic_ct(out / "ct", slices=3, rows=32, columns=32)
    yield from ct
    yield from testdata.sagittal_series(out / "sag", slices=2, rows=16, columns=16)
    yield from testdata.multiframe_mr(out / "mf", frames=3, rows=16, columns=16)
    yield testdata.missing_uid_file(out / "missing.dcm")
    yield testdata.malformed_file(out / "malformed.dcm")
    for name in sorted(testdata.SYNTAXES):
        try:
            yield from testdata.transcode(ct[:1], out / name, name)
        except Exception:  # a codec this machine lacks: the others still count
            continue
    for make in (testdata.cranium_ct, testdata.colin27_mr):
        try:
            yield from make(out / make.__name__, slices=[0])
        except Exception:  # its source data is not installed here
            continue
    yield from (p for p in (ROOT / "tests" / "data").rglob("*") if p.is_file())
    yield from (Path(p) for p in get_testdata_files() if Path(p).is_file())


def _read(reader: object, path: Path) -> InstanceHeader | tuple[int, str]:
    try:
        return reader(path)  # type: ignore[operator, no-any-return]
    except HeaderError as exc:
        return (exc.status, str(exc))


def test_both_header_readers_agree_on_every_corpus_file(tmp_path: Path) -> None:
    compared = fast = 0
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    for path in _corpus(tmp_path / "corpus"):
        staged = scratch / "received.dcm"
        shutil.copyfile(path, staged)
        try:
            checked = check_dataset(staged, max_inflated_bytes=1 << 28, scratch=scratch)
        except DatasetError:
            continue  # refused before any header is read, as on receipt
        except Exception:  # not a Part-10 file at all (pydicom's raw test streams)
            continue
        try:
            expected = _read(read_header_pydicom, checked.readable)
            got = _read(read_header, checked.readable)
            assert got == expected, f"{path.name}: the readers differ"
            compared += 1
            try:
                read_values(checked.readable, _KEYWORDS)
                fast += 1
            except Unsupported:
                pass
        finally:
            checked.discard()
    print(f"compared {compared}, fast {fast}")
    assert compared >= 100, f"only {compared} files compared"
    assert fast >= 40, f"only {fast} files took the fast path"


def test_the_fast_path_reads_a_common_ct_without_pydicom(tmp_path: Path) -> None:
    path = testdata.synthetic_ct(tmp_path, slices=1, rows=16, columns=16)[0]
    values = read_values(path, _KEYWORDS)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert values.get("SOPInstanceUID") == ds.SOPInstanceUID
    assert values.get("ImagePositionPatient") == [float(v) for v in ds.ImagePositionPatient]
    assert values.get("Rows") == 16 and "Rows" in values and "PixelData" not in values


@pytest.mark.parametrize("syntax", ["deflated", "big-endian"])
def test_the_fast_path_leaves_other_encodings_to_pydicom(tmp_path: Path, syntax: str) -> None:
    ct = testdata.synthetic_ct(tmp_path / "ct", slices=1, rows=16, columns=16)
    path = testdata.transcode(ct, tmp_path / syntax, syntax)[0]
    with pytest.raises(Unsupported):
        read_values(path, _KEYWORDS)
    assert read_header(path) == read_header_pydicom(path)
