"""Keyed, deterministic pseudonyms: UIDs, patient identifiers and per-patient date shifts.

Everything is derived with HMAC-SHA256 under one secret key, so the same input always gives
the same output (across instances, processes and restarts) and nobody without the key can
compute or reverse it. Inputs are domain-separated: UIDs are hashed as they are (a UID holds
only digits and dots), pseudonyms and date offsets with a prefix that no UID can have.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Final

__all__ = ["DATE_OFFSET_MAX", "DATE_OFFSET_MIN", "MIN_KEY_BYTES", "UIDMapper"]

MIN_KEY_BYTES: Final[int] = 16
#: Inclusive range of the per-patient date shift, in days (always into the past).
DATE_OFFSET_MIN: Final[int] = -3650
DATE_OFFSET_MAX: Final[int] = -365
_PSEUDONYM_PREFIX: Final[str] = "DN"
_PSEUDONYM_BYTES: Final[int] = 10  # 80 bits: 16 base32 characters


class UIDMapper:
    """Derive pseudonymous UIDs, identifiers and date offsets from ``key``."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes):
            raise TypeError("the pseudonymization key must be bytes")
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(
                f"the pseudonymization key is {len(key)} bytes; at least {MIN_KEY_BYTES} "
                "are required"
            )
        self._key = key

    def __repr__(self) -> str:
        return "UIDMapper(key=<hidden>)"

    def _mac(self, message: bytes) -> bytes:
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def pseudonymize(self, uid: str) -> str:
        """Return ``2.25.<int of the first 16 bytes of HMAC-SHA256(key, uid)>``.

        The result is a valid UID of at most 44 characters (PS3.5 9.1, UUID-derived form).
        """
        if not isinstance(uid, str) or not uid:
            raise ValueError("a UID to pseudonymize must be a non-empty string")
        digest = self._mac(uid.encode("utf-8"))
        return "2.25." + str(int.from_bytes(digest[:16], "big"))

    def pseudonym(self, value: str, kind: str) -> str:
        """Return ``"DN"`` + 16 base32 characters keyed on ``kind`` and ``value``.

        ``kind`` names what the value is (``"PatientID"``, ``"PatientName"``...), so equal
        values of different kinds get different pseudonyms. The result is valid as LO, SH
        and PN (upper-case letters and digits 2-7).
        """
        if not isinstance(kind, str) or not kind:
            raise ValueError("the pseudonym kind must be a non-empty string")
        if not isinstance(value, str):
            raise TypeError("the value to pseudonymize must be a string")
        digest = self._mac(b"pseudonym\x00" + kind.encode() + b"\x00" + value.encode())
        return _PSEUDONYM_PREFIX + base64.b32encode(digest[:_PSEUDONYM_BYTES]).decode("ascii")

    def date_offset_days(self, patient_id: str) -> int:
        """The patient's date shift in days, in [DATE_OFFSET_MIN, DATE_OFFSET_MAX]."""
        if not isinstance(patient_id, str):
            raise TypeError("patient_id must be a string")
        digest = self._mac(b"date-offset\x00" + patient_id.encode())
        span = DATE_OFFSET_MAX - DATE_OFFSET_MIN + 1
        return DATE_OFFSET_MIN + int.from_bytes(digest[:8], "big") % span
