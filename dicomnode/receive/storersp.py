"""The C-STORE response command set, encoded without building a pydicom Dataset.

pynetdicom answers each C-STORE by converting the response primitive into a
``C_STORE_RSP`` message, which builds a pydicom :class:`~pydicom.dataset.Dataset` holding
every element of the command set and encodes it: about 0.3 ms of Python per instance,
on the path between the last fragment of a request and the sender's next request (a
sender waits for the response before it sends the next instance on its association).
:func:`encode_c_store_rsp` writes the same bytes directly; the SCP's DIMSE provider
(``send_msg`` in :mod:`dicomnode.receive.guard`) uses it for responses that carry only the
required elements (no Offending Element, no Error Comment) and leaves everything else to
pynetdicom. tests/test_storersp.py compares the bytes with pynetdicom's encoding.

The command set is Implicit VR Little Endian (PS3.7 6.3.1); the C-STORE-RSP elements
are those of PS3.7 Table 9.3-2 in tag order.
"""

from __future__ import annotations

import struct

__all__ = ["C_STORE_RSP_COMMAND_FIELD", "encode_c_store_rsp"]

#: Command Field (0000,0100) of a C-STORE-RSP.
C_STORE_RSP_COMMAND_FIELD = 0x8001
#: Command Data Set Type (0000,0800): no data set follows.
_NO_DATA_SET = 0x0101

_UL = struct.Struct("<HHII")  # tag group, element, length 4, value
_US = struct.Struct("<HHIH")  # tag group, element, length 2, value
_HEAD = struct.Struct("<HHI")  # tag group, element, length


def _uid(element: int, value: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\x00"  # UI values are padded to even length with NUL (PS3.5 6.2)
    return _HEAD.pack(0x0000, element, len(raw)) + raw


def encode_c_store_rsp(*, affected_sop_class_uid: str, affected_sop_instance_uid: str,
                       message_id_being_responded_to: int, status: int) -> bytes:
    """The encoded command set of a C-STORE-RSP with the required elements only.

    Args:
        affected_sop_class_uid: (0000,0002), as the request had it.
        affected_sop_instance_uid: (0000,1000), as the request had it.
        message_id_being_responded_to: (0000,0120), 0-65535.
        status: (0000,0900), 0-65535.

    Raises:
        ValueError: a value outside its range, or a UID that is not ASCII or longer
            than 64 characters.
    """
    for name, number in (("message_id_being_responded_to", message_id_being_responded_to),
                         ("status", status)):
        if not 0 <= number <= 0xFFFF:
            raise ValueError(f"{name} must be 0-65535, not {number}")
    for name, uid in (("affected_sop_class_uid", affected_sop_class_uid),
                      ("affected_sop_instance_uid", affected_sop_instance_uid)):
        if not uid or len(uid) > 64 or not uid.isascii():
            raise ValueError(f"{name} must be an ASCII UID of 1-64 characters")
    body = b"".join((
        _uid(0x0002, affected_sop_class_uid),
        _US.pack(0x0000, 0x0100, 2, C_STORE_RSP_COMMAND_FIELD),
        _US.pack(0x0000, 0x0120, 2, message_id_being_responded_to),
        _US.pack(0x0000, 0x0800, 2, _NO_DATA_SET),
        _US.pack(0x0000, 0x0900, 2, status),
        _uid(0x1000, affected_sop_instance_uid),
    ))
    return _UL.pack(0x0000, 0x0000, 4, len(body)) + body
