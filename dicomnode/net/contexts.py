"""The presentation contexts the node accepts as an SCP.

* SOP classes: every storage SOP class pynetdicom knows, plus every SOP class in
  pydicom's UID dictionary whose name contains "Storage" (retired ones included, such
  as the retired Ultrasound Image Storage ``1.2.840.10008.5.1.4.1.1.6``), except the
  Storage Commitment and Media Storage Directory classes, which are not instances.
  Those pynetdicom does not know are registered with its Storage Service Class, so
  their C-STOREs reach the node's handler.
* Transfer syntaxes: every transfer syntax in pydicom's UID dictionary, retired or not
  (the retired JPEG ``1.2.840.10008.1.2.4.53``, ``.55``, ...), in the order of
  :func:`transfer_syntaxes`: Explicit VR Little Endian first, then Implicit VR Little
  Endian, then the others. pynetdicom accepts, for each proposed context, the first
  syntax *of the acceptor's list* that the requestor also proposed, so a sender that
  offers Explicit and Implicit VR in one context gets Explicit VR (private attributes
  keep their VR, nothing is converted).
"""

from __future__ import annotations

import re
from functools import lru_cache

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import sop_class
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import _STORAGE_CLASSES

__all__ = ["storage_sop_classes", "transfer_syntaxes"]

_NOT_INSTANCES = re.compile(r"Storage Commitment|Media Storage Directory")


@lru_cache(maxsize=1)
def storage_sop_classes() -> tuple[str, ...]:
    """Every storage SOP class accepted (registered with pynetdicom on first call)."""
    known = set(_STORAGE_CLASSES.values())
    uids = list(dict.fromkeys(str(u) for u in _STORAGE_CLASSES.values()))
    for uid, (name, kind, *_rest) in UID_dictionary.items():
        if kind != "SOP Class" or "Storage" not in name or _NOT_INSTANCES.search(name):
            continue
        if uid not in known:
            keyword = "DicomnodeStorage_" + uid.replace(".", "_")
            if not hasattr(sop_class, keyword):
                sop_class.register_uid(uid, keyword, StorageServiceClass)
            uids.append(uid)
    return tuple(uids)


@lru_cache(maxsize=1)
def transfer_syntaxes() -> tuple[str, ...]:
    """Every transfer syntax accepted, Explicit VR Little Endian first."""
    first = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
    rest = [uid for uid, (_name, kind, *_r) in UID_dictionary.items()
            if kind == "Transfer Syntax" and uid not in first]
    return tuple(first + rest)
