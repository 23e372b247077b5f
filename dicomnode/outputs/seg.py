"""DICOM Segmentation (SEG) objects from a segmentation, written with highdicom.

One segment per structure of the model card, with its label, SNOMED CT category
and type, recommended display colour (CIELab, converted from the card's RGB) and
the algorithm's identification (model name and version). The SEG is a new series
in the source study, shares the source's Frame of Reference and references every
source image. It holds one frame per source frame and segment where that segment has a
voxel (``outputs.seg_omit_empty_frames: true``, the node's default, as highdicom and MONAI
do); each frame names its source image and position. ``false`` keeps the empty ones too.
"""

from __future__ import annotations

from typing import Literal

import highdicom as hd
import numpy as np
import numpy.typing as npt

from dicomnode.inference.segment import Segmentation
from dicomnode.outputs.algorithm import (
    algorithm_identification,
    algorithm_identity,
    content_label,
    contributing_equipment,
    marked,
    result_description,
    software_versions,
    sr_code,
)
from dicomnode.outputs.source import (
    OutputError,
    SourceSeries,
    check_plane_shape,
    object_identity,
    result_uid,
)

__all__ = ["KEEP_EMPTY_FRAMES_MAX_SEGMENTS", "SEG_SERIES_NUMBER", "SegType", "build_seg"]

SegType = Literal["binary", "labelmap"]
SEG_SERIES_NUMBER = 9901
"""Series Number of SEG series the node writes (RTSTRUCT uses 9902, SR 9903)."""
KEEP_EMPTY_FRAMES_MAX_SEGMENTS = 16
"""``omit_empty_frames="auto"`` keeps every frame up to this many segments."""


def _frames(segmentation: Segmentation, source: SourceSeries,
            seg_type: SegType) -> npt.NDArray[np.uint8 | np.bool_]:
    """The pixel array highdicom takes: per source frame, [rows, cols, segments] or segment
    numbers. Disjoint structures (views of one label map) go as segment numbers for either
    type: highdicom makes each segment's frames from them one plane at a time, so memory
    stays one label map, not one mask per structure."""
    zs = [f.z for f in source.frames]
    structures = segmentation.structures
    shared = segmentation.shared_label_map()
    if shared is not None:
        lut = np.zeros(256, dtype=np.uint8 if len(structures) < 256 else np.uint16)
        for number, structure in enumerate(structures, start=1):
            lut[structure.label.value] = number
        return lut[shared[zs]]
    if seg_type == "labelmap":
        labels = np.zeros((len(zs), *structures[0].shape[1:]), dtype=np.uint8)
        for number, structure in enumerate(structures, start=1):
            for frame, z in enumerate(zs):
                labels[frame][structure.plane(z)] = number
        return labels
    # built segment by segment, handed over as a [frames, rows, cols, segments] view:
    # highdicom walks it one segment at a time, far faster over contiguous segments
    by_segment = np.stack([np.asarray(s.voxels[zs], dtype=bool) for s in structures], axis=0)
    return np.moveaxis(by_segment, 0, -1)


def build_seg(
    segmentation: Segmentation,
    source: SourceSeries,
    *,
    seg_type: SegType = "binary",
    omit_empty_frames: bool | Literal["auto"] = False,
    seed: str,
    series_number: int = SEG_SERIES_NUMBER,
    result_number: int = 1,
) -> hd.seg.Segmentation:
    """A SEG object of ``segmentation`` referencing ``source``.

    Args:
        segmentation: the structures on the grid of ``source`` (masks [z, y, x]).
        source: the source headers and, per source frame, its plane of the masks.
        seg_type: ``binary`` (one frame per source frame and segment; structures may
            overlap) or ``labelmap`` (one frame per source frame holding segment
            numbers; where structures overlap the later one in the card wins).
        omit_empty_frames: leave out frames where a segment has no voxel; ``auto`` keeps
            them up to :data:`KEEP_EMPTY_FRAMES_MAX_SEGMENTS` segments (a binary SEG has a
            frame per source frame and segment: 35 400 frames, 1.2 GB, for 118 structures
            on 300 slices of 512 x 512).
        seed: what makes the object's UIDs (e.g. the job's key); the same seed gives
            the same Series and SOP Instance UIDs.
        series_number: the SEG series' number.
        result_number: which result of its job this is (its SeriesDescription says it).

    Raises:
        OutputError: the segmentation has no structure, or its grid does not match
            the source images.
    """
    card = segmentation.card
    if not segmentation.structures:
        raise OutputError(f"model {card.name} produced no structure to write")
    check_plane_shape(source, segmentation.structures[0].shape)
    identity = algorithm_identity(card)
    algorithm = algorithm_identification(card, identity)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=s.label.name,
            segmented_property_category=sr_code(s.label.category),
            segmented_property_type=sr_code(s.label.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=result_uid(seed, "segment", s.label.name),
            tracking_id=s.label.name,
            display_color=hd.color.CIELabColor.from_rgb(*s.label.color),
        )
        for number, s in enumerate(segmentation.structures, start=1)
    ]
    seg_type_value = (hd.seg.SegmentationTypeValues.LABELMAP if seg_type == "labelmap"
                      else hd.seg.SegmentationTypeValues.BINARY)
    seg = hd.seg.Segmentation(
        source_images=list(source.headers),
        pixel_array=_frames(segmentation, source, seg_type),
        segmentation_type=seg_type_value,
        segment_descriptions=descriptions,
        **object_identity(seed, "SEG", series_number),
        manufacturer_model_name=card.name[:64],
        software_versions=software_versions(card),
        device_serial_number="0",
        content_label=content_label(card),
        content_description=marked(f"{card.name} {card.version}", card),
        series_description=result_description("SEG", card, result_number),
        omit_empty_frames=(len(descriptions) > KEEP_EMPTY_FRAMES_MAX_SEGMENTS
                           if omit_empty_frames == "auto" else omit_empty_frames),
        contributing_equipment=[contributing_equipment(identity)],
    )
    seg.ImageLaterality = image_laterality(source)
    return seg


def image_laterality(source: SourceSeries) -> str:
    """Image Laterality (0020,0062) of a SEG: the source's own (``R``, ``L``, ``U``, ``B``),
    else its series Laterality (``R``, ``L``), else ``U`` (unpaired: head, body).

    Laterality (0020,0060) of General Series is Type 2C, required for a paired body part
    unless Image or Frame Laterality is given. PixelMed's validator reads the condition as
    "no Image or Frame Laterality" and reports a SEG without Laterality as an error, while
    dciodvfy reports an (empty) Laterality on an unpaired body part as one: giving Image
    Laterality (General Image, Type 3) satisfies both, and says what is known.
    """
    first = source.first
    image = str(first.get("ImageLaterality", "") or "").strip().upper()
    if image in ("R", "L", "U", "B"):
        return image
    series = str(first.get("Laterality", "") or "").strip().upper()
    return series if series in ("R", "L") else "U"
