#!/usr/bin/env python3
"""Builders of real DICOM test data for dicomnode.

Every builder writes one DICOM Part-10 file per instance (explicit VR little endian,
complete file meta information) into ``out_dir`` (created when missing) and returns the
sorted list of the written paths.  File names sort in instance order.

Conventions used throughout this module:

* Lengths, positions and spacings are in millimetres (mm).
* Coordinates are in the DICOM patient coordinate system (LPS): +x towards the
  patient's Left, +y towards Posterior, +z towards the Head (superior).
* ``ImagePositionPatient`` is the centre of the first transmitted pixel (row 0,
  column 0); ``ImageOrientationPatient`` holds the row direction (direction of
  increasing column index) followed by the column direction (direction of increasing
  row index); the slice normal is row direction x column direction.
* Volumes returned as numpy arrays are indexed ``[slice, row, column]`` (z, y, x for
  axial series), i.e. ``volume[k]`` is the pixel matrix of the k-th instance.

Data sources (Debian packages, all read-only):

* ``invesalius-examples``: ``Cranium.inv3``, a real head CT (108 x 256 x 256, int16 HU,
  0.957 x 0.957 x 1.5 mm) with the InVesalius bone mask (threshold 226..3071 HU).
* ``mricron-data``: ``ch2.nii.gz`` (Colin27 T1 MR template, 181 x 217 x 181 at 1 mm).
* ``dcmtk``: ``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``, ``dcmconv`` used by :func:`transcode`.
  They are always called by absolute path under ``/usr/bin`` because a pip package on the
  development machines installs scripts of the same names that shadow DCMTK on ``PATH``.

Command line::

    python tools/testdata.py KIND OUT_DIR [--slices N] [--missing I ...] [--syntax S]

with KIND one of ``cranium``, ``synthetic-ct``, ``sagittal``, ``multiframe-mr``,
``colin27``.  With ``--syntax`` the series is written to ``OUT_DIR/native`` and the
transcoded copies to ``OUT_DIR/<syntax>``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import gzip
import plistlib
import struct
import subprocess
import sys
import tarfile
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

__all__ = [
    "COLIN27_PATH",
    "CRANIUM_PATH",
    "LOSSLESS_SYNTAXES",
    "PHANTOM_AIR_HU",
    "PHANTOM_BONE_HU",
    "PHANTOM_WATER_HU",
    "SYNTAXES",
    "colin27_arrays",
    "colin27_mr",
    "cranium_arrays",
    "cranium_ct",
    "main",
    "malformed_file",
    "missing_uid_file",
    "multiframe_mr",
    "sagittal_series",
    "synthetic_ct",
    "synthetic_phantom_hu",
    "transcode",
]

CRANIUM_PATH = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
COLIN27_PATH = Path("/usr/share/mricron/templates/ch2.nii.gz")

#: UID root of the implementation that writes these files (pydicom's root plus a suffix).
IMPLEMENTATION_CLASS_UID = UID("1.2.826.0.1.3680043.8.498.1")
IMPLEMENTATION_VERSION_NAME = "DN_TESTDATA_1"

#: ``syntax`` names accepted by :func:`transcode` and the transfer syntax each produces.
SYNTAXES: dict[str, UID] = {
    "jpeg-baseline": JPEGBaseline8Bit,  # 1.2.840.10008.1.2.4.50 (lossy)
    "jpeg-extended": JPEGExtended12Bit,  # 1.2.840.10008.1.2.4.51 (lossy)
    "jpeg-lossless": JPEGLosslessSV1,  # 1.2.840.10008.1.2.4.70
    "jpeg-lossless-p14": JPEGLossless,  # 1.2.840.10008.1.2.4.57
    "jpeg-ls": JPEGLSLossless,  # 1.2.840.10008.1.2.4.80
    "jpeg2000": JPEG2000Lossless,  # 1.2.840.10008.1.2.4.90
    "rle": RLELossless,  # 1.2.840.10008.1.2.5
    "deflated": DeflatedExplicitVRLittleEndian,  # 1.2.840.10008.1.2.1.99
    "big-endian": ExplicitVRBigEndian,  # 1.2.840.10008.1.2.2 (retired, still seen)
    "implicit": ImplicitVRLittleEndian,  # 1.2.840.10008.1.2
}

#: Syntaxes whose pixel data decode back bit-for-bit equal to the source.
LOSSLESS_SYNTAXES = frozenset(SYNTAXES) - {"jpeg-baseline", "jpeg-extended"}

_DCMTK = Path("/usr/bin")

Vec3 = tuple[float, float, float]


# --------------------------------------------------------------------------- helpers


def _ds_str(value: float) -> str:
    """Format ``value`` as a valid DICOM DS string (at most 16 characters)."""
    text: str = format_number_as_ds(float(value) + 0.0)  # + 0.0 turns -0.0 into 0.0
    return text


def _ds_list(values: Iterable[float]) -> list[str]:
    return [_ds_str(v) for v in values]


def _now() -> tuple[str, str]:
    now = _dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as Part-10 explicit VR little endian (the meta must already be set)."""
    ds.file_meta.MediaStorageSOPClassUID = UID(ds.SOPClassUID)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
    ds.save_as(path, enforce_file_format=True)
    return path


def _unit(v: npt.ArrayLike) -> npt.NDArray[np.float64]:
    a = np.asarray(v, dtype=np.float64)
    n = float(np.linalg.norm(a))
    if n == 0.0:
        raise ValueError("zero-length direction vector")
    result: npt.NDArray[np.float64] = a / n
    return result


def _common_dataset(
    *,
    sop_class: str,
    modality: str,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    patient_id: str,
    patient_name: str,
    series_description: str,
    series_number: int,
    study_description: str,
) -> Dataset:
    """Patient, General Study, General Series, Frame of Reference, Equipment modules."""
    date, time = _now()
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, generate_uid())
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyDate = date
    ds.SeriesDate = date
    ds.ContentDate = date
    ds.StudyTime = time
    ds.SeriesTime = time
    ds.ContentTime = time
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "dicomnode-testdata"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = UID(study_uid)
    ds.SeriesInstanceUID = UID(series_uid)
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = UID(frame_uid)
    ds.PositionReferenceIndicator = ""
    return ds


