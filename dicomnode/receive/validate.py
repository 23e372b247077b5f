"""Check that a received dataset parses to its end, before anything is stored.

:func:`check_dataset` walks every data element of a received Part-10 file (the
File Meta Information written by the SCP, then the dataset as the peer encoded
it), including the items of every sequence and the fragments of encapsulated
pixel data, without reading bulk values into memory: large values are skipped
with a seek. A deflated dataset is inflated in bounded chunks into a scratch
file (at most ``max_inflated_bytes``), which is then walked and read instead.

What is refused, each with its C-STORE failure status (the reason names the
attribute, never its value, so nothing from the dataset reaches a log):

* ``0xC001`` the dataset does not parse: an element or item that runs past the
  end of its file, sequence or item; an invalid VR (explicit VR); a malformed
  sequence, item or delimiter; encapsulated pixel data without a valid item
  structure (Basic Offset Table item, at least one fragment, sequence delimiter);
  nesting deeper than :data:`MAX_DEPTH`.
* ``0xC005`` pixel data that does not match the image: Rows, Columns,
  NumberOfFrames, SamplesPerPixel or BitsAllocated missing where pixel data is
  present, 0, negative or not a number; native (uncompressed) pixel data
  shorter than Rows x Columns x SamplesPerPixel x BitsAllocated/8 x
  NumberOfFrames (longer is accepted: vendors pad); encapsulated pixel data with
  fewer fragments than frames (a fragment never holds more than one frame,
  PS3.5 A.4; not applied to video syntaxes); zero-length or missing pixel data
  in an image storage SOP class (any SOP class named "... Image Storage").
* ``0xC006`` a Specific Character Set term pydicom does not know.
* ``0xC007`` a deflated dataset that inflates to more than ``max_inflated_bytes``,
  or whose deflate stream is corrupt or truncated (then ``0xC001``).
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pydicom import charset
from pydicom.datadict import dictionary_VR
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import VR

from dicomnode.dicom.status import Status

__all__ = [
    "MAX_DEPTH",
    "STATUS_BAD_CHARSET",
    "STATUS_BAD_PIXEL_DATA",
    "STATUS_CANNOT_PARSE",
    "STATUS_TOO_LARGE_INFLATED",
    "CheckedDataset",
    "DatasetError",
    "check_dataset",
]

LOG = logging.getLogger(__name__)

STATUS_CANNOT_PARSE = Status.CANNOT_UNDERSTAND_PARSE
STATUS_BAD_PIXEL_DATA = Status.CANNOT_UNDERSTAND_PIXEL_DATA
STATUS_BAD_CHARSET = Status.CANNOT_UNDERSTAND_CHARACTER_SET
STATUS_TOO_LARGE_INFLATED = Status.CANNOT_UNDERSTAND_INFLATED_SIZE

MAX_DEPTH = 32
"""Deepest sequence nesting accepted (real objects nest a few levels)."""

_UNDEFINED = 0xFFFFFFFF
_CHUNK = 1 << 20  # bytes inflated (or read) at a time
_SMALL_VALUE = 1024  # values of the few attributes read are at most this long
_VRS = frozenset(v.value.encode("ascii") for v in VR if len(v.value) == 2)
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})

_ITEM = (0xFFFE, 0xE000)
_ITEM_END = (0xFFFE, 0xE00D)
_SEQ_END = (0xFFFE, 0xE0DD)
_PIXEL_TAGS = {(0x7FE0, 0x0010): "PixelData", (0x7FE0, 0x0008): "FloatPixelData",
               (0x7FE0, 0x0009): "DoubleFloatPixelData"}
_CHARSET = (0x0008, 0x0005)
# top-level attributes whose (small) values are read
_READ = {
    (0x0008, 0x0016): "SOPClassUID",
    (0x0028, 0x0002): "SamplesPerPixel",
    (0x0028, 0x0004): "PhotometricInterpretation",
    (0x0028, 0x0008): "NumberOfFrames",
    (0x0028, 0x0010): "Rows",
    (0x0028, 0x0011): "Columns",
    (0x0028, 0x0100): "BitsAllocated",
}
# video syntaxes (MPEG-2, MPEG-4, HEVC) hold all frames in one stream of fragments;
# JPIP syntaxes reference their pixel data instead of holding it
_VIDEO_PREFIX = "1.2.840.10008.1.2.4.10"
_JPIP = frozenset({"1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95"})


class DatasetError(Exception):
    """A dataset that is refused; ``status`` is the C-STORE failure status to answer.

    The message names attributes and offsets, never a value from the dataset.
    """

    def __init__(self, message: str, status: int = STATUS_CANNOT_PARSE) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class CheckedDataset:
    """What :func:`check_dataset` found.

    ``readable`` is the file to read the header from: the received file itself, or,
    for a deflated dataset, an inflated scratch copy (Explicit VR Little Endian) that
    the caller deletes (``inflated`` is then True).
    """

    transfer_syntax_uid: str
    meta_sop_class_uid: str | None
    meta_sop_instance_uid: str | None
    readable: Path
    inflated: bool = False
    values: dict[str, bytes] = field(default_factory=dict)
    pixel_name: str | None = None
    pixel_length: int | None = None  # None: encapsulated
    fragments: int = 0

    def discard(self) -> None:
        """Delete the inflated scratch copy, if any."""
        if self.inflated:
            self.readable.unlink(missing_ok=True)


class _Walker:
    """Walks the elements of an encoded dataset in ``buf`` (a memory map of the file) from
    ``pos`` to ``end`` (the end of the file). Offsets are kept as integers and values are
    read with :func:`struct.unpack_from`, so bulk values are skipped without being read."""

    def __init__(self, buf: mmap.mmap, pos: int, end: int, *, implicit: bool,
                 little: bool, encapsulated: bool) -> None:
        self.buf = buf
        self.pos = pos
        self.end = end
        self.implicit = implicit
        endian = "<" if little else ">"
        self._tag = struct.Struct(endian + "HH")
        self._tag_len = struct.Struct(endian + "HHL")
        self._u32 = struct.Struct(endian + "L")
        self._u16 = struct.Struct(endian + "H")
        self.encapsulated = encapsulated
        self.values: dict[str, bytes] = {}
        self.charsets: list[bytes] = []
        self.pixel_name: str | None = None
        self.pixel_length: int | None = None
        self.fragments = 0

    def _need(self, n: int, what: str, at: int | None = None) -> None:
        """Refuse unless ``n`` bytes follow offset ``at`` (default: the current one)."""
        if (self.pos if at is None else at) + n > self.end:
            raise DatasetError(f"{what} runs past the end of the dataset")

    def _tag_length(self, what: str) -> tuple[tuple[int, int], int]:
        self._need(8, what)
        group, element, length = self._tag_len.unpack_from(self.buf, self.pos)
        self.pos += 8
        return (group, element), length

    def _skip(self, length: int, limit: int, what: str | tuple[int, int]) -> None:
        """Skip a value of ``length`` bytes that must end by ``limit``; ``what`` names it
        (an element's tag is turned into its name only for the error)."""
        if self.pos + length > limit:
            what = what if isinstance(what, str) else _name(what)
            raise DatasetError(f"{what} runs past the end of its "
                               f"{'dataset' if limit == self.end else 'sequence or item'}")
        self.pos += length

    def dataset(self, limit: int, *, depth: int, implicit: bool) -> None:
        """The elements of a dataset (or item) of a defined length ending at ``limit``."""
        while self.pos < limit:
            self._next(limit, depth=depth, implicit=implicit, delimited=False)
        if self.pos > limit:
            raise DatasetError("an element runs past the end of its item")

    def dataset_until_delimiter(self, limit: int, *, depth: int, implicit: bool) -> None:
        """The elements of an item of undefined length, up to its item delimiter, which
        must come before ``limit`` (the bound of the container)."""
        while self._next(limit, depth=depth, implicit=implicit, delimited=True):
            pass

    def _next(self, limit: int, *, depth: int, implicit: bool, delimited: bool) -> bool:
        """Read one element; False at the item delimiter (``delimited`` only)."""
        pos = self.pos
        if pos >= limit:
            raise DatasetError("an item has no item delimiter")
        self._need(4, "an element tag", pos)
        tag = self._tag.unpack_from(self.buf, pos)
        if tag == _ITEM_END:
            self._need(4, "an item delimiter", pos + 4)
            length = self._u32.unpack_from(self.buf, pos + 4)[0]
            self.pos = pos + 8
            if not delimited or length != 0:
                raise DatasetError("misplaced item delimiter")
            return False
        if tag[0] == 0xFFFE:
            raise DatasetError(f"unexpected delimiter tag (FFFE,{tag[1]:04X}) in a dataset")
        vr: bytes | None
        if implicit:  # tag, 4-byte length
            vr, header = dictionary_vr(tag), 8
        else:  # tag, VR, then a 2-byte length, or 2 reserved bytes and a 4-byte one
            if pos + 6 > self.end:
                raise DatasetError(f"{_name(tag)} runs past the end of the dataset")
            vr = self.buf[pos + 4:pos + 6]
            if vr not in _VRS:
                raise DatasetError(f"{_name(tag)} has an invalid VR")
            header = 12 if vr in _LONG_VRS else 8
        if pos + header > self.end:
            raise DatasetError(f"{_name(tag)} runs past the end of the dataset")
        if header == 8 and not implicit:
            length = self._u16.unpack_from(self.buf, pos + 6)[0]
        else:
            length = self._u32.unpack_from(self.buf, pos + header - 4)[0]
        self.pos = pos + header
        self._element(tag, vr, length, limit, depth=depth, implicit=implicit)
        return True

    def _element(self, tag: tuple[int, int], vr: bytes | None, length: int, limit: int, *,
                 depth: int, implicit: bool) -> None:
        top = depth == 0
        if top and tag in _PIXEL_TAGS:
            self.pixel_name = _PIXEL_TAGS[tag]
        if length == _UNDEFINED:
            if top and tag == (0x7FE0, 0x0010) and self.encapsulated:
                self._encapsulated(limit)
                return
            if vr in (b"SQ", b"UN") or vr is None or implicit:
                # UN of undefined length holds an Implicit VR Little Endian sequence
                self._sequence(limit, depth=depth + 1,
                               implicit=implicit or vr == b"UN", name=_name(tag))
                return
            raise DatasetError(f"{_name(tag)} has an undefined length but is not a sequence")
        if vr == b"SQ":
            end = self.pos + length
            if end > limit:
                raise DatasetError(f"{_name(tag)} runs past the end of its container")
            self._sequence(end, depth=depth + 1, implicit=implicit, name=_name(tag),
                           defined=True)
            return
        if top and tag in _PIXEL_TAGS:
            if tag == (0x7FE0, 0x0010) and self.encapsulated:
                raise DatasetError("encapsulated transfer syntax but PixelData has a defined "
                                   "length (no fragments)")
            self.pixel_length = length
        if tag == _CHARSET or (top and tag in _READ):
            if length > _SMALL_VALUE:
                raise DatasetError(f"{_name(tag)} is too long")
            self._need(length, _name(tag))
            value = self.buf[self.pos:self.pos + length]
            self.pos += length
            if self.pos > limit:
                raise DatasetError(f"{_name(tag)} runs past the end of its container")
            if tag == _CHARSET:
                self.charsets.append(value)
            if top and tag in _READ:
                self.values[_READ[tag]] = value
            return
        self._skip(length, limit, tag)

    def _sequence(self, limit: int, *, depth: int, implicit: bool, name: str,
                  defined: bool = False) -> None:
        if depth > MAX_DEPTH:
            raise DatasetError(f"sequences nested deeper than {MAX_DEPTH} levels")
        while True:
            if defined and self.pos == limit:
                return
            tag, length = self._tag_length(f"an item of {name}")
            if tag == _SEQ_END:
                if defined or length != 0:
                    raise DatasetError(f"misplaced sequence delimiter in {name}")
                return
            if tag != _ITEM:
                raise DatasetError(f"{name} holds something other than items")
            if length == _UNDEFINED:
                self.dataset_until_delimiter(limit, depth=depth, implicit=implicit)
            else:
                end = self.pos + length
                if end > limit:
                    raise DatasetError(f"an item of {name} runs past the end of its container")
                self.dataset(end, depth=depth, implicit=implicit)

    def _encapsulated(self, limit: int) -> None:
        tag, length = self._tag_length("the Basic Offset Table item")
        if tag != _ITEM or length == _UNDEFINED:
            raise DatasetError("encapsulated PixelData does not start with a Basic Offset "
                               "Table item")
        self._skip(length, limit, "the Basic Offset Table")
        while True:
            tag, length = self._tag_length("a pixel data fragment")
            if tag == _SEQ_END:
                if length != 0:
                    raise DatasetError("pixel data sequence delimiter with a non-zero length")
                break
            if tag != _ITEM or length == _UNDEFINED:
                raise DatasetError("encapsulated PixelData holds something other than "
                                   "fragments of a defined length")
            self._skip(length, limit, "a pixel data fragment")
            self.fragments += 1
        if self.fragments == 0:
            raise DatasetError("encapsulated PixelData has no fragment",
                               STATUS_BAD_PIXEL_DATA)


def _name(tag: tuple[int, int]) -> str:
    """How a reason names an element: by its tag only."""
    return f"element ({tag[0]:04X},{tag[1]:04X})"


def dictionary_vr(tag: tuple[int, int]) -> bytes | None:
    """The VR of a tag in an implicit VR dataset: from the dictionary, None when unknown
    (private or unknown tags: their values are skipped, an undefined length is a sequence)."""
    if tag[0] == 0x0002 or tag[1] == 0x0000:
        return b"UL" if tag[1] == 0x0000 else None
    try:
        vr = dictionary_VR((tag[0] << 16) | tag[1])
    except KeyError:
        return None
    return vr.encode("ascii") if len(vr) == 2 else None


def _read_meta(fp: BinaryIO) -> dict[str, str]:
    """The File Meta Information UIDs (Explicit VR Little Endian); leaves ``fp`` at the
    start of the dataset."""
    preamble = fp.read(132)
    if len(preamble) != 132 or preamble[128:] != b"DICM":
        raise DatasetError("not a DICOM Part-10 file")
    found: dict[str, str] = {}
    names = {0x0002: "MediaStorageSOPClassUID", 0x0003: "MediaStorageSOPInstanceUID",
             0x0010: "TransferSyntaxUID"}
    while True:
        pos = fp.tell()
        head = fp.read(6)
        if len(head) < 6 or struct.unpack("<H", head[:2])[0] != 0x0002:
            fp.seek(pos)
            break
        element = struct.unpack("<H", head[2:4])[0]
        vr = head[4:6]
        if vr in _LONG_VRS:
            rest = fp.read(6)
            if len(rest) != 6:
                raise DatasetError("File Meta Information runs past the end")
            length = struct.unpack("<2xL", rest)[0]
        else:
            rest = fp.read(2)
            if len(rest) != 2:
                raise DatasetError("File Meta Information runs past the end")
            length = struct.unpack("<H", rest)[0]
        if length > 1 << 16:
            raise DatasetError("File Meta Information element too long")
        value = fp.read(length)
        if len(value) != length:
            raise DatasetError("File Meta Information runs past the end")
        if element in names:
            found[names[element]] = value.rstrip(b"\x00 ").decode("ascii", "replace")
    if "TransferSyntaxUID" not in found:
        raise DatasetError("File Meta Information lacks the transfer syntax")
    return found


def _charset_ok(term: str) -> bool:
    if term in charset.python_encoding:
        return True
    if re.match("^ISO[^_]IR", term):
        return "ISO_IR" + term[6:] in charset.python_encoding
    if re.match("^(?=ISO.2022.IR.)(?!ISO 2022 IR )", term):
        return "ISO 2022 IR " + term[12:] in charset.python_encoding
    return False


def _inflate(fp: BinaryIO, out: BinaryIO, *, max_inflated_bytes: int,
             on_write: Callable[[int], None] | None) -> int:
    """Inflate the raw deflate stream from ``fp`` to its end into ``out``, chunk by chunk
    (at most 1 MiB in memory); returns the inflated size."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while True:
        chunk = fp.read(_CHUNK)
        try:
            data = inflater.decompress(chunk, _CHUNK) if chunk else b""
        except zlib.error:
            raise DatasetError("deflated dataset is corrupt") from None
        while True:
            total += len(data)
            if total > max_inflated_bytes:
                raise DatasetError(
                    f"deflated dataset inflates to more than storage.max_inflated_bytes "
                    f"({max_inflated_bytes} bytes)", STATUS_TOO_LARGE_INFLATED)
            if data:
                if on_write is not None:
                    on_write(len(data))
                out.write(data)
            if inflater.eof or not inflater.unconsumed_tail:
                break  # after the end of the stream, only padding is left
            try:
                data = inflater.decompress(inflater.unconsumed_tail, _CHUNK)
            except zlib.error:
                raise DatasetError("deflated dataset is corrupt") from None
        if inflater.eof or not chunk:
            break
    if not inflater.eof:
        raise DatasetError("deflated dataset is truncated")
    return total


def check_dataset(path: Path, *, max_inflated_bytes: int, scratch: Path,
                  on_write: Callable[[int], None] | None = None) -> CheckedDataset:
    """Walk the received Part-10 file at ``path`` to its end; refuse what does not parse.

    Args:
        path: the received file (File Meta Information, then the dataset as received).
        max_inflated_bytes: the largest inflated size accepted for a deflated dataset.
        scratch: folder for the inflated copy of a deflated dataset.
        on_write: called with the number of bytes about to be written to the inflated
            copy (a disk-reserve check may raise from it).

    Raises:
        DatasetError: with the status to answer and a reason without values.
        OSError: reading or writing failed.
    """
    size = path.stat().st_size
    with open(path, "rb") as fp:
        meta = _read_meta(fp)
        syntax = UID(meta["TransferSyntaxUID"])
        if not syntax.is_transfer_syntax:
            raise DatasetError("unknown transfer syntax")
        start = fp.tell()
        inflated: Path | None = None
        try:
            if syntax.is_deflated:
                inflated = scratch / f"{path.name}.inflated"
                with open(inflated, "wb") as out:
                    _write_inflated_header(out, meta)
                    header_size = out.tell()
                    length = _inflate(fp, out, max_inflated_bytes=max_inflated_bytes,
                                      on_write=on_write)
                walk_file, walk_start, walk_end = inflated, header_size, header_size + length
                implicit, little = False, True
            else:
                walk_file, walk_start, walk_end = path, start, size
                implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
            with open(walk_file, "rb") as wfp:
                with mmap.mmap(wfp.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    walk_end = min(walk_end, len(buf))
                    walker = _Walker(buf, walk_start, walk_end, implicit=implicit,
                                     little=little, encapsulated=syntax.is_encapsulated
                                     and not syntax.is_deflated)
                    walker.dataset(walk_end, depth=0, implicit=implicit)
            _check_charsets(walker.charsets)
            checked = CheckedDataset(
                transfer_syntax_uid=str(syntax),
                meta_sop_class_uid=meta.get("MediaStorageSOPClassUID"),
                meta_sop_instance_uid=meta.get("MediaStorageSOPInstanceUID"),
                readable=inflated or path, inflated=inflated is not None,
                values=walker.values, pixel_name=walker.pixel_name,
                pixel_length=walker.pixel_length, fragments=walker.fragments)
            _check_pixels(checked, syntax, little)
        except BaseException:
            if inflated is not None:
                inflated.unlink(missing_ok=True)
            raise
    return checked


def _write_inflated_header(out: BinaryIO, meta: dict[str, str]) -> None:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = UID(meta.get("MediaStorageSOPClassUID", ""))
    fm.MediaStorageSOPInstanceUID = UID(meta.get("MediaStorageSOPInstanceUID", ""))
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, fm, enforce_standard=True)  # type: ignore[arg-type]


def _check_charsets(values: list[bytes]) -> None:
    for value in values:
        terms = value.decode("ascii", "replace").split("\\")
        for i, term in enumerate(terms):
            term = term.strip(" \x00")
            if not term and i == 0:
                continue  # an empty first value: the default repertoire
            if not _charset_ok(term):
                raise DatasetError("SpecificCharacterSet holds a term pydicom does not know",
                                   STATUS_BAD_CHARSET)


def _us(values: dict[str, bytes], name: str, little: bool) -> int | None:
    raw = values.get(name)
    if raw is None or raw == b"":
        return None
    if len(raw) != 2:
        raise DatasetError(f"{name} is not one US value", STATUS_BAD_PIXEL_DATA)
    return int(struct.unpack("<H" if little else ">H", raw)[0])


def _is(values: dict[str, bytes], name: str) -> int | None:
    raw = values.get(name)
    if raw is None:
        return None
    text = raw.decode("ascii", "replace").strip(" \x00")
    if not text:
        return None
    if not re.fullmatch(r"[+-]?[0-9]{1,12}", text):
        raise DatasetError(f"{name} is not an integer string", STATUS_BAD_PIXEL_DATA)
    return int(text)


def _is_image_class(sop_class: str) -> bool:
    try:
        name = UID(sop_class).name
    except Exception:
        return False
    return "Image Storage" in name


def _check_pixels(checked: CheckedDataset, syntax: UID, little: bool) -> None:
    values = checked.values
    raw_class = values.get("SOPClassUID", b"").decode("ascii", "replace").strip(" \x00")
    image_class = _is_image_class(raw_class) and str(syntax) not in _JPIP
    has_pixels = checked.pixel_name is not None
    if not has_pixels:
        if image_class:
            raise DatasetError("image storage SOP class without pixel data",
                               STATUS_BAD_PIXEL_DATA)
        return
    if checked.pixel_length == 0:
        raise DatasetError(f"{checked.pixel_name} is empty", STATUS_BAD_PIXEL_DATA)
    rows = _us(values, "Rows", little)
    columns = _us(values, "Columns", little)
    samples = _us(values, "SamplesPerPixel", little)
    bits = _us(values, "BitsAllocated", little)
    frames = _is(values, "NumberOfFrames")
    for name, value in (("Rows", rows), ("Columns", columns)):
        if value is None:
            raise DatasetError(f"pixel data without {name}", STATUS_BAD_PIXEL_DATA)
        if value == 0:
            raise DatasetError(f"{name} is 0", STATUS_BAD_PIXEL_DATA)
    if frames is not None and frames < 1:
        raise DatasetError("NumberOfFrames is not positive", STATUS_BAD_PIXEL_DATA)
    if samples is not None and samples == 0:
        raise DatasetError("SamplesPerPixel is 0", STATUS_BAD_PIXEL_DATA)
    if bits is not None and bits == 0:
        raise DatasetError("BitsAllocated is 0", STATUS_BAD_PIXEL_DATA)
    assert rows is not None and columns is not None
    n_frames = frames or 1
    if checked.pixel_length is None:  # encapsulated
        if n_frames > checked.fragments and not str(syntax).startswith(_VIDEO_PREFIX):
            raise DatasetError(f"NumberOfFrames exceeds the {checked.fragments} pixel data "
                               "fragment(s)", STATUS_BAD_PIXEL_DATA)
        return
    if checked.pixel_name == "PixelData":
        bits_per_sample = bits if bits is not None else 8
        if bits is None:
            raise DatasetError("PixelData without BitsAllocated", STATUS_BAD_PIXEL_DATA)
    else:
        bits_per_sample = 32 if checked.pixel_name == "FloatPixelData" else 64
    photometric = values.get("PhotometricInterpretation", b"").decode("ascii", "replace")
    per_pixel = samples or 1
    if photometric.strip(" \x00") in ("YBR_FULL_422", "YBR_PARTIAL_422") and per_pixel == 3:
        per_pixel = 2  # two chrominance samples shared by two pixels (PS3.3 C.7.6.3.1.2)
    expected_bits = rows * columns * per_pixel * bits_per_sample * n_frames
    expected = (expected_bits + 7) // 8
    if checked.pixel_length < expected:
        raise DatasetError(
            f"{checked.pixel_name} is shorter than its Rows, Columns, SamplesPerPixel, "
            "BitsAllocated and NumberOfFrames need", STATUS_BAD_PIXEL_DATA)


def remove_quietly(path: Path) -> None:
    """Delete ``path`` if it exists (errors are logged by type only)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        LOG.warning("could not remove a temporary file: %s", type(exc).__name__)
