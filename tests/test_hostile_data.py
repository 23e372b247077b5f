"""Hostile and broken data over real associations: refused with a failure status, while
good data (including every valid storage instance of pydicom's own test files) is stored.

The corpus is generated here, element by element (Explicit VR Little Endian unless a
variant says otherwise), so each variant breaks exactly one thing; each carries the
status the node must answer.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from conftest import NodeFactory, RunningNode, storescu, wait_until
from orthanc import OrthancServer, requires_orthanc
from pydicom.filereader import read_file_meta_info
from pydicom.uid import generate_uid
from pynetdicom import AE, _config, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
US_RETIRED = "1.2.840.10008.5.1.4.1.1.6"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_RETIRED_53 = "1.2.840.10008.1.2.4.53"
JPEG_RETIRED_55 = "1.2.840.10008.1.2.4.55"

MARKER = "HOSTILEMARKER"  # in every generated dataset: must never reach the log
_LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_UNDEFINED = 0xFFFFFFFF

Tag = tuple[int, int]


# ---------------------------------------------------------------- encoding helpers


def el(tag: Tag, vr: str, value: bytes, *, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian element; ``length`` overrides the encoded length."""
    n = len(value) if length is None else length
    if vr in _LONG:
        return struct.pack("<HH2s2xL", tag[0], tag[1], vr.encode(), n) + value
    return struct.pack("<HH2sH", tag[0], tag[1], vr.encode(), n) + value


def text(value: str, vr: str = "LO") -> bytes:
    data = value.encode("latin-1")
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    return data


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def item(content: bytes, *, undefined: bool = False) -> bytes:
    if undefined:
        return struct.pack("<HHL", 0xFFFE, 0xE000, _UNDEFINED) + content + struct.pack(
            "<HHL", 0xFFFE, 0xE00D, 0)
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(content)) + content


SEQ_END = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def part10(sop_class: str, sop_instance: str, syntax: str, dataset: bytes) -> bytes:
    """Preamble, DICM and File Meta Information, then the encoded dataset as given."""
    meta = b"".join([
        el((0x0002, 0x0001), "OB", b"\x00\x01"),
        el((0x0002, 0x0002), "UI", text(sop_class, "UI")),
        el((0x0002, 0x0003), "UI", text(sop_instance, "UI")),
        el((0x0002, 0x0010), "UI", text(syntax, "UI")),
        el((0x0002, 0x0012), "UI", text("1.2.826.0.1.3680043.9.7433.1", "UI")),
    ])
    return (b"\x00" * 128 + b"DICM" + el((0x0002, 0x0000), "UL", struct.pack("<L", len(meta)))
            + meta + dataset)


@dataclass(frozen=True)
class Variant:
    """One generated instance and the status the node must answer."""

    name: str
    elements: dict[Tag, bytes]
    expected: int | None  # None: any failure status
    sop_class: str = CT
    meta_sop_class: str | None = None
    syntax: str = EXPLICIT
    sop_instance: str = ""
    raw: Callable[[bytes], bytes] | None = None  # rewrites the encoded dataset

    def dataset(self) -> bytes:
        data = b"".join(self.elements[t] for t in sorted(self.elements))
        return self.raw(data) if self.raw is not None else data

    def write(self, folder: Path) -> Path:
        data = self.dataset()
        if self.syntax == DEFLATED:
            packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            data = packer.compress(data) + packer.flush()
            if len(data) % 2:
                data += b"\x00"
        path = folder / f"{self.name}.dcm"
        path.write_bytes(part10(self.meta_sop_class or self.sop_class, self.sop_instance,
                                self.syntax, data))
        return path


