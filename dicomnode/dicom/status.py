"""DIMSE status codes by name: those the node answers as SCP and those it reads as SCU.

Names follow PS3.4 (Annex B C-STORE, Annex A C-ECHO via PS3.7 C.4) and PS3.7 Annex C
(general statuses). Several failures are ranges in the standard (Refused: Out of
Resources ``A7xx``, Error: Data Set Does Not Match SOP Class ``A9xx``, Error: Cannot
Understand ``Cxxx``); within them the node gives each of its refusals its own code, so a
peer's log says which check refused the instance. Those codes are marked "node" below.

:func:`category` and :func:`is_transient` read any 16-bit status, named here or not
(a peer may answer codes this node never sends).
"""

from __future__ import annotations

import enum

__all__ = ["Status", "StatusCategory", "category", "is_stored", "is_transient"]


class Status(enum.IntEnum):
    """A DIMSE status (the Status (0000,0900) value), by its PS3.4/PS3.7 name."""

    SUCCESS = 0x0000
    # -- warnings (the instance was stored): PS3.4 B.2.3
    WARNING_COERCION_OF_DATA_ELEMENTS = 0xB000
    WARNING_ELEMENTS_DISCARDED = 0xB006
    WARNING_DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xB007
    # -- general failures: PS3.7 C.5
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    NO_SUCH_SOP_CLASS = 0x0118
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    UNRECOGNIZED_OPERATION = 0x0211
    # -- Refused: Out of Resources (A7xx), PS3.4 B.2.3
    OUT_OF_RESOURCES = 0xA700  # node: the disk reserve (storage.min_free_bytes) is reached
    OUT_OF_RESOURCES_INDEX_UNAVAILABLE = 0xA701  # node: the index write failed
    OUT_OF_RESOURCES_SUB_OPERATIONS = 0xA702  # PS3.4 C.4.2 (C-MOVE/C-GET); read as SCU
    # -- Error: Data Set Does Not Match SOP Class (A9xx), PS3.4 B.2.3
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # node: SOP Class UID differs from the request
    DATA_SET_DOES_NOT_MATCH_STUDY = 0xA901  # node: STOW-RS to /studies/{uid}, another study
    # -- Error: Cannot Understand (Cxxx), PS3.4 B.2.3
    CANNOT_UNDERSTAND = 0xC000
    CANNOT_UNDERSTAND_PARSE = 0xC001  # node: the dataset does not parse
    CANNOT_UNDERSTAND_MISSING_UID = 0xC002  # node: Study, Series or SOP Instance UID missing
    CANNOT_UNDERSTAND_INVALID_UID = 0xC003  # node: an identifier is not a valid UID
    CANNOT_UNDERSTAND_UID_MISMATCH = 0xC004  # node: SOP Instance UID differs from the request
    CANNOT_UNDERSTAND_PIXEL_DATA = 0xC005  # node: pixel data does not match the image
    CANNOT_UNDERSTAND_CHARACTER_SET = 0xC006  # node: an unknown Specific Character Set
    CANNOT_UNDERSTAND_INFLATED_SIZE = 0xC007  # node: a deflated dataset inflates too large
    # -- cancel: PS3.7 C.3
    CANCEL = 0xFE00

    @property
    def category(self) -> StatusCategory:
        """Success, warning, failure or cancel (see :func:`category`)."""
        return category(self)


class StatusCategory(str, enum.Enum):
    """The kind of a status, PS3.7 C.1-C.4."""

    SUCCESS = "success"
    WARNING = "warning"  # the operation was performed (C-STORE: the instance was stored)
    FAILURE = "failure"
    CANCEL = "cancel"
    PENDING = "pending"  # FF00/FF01: more responses follow (C-FIND, C-MOVE, C-GET)


def category(status: int) -> StatusCategory:
    """The category of any 16-bit status, named in :class:`Status` or not.

    ``0000`` success; ``0001``, ``0107``, ``0116`` and ``Bxxx`` warnings; ``FE00``
    cancel; ``FF00``/``FF01`` pending; everything else a failure.
    """
    if not 0 <= status <= 0xFFFF:
        raise ValueError(f"a DIMSE status is a 16-bit value, not {status}")
    if status == Status.SUCCESS:
        return StatusCategory.SUCCESS
    if status >> 12 == 0xB or status in (0x0001, 0x0107, 0x0116):
        return StatusCategory.WARNING
    if status == Status.CANCEL:
        return StatusCategory.CANCEL
    if status in (0xFF00, 0xFF01):
        return StatusCategory.PENDING
    return StatusCategory.FAILURE


def is_stored(status: int) -> bool:
    """Whether a C-STORE response says the peer stored the instance: Success (0000) or a
    warning (Bxxx)."""
    return status == Status.SUCCESS or status >> 12 == 0xB


def is_transient(status: int) -> bool:
    """Whether a C-STORE failure status may change on a later try.

    Refused: Out of Resources (``A7xx``) and Cancel (``FE00``) are transient; every
    other failure (``A9xx`` data set does not match SOP class, ``Cxxx`` cannot
    understand, ``01xx``/``02xx`` general failures such as ``0122`` SOP class not
    supported) is final.
    """
    return status >> 8 == 0xA7 or status == Status.CANCEL