def _pixel_module(ds: Dataset, *, rows: int, columns: int, bits_stored: int, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0


def _ct_attributes(ds: Dataset, *, body_part: str, window: tuple[float, float]) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined = body_part
    ds.KVP = "120"
    ds.AcquisitionNumber = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = _ds_str(window[0])
    ds.WindowWidth = _ds_str(window[1])


def _mr_attributes(ds: Dataset, *, body_part: str) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.BodyPartExamined = body_part
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = "SP"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D"
    ds.RepetitionTime = "8.1"
    ds.EchoTime = "3.7"
    ds.EchoTrainLength = 1
    ds.MagneticFieldStrength = "3"
    ds.FlipAngle = "8"
    ds.AcquisitionNumber = 1


def _write_slices(
    template: Dataset,
    out_dir: Path,
    *,
    prefix: str,
    slices: Iterable[tuple[int, bytes]],
    origin: Sequence[float],
    row_dir: Sequence[float],
    col_dir: Sequence[float],
    step: Sequence[float],
    pixel_spacing: tuple[float, float],
    slice_thickness: float,
) -> list[Path]:
    """Write one single-frame instance per ``(index, pixel_bytes)`` item.

    ``origin`` is the LPS position (mm) of pixel (0, 0) of slice index 0 and ``step`` the
    LPS displacement (mm) from slice ``k`` to slice ``k + 1``.  The template dataset is
    mutated in place (UIDs, position, instance number, pixel data) for speed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    o = np.asarray(origin, dtype=np.float64)
    s = np.asarray(step, dtype=np.float64)
    normal = np.cross(_unit(row_dir), _unit(col_dir))
    ds = template
    ds.ImageOrientationPatient = _ds_list([*_unit(row_dir), *_unit(col_dir)])
    ds.PixelSpacing = _ds_list(pixel_spacing)
    ds.SliceThickness = _ds_str(slice_thickness)
    ds.SpacingBetweenSlices = _ds_str(float(np.linalg.norm(s)))
    paths: list[Path] = []
    for index, pixels in slices:
        pos = o + index * s
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = _ds_list(pos)
        ds.SliceLocation = _ds_str(float(np.dot(pos, normal)))
        ds.PixelData = pixels
        ds["PixelData"].VR = "OW"
        path = out_dir / f"{prefix}{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return sorted(paths)


# --------------------------------------------------------------------------- Cranium CT


def _tar_member(tar: tarfile.TarFile, name: str) -> bytes:
    for member in tar.getmembers():
        if member.isfile() and Path(member.name).name == name:
            handle = tar.extractfile(member)
            if handle is None:  # pragma: no cover - isfile() guarantees a handle
                break
            with handle:
                return handle.read()
    raise FileNotFoundError(f"{name} not found in {tar.name!r}")


@functools.lru_cache(maxsize=1)
def _cranium_raw() -> tuple[
    npt.NDArray[np.int16], npt.NDArray[np.uint8], tuple[float, float, float]
]:
    if not CRANIUM_PATH.is_file():
        raise FileNotFoundError(
            f"{CRANIUM_PATH} is missing: install the Debian package 'invesalius-examples' "
            "(apt-get install invesalius-examples)"
        )
    with tarfile.open(CRANIUM_PATH, "r:*") as tar:
        main = plistlib.loads(_tar_member(tar, "main.plist"))
        matrix = main["matrix"]
        dtype = np.dtype(matrix["dtype"]).newbyteorder("<")
        shape = tuple(int(v) for v in matrix["shape"])
        volume = np.frombuffer(_tar_member(tar, matrix["filename"]), dtype=dtype)
        volume = volume.reshape(shape).astype(np.int16)
        mask_plist_name = main["masks"]["0"]
        mask_info = plistlib.loads(_tar_member(tar, mask_plist_name))
        mask_shape = tuple(int(v) for v in mask_info["mask_shape"])
        mask = np.frombuffer(_tar_member(tar, mask_info["mask_file"]), dtype=np.uint8)
        mask = mask.reshape(mask_shape)
    # InVesalius stores (x, y, z) spacing; the matrix is (z, y, x).
    sx, sy, sz = (float(v) for v in main["spacing"])
    # The matrix already holds HU (scalar_range -1024..3033): no offset to apply.
    low = int(main.get("scalar_range", [-1024])[0])
    if low < -1100:
        raise ValueError(f"unexpected Cranium scalar range starting at {low}")
    # InVesalius keeps the images flipped top-to-bottom (VTK convention, head rest at
    # row 0); flip them back so that row 0 is anterior as in the original DICOM.
    volume = np.ascontiguousarray(volume[:, ::-1, :])
    # The InVesalius mask carries one extra leading plane/row/column of bookkeeping
    # flags; mask[1:, 1:, 1:] is aligned with the matrix.
    mask = np.ascontiguousarray(mask[1:, 1:, 1:][:, ::-1, :])
    volume.setflags(write=False)
    mask.setflags(write=False)
    return volume, mask, (sz, sy, sx)


def cranium_arrays() -> tuple[
    npt.NDArray[np.int16], npt.NDArray[np.uint8], tuple[float, float, float]
]:
    """Return the InVesalius ``Cranium`` head CT as arrays.

    Returns ``(hu, bone, spacing)``:

    * ``hu``: int16 Hounsfield units, shape (108, 256, 256) indexed ``[z, y, x]`` in the
      same order as the instances written by :func:`cranium_ct` (``hu[k]`` is the pixel
      matrix of instance ``k`` after the modality rescale).  Slice 0 is the most inferior
      slice; z increases towards the head (+z of DICOM LPS), rows run anterior to
      posterior (+y), columns run patient right to left (+x).
    * ``bone``: uint8 bone mask with the values as stored by InVesalius (255 inside,
      0 outside; threshold 226..3071 HU), cropped of InVesalius' one-voxel bookkeeping
      border and flipped exactly like ``hu`` so that it is voxel-aligned with it.
    * ``spacing``: (z, y, x) voxel spacing in mm, i.e. (1.5, 0.9570312, 0.9570312).

    The archive is read in memory with :mod:`tarfile`; nothing is extracted to disk.
    Raises :class:`FileNotFoundError` naming the Debian package when it is not installed.
    """
    volume, mask, spacing = _cranium_raw()
    return volume.copy(), mask.copy(), spacing


def cranium_ct(
    out_dir: str | Path,
    *,
    study_uid: str | None = None,
    patient_id: str = "DN-TEST-0001",
    patient_name: str = "Test^Patient",
    series_description: str = "Cranium CT (InVesalius example)",
    series_number: int = 1,
    slices: Sequence[int] | None = None,
) -> list[Path]:
    """Write the real ``Cranium`` head CT as an axial CT Image Storage series.

    108 instances of 256 x 256 pixels, PixelSpacing 0.9570312 mm, SliceThickness and
    slice spacing 1.5 mm.  ImageOrientationPatient is 1,0,0,0,1,0 (axial, DICOM LPS) and
    ImagePositionPatient steps by +1.5 mm along +z (towards the head) with the instance
    number; the in-plane origin is chosen so that the volume is centred on x = y = 0.
    Stored values are signed int16 ``HU + 1024`` with RescaleIntercept -1024 and
    RescaleSlope 1.  ``slices`` optionally restricts the written slice indices (0-based,
    positions and instance numbers keep the full-volume values).
    """
    hu, _mask, (dz, dy, dx) = _cranium_raw()
    nz, ny, nx = hu.shape
    study = study_uid or generate_uid()
    ds = _common_dataset(
        sop_class=CTImageStorage,
        modality="CT",
        study_uid=study,
        series_uid=generate_uid(),
        frame_uid=generate_uid(),
        patient_id=patient_id,
        patient_name=patient_name,
        series_description=series_description,
        series_number=series_number,
        study_description="dicomnode test head CT",
    )
    _ct_attributes(ds, body_part="HEAD", window=(40.0, 400.0))
    _pixel_module(ds, rows=ny, columns=nx, bits_stored=16, signed=True)
    stored = (hu.astype(np.int32) + 1024).astype("<i2")
    wanted = range(nz) if slices is None else sorted(set(slices))

    def gen() -> Iterable[tuple[int, bytes]]:
        for k in wanted:
            if not 0 <= k < nz:
                raise IndexError(f"slice index {k} outside 0..{nz - 1}")
            yield k, stored[k].tobytes()

    origin = (-(nx - 1) / 2 * dx, -(ny - 1) / 2 * dy, -(nz - 1) / 2 * dz)
    return _write_slices(
        ds,
        Path(out_dir),
        prefix="CT_",
        slices=gen(),
        origin=origin,
        row_dir=(1.0, 0.0, 0.0),
        col_dir=(0.0, 1.0, 0.0),
        step=(0.0, 0.0, dz),
        pixel_spacing=(dy, dx),
        slice_thickness=dz,
    )


# --------------------------------------------------------------------------- synthetic CT


#: Hounsfield units of the synthetic phantom's materials.
PHANTOM_AIR_HU = -1000
PHANTOM_WATER_HU = 0
PHANTOM_BONE_HU = 700


@functools.lru_cache(maxsize=8)
def _phantom_hu(rows: int, columns: int) -> npt.NDArray[np.int16]:
    """HU slice of the phantom: water ellipse, bone ring inside it, air around."""
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float64)
    cy, cx = (rows - 1) / 2, (columns - 1) / 2
    ry, rx = 0.40 * rows, 0.45 * columns
    r = np.hypot((yy - cy) / ry, (xx - cx) / rx)
    hu = np.full((rows, columns), PHANTOM_AIR_HU, dtype=np.int16)
    hu[r <= 1.0] = PHANTOM_WATER_HU
    hu[(r >= 0.80) & (r <= 0.90)] = PHANTOM_BONE_HU
    hu.setflags(write=False)
    return hu


def synthetic_phantom_hu(rows: int = 512, columns: int = 512) -> npt.NDArray[np.int16]:
    """Return one HU slice (rows x columns, int16) of the :func:`synthetic_ct` phantom.

    Every slice of the series equals this image except pixel (0, 0), which holds the
    slice index as stored value (HU ``index - 1024``) so slices are distinguishable.
    """
    hu: npt.NDArray[np.int16] = np.array(_phantom_hu(rows, columns), dtype=np.int16)
    return hu


def synthetic_ct(
    out_dir: str | Path,
    *,
    slices: int = 300,
    rows: int = 512,
    columns: int = 512,
    spacing: tuple[float, float, float] = (0.8, 0.8, 1.25),
    missing: Collection[int] = (),
    study_uid: str | None = None,
    patient_id: str = "DN-TEST-0001",
    patient_name: str = "Test^Patient",
    series_description: str = "Synthetic CT phantom",
    series_number: int = 2,
) -> list[Path]:
    """Write an axial CT Image Storage series of a simple cylindrical phantom.

    ``spacing`` is (row spacing, column spacing, slice spacing) in mm: PixelSpacing is
    ``spacing[:2]``; ImagePositionPatient starts at (-(columns-1)/2 * dx,
    -(rows-1)/2 * dy, 0) and steps ``spacing[2]`` mm along +z (DICOM LPS) per slice
    index; ImageOrientationPatient is 1,0,0,0,1,0.  The phantom is an ellipse of water
    (0 HU) holding a bone ring (700 HU) in air (-1000 HU); stored values are int16
    ``HU + 1024`` with RescaleIntercept -1024.  Pixel (0, 0) of slice ``k`` stores ``k``.

    ``missing`` lists slice indices not written (instance numbers and positions of the
    others are unchanged, so the series has a real gap).  300 slices of 512 x 512 take a
    few seconds: the slice bytes are computed once per shape.
    """
    drow, dcol, dz = (float(v) for v in spacing)
    base = (_phantom_hu(rows, columns).astype(np.int32) + 1024).astype("<i2").tobytes()
    tail = base[2:]
    skip = {int(i) for i in missing}
    ds = _common_dataset(
        sop_class=CTImageStorage,
        modality="CT",
        study_uid=study_uid or generate_uid(),
        series_uid=generate_uid(),
        frame_uid=generate_uid(),
        patient_id=patient_id,
        patient_name=patient_name,
        series_description=series_description,
        series_number=series_number,
        study_description="dicomnode synthetic CT",
    )
    _ct_attributes(ds, body_part="ABDOMEN", window=(40.0, 400.0))
    _pixel_module(ds, rows=rows, columns=columns, bits_stored=16, signed=True)

    def gen() -> Iterable[tuple[int, bytes]]:
        for k in range(slices):
            if k not in skip:
                yield k, struct.pack("<h", k % 32768) + tail

    return _write_slices(
        ds,
        Path(out_dir),
        prefix="CT_",
        slices=gen(),
        origin=(-(columns - 1) / 2 * dcol, -(rows - 1) / 2 * drow, 0.0),
        row_dir=(1.0, 0.0, 0.0),
        col_dir=(0.0, 1.0, 0.0),
        step=(0.0, 0.0, dz),
        pixel_spacing=(drow, dcol),
        slice_thickness=dz,
    )


# --------------------------------------------------------------------------- sagittal MR


def _sphere_slices(n: int, rows: int, columns: int, *, peak: int = 1000) -> npt.NDArray[np.uint16]:
    """A bright ball (value ``peak``) with a darker core in a (n, rows, columns) volume."""
    k, r, c = np.ogrid[0:n, 0:rows, 0:columns]
    d = np.sqrt(
        ((k - (n - 1) / 2) / (0.45 * n)) ** 2
        + ((r - (rows - 1) / 2) / (0.45 * rows)) ** 2
        + ((c - (columns - 1) / 2) / (0.45 * columns)) ** 2
    )
    vol = np.zeros((n, rows, columns), dtype=np.uint16)
    vol[d <= 1.0] = peak
    vol[d <= 0.5] = peak // 2
    return vol


def sagittal_series(
    out_dir: str | Path,
    *,
    slices: int = 40,
    rows: int = 128,
    columns: int = 128,
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.0),
    study_uid: str | None = None,
    patient_id: str = "DN-TEST-0001",
    patient_name: str = "Test^Patient",
    series_description: str = "Sagittal MR phantom",
    series_number: int = 3,
) -> list[Path]:
    """Write a sagittal MR Image Storage series of a ball phantom.

    ImageOrientationPatient is 0,1,0,0,0,-1 (rows run anterior to posterior, +y; columns
    run head to feet, -z; DICOM LPS), so the slice normal row x column is (-1, 0, 0).
    ImagePositionPatient of slice ``k`` is ``origin + k * spacing[2] * (-1, 0, 0)``: the
    positions step ``spacing[2]`` mm along x, in the direction of the normal (towards the
    patient's right).  ``spacing`` is (row spacing, column spacing, slice spacing) in mm.
    Pixels are unsigned 16-bit (12 bits stored).
    """
    drow, dcol, ds_ = (float(v) for v in spacing)
    vol = _sphere_slices(slices, rows, columns).astype("<u2")
    ds = _common_dataset(
        sop_class=MRImageStorage,
        modality="MR",
        study_uid=study_uid or generate_uid(),
        series_uid=generate_uid(),
        frame_uid=generate_uid(),
        patient_id=patient_id,
        patient_name=patient_name,
        series_description=series_description,
        series_number=series_number,
        study_description="dicomnode sagittal MR",
    )
    _mr_attributes(ds, body_part="HEAD")
    _pixel_module(ds, rows=rows, columns=columns, bits_stored=12, signed=False)
    ds.WindowCenter = "500"
    ds.WindowWidth = "1000"
    # Pixel (0, 0) of slice 0 at x = +half extent, y = -half, z = +half.
    origin = ((slices - 1) / 2 * ds_, -(columns - 1) / 2 * dcol, (rows - 1) / 2 * drow)
    return _write_slices(
        ds,
        Path(out_dir),
        prefix="MR_",
        slices=((k, vol[k].tobytes()) for k in range(slices)),
        origin=origin,
        row_dir=(0.0, 1.0, 0.0),
        col_dir=(0.0, 0.0, -1.0),
        step=(-ds_, 0.0, 0.0),
        pixel_spacing=(drow, dcol),
        slice_thickness=ds_,
    )


# --------------------------------------------------------------------------- enhanced MR


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def multiframe_mr(
    out_dir: str | Path,
    *,
    frames: int = 24,
    rows: int = 96,
    columns: int = 96,
    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0),
    study_uid: str | None = None,
    patient_id: str = "DN-TEST-0001",
    patient_name: str = "Test^Patient",
    series_description: str = "Enhanced MR phantom",
    series_number: int = 4,
) -> list[Path]:
    """Write ONE Enhanced MR Image Storage instance holding an axial stack of ``frames``.

    Shared functional groups: PixelMeasuresSequence (PixelSpacing ``spacing[:2]`` mm,
    SliceThickness ``spacing[2]`` mm) and PlaneOrientationSequence
    (ImageOrientationPatient 1,0,0,0,1,0, DICOM LPS).  Per-frame functional groups:
    PlanePositionSequence with ImagePositionPatient of frame ``f`` equal to
    (-(columns-1)/2 * dx, -(rows-1)/2 * dy, f * spacing[2]) mm, i.e. stepping along +z,
    and FrameContentSequence with InStackPositionNumber ``f + 1`` in stack "1".
    Pixels are unsigned 16-bit (12 bits stored) of a ball phantom.
    """
    drow, dcol, dz = (float(v) for v in spacing)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vol = _sphere_slices(frames, rows, columns).astype("<u2")
    ds = _common_dataset(
        sop_class=EnhancedMRImageStorage,
        modality="MR",
        study_uid=study_uid or generate_uid(),
        series_uid=generate_uid(),
        frame_uid=generate_uid(),
        patient_id=patient_id,
        patient_name=patient_name,
        series_description=series_description,
        series_number=series_number,
        study_description="dicomnode enhanced MR",
    )
    date, time = ds.ContentDate, ds.ContentTime
    acq_dt = f"{date}{time}"
    # Enhanced General Equipment
    ds.ManufacturerModelName = "testdata"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "1"
    # Image Pixel
    _pixel_module(ds, rows=rows, columns=columns, bits_stored=12, signed=False)
    # Enhanced MR Image / MR Image and Spectroscopy Instance Macro
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "T1"
    ds.ContentQualification = "RESEARCH"
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = acq_dt
    ds.AcquisitionDuration = 60.0
    ds.PresentationLUTShape = "IDENTITY"
    ds.MagneticFieldStrength = "3"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.BodyPartExamined = "HEAD"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # MR Pulse Sequence
    ds.PulseSequenceName = "TESTGRE"
    ds.MRAcquisitionType = "3D"
    ds.EchoPulseSequence = "GRADIENT"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.SegmentedKSpaceTraversal = "SINGLE"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.NumberOfKSpaceTrajectories = 1
    ds.CoverageOfKSpace = "FULL"
    # Multi-frame Functional Groups
    ds.InstanceNumber = 1
    ds.NumberOfFrames = frames
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = _ds_list((drow, dcol))
    measures.SliceThickness = _ds_str(dz)
    measures.SpacingBetweenSlices = _ds_str(dz)
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orientation = Dataset()
    orientation.ImageOrientationPatient = _ds_list((1, 0, 0, 0, 1, 0))
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    anatomy = Dataset()
    anatomy.FrameLaterality = "U"
    anatomy.AnatomicRegionSequence = DicomSequence([_code("69536005", "SCT", "Head")])
    shared.FrameAnatomySequence = DicomSequence([anatomy])
    transform = Dataset()
    transform.RescaleIntercept = "0"
    transform.RescaleSlope = "1"
    transform.RescaleType = "US"
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    voi = Dataset()
    voi.WindowCenter = "500"
    voi.WindowWidth = "1000"
    shared.FrameVOILUTSequence = DicomSequence([voi])
    timing = Dataset()
    timing.RepetitionTime = 8.1
    timing.FlipAngle = 8.0
    timing.EchoTrainLength = 1
    timing.RFEchoTrainLength = 1
    timing.GradientEchoTrainLength = 1
    sar = Dataset()
    sar.SpecificAbsorptionRateDefinition = "IEC_WHOLE_BODY"
    sar.SpecificAbsorptionRateValue = 0.5
    timing.SpecificAbsorptionRateSequence = DicomSequence([sar])
    mode = Dataset()
    mode.OperatingModeType = "STATIC FIELD"
    mode.OperatingMode = "IEC_NORMAL"
    timing.OperatingModeSequence = DicomSequence([mode])
    timing.GradientOutputType = "DB_DT"
    timing.GradientOutput = 10.0
    shared.MRTimingAndRelatedParametersSequence = DicomSequence([timing])
    fov = Dataset()
    fov.InPlanePhaseEncodingDirection = "ROW"
    fov.MRAcquisitionFrequencyEncodingSteps = columns
    fov.MRAcquisitionPhaseEncodingStepsInPlane = rows
    fov.MRAcquisitionPhaseEncodingStepsOutOfPlane = frames
    fov.PercentSampling = 100.0
    fov.PercentPhaseFieldOfView = 100.0
    shared.MRFOVGeometrySequence = DicomSequence([fov])
    echo = Dataset()
    echo.EffectiveEchoTime = 3.7
    shared.MREchoSequence = DicomSequence([echo])
    modifier = Dataset()
    modifier.InversionRecovery = "NO"
    modifier.FlowCompensation = "NONE"
    modifier.T2Preparation = "NO"
    modifier.SpectrallySelectedExcitation = "NONE"
    modifier.SpatialPresaturation = "NONE"
    modifier.PartialFourier = "NO"
    modifier.ParallelAcquisition = "NO"
    shared.MRModifierSequence = DicomSequence([modifier])
    imaging_mod = Dataset()
    imaging_mod.MagnetizationTransfer = "NONE"
    imaging_mod.BloodSignalNulling = "NO"
    imaging_mod.Tagging = "NONE"
    imaging_mod.TransmitterFrequency = 127.7
    imaging_mod.PixelBandwidth = 200.0
    shared.MRImagingModifierSequence = DicomSequence([imaging_mod])
    receive = Dataset()
    receive.ReceiveCoilName = "HEAD"
    receive.ReceiveCoilManufacturerName = "testdata"
    receive.ReceiveCoilType = "VOLUME"
    receive.QuadratureReceiveCoil = "YES"
    shared.MRReceiveCoilSequence = DicomSequence([receive])
    transmit = Dataset()
    transmit.TransmitCoilName = "BODY"
    transmit.TransmitCoilManufacturerName = "testdata"
    transmit.TransmitCoilType = "BODY"
    shared.MRTransmitCoilSequence = DicomSequence([transmit])
    averages = Dataset()
    averages.NumberOfAverages = 1.0
    shared.MRAveragesSequence = DicomSequence([averages])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    # Multi-frame Dimension: one stack, ordered by in-stack position.
    dim_org = generate_uid()
    org = Dataset()
    org.DimensionOrganizationUID = dim_org
    ds.DimensionOrganizationSequence = DicomSequence([org])
    ds.DimensionOrganizationType = "3D"
    idx_stack = Dataset()
    idx_stack.DimensionOrganizationUID = dim_org
    idx_stack.DimensionIndexPointer = pydicom.tag.Tag("StackID")
    idx_stack.FunctionalGroupPointer = pydicom.tag.Tag("FrameContentSequence")
    idx_stack.DimensionDescriptionLabel = "Stack ID"
    idx_pos = Dataset()
    idx_pos.DimensionOrganizationUID = dim_org
    idx_pos.DimensionIndexPointer = pydicom.tag.Tag("InStackPositionNumber")
    idx_pos.FunctionalGroupPointer = pydicom.tag.Tag("FrameContentSequence")
    idx_pos.DimensionDescriptionLabel = "In-Stack Position Number"
    ds.DimensionIndexSequence = DicomSequence([idx_stack, idx_pos])
    # Acquisition Context (type 2, empty)
    ds.AcquisitionContextSequence = DicomSequence()
    per_frame: list[Dataset] = []
    x0, y0 = -(columns - 1) / 2 * dcol, -(rows - 1) / 2 * drow
    for f in range(frames):
        item = Dataset()
        content = Dataset()
        content.FrameAcquisitionDateTime = acq_dt
        content.FrameReferenceDateTime = acq_dt
        content.FrameAcquisitionDuration = 60000.0 / frames
        content.StackID = "1"
        content.InStackPositionNumber = f + 1
        content.DimensionIndexValues = [1, f + 1]
        item.FrameContentSequence = DicomSequence([content])
        position = Dataset()
        position.ImagePositionPatient = _ds_list((x0, y0, f * dz))
        item.PlanePositionSequence = DicomSequence([position])
        frame_type = Dataset()
        frame_type.FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        frame_type.PixelPresentation = "MONOCHROME"
        frame_type.VolumetricProperties = "VOLUME"
        frame_type.VolumeBasedCalculationTechnique = "NONE"
        frame_type.ComplexImageComponent = "MAGNITUDE"
        frame_type.AcquisitionContrast = "T1"
        item.MRImageFrameTypeSequence = DicomSequence([frame_type])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = vol.tobytes()
    ds["PixelData"].VR = "OW"
    path = out / "EMR_0000.dcm"
    return [_save(ds, path)]


# --------------------------------------------------------------------------- Colin27 MR


def _read_nifti(path: Path) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
    """Read a NIfTI-1 file (optionally gzipped) with numpy only.

    Returns ``(data, affine)`` where ``data`` is indexed ``[i, j, k]`` (NIfTI voxel axes)
    and ``affine`` (4 x 4) maps voxel indices to NIfTI world coordinates in mm (RAS+:
    +x Right, +y Anterior, +z Superior), taken from the sform when ``sform_code > 0``,
    else from the qform quaternion, else from the pixel dimensions.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    endian = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    if struct.unpack(f"{endian}i", raw[:4])[0] != 348:
        raise ValueError(f"{path} is not a NIfTI-1 file")
    dim = struct.unpack(f"{endian}8h", raw[40:56])
    datatype, _bitpix = struct.unpack(f"{endian}hh", raw[70:74])
    pixdim = struct.unpack(f"{endian}8f", raw[76:108])
    vox_offset = int(struct.unpack(f"{endian}f", raw[108:112])[0])
    slope, inter = struct.unpack(f"{endian}ff", raw[112:120])
    qform_code, sform_code = struct.unpack(f"{endian}hh", raw[252:256])
    dtypes = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4"}
    if datatype not in dtypes:
        raise ValueError(f"unsupported NIfTI datatype {datatype}")
    ndim = dim[0]
    shape = tuple(int(d) for d in dim[1 : 1 + ndim])
    dtype = np.dtype(endian + dtypes[datatype])
    count = int(np.prod(shape))
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=vox_offset)
    data = data.reshape(shape, order="F")  # NIfTI voxel data are stored i fastest
    if slope not in (0.0, 1.0) or inter != 0.0:
        data = data * (slope or 1.0) + inter
    affine = np.eye(4)
    if sform_code > 0:
        srow = struct.unpack(f"{endian}12f", raw[280:328])
        affine[:3, :] = np.asarray(srow, dtype=np.float64).reshape(3, 4)
    elif qform_code > 0:
        b, c, d, qx, qy, qz = struct.unpack(f"{endian}6f", raw[256:280])
        a = float(np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d))))
        rot = np.array(
            [
                [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
            ]
        )
        qfac = -1.0 if pixdim[0] < 0 else 1.0
        affine[:3, :3] = rot * np.array([pixdim[1], pixdim[2], qfac * pixdim[3]])
        affine[:3, 3] = (qx, qy, qz)
    else:
        affine[:3, :3] = np.diag(pixdim[1:4])
    return data, affine


def _nifti_to_lps_axial(
    data: npt.NDArray[Any], affine_ras: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
    """Reorder a NIfTI volume so that it reads as axial DICOM slices.

    The RAS affine is turned into LPS (DICOM) by negating its first two rows.  The voxel
    axes are then permuted and flipped so that axis 0 runs mostly along +x (L), axis 1
    along +y (P) and axis 2 along +z (S).  Returns ``(volume, affine_lps)`` where
    ``volume`` is indexed ``[k, row, column]`` = ``[z, y, x]`` and ``affine_lps`` maps
    ``(column, row, slice, 1)`` to LPS mm.
    """
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    # Which world axis each voxel axis points along.
    dominant = [int(np.argmax(np.abs(lps[:3, a]))) for a in range(3)]
    if sorted(dominant) != [0, 1, 2]:
        raise ValueError("NIfTI axes too oblique to map to an axial stack")
    order = [dominant.index(w) for w in range(3)]  # voxel axis for x, y, z
    vol = np.transpose(data, order)
    m = lps.copy()
    m[:, :3] = lps[:, order]
    for a in range(3):
        if m[a, a] < 0:
            vol = np.flip(vol, axis=a)
            m[:3, 3] += m[:3, a] * (vol.shape[a] - 1)
            m[:3, a] = -m[:3, a]
    # [x, y, z] -> [z, y, x] = [slice, row, column]
    return np.ascontiguousarray(np.transpose(vol, (2, 1, 0))), m


def colin27_arrays() -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.float64]]:
    """Return the Colin27 T1 template as ``(volume, affine_lps)``.

    ``volume`` is uint16 indexed ``[slice, row, column]`` (z, y, x; slice 0 inferior, row 0
    anterior, column 0 patient right) exactly as written by :func:`colin27_mr`;
    ``affine_lps`` (4 x 4) maps ``(column, row, slice, 1)`` to DICOM LPS in mm.  The
    NIfTI world frame is RAS, so LPS = diag(-1, -1, 1) * RAS.
    """
    if not COLIN27_PATH.is_file():
        raise FileNotFoundError(
            f"{COLIN27_PATH} is missing: install the Debian package 'mricron-data'"
        )
    data, affine = _read_nifti(COLIN27_PATH)
    vol, m = _nifti_to_lps_axial(data, affine)
    return np.clip(np.rint(vol), 0, 4095).astype(np.uint16), m


