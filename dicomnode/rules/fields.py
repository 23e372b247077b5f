"""Field names: DICOM keywords, tags and the derived series fields.

A field is named, in a statement or in :meth:`SeriesView.values` calls, by its
*canonical name*:

* the DICOM keyword (``SeriesDescription``) for every attribute of pydicom's data
  dictionary, also when the statement wrote it as a tag (``(0008,103E)``);
* ``"(GGGG,EEEE)"`` (upper-case hex) for a tag without a dictionary keyword
  (private tags, for instance);
* one of :data:`DERIVED_FIELDS` for the values the index computes per series
  (``NumSlices`` is an alias of ``NumImages``).
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache

from pydicom.datadict import keyword_dict, keyword_for_tag, tag_for_keyword

__all__ = [
    "DERIVED_FIELDS",
    "FIELD_ALIASES",
    "ORIENTATIONS",
    "canonical_field",
    "canonical_tag_name",
    "suggest_field",
]

NUM_IMAGES = "NumImages"
ORIENTATION = "Orientation"
SLICE_SPACING = "SliceSpacing"
IS_VOLUME = "IsVolume"

DERIVED_FIELDS = frozenset({NUM_IMAGES, ORIENTATION, SLICE_SPACING, IS_VOLUME})
"""Fields computed per series rather than read from a DICOM attribute."""

FIELD_ALIASES = {"NumSlices": NUM_IMAGES}
"""Alternative spellings of derived fields, mapped to the canonical name."""

ORIENTATIONS = ("AXIAL", "SAGITTAL", "CORONAL", "OBLIQUE")
"""The values of the ``Orientation`` derived field."""

_TAG_TEXT = re.compile(
    r"""^\(?\s*["']?(?:0[xX])?([0-9A-Fa-f]{4})["']?\s*,?\s*["']?(?:0[xX])?([0-9A-Fa-f]{4})["']?\s*\)?$"""
)


def canonical_tag_name(tag: int) -> str:
    """The canonical name of a tag: its keyword if it has one, else ``"(GGGG,EEEE)"``.

    Raises:
        ValueError: If ``tag`` is not a 32-bit unsigned value.
    """
    if not 0 <= tag <= 0xFFFFFFFF:
        raise ValueError(f"a DICOM tag is a 32-bit unsigned value, got {tag:#x}")
    keyword = keyword_for_tag(tag)
    # Repeating groups (60xx,3000) share a keyword: keep the exact tag for those.
    if keyword and tag_for_keyword(keyword) == tag:
        return str(keyword)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def canonical_field(name: str) -> tuple[str, int | None, bool] | None:
    """Resolve a field name to ``(canonical name, tag or None, is derived)``.

    ``name`` may be a derived field (or its alias), a DICOM keyword (case-sensitive,
    as in the standard) or a tag written ``(gggg,eeee)``, ``ggggeeee``,
    ``0xggggeeee`` or ``("0xgggg","0xeeee")``. Returns ``None`` when the name is
    none of these.
    """
    name = name.strip()
    if name in FIELD_ALIASES:
        name = FIELD_ALIASES[name]
    if name in DERIVED_FIELDS:
        return name, None, True
    tag = tag_for_keyword(name)
    if tag is not None:
        return name, int(tag), False
    compact = name[2:] if name[:2] in ("0x", "0X") and len(name) == 10 else name
    match = _TAG_TEXT.match(compact)
    if match:
        tag = int(match.group(1) + match.group(2), 16)
        return canonical_tag_name(tag), tag, False
    return None


@lru_cache(maxsize=1)
def _known_names() -> dict[str, str]:
    names = {kw.lower(): kw for kw in keyword_dict}
    names.update({d.lower(): d for d in DERIVED_FIELDS})
    names.update({a.lower(): a for a in FIELD_ALIASES})
    return names


@lru_cache(maxsize=256)
def suggest_field(name: str) -> str | None:
    """The closest known field name to an unknown ``name``, if any is close."""
    names = _known_names()
    exact = names.get(name.lower())
    if exact is not None:
        return exact
    close = difflib.get_close_matches(name.lower(), list(names), n=1, cutoff=0.8)
    return names[close[0]] if close else None
