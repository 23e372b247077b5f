"""How result objects name the algorithm that made them: the model card's identity.

IHE AI Results (AIR, RAD TF Suppl., section 6.5.3.1) asks every result object to describe
the algorithm in a Contributing Equipment Sequence (0018,A001) item: Purpose of Reference,
Manufacturer, Manufacturer's Model Name, Software Versions and Device UID; and the
algorithm identification elsewhere in the object (a SEG's Segment Algorithm Name and
Algorithm Identification Sequence, an RTSTRUCT's ROI Generation Description, an SR's
device observer and TID 4019 items) to carry the same values. :class:`AlgorithmIdentity`
holds them once, derived from the model card and the model file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicomnode import __version__
from dicomnode.models.card import RESEARCH_MARK, Card, file_sha256
from dicomnode.models.card import Code as CardCode
from dicomnode.outputs.source import OutputError, result_uid

__all__ = ["PROCESSING_EQUIPMENT", "AlgorithmIdentity", "algorithm_identification",
           "algorithm_identity", "content_label", "contributing_equipment", "description",
           "marked", "software_versions", "sr_code"]

PROCESSING_EQUIPMENT = codes.cid7005.ProcessingEquipment
"""Purpose of Reference of the algorithm's Contributing Equipment item: (109102, DCM,
"Processing Equipment") of CID 7005. AIR Rev. 1.1 printed a placeholder here, (Newcode1,
99IHE, "Processing Algorithm"), pending a DICOM code; CID 7005 has no such concept, and
later AIR revisions name 109102 "Processing Equipment" (highdicom accepts only CID 7005
codes)."""


def _lo(text: str) -> str:
    """``text`` as one LO value: no backslash or control character, 64 characters."""
    cleaned = "".join(" " if ord(c) < 32 else c for c in text).replace("\\", "/")
    return cleaned.strip()[:64]


@dataclass(frozen=True)
class AlgorithmIdentity:
    """What every result object says about the algorithm that made it (IHE AIR).

    ``manufacturer`` is the model's authors (the card's ``authors``), ``model_name`` the
    model package's name, ``version`` the package's version, ``software_versions`` that
    version and the node's (``dicomnode X``), ``device_uid`` a UID derived from the name,
    version and the SHA-256 of the model file: a changed model file is another device.
    ``source`` is the card's provenance (where the model comes from).
    """

    manufacturer: str
    model_name: str
    version: str
    software_versions: tuple[str, str]
    device_uid: str
    family: Code
    source: str
    description: str


def _model_digest(card: Card) -> str:
    path = Path(card.model_path)
    if path.is_file():
        return file_sha256(path)
    if card.sha256:
        return card.sha256
    raise OutputError(f"model {card.name}: {card.file} is missing and the card names no "
                      "sha256: the results' Device UID derives from the model file")


def algorithm_identity(card: Card) -> AlgorithmIdentity:
    """The identity of ``card``'s model as its results carry it.

    Raises:
        OutputError: the model file is missing and the card has no ``sha256``.
    """
    family = (codes.cid7162.MorphologicalOperations if card.rule_based
              else codes.cid7162.ArtificialIntelligence)
    return AlgorithmIdentity(
        manufacturer=_lo(", ".join(card.authors)) or "unknown",
        model_name=_lo(card.name),
        version=_lo(card.version),
        software_versions=(_lo(card.version), _lo(f"dicomnode {__version__}")),
        device_uid=result_uid("model", card.name, card.version, _model_digest(card)),
        family=family,
        source=card.source,
        description=description(card),
    )


def contributing_equipment(identity: AlgorithmIdentity) -> hd.ContributingEquipment:
    """The Contributing Equipment Sequence item IHE AIR asks for (section 6.5.3.1)."""
    item = hd.ContributingEquipment(
        manufacturer=identity.manufacturer,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=identity.model_name,
        software_versions=list(identity.software_versions),
        contribution_description=(
            f"{identity.description}, run by dicomnode {__version__}; model source: "
            f"{identity.source}")[:1024].replace("\\", "/"),
    )
    item.DeviceUID = identity.device_uid
    return item


def algorithm_identification(card: Card, identity: AlgorithmIdentity | None = None
                             ) -> hd.AlgorithmIdentificationSequence:
    """The model's name, version, family (rule-based cards: morphological operations) and
    source (its manufacturer, as AIR maps Algorithm Source to Manufacturer)."""
    identity = identity or algorithm_identity(card)
    return hd.AlgorithmIdentificationSequence(
        name=identity.model_name, family=identity.family, version=identity.version,
        source=identity.manufacturer)


def content_label(card: Card) -> str:
    """The card name as a Code String (upper case, ``_`` for other characters, 16 chars)."""
    text = "".join(c if c.isalnum() else "_" for c in card.name.upper())
    return text[:16] or "DICOMNODE"


def description(card: Card) -> str:
    """``name version`` (and ``rule-based``), at most 64 characters (LO)."""
    text = f"{card.name} {card.version}" + (" (rule-based)" if card.rule_based else "")
    return text[:64]


def marked(text: str, card: Card, length: int = 64) -> str:
    """``text`` as a result of ``card``'s model says it: prefixed with
    ``RESEARCH - NOT FOR CLINICAL USE`` when the model is not clinical (card ``status``
    research or qa), cut to ``length`` characters keeping the prefix whole and the end of
    ``text`` (which says which result it is)."""
    if card.clinical:
        return text[-length:]
    room = length - len(RESEARCH_MARK) - 1
    return f"{RESEARCH_MARK} {text[-room:] if room > 0 else ''}".strip()[:length]


def result_description(kind: str, card: Card, result_number: int = 1) -> str:
    """The SeriesDescription of a result object: its kind, the model and which result of
    its job this is (a job's later versions are results 2, 3, ...), e.g.
    ``SEG ct-body v1.0.0 result 2`` (LO, 64 characters); a model that is not clinical
    says ``RESEARCH - NOT FOR CLINICAL USE SEG brain-mr v0.1.0 result 1`` (:func:`marked`)."""
    if result_number < 1:
        raise ValueError(f"result_number must be >= 1, not {result_number}")
    return marked(f"{kind} {card.name} v{card.version} result {result_number}", card)


def sr_code(code: CardCode) -> Code:
    """A card's coded concept as the pydicom :class:`~pydicom.sr.coding.Code` highdicom takes."""
    return Code(code.value, code.scheme, code.meaning)


def software_versions(card: Card) -> str:
    """Software Versions of a result object: the node's and the model's (LO, 64 chars)."""
    return f"dicomnode {__version__}; {card.name} {card.version}"[:64]