def colin27_mr(
    out_dir: str | Path,
    *,
    study_uid: str | None = None,
    patient_id: str = "DN-TEST-0001",
    patient_name: str = "Test^Patient",
    series_description: str = "Colin27 T1 (mricron ch2)",
    series_number: int = 5,
    slices: Sequence[int] | None = None,
) -> list[Path]:
    """Write the Colin27 T1 MR template as an axial MR Image Storage series.

    Source: ``ch2.nii.gz`` from Debian ``mricron-data`` (181 x 217 x 181 voxels, 1 mm).
    The NIfTI RAS world coordinates are converted to DICOM LPS (x and y negated) and the
    voxel axes are reordered/flipped so that ImageOrientationPatient is 1,0,0,0,1,0;
    ImagePositionPatient is the LPS position of each slice's first voxel, stepping 1 mm
    along +z.  Pixel values are the template's intensities (0..255) as unsigned 16-bit.
    ``slices`` optionally restricts the written slice indices.
    """
    vol, m = colin27_arrays()
    nz, ny, nx = vol.shape
    row_dir = m[:3, 0]
    col_dir = m[:3, 1]
    ds = _common_dataset(
        sop_class=MRImageStorage,
        modality="MR",
        study_uid=study_uid or generate_uid(),
        series_uid=generate_uid(),
        frame_uid=generate_uid(),
        patient_id=patient_id,
        patient_name=patient_name,
        series_description=series_description,
        series_number=series_number,
        study_description="dicomnode Colin27 MR",
    )
    _mr_attributes(ds, body_part="BRAIN")
    _pixel_module(ds, rows=ny, columns=nx, bits_stored=12, signed=False)
    ds.WindowCenter = "128"
    ds.WindowWidth = "256"
    data = vol.astype("<u2")
    wanted = range(nz) if slices is None else sorted(set(slices))
    return _write_slices(
        ds,
        Path(out_dir),
        prefix="MR_",
        slices=((k, data[k].tobytes()) for k in wanted),
        origin=tuple(float(v) for v in m[:3, 3]),
        row_dir=tuple(float(v) for v in row_dir),
        col_dir=tuple(float(v) for v in col_dir),
        step=tuple(float(v) for v in m[:3, 2]),
        pixel_spacing=(float(np.linalg.norm(col_dir)), float(np.linalg.norm(row_dir))),
        slice_thickness=float(np.linalg.norm(m[:3, 2])),
    )


