"""The C-STORE response encoded without a Dataset (dicomnode.receive.storersp) is the same
command set, byte for byte, as pynetdicom's own encoding of the response primitive."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from dicomnode.receive.storersp import encode_c_store_rsp


def _pynetdicom_bytes(sop_class: str, sop_instance: str, message_id: int, status: int) -> bytes:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    encoded = encode(message.command_set, True, True)
    assert encoded is not None
    return encoded


@pytest.mark.parametrize(("sop_class", "sop_instance", "message_id", "status"), [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", 1, 0x0000),  # odd-length instance UID
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.56", 65535, 0x0000),  # even, largest id
    ("1.2.840.10008.5.1.4.1.1.66.4", "2.25." + "9" * 59, 0, 0xB000),  # 64 characters
    ("1.2.840.10008.5.1.4.1.1.7", "1.2", 4242, 0xA700),
])
def test_same_bytes_as_pynetdicom(sop_class: str, sop_instance: str, message_id: int,
                                  status: int) -> None:
    ours = encode_c_store_rsp(affected_sop_class_uid=sop_class,
                              affected_sop_instance_uid=sop_instance,
                              message_id_being_responded_to=message_id, status=status)
    assert ours == _pynetdicom_bytes(sop_class, sop_instance, message_id, status)


@pytest.mark.parametrize("kwargs", [
    {"message_id_being_responded_to": 70000},
    {"status": -1},
    {"affected_sop_instance_uid": ""},
    {"affected_sop_instance_uid": "1." * 40},
    {"affected_sop_class_uid": "1.2.\u00e9"},
])
def test_refuses_values_out_of_range(kwargs: dict[str, object]) -> None:
    values: dict[str, object] = {
        "affected_sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "affected_sop_instance_uid": "1.2.3", "message_id_being_responded_to": 1,
        "status": 0}
    values.update(kwargs)
    with pytest.raises(ValueError):
        encode_c_store_rsp(**values)  # type: ignore[arg-type]
