"""How result objects name the algorithm that made them: the model card's identity."""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicomnode import __version__
from dicomnode.models.card import Card
from dicomnode.models.card import Code as CardCode

__all__ = ["algorithm_identification", "content_label", "description", "software_versions",
           "sr_code"]


def algorithm_identification(card: Card) -> hd.AlgorithmIdentificationSequence:
    """The model's name, version and family (rule-based cards: morphological operations)."""
    family = (codes.cid7162.MorphologicalOperations if card.rule_based
              else codes.cid7162.ArtificialIntelligence)
    return hd.AlgorithmIdentificationSequence(
        name=card.name[:64], family=family, version=card.version[:64],
        source=(card.source or None) and card.source[:64])


def content_label(card: Card) -> str:
    """The card name as a Code String (upper case, ``_`` for other characters, 16 chars)."""
    text = "".join(c if c.isalnum() else "_" for c in card.name.upper())
    return text[:16] or "DICOMNODE"


def description(card: Card) -> str:
    """``name version`` (and ``rule-based``), at most 64 characters (LO)."""
    text = f"{card.name} {card.version}" + (" (rule-based)" if card.rule_based else "")
    return text[:64]


def result_description(kind: str, card: Card, result_number: int = 1) -> str:
    """The SeriesDescription of a result object: its kind, the model and which result of
    its job this is (a job's later versions are results 2, 3, ...), e.g.
    ``SEG ct-body v1.0.0 result 2`` (LO, 64 characters)."""
    if result_number < 1:
        raise ValueError(f"result_number must be >= 1, not {result_number}")
    return f"{kind} {card.name} v{card.version} result {result_number}"[-64:]


def sr_code(code: CardCode) -> Code:
    """A card's coded concept as the pydicom :class:`~pydicom.sr.coding.Code` highdicom takes."""
    return Code(code.value, code.scheme, code.meaning)


def software_versions(card: Card) -> str:
    """Software Versions of a result object: the node's and the model's (LO, 64 chars)."""
    return f"dicomnode {__version__}; {card.name} {card.version}"[:64]
