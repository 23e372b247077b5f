"""Measurements of a segmentation: JSON beside the objects, and a DICOM SR (TID 1500).

The JSON holds, per structure, its label, name, volume (mL) and voxel count on
the source grid (see :meth:`dicomnode.inference.segment.Segmentation.measurements`).
The SR is a Comprehensive 3D SR with a TID 1500 Measurement Report written with
highdicom, as IHE AI Results (AIR) asks of a measurement report: the model as the
device observer (its Device UID, manufacturer and model name, the values of the
Contributing Equipment item), the imaging procedure analysed (from the source's
modality), and one Volumetric ROI group per non-empty segment of the SEG with a
tracking identifier and UID (the SEG segment's), a reference to that segment, the
algorithm identification (TID 4019), the finding type and category from the model
card, the finding site for anatomical structures, and the volume in mL.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicomnode.inference.segment import Segmentation
from dicomnode.models.card import RESEARCH_MARK
from dicomnode.outputs.algorithm import (
    algorithm_identity,
    contributing_equipment,
    result_description,
    sr_code,
)
from dicomnode.outputs.source import OutputError, SourceSeries, object_identity, result_uid

__all__ = ["SR_SERIES_NUMBER", "build_sr"]

SR_SERIES_NUMBER = 9903
_IMAGING_PROCEDURE = codes.cid100.ImagingProcedure
# CID 100 (Quantitative Diagnostic Imaging Procedures) per source modality
_PROCEDURES = {"CT": codes.cid100.CTUnspecifiedBodyRegion,
               "MR": codes.cid100.MRIUnspecifiedBodyRegion,
               "PT": codes.cid100.PETUnspecifiedBodyRegion,
               "NM": codes.cid100.NMUnspecifiedBodyRegion}
# a card label of this category is an anatomical structure: it is its own finding site
_ANATOMICAL_STRUCTURE = "123037004"
_VOLUME = Code("118565006", "SCT", "Volume")
_MILLILITRE = Code("ml", "UCUM", "milliliter")
# TID 1500 row 12: the report's Qualitative Evaluations, whose TEXT items say the report's
# standing (a model that is not clinical: RESEARCH - NOT FOR CLINICAL USE)
_QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")


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
    identity = algorithm_identity(card)
    algorithm = hd.sr.AlgorithmIdentification(name=identity.model_name,
                                              version=identity.version)
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
            finding_sites=([hd.sr.FindingSite(sr_code(label.type))]
                           if (label.category.scheme, label.category.value)
                           == ("SCT", _ANATOMICAL_STRUCTURE) else None),
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(
                name=_VOLUME, value=round(structure.volume_ml, 3),
                unit=_MILLILITRE, algorithm_id=algorithm)],
        ))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=identity.device_uid, name=identity.model_name,
            manufacturer_name=identity.manufacturer, model_name=identity.model_name),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_PROCEDURES.get(str(source.first.get("Modality", "")),
                                           _IMAGING_PROCEDURE),
        imaging_measurements=groups,
    )
    if not card.clinical:
        note = hd.sr.ContainerContentItem(
            name=_QUALITATIVE_EVALUATIONS,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        note.ContentSequence = DicomSequence([hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=RESEARCH_MARK,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)])
        report[0].ContentSequence.append(note)
    return hd.sr.Comprehensive3DSR(
        evidence=[*source.headers, seg],
        content=report,
        **object_identity(seed, "SR", series_number),
        is_complete=True,
        series_description=result_description("Volumes", card, result_number),
        contributing_equipment=[contributing_equipment(identity)],
    )