# --------------------------------------------------------------------------- transcode


def _run(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{args[0]} failed with exit status {proc.returncode}: "
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )


def transcode(
    paths: Iterable[str | Path],
    out_dir: str | Path,
    syntax: str,
    *,
    keep_uids: bool = True,
) -> list[Path]:
    """Write copies of ``paths`` in the transfer syntax named ``syntax`` into ``out_dir``.

    ``syntax`` is one of :data:`SYNTAXES`:

    * ``jpeg-baseline`` (1.2.840.10008.1.2.4.50): ``/usr/bin/dcmcjpeg +eb``.  Baseline JPEG
      holds 8-bit samples only; DCMTK 3.6.7 accepts 12/16-bit input and scales it to 8
      bits itself (``+sp``: min/max of the pixel values).  For CT it rewrites
      RescaleSlope/RescaleIntercept so the stored values still map to HU (e.g. slope
      16.05882, intercept -2047 for the Cranium: about 16 HU per level, mean error
      ~13 HU); for MR (no modality rescale) the values are scaled to 0..255 and their
      original scale is lost.  Lossy; BitsAllocated/BitsStored become 8, which the CT
      IOD does not allow (``dciodvfy`` flags it) but which real archives do meet.
    * ``jpeg-extended`` (…4.51): ``dcmcjpeg +ee`` (12-bit lossy; 16-bit CT input is
      rescaled to 12 bits with an updated rescale, errors of a few HU).  Lossy.
    * ``jpeg-lossless`` (…4.70, process 14 selection value 1): ``dcmcjpeg +e1``.
    * ``jpeg-lossless-p14`` (…4.57): ``dcmcjpeg +el``.
    * ``jpeg-ls`` (…4.80): ``/usr/bin/dcmcjpls`` (lossless).
    * ``jpeg2000`` (…4.90): pydicom ``Dataset.compress`` with pylibjpeg-openjpeg.
    * ``rle`` (…1.2.5): ``/usr/bin/dcmcrle``.
    * ``deflated`` (…1.2.1.99), ``big-endian`` (…1.2.2), ``implicit`` (…1.2):
      ``/usr/bin/dcmconv +td / +tb / +ti``.

    With ``keep_uids`` (default) the SOP Instance UID is kept even for lossy syntaxes
    (DCMTK ``+un``) so copies can be matched to their source; otherwise DCMTK assigns new
    UIDs to lossy copies and pydicom to the JPEG 2000 ones.  Output files keep their
    source's file name.  Every output's TransferSyntaxUID is checked; a failing tool
    raises :class:`RuntimeError` including its stderr.  Returns the sorted output paths.
    """
    if syntax not in SYNTAXES:
        raise ValueError(f"unknown syntax {syntax!r}; expected one of {sorted(SYNTAXES)}")
    expected = SYNTAXES[syntax]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    uid_opt = ["+un"] if keep_uids else []
    written: list[Path] = []
    seen: set[str] = set()
    for src_like in paths:
        src = Path(src_like)
        if src.name in seen:
            raise ValueError(f"two inputs share the file name {src.name!r}")
        seen.add(src.name)
        dst = out / src.name
        if dst.resolve() == src.resolve():
            raise ValueError(f"output {dst} would overwrite its input")
        if syntax == "jpeg-baseline":
            _run([str(_DCMTK / "dcmcjpeg"), "+eb", *uid_opt, str(src), str(dst)])
        elif syntax == "jpeg-extended":
            _run([str(_DCMTK / "dcmcjpeg"), "+ee", *uid_opt, str(src), str(dst)])
        elif syntax == "jpeg-lossless":
            _run([str(_DCMTK / "dcmcjpeg"), "+e1", str(src), str(dst)])
        elif syntax == "jpeg-lossless-p14":
            _run([str(_DCMTK / "dcmcjpeg"), "+el", str(src), str(dst)])
        elif syntax == "jpeg-ls":
            _run([str(_DCMTK / "dcmcjpls"), "+el", str(src), str(dst)])
        elif syntax == "rle":
            _run([str(_DCMTK / "dcmcrle"), str(src), str(dst)])
        elif syntax == "deflated":
            _run([str(_DCMTK / "dcmconv"), "+td", str(src), str(dst)])
        elif syntax == "big-endian":
            _run([str(_DCMTK / "dcmconv"), "+tb", str(src), str(dst)])
        elif syntax == "implicit":
            _run([str(_DCMTK / "dcmconv"), "+ti", str(src), str(dst)])
        elif syntax == "jpeg2000":
            ds = pydicom.dcmread(src)
            try:
                ds.compress(JPEG2000Lossless, generate_instance_uid=not keep_uids)
            except Exception as exc:
                raise RuntimeError(f"JPEG 2000 compression of {src} failed: {exc}") from exc
            ds.save_as(dst, enforce_file_format=True)
        else:  # pragma: no cover - guarded by the SYNTAXES check
            raise AssertionError(syntax)
        got = pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID
        if got != expected:
            raise RuntimeError(
                f"{dst} has transfer syntax {got} ({got.name}), expected {expected} "
                f"({expected.name}) for {syntax!r}"
            )
        written.append(dst)
    return sorted(written)


