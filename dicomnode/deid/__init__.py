"""Pseudonymization by DICOM PS3.15 Annex E (Basic Profile and options), and its reversal.

Pure functions of a dataset and a secret key: no database, no network. The key comes from
:func:`load_key`; :class:`Pseudonymizer` changes a dataset in place and returns a
:class:`PseudonymizationRecord` (which holds identity: store it, never log it);
:func:`reidentify` gives a result made from pseudonymized inputs its original identity.
"""

from dicomnode.deid.key import DeidKeyError, load_key
from dicomnode.deid.profile import EDITION, ActionTable, ProfileOptions
from dicomnode.deid.pseudonymize import PseudonymizationError, Pseudonymizer
from dicomnode.deid.record import PseudonymizationRecord
from dicomnode.deid.reidentify import ReidentificationError, reidentify, reidentify_encoded
from dicomnode.deid.uids import UIDMapper
from dicomnode.logs import hide_dicom_values

hide_dicom_values()  # pydicom quotes the values it rejects: never in a log line

__all__ = [
    "EDITION",
    "ActionTable",
    "DeidKeyError",
    "ProfileOptions",
    "PseudonymizationError",
    "PseudonymizationRecord",
    "Pseudonymizer",
    "ReidentificationError",
    "UIDMapper",
    "load_key",
    "reidentify",
    "reidentify_encoded",
]