def image(*, rows: int = 16, columns: int = 16, bits: int = 16, frames: int | None = None,
          sop_class: str = CT, pixels: bytes | None = None, study: str | None = None,
          series: str | None = None, sop: str | None = None,
          **extra: bytes) -> tuple[str, dict[Tag, bytes]]:
    """A small valid image (MONOCHROME2) as elements; returns (SOP Instance UID, elements)."""
    sop = sop or generate_uid()
    per_frame = rows * columns * (bits // 8)
    count = per_frame * (frames if frames is not None and 0 < frames <= 64 else 1)
    elements: dict[Tag, bytes] = {
        (0x0008, 0x0016): el((0x0008, 0x0016), "UI", text(sop_class, "UI")),
        (0x0008, 0x0018): el((0x0008, 0x0018), "UI", text(sop, "UI")),
        (0x0008, 0x0060): el((0x0008, 0x0060), "CS", text("CT", "CS")),
        (0x0008, 0x103E): el((0x0008, 0x103E), "LO", text(f"{MARKER} series")),
        (0x0010, 0x0010): el((0x0010, 0x0010), "PN", text(f"{MARKER}^Patient", "PN")),
        (0x0010, 0x0020): el((0x0010, 0x0020), "LO", text(f"{MARKER}-ID")),
        (0x0020, 0x000D): el((0x0020, 0x000D), "UI", text(study or generate_uid(), "UI")),
        (0x0020, 0x000E): el((0x0020, 0x000E), "UI", text(series or generate_uid(), "UI")),
        (0x0020, 0x0013): el((0x0020, 0x0013), "IS", text("1", "IS")),
        (0x0020, 0x0032): el((0x0020, 0x0032), "DS", text("0\\0\\0", "DS")),
        (0x0020, 0x0037): el((0x0020, 0x0037), "DS", text("1\\0\\0\\0\\1\\0", "DS")),
        (0x0028, 0x0002): el((0x0028, 0x0002), "US", us(1)),
        (0x0028, 0x0004): el((0x0028, 0x0004), "CS", text("MONOCHROME2", "CS")),
        (0x0028, 0x0010): el((0x0028, 0x0010), "US", us(rows)),
        (0x0028, 0x0011): el((0x0028, 0x0011), "US", us(columns)),
        (0x0028, 0x0030): el((0x0028, 0x0030), "DS", text("1\\1", "DS")),
        (0x0028, 0x0100): el((0x0028, 0x0100), "US", us(bits)),
        (0x0028, 0x0101): el((0x0028, 0x0101), "US", us(bits)),
        (0x0028, 0x0102): el((0x0028, 0x0102), "US", us(bits - 1)),
        (0x0028, 0x0103): el((0x0028, 0x0103), "US", us(0)),
        (0x7FE0, 0x0010): el((0x7FE0, 0x0010), "OW" if bits > 8 else "OB",
                             b"\x01" * count if pixels is None else pixels),
    }
    if frames is not None:
        elements[(0x0028, 0x0008)] = el((0x0028, 0x0008), "IS", text(str(frames), "IS"))
    for keyword, encoded in extra.items():
        tag = pydicom.datadict.tag_for_keyword(keyword)
        assert tag is not None, keyword
        elements[(tag >> 16, tag & 0xFFFF)] = encoded
    return sop, elements


def variant(name: str, expected: int | None, *, edit: Callable[[dict[Tag, bytes]], None]
            | None = None, **kwargs: object) -> Variant:
    image_args = {k: kwargs.pop(k) for k in list(kwargs)
                  if k in ("rows", "columns", "bits", "frames", "pixels", "study", "series",
                           "sop")}
    sop_class = str(kwargs.get("sop_class", CT))
    sop, elements = image(sop_class=sop_class, **image_args)  # type: ignore[arg-type]
    if edit is not None:
        edit(elements)
    return Variant(name, elements, expected, sop_instance=sop, **kwargs)  # type: ignore[arg-type]


def _set(tag: Tag, encoded: bytes | None) -> Callable[[dict[Tag, bytes]], None]:
    def edit(elements: dict[Tag, bytes]) -> None:
        if encoded is None:
            del elements[tag]
        else:
            elements[tag] = encoded
    return edit


def _encapsulated(*fragments: bytes, bot: bool = True, end: bool = True) -> bytes:
    body = (item(b"") if bot else b"") + b"".join(item(f) for f in fragments)
    return (struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OB", _UNDEFINED) + body
            + (SEQ_END if end else b""))


JPEG_FRAGMENT = b"\xff\xd8\xff\xdb" + b"\x00" * 60 + b"\xff\xd9"  # structure only


def _nested(depth: int) -> bytes:
    inner = el((0x0008, 0x0100), "SH", text("CODE", "SH"))
    for _ in range(depth):
        inner = el((0x0040, 0xA730), "SQ", b"", length=_UNDEFINED) + item(
            inner, undefined=True) + SEQ_END
    return inner


def _fuzz(seed: int) -> Callable[[bytes], bytes]:
    def rewrite(data: bytes) -> bytes:
        rng = random.Random(seed)
        header_end = data.index(b"\xe0\x7f\x10\x00")
        at = rng.randrange(8, header_end)
        garbage = bytes(rng.randrange(256) for _ in range(16))
        return data[:at] + garbage + data[at:]
    return rewrite


def malformed_corpus() -> list[Variant]:
    """A few dozen broken instances, each with the status the node must answer."""
    seq = (0x0040, 0xA730)  # ContentSequence
    code = el((0x0008, 0x0100), "SH", text("CODE", "SH"))
    v: list[Variant] = [
        # pixel data against Rows x Columns x SamplesPerPixel x BitsAllocated x frames
        variant("pixel-half", 0xC005, pixels=b"\x01" * 256),
        variant("pixel-two-bytes-short", 0xC005, pixels=b"\x01" * 510),
        variant("pixel-frames-short", 0xC005, frames=3, pixels=b"\x01" * 1024),
        variant("pixel-empty", 0xC005, pixels=b""),
        variant("pixel-missing", 0xC005, edit=_set((0x7FE0, 0x0010), None)),
        variant("rows-zero", 0xC005, edit=_set((0x0028, 0x0010),
                                               el((0x0028, 0x0010), "US", us(0)))),
        variant("columns-zero", 0xC005, edit=_set((0x0028, 0x0011),
                                                  el((0x0028, 0x0011), "US", us(0)))),
        variant("rows-absurd", 0xC005, edit=_set((0x0028, 0x0010),
                                                 el((0x0028, 0x0010), "US", us(65535)))),
        variant("rows-two-values", 0xC005, edit=_set(
            (0x0028, 0x0010), el((0x0028, 0x0010), "US", us(16) + us(16)))),
        variant("rows-missing", 0xC005, edit=_set((0x0028, 0x0010), None)),
        variant("bits-missing", 0xC005, edit=_set((0x0028, 0x0100), None)),
        variant("frames-zero", 0xC005, frames=0),
        variant("frames-negative", 0xC005, frames=-2),
        variant("frames-not-a-number", 0xC005, edit=_set(
            (0x0028, 0x0008), el((0x0028, 0x0008), "IS", text("x1", "IS")))),
        variant("frames-absurd", 0xC005, frames=2_000_000_000),
        # structure
        variant("pixel-length-past-end", 0xC001, edit=_set(
            (0x7FE0, 0x0010), el((0x7FE0, 0x0010), "OW", b"\x01" * 512, length=4096))),
        variant("header-length-past-end", 0xC001, edit=_set(
            (0x0010, 0x0010), el((0x0010, 0x0010), "PN", text(MARKER, "PN"), length=65000))),
        variant("truncated-in-element-header", 0xC001, raw=lambda d: d[:d.index(
            b"\xe0\x7f\x10\x00") + 6]),
        variant("truncated-in-value", 0xC001, raw=lambda d: d[:-100]),
        variant("invalid-vr", 0xC001, edit=_set(
            (0x0010, 0x0020), el((0x0010, 0x0020), "ZZ", text("X")))),
        variant("invalid-vr-lowercase", 0xC001, edit=_set(
            (0x0010, 0x0020), el((0x0010, 0x0020), "lo", text("X")))),
        variant("invalid-vr-nul", 0xC001, edit=_set(
            (0x0008, 0x103E), struct.pack("<HH", 0x0008, 0x103E) + b"\x00\x00\x02\x00AB")),
        variant("sequence-holds-no-item", 0xC001, edit=_set(
            seq, el(seq, "SQ", code))),
        variant("sequence-without-delimiter", 0xC001, raw=lambda d: d + el(
            (0x7FE1, 0x0010), "SQ", item(code), length=_UNDEFINED)),
        variant("item-longer-than-sequence", 0xC001, edit=_set(
            seq, el(seq, "SQ", item(code)[:4] + struct.pack("<L", 400) + code))),
        variant("stray-item-delimiter", 0xC001, edit=_set(
            (0x0008, 0x0019), struct.pack("<HHL", 0xFFFE, 0xE00D, 0))),
        variant("nesting-too-deep", 0xC001, edit=_set(seq, _nested(40)[:])),
        # identity of the instance
        variant("sop-class-differs-from-request", 0xA900, meta_sop_class=MR),
        variant("study-uid-65", 0xC003, study="1." + "2" * 63),
        variant("series-uid-70", 0xC003, series="1.2." + "3" * 66),
        variant("sop-uid-80", 0xC003, edit=_set((0x0008, 0x0018), el(
            (0x0008, 0x0018), "UI", text("1.2." + "4" * 76, "UI")))),
        variant("uid-with-letters", 0xC003, study="1.2.3.abc"),
        variant("patient-id-65", 0xC003, edit=_set((0x0010, 0x0020), el(
            (0x0010, 0x0020), "LO", text("P" * 65)))),
        # character sets
        variant("charset-unknown", 0xC006, edit=_set((0x0008, 0x0005), el(
            (0x0008, 0x0005), "CS", text("ISO_IR 999", "CS")))),
        variant("charset-garbage", 0xC006, edit=_set((0x0008, 0x0005), el(
            (0x0008, 0x0005), "CS", text("KOI8-XYZ", "CS")))),
        variant("charset-unknown-in-item", 0xC006, edit=_set(seq, el(seq, "SQ", item(
            el((0x0008, 0x0005), "CS", text("ISO_IR 4711", "CS")) + code)))),
        # encapsulated pixel data
        variant("encapsulated-no-offset-table", 0xC001, syntax=JPEG_BASELINE, bits=8,
                edit=_set((0x7FE0, 0x0010), _encapsulated(bot=False))),
        variant("encapsulated-no-fragment", 0xC005, syntax=JPEG_BASELINE, bits=8,
                edit=_set((0x7FE0, 0x0010), _encapsulated())),
        variant("encapsulated-no-delimiter", 0xC001, syntax=JPEG_BASELINE, bits=8,
                edit=_set((0x7FE0, 0x0010), _encapsulated(JPEG_FRAGMENT, end=False))),
        variant("encapsulated-fragment-past-end", 0xC001, syntax=JPEG_BASELINE, bits=8,
                edit=_set((0x7FE0, 0x0010), _encapsulated(JPEG_FRAGMENT)[:-20])),
        variant("encapsulated-defined-length", 0xC001, syntax=JPEG_BASELINE, bits=8,
                edit=_set((0x7FE0, 0x0010), el((0x7FE0, 0x0010), "OB", JPEG_FRAGMENT))),
        variant("encapsulated-more-frames-than-fragments", 0xC005, syntax=JPEG_BASELINE,
                bits=8, frames=3, edit=_set((0x7FE0, 0x0010), _encapsulated(JPEG_FRAGMENT))),
        # deflate
        variant("deflated-truncated", 0xC001, syntax=DEFLATED,
                raw=lambda d: d),  # truncated after compression, see below
    ]
    v += [variant(f"fuzzed-{seed}", None, raw=_fuzz(seed)) for seed in range(8)]
    return v


def valid_corpus() -> list[Variant]:
    """Instances that must be stored (Success), each testing a tolerance."""
    seq = (0x0040, 0xA730)
    code = el((0x0008, 0x0100), "SH", text("CODE", "SH"))
    return [
        variant("valid-plain", 0),
        variant("valid-pixel-padded", 0, pixels=b"\x01" * 612),
        variant("valid-odd-length-pad", 0, rows=3, columns=3, bits=8, pixels=b"\x01" * 10),
        variant("valid-multiframe", 0, frames=3),
        variant("valid-uid-64", 0, study="1." + "2" * 62),
        variant("valid-charset-latin1", 0, edit=_set((0x0008, 0x0005), el(
            (0x0008, 0x0005), "CS", text("ISO_IR 100", "CS")))),
        variant("valid-charset-extensions", 0, edit=_set((0x0008, 0x0005), el(
            (0x0008, 0x0005), "CS", text("\\ISO 2022 IR 87", "CS")))),
        variant("valid-charset-utf8", 0, edit=_set((0x0008, 0x0005), el(
            (0x0008, 0x0005), "CS", text("ISO_IR 192", "CS")))),
        variant("valid-sequences", 0, edit=_set(seq, el(seq, "SQ", b"", length=_UNDEFINED)
                                                 + item(code, undefined=True) + item(code)
                                                 + SEQ_END)),
        variant("valid-nested-10", 0, edit=_set(seq, _nested(10))),
        variant("valid-un-sequence", 0, edit=_set((0x0009, 0x1001), el(
            (0x0009, 0x1001), "UN", b"", length=_UNDEFINED) + item(
                struct.pack("<HHL", 0x0008, 0x0100, 4) + b"CODE") + SEQ_END)),
        variant("valid-jpeg-baseline", 0, syntax=JPEG_BASELINE, bits=8,
                edit=_set((0x7FE0, 0x0010), _encapsulated(JPEG_FRAGMENT))),
        variant("valid-retired-jpeg-53", 0, syntax=JPEG_RETIRED_53, bits=8,
                edit=_set((0x7FE0, 0x0010), _encapsulated(JPEG_FRAGMENT))),
        variant("valid-retired-jpeg-55", 0, syntax=JPEG_RETIRED_55, bits=8,
                edit=_set((0x7FE0, 0x0010), _encapsulated(JPEG_FRAGMENT))),
        variant("valid-retired-us-image", 0, sop_class=US_RETIRED, bits=8),
        variant("valid-deflated", 0, syntax=DEFLATED),
        variant("valid-text-sr-without-pixels", 0, sop_class=BASIC_TEXT_SR,
                edit=_set((0x7FE0, 0x0010), None)),
    ]


def write_corpus(variants: list[Variant], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {v.name: v.write(folder) for v in variants}
    truncated = paths.get("deflated-truncated")
    if truncated is not None:
        data = truncated.read_bytes()
        truncated.write_bytes(data[:len(data) - 40 - len(data) % 2])
    return paths


# ---------------------------------------------------------------- sending


def send_files(port: int, paths: list[Path], *, aet: str = "TESTSCU") -> list[int | None]:
    """C-STORE each file as it is (bytes unchanged), a context per (SOP class, syntax);
    returns the statuses (None where no context was accepted for the file)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    metas = [read_file_meta_info(p) for p in paths]
    pairs = [(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas]
    statuses: list[int | None] = [None] * len(paths)
    unique = list(dict.fromkeys(pairs))
    for start in range(0, len(unique), 100):
        chunk = set(unique[start:start + 100])
        ae = AE(ae_title=aet)
        ae.requested_contexts = [build_context(s, t) for s, t in chunk]
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert assoc.is_established
        accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0]))
                    for c in assoc.accepted_contexts}
        for i, (path, pair) in enumerate(zip(paths, pairs, strict=True)):
            if pair not in chunk or pair not in accepted:
                continue
            rsp = assoc.send_c_store(path)
            statuses[i] = int(rsp.Status) if "Status" in rsp else None
            if not assoc.is_established:
                break
        if assoc.is_established:
            assoc.release()
    return statuses


def stored(node: RunningNode) -> dict[str, Path]:
    return {p.stem: p for p in (node.store / "instances").rglob("*.dcm")}


# ---------------------------------------------------------------- item 1 and 2: the corpus


@pytest.mark.slow
def test_malformed_corpus_gets_failure_statuses_and_valid_corpus_is_stored(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    malformed, valid = malformed_corpus(), valid_corpus()
    assert len(malformed) >= 40
    paths = write_corpus(malformed + valid, tmp_path / "corpus")
    node = node_factory()
    variants = malformed + valid
    statuses = send_files(node.port, [paths[v.name] for v in variants])
    wrong = []
    for v, status in zip(variants, statuses, strict=True):
        if v.expected is None:
            ok = status is not None and status != 0 and (status >> 12) in (0xA, 0xC)
        else:
            ok = status == v.expected
        if not ok:
            shown = "no status" if status is None else f"0x{status:04X}"
            want = "a failure" if v.expected is None else f"0x{v.expected:04X}"
            wrong.append(f"{v.name}: {shown}, expected {want}")
    assert not wrong, "\n".join(wrong)
    kept = stored(node)
    assert sorted(kept) == sorted(v.sop_instance for v in valid)
    # the stored bytes are the received bytes (the deflated one as well)
    for v in valid:
        assert kept[v.sop_instance].read_bytes().endswith(paths[v.name].read_bytes()[-64:])
    assert not any((node.store / "tmp").iterdir()), "a temporary file stayed behind"
    log = node.log()
    assert MARKER not in log, "a value from a dataset reached the log"
    assert "refused with 0xC005: PixelData is shorter than its Rows" in log
    assert "refused with 0xC001: element (0010,0020) has an invalid VR" in log
    assert "refused with 0xA900" in log
    assert node.cli("echo", "self").returncode == 0


@pytest.mark.slow
def test_uids_longer_than_64_are_refused_not_truncated_into_one_study(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    # two patients whose StudyInstanceUIDs share their first 64 characters
    prefix = "1.2.826.0.1.3680043.9.7433.2." + "7" * 35
    assert len(prefix) == 64
    a = variant("patient-a", 0xC003, study=prefix + "01")
    b = variant("patient-b", 0xC003, study=prefix + "02")
    long_sop = variant("sop-65", 0xC003, sop="1.2.826.0.1.3680043.9.7433.3." + "8" * 36)
    paths = write_corpus([a, b, long_sop], tmp_path / "uids")
    node = node_factory()
    statuses = send_files(node.port, [paths["patient-a"], paths["patient-b"]])
    assert statuses == [0xC003, 0xC003]
    assert node.studies() == []
    assert stored(node) == {}
    assert "StudyInstanceUID is longer than 64 characters" in node.log()


def _valid_pydicom_instances(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """pydicom's test files that are valid storage instances, and those left out (why).

    Valid: pydicom reads the whole file with its File Meta Information, it names a
    storage SOP class and Study/Series/SOP Instance UIDs, and the pixel data (if any)
    decodes or is compressed with a codec that is not installed. Files known to be
    broken on purpose are listed with the reason the node refuses them. A file whose
    File Meta Information names another SOP Instance UID than its dataset is sent as a
    copy with the meta corrected (a C-STORE names the dataset's instance).
    """
    from pydicom.data import get_testdata_files

    broken_on_purpose = {
        "MR_truncated.dcm": "pixel data runs past the end of the file",
        "rtplan_truncated.dcm": "a sequence runs past the end of the file",
        "badVR.dcm": "NumberOfFrames is not a number",
        "SC_rgb_jpeg.dcm": "encoded Implicit VR under an Explicit VR transfer syntax",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = sorted(get_testdata_files("*.dcm"))
    valid: list[Path] = []
    left_out: dict[str, str] = {}
    for name in files:
        path = Path(name)
        if path.name in broken_on_purpose:
            left_out[path.name] = broken_on_purpose[path.name]
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
                meta = ds.file_meta
                if "TransferSyntaxUID" not in meta or not meta.get("MediaStorageSOPClassUID"):
                    raise ValueError("no File Meta Information")
                if not all(ds.get(k) for k in ("SOPClassUID", "StudyInstanceUID",
                                               "SeriesInstanceUID", "SOPInstanceUID")):
                    raise ValueError("no storage instance")
                if "Storage" not in pydicom.uid.UID(str(ds.SOPClassUID)).name:
                    raise ValueError("not a storage SOP class")
                if "PixelData" in ds:
                    try:
                        ds.pixel_array  # noqa: B018
                    except RuntimeError:
                        pass  # no codec installed: the node does not decode anyway
        except Exception as exc:
            left_out[path.name] = f"{type(exc).__name__}: {exc}"[:80]
            continue
        if meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / path.name
            ds.save_as(path, enforce_file_format=True)
        valid.append(path)
    return valid, left_out


@pytest.mark.slow
def test_pydicom_testdata_valid_storage_instances_are_all_accepted(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    valid, left_out = _valid_pydicom_instances(tmp_path / "aligned")
    assert len(valid) >= 50, left_out
    # one copy per file with its own SOP Instance UID in the meta and dataset is not
    # needed: re-sends of the same instance are Success too (stored or replaced)
    node = node_factory()
    statuses = send_files(node.port, valid)
    wrong = [f"{p.name}: {'no context' if s is None else f'0x{s:04X}'}"
             for p, s in zip(valid, statuses, strict=True) if s != 0]
    assert not wrong, "\n".join(wrong)
    # and the files broken on purpose are refused, not stored
    broken = [Path(f) for f in _testdata_paths(["MR_truncated.dcm", "rtplan_truncated.dcm",
                                                "badVR.dcm"])]
    assert all(s is not None and s >= 0xA000 for s in send_files(node.port, broken))


def _testdata_paths(names: list[str]) -> list[str]:
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [str(get_testdata_file(n)) for n in names]


# ---------------------------------------------------------------- item 3: AE titles


@pytest.fixture
def lenient_ae_validation() -> Iterator[None]:
    """Let this test process send AE titles pynetdicom would refuse to send."""
    saved = _config.VALIDATORS["AE"]
    _config.VALIDATORS["AE"] = lambda value: (True, "")
    try:
        yield
    finally:
        _config.VALIDATORS["AE"] = saved


@pytest.mark.usefixtures("lenient_ae_validation")
def test_ae_titles_with_control_characters_are_refused_and_logged_escaped(
        node_factory: NodeFactory) -> None:
    node = node_factory()
    cases = [("TESTSCU\nFORGED", "DICOMNODE", 0x03), ("TESTSCU\t", "DICOMNODE", 0x03),
             ("TESTSCU", "DICOMNODE\r", 0x07), ("TEST\x1bSCU", "DICOMNODE", 0x03)]
    for calling, called, diagnostic in cases:
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=called)
        assert assoc.is_rejected, repr(calling)
        assert assoc.acceptor.primitive is not None
        assert assoc.acceptor.primitive.diagnostic == diagnostic
    log = node.log()
    assert not any(line.startswith("FORGED") for line in log.splitlines())
    assert "\x1b" not in log and "\r" not in log
    assert "calling AE title 'TESTSCU\\nFORGED' is not a valid AE title" in log
    # a well-formed title still associates
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assoc.release()


def test_printable_escapes_what_could_forge_a_log_line() -> None:
    from dicomnode.net.access import printable

    assert printable("TESTSCU") == "'TESTSCU'"
    assert printable("A\nB\tC\x1b\u2028") == "'A\\nB\\tC\\x1b\\u2028'"
    assert printable("x" * 100, limit=8) == "'xxxxxxxx'..."


# ---------------------------------------------------------------- item 4: contexts


def test_storescu_gets_explicit_vr_and_private_attributes_keep_their_vr(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    sop, elements = image()
    creator = el((0x0009, 0x0010), "LO", text("DICOMNODE TEST"))
    private = el((0x0009, 0x1001), "DS", text("1.5", "DS"))
    elements[(0x0009, 0x0010)] = creator
    elements[(0x0009, 0x1001)] = private
    path = Variant("private", elements, 0, sop_instance=sop).write(tmp_path)
    node = node_factory()
    # with a compression option, storescu proposes the compressed syntax in one context
    # and Explicit VR LE, Explicit VR BE and Implicit VR LE together in another: the node
    # must pick Explicit VR LE there (pynetdicom takes the first of the acceptor's list)
    result = storescu(node.port, path, extra=("-xs",))
    assert result.returncode == 0, result.stderr
    kept = stored(node)[sop]
    ds = pydicom.dcmread(kept)
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT
    assert ds[0x00091001].VR == "DS"
    assert private in kept.read_bytes()


def test_retired_sop_classes_and_retired_jpeg_syntaxes_are_accepted(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    variants = [
        variant("us-retired", 0, sop_class=US_RETIRED, bits=8),
        variant("us-multiframe-retired", 0, sop_class="1.2.840.10008.5.1.4.1.1.3", bits=8,
                frames=2),
        variant("nm-retired", 0, sop_class="1.2.840.10008.5.1.4.1.1.5"),
        variant("jpeg-53", 0, syntax=JPEG_RETIRED_53, bits=8,
                edit=_set((0x7FE0, 0x0010), _encapsulated(JPEG_FRAGMENT))),
        variant("jpeg-55", 0, syntax=JPEG_RETIRED_55, bits=8,
                edit=_set((0x7FE0, 0x0010), _encapsulated(JPEG_FRAGMENT))),
        variant("jpeg-60", 0, syntax="1.2.840.10008.1.2.4.60", bits=8,
                edit=_set((0x7FE0, 0x0010), _encapsulated(JPEG_FRAGMENT))),
    ]
    paths = write_corpus(variants, tmp_path / "retired")
    node = node_factory()
    assert send_files(node.port, [paths[v.name] for v in variants]) == [0] * len(variants)
    assert len(stored(node)) == len(variants)


@pytest.mark.slow
@requires_orthanc
def test_orthanc_push_with_retired_classes_and_syntaxes_is_stored_whole(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    variants = [
        variant("ct", 0),
        variant("us-retired", 0, sop_class=US_RETIRED, bits=8),
        variant("jpeg-53", 0, syntax=JPEG_RETIRED_53, bits=8,
                edit=_set((0x7FE0, 0x0010), _encapsulated(JPEG_FRAGMENT))),
    ]
    paths = write_corpus(variants, tmp_path / "push")
    node = node_factory(peers={"orthanc": {"ae_title": "ORTHANC", "host": "127.0.0.1"}})
    with OrthancServer(tmp_path / "orthanc",
                       modalities={"dicomnode": ("DICOMNODE", node.port)}) as orthanc:
        ids = [str(orthanc.upload(paths[v.name])["ID"]) for v in variants]
        orthanc.push("dicomnode", ids)
    kept = stored(node)
    assert sorted(kept) == sorted(v.sop_instance for v in variants)
    stored_syntax = read_file_meta_info(kept[variants[2].sop_instance]).TransferSyntaxUID
    assert stored_syntax == JPEG_RETIRED_53


# ---------------------------------------------------------------- item 5: disk


def _big_image(folder: Path, mib: int, *, name: str = "big") -> tuple[Path, str]:
    rows = columns = 1024
    frames = mib // 2  # 2 MiB per 16-bit 1024 x 1024 frame
    sop, elements = image(rows=rows, columns=columns, frames=frames, pixels=b"")
    pixel_bytes = rows * columns * 2 * frames
    elements[(0x7FE0, 0x0010)] = el((0x7FE0, 0x0010), "OW", b"", length=pixel_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.dcm"
    head = part10(CT, sop, EXPLICIT, b"".join(elements[t] for t in sorted(elements)))
    with path.open("wb") as fp:
        fp.write(head)
        block = b"\x01" * (1 << 20)
        for _ in range(pixel_bytes >> 20):
            fp.write(block)
    return path, sop


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 50 MiB tmpfs (needs root); unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a 50 MiB tmpfs needs root")
    mount = tmp_path / "small-fs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=50m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_reserve_holds_while_streaming_and_partial_file_is_removed(
        node_factory: NodeFactory, small_filesystem: Path, tmp_path: Path) -> None:
    reserve = 16 * 1024 * 1024
    node = node_factory(min_free_bytes=reserve,
                        storage={"path": str(small_filesystem / "store"),
                                 "min_free_bytes": reserve})
    node.store = small_filesystem / "store"
    path, _sop = _big_image(tmp_path / "big", 40)
    lowest = [shutil.disk_usage(small_filesystem).free]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            lowest[0] = min(lowest[0], shutil.disk_usage(small_filesystem).free)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        statuses = send_files(node.port, [path])
    finally:
        done.set()
        watcher.join()
    assert statuses == [0xA700]
    print(f"lowest free space while streaming 40 MiB: {lowest[0] / 2**20:.1f} MiB "
          f"(reserve {reserve / 2**20:.0f} MiB)")
    # never more than one PDU (1 MiB) below the reserve
    assert lowest[0] >= reserve - (1 << 20), f"free space fell to {lowest[0]} bytes"
    assert not any((node.store / "tmp").iterdir())
    assert stored(node) == {}
    # a small instance that fits still goes in
    small_path = write_corpus([variant("fits", 0)], tmp_path / "small")["fits"]
    assert send_files(node.port, [small_path]) == [0]


_SLOW_SENDER = textwrap.dedent("""
    import os, sys, threading, time
    from pynetdicom import AE, _config, evt, build_context
    _config.STORE_SEND_CHUNKED_DATASET = True
    def slow(event):
        time.sleep(0.2)
    ae = AE(ae_title="TESTSCU")
    ae.requested_contexts = [build_context("1.2.840.10008.5.1.4.1.1.2",
                                           "1.2.840.10008.1.2.1")]
    assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="DICOMNODE",
                         evt_handlers=[(evt.EVT_PDU_SENT, slow)])
    assert assoc.is_established
    sender = threading.Thread(target=assoc.send_c_store, args=(sys.argv[2],), daemon=True)
    sender.start()
    if sys.argv[3] == "abort":
        time.sleep(2.5)
        # an A-ABORT PDU in the middle of the dataset, between two P-DATA PDUs (the
        # sender sleeps after each): pynetdicom's abort() would queue it after them
        assoc.dul.socket.socket.sendall(bytes([7, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
        time.sleep(0.5)
        os._exit(0)
    else:
        sender.join()
""")


@pytest.mark.slow
def test_transfer_cut_mid_dataset_leaves_no_temporary_file(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory()
    path, _sop = _big_image(tmp_path / "cut", 64)
    script = tmp_path / "slow_sender.py"
    script.write_text(_SLOW_SENDER)
    tmp = node.store / "tmp"
    for how in ("kill", "abort"):
        proc = subprocess.Popen([sys.executable, str(script), str(node.port), str(path), how],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: any(p.stat().st_size > (4 << 20) for p in tmp.iterdir()),
                       30, "a partial temporary file")
            if how == "kill":  # the sender dies: its connection just closes
                proc.send_signal(signal.SIGKILL)
            proc.wait(20)  # "abort": the sender sends an A-ABORT after 2.5 s
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        wait_until(lambda: not any(tmp.iterdir()), 5,
                   f"the partial file to go after {how}")
    assert stored(node) == {}
    assert node.log().count("removed 1 unfinished transfer(s)") == 2


# ---------------------------------------------------------------- item 6: deflate


def _deflated_bomb(folder: Path, inflated_mib: int) -> tuple[Path, str]:
    """A valid CT whose deflated dataset inflates to about ``inflated_mib`` MiB."""
    rows = columns = 2048
    frames = inflated_mib // 8  # 8 MiB per 16-bit 2048 x 2048 frame
    sop, elements = image(rows=rows, columns=columns, frames=frames, pixels=b"")
    pixel_bytes = rows * columns * 2 * frames
    elements[(0x7FE0, 0x0010)] = el((0x7FE0, 0x0010), "OW", b"", length=pixel_bytes)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [packer.compress(b"".join(elements[t] for t in sorted(elements)))]
    block = b"\x00" * (1 << 20)
    for _ in range(pixel_bytes >> 20):
        parts.append(packer.compress(block))
    parts.append(packer.flush())
    data = b"".join(parts)
    if len(data) % 2:
        data += b"\x00"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"bomb-{inflated_mib}.dcm"
    path.write_bytes(part10(CT, sop, DEFLATED, data))
    return path, sop


def _rss(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


@pytest.mark.slow
def test_deflate_bomb_is_refused_with_bounded_memory(node_factory: NodeFactory,
                                                     tmp_path: Path) -> None:
    bomb, _ = _deflated_bomb(tmp_path / "bomb", 256)
    fits, fits_sop = _deflated_bomb(tmp_path / "fits", 48)
    assert bomb.stat().st_size < 400_000
    node = node_factory(storage={"path": "store", "min_free_bytes": 0,
                                 "max_inflated_bytes": 64 * 1024 * 1024})
    assert node.proc is not None
    pid = node.proc.pid
    warm = variant("warm", 0)
    assert send_files(node.port, [write_corpus([warm], tmp_path / "w")["warm"]]) == [0]
    before = _rss(pid)["VmRSS"]
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
    assert send_files(node.port, [bomb, fits]) == [0xC007, 0]
    peak = _rss(pid)["VmHWM"]
    growth = peak - before
    print(f"node RSS {before / 2**20:.0f} MiB, peak while inflating "
          f"{peak / 2**20:.0f} MiB (+{growth / 2**20:.0f} MiB)")
    assert growth < 40 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB"
    kept = stored(node)
    assert sorted(kept) == sorted([warm.sop_instance, fits_sop])
    assert kept[fits_sop].stat().st_size < 400_000, "stored as received, deflated"
    assert not any((node.store / "tmp").iterdir())
    assert "inflates to more than storage.max_inflated_bytes" in node.log()


# ---------------------------------------------------------------- item 7: multi-frame verdicts


@pytest.mark.slow
def test_rt_dose_grid_and_multiframe_without_positions_get_true_verdicts(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(str(get_testdata_file("rtdose.dcm")))
    # the test file's meta names another SOP Instance UID than its dataset: align them
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    dose = tmp_path / "rtdose.dcm"
    ds.save_as(dose, enforce_file_format=True)
    # a cine loop: one position for the instance, none per frame
    cine = variant("cine", 0, sop_class="1.2.840.10008.5.1.4.1.1.3.1", bits=8, frames=4)
    cine_path = write_corpus([cine], tmp_path / "cine")["cine"]
    node = node_factory()
    assert send_files(node.port, [dose, cine_path]) == [0, 0]
    studies = node.wait_for(lambda s: len(s) == 2 and all(x["state"] == "complete" for x in s))
    verdicts = {x["series"][0]["modality"]: x["series"][0]["geometry"] for x in studies}
    assert verdicts["RTDOSE"]["whole"] is True
    assert verdicts["RTDOSE"]["frames"] == 15
    assert verdicts["RTDOSE"]["slice_spacing_mm"] == pytest.approx(5.0)
    assert verdicts["CT"]["whole"] is False  # the cine variant keeps Modality CT
    assert "4 of 4 frames lack ImagePositionPatient" in verdicts["CT"]["reason"]