# --------------------------------------------------------------------------- broken files


def malformed_file(path: str | Path) -> Path:
    """Write a Part-10 file whose data set cannot be parsed.

    The 128-byte preamble, ``DICM`` prefix and file meta information (CT Image Storage,
    explicit VR little endian, MediaStorageSOPClass/InstanceUID set) are valid, and the
    data set starts with valid SOP Class and SOP Instance UID elements.  They are followed
    by (0008,1115) with VR UN and undefined length (read as an implicit VR sequence per
    CP-246) holding an item of declared length 4000 whose (0008,1150) element declares
    3000 bytes, while the file ends 5 bytes later and no delimiter follows.

    ``pydicom.dcmread`` raises ``OSError`` on it and DCMTK reports a premature end of
    stream; pynetdicom can still send it as raw bytes when
    ``pynetdicom._config.STORE_SEND_CHUNKED_DATASET`` is true (it then reads only the
    file meta).  Returns ``path``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(CTImageStorage, sop_uid)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.save_as(target, enforce_file_format=True)
    broken = (
        struct.pack("<HH2sHI", 0x0008, 0x1115, b"UN", 0, 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 4000)
        + struct.pack("<HHI", 0x0008, 0x1150, 3000)
        + b"1.2.3"
    )
    with target.open("ab") as fh:
        fh.write(broken)
    return target


def missing_uid_file(
    path: str | Path,
    *,
    study_uid: str | None = None,
    patient_id: str = "DN-TEST-0001",
    patient_name: str = "Test^Patient",
) -> Path:
    """Write a parseable single-slice CT instance (64 x 64, 1 mm pixels, axial, DICOM LPS
    origin at (0, 0, 0) mm) that lacks SeriesInstanceUID.  Returns ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds = _common_dataset(
        sop_class=CTImageStorage,
        modality="CT",
        study_uid=study_uid or generate_uid(),
        series_uid=generate_uid(),
        frame_uid=generate_uid(),
        patient_id=patient_id,
        patient_name=patient_name,
        series_description="CT without SeriesInstanceUID",
        series_number=99,
        study_description="dicomnode broken CT",
    )
    del ds.SeriesInstanceUID
    _ct_attributes(ds, body_part="HEAD", window=(40.0, 400.0))
    _pixel_module(ds, rows=64, columns=64, bits_stored=16, signed=True)
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = ["0", "0", "0"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = ["1", "1"]
    ds.SliceThickness = "1"
    ds.PixelData = np.full((64, 64), 1024, dtype="<i2").tobytes()
    ds["PixelData"].VR = "OW"
    return _save(ds, target)


# --------------------------------------------------------------------------- CLI


def _build(kind: str, out_dir: Path, args: argparse.Namespace) -> list[Path]:
    if kind == "cranium":
        return cranium_ct(out_dir)
    if kind == "synthetic-ct":
        return synthetic_ct(
            out_dir, slices=args.slices if args.slices else 300, missing=args.missing
        )
    if kind == "sagittal":
        return sagittal_series(out_dir, slices=args.slices if args.slices else 40)
    if kind == "multiframe-mr":
        return multiframe_mr(out_dir, frames=args.slices if args.slices else 24)
    if kind == "colin27":
        return colin27_mr(out_dir)
    raise ValueError(kind)  # pragma: no cover - argparse restricts the choices


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="testdata.py",
        description="Write DICOM test series (positions in mm, DICOM patient LPS).",
    )
    parser.add_argument(
        "kind", choices=["cranium", "synthetic-ct", "sagittal", "multiframe-mr", "colin27"]
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--slices", type=int, default=None, help="slice (or frame) count where it applies"
    )
    parser.add_argument(
        "--missing", type=int, nargs="*", default=[], help="synthetic-ct slice indices to omit"
    )
    parser.add_argument(
        "--syntax",
        choices=sorted(SYNTAXES),
        default=None,
        help="also transcode; native files go to OUT_DIR/native, copies to OUT_DIR/SYNTAX",
    )
    args = parser.parse_args(argv)
    if args.slices is not None and args.kind in ("cranium", "colin27"):
        parser.error("--slices applies to synthetic-ct, sagittal and multiframe-mr only")
    if args.missing and args.kind != "synthetic-ct":
        parser.error("--missing applies to synthetic-ct only")
    out_dir: Path = args.out_dir
    if args.syntax:
        native = _build(args.kind, out_dir / "native", args)
        written = transcode(native, out_dir / args.syntax, args.syntax)
    else:
        written = _build(args.kind, out_dir, args)
    print(f"wrote {len(written)} file(s) to {written[0].parent if written else out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
