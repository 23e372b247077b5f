"""Measurements of a segmentation: JSON beside the objects, and a DICOM SR (TID 1500).

The JSON holds, per structure, its label, name, volume (mL) and voxel count on
the source grid (see :meth:`dicomnode.inference.segment.Segmentation.measurements`).
The SR is a Comprehensive 3D SR with a TID 1500 Measurement Report written with
highdicom: one Volumetric ROI group per non-empty segment of the SEG, with the
structure's volume in mL, its finding type and category from the model card.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicomnode.inference.segment import Segmentation
from dicomnode.outputs.algorithm import description, result_description, sr_code
from dicomnode.outputs.source import OutputError, SourceSeries, object_identity, result_uid

__all__ = ["SR_SERIES_NUMBER", "build_sr"]

SR_SERIES_NUMBER = 9903
_IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging")
_VOLUME = Code("118565006", "SCT", "Volume")
_MILLILITRE = Code("ml", "UCUM", "milliliter")


def build_sr(
    segmentation: Segmentation,
    seg: Dataset,
    source: SourceSeries,
    *,
    seed: str,
    series_number: int = SR_SERIES_NUMBER,
    result_number: int = 1,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 measurement report of the volumes of ``segmentation``'s structures.

    ``seg`` is the SEG object written from the same segmentation (the report
    references its segments by number, in card order).

    Raises:
        OutputError: ``seg`` does not hold one segment per structure.
    """
    card = segmentation.card
    if len(seg.SegmentSequence) < len(segmentation.structures):
        raise OutputError(f"the SEG has {len(seg.SegmentSequence)} segment(s) for "
                          f"{len(segmentation.structures)} structure(s)")
    algorithm = hd.sr.AlgorithmIdentification(name=card.name[:64], version=card.version[:64])
    groups = []
    for number, structure in enumerate(segmentation.structures, start=1):
        if structure.voxel_count == 0:
            continue  # an empty segment has no frame to reference
        label = structure.label
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=result_uid(seed, "segment", label.name), identifier=label.name),
            # the source series, not from_segmentation: highdicom 0.28 looks for the segment
            # number per frame, where a one-segment SEG has it in the shared groups
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=number,
                source_series=hd.sr.SourceSeriesForSegmentation(
                    source.first.SeriesInstanceUID)),
            finding_type=sr_code(label.type),
            finding_category=sr_code(label.category),
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(
                name=_VOLUME, value=round(structure.volume_ml, 3),
                unit=_MILLILITRE, algorithm_id=algorithm)],
        ))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid("device", "dicomnode"), name="dicomnode",
            model_name=description(card)),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[*source.headers, seg],
        content=report,
        **object_identity(seed, "SR", series_number),
        is_complete=True,
        series_description=result_description("Volumes", card, result_number),
    )
