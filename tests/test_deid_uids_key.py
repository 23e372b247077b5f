"""UIDMapper (keyed UIDs, pseudonyms, date offsets) and load_key."""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

import pytest
from pydicom.uid import UID

from dicomnode.deid.key import DeidKeyError, load_key
from dicomnode.deid.uids import DATE_OFFSET_MAX, DATE_OFFSET_MIN, UIDMapper

KEY = b"k" * 16
SECRET = "s3cr3t-passphrase-0123456789"


def test_uid_formula_and_validity() -> None:
    mapper = UIDMapper(KEY)
    uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    digest = hmac.new(KEY, uid.encode(), hashlib.sha256).digest()
    expected = "2.25." + str(int.from_bytes(digest[:16], "big"))
    assert mapper.pseudonymize(uid) == expected
    assert mapper.pseudonymize(uid) == UIDMapper(KEY).pseudonymize(uid)
    for i in range(200):
        out = mapper.pseudonymize(f"1.2.3.{i}")
        assert len(out) <= 64 and UID(out).is_valid
    assert UIDMapper(b"x" * 16).pseudonymize(uid) != expected
    with pytest.raises(ValueError, match="non-empty"):
        mapper.pseudonymize("")


def test_pseudonyms_and_offsets() -> None:
    mapper = UIDMapper(KEY)
    pid = mapper.pseudonym("PID-1", "PatientID")
    assert re.fullmatch(r"DN[A-Z2-7]{16}", pid)
    assert pid == UIDMapper(KEY).pseudonym("PID-1", "PatientID")
    assert pid != mapper.pseudonym("PID-1", "PatientName")
    assert pid != mapper.pseudonym("PID-2", "PatientID")
    assert pid != UIDMapper(b"y" * 16).pseudonym("PID-1", "PatientID")
    offsets = {mapper.date_offset_days(f"P{i}") for i in range(300)}
    assert all(DATE_OFFSET_MIN <= o <= DATE_OFFSET_MAX for o in offsets)
    assert len(offsets) > 250
    assert mapper.date_offset_days("P1") == UIDMapper(KEY).date_offset_days("P1")


def test_mapper_rejects_bad_keys_without_showing_them() -> None:
    with pytest.raises(ValueError, match="15 bytes; at least 16") as info:
        UIDMapper(b"short-key-12345")
    assert "short-key" not in str(info.value)
    with pytest.raises(TypeError):
        UIDMapper("a string key of enough length")  # type: ignore[arg-type]
    assert "k" * 16 not in repr(UIDMapper(KEY))


def test_load_key_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOMNODE_DEID_KEY", raising=False)
    key_file = tmp_path / "deid.key"
    key_file.write_text(SECRET + "\n")
    assert load_key(key_file) == SECRET.encode()
    monkeypatch.setenv("DICOMNODE_DEID_KEY", "env-" + SECRET)
    assert load_key(None) == ("env-" + SECRET).encode()
    assert load_key(key_file) == SECRET.encode()  # an explicit file wins
    monkeypatch.setenv("OTHER_VAR", "other-" + SECRET)
    assert load_key(None, env_var="OTHER_VAR") == ("other-" + SECRET).encode()
    raw = bytes(range(32))
    key_file.write_bytes(raw)
    assert load_key(key_file) == raw.rstrip(b" \t\r\n")


def test_load_key_errors_are_precise_and_secret_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DICOMNODE_DEID_KEY", raising=False)
    with pytest.raises(DeidKeyError, match="set the environment variable DICOMNODE_DEID_KEY"):
        load_key(None)
    with pytest.raises(DeidKeyError, match="does not exist"):
        load_key(tmp_path / "missing.key")
    with pytest.raises(DeidKeyError, match="is a directory"):
        load_key(tmp_path)
    short = tmp_path / "short.key"
    short.write_text("tooshort-secret\n")
    with pytest.raises(DeidKeyError, match="15 bytes; at least 16") as info:
        load_key(short)
    assert "tooshort" not in str(info.value)
    monkeypatch.setenv("DICOMNODE_DEID_KEY", "tiny-secret")
    with pytest.raises(DeidKeyError, match="environment variable DICOMNODE_DEID_KEY") as info:
        load_key(None)
    assert "tiny" not in str(info.value)
    monkeypatch.setenv("DICOMNODE_DEID_KEY", "   ")
    with pytest.raises(DeidKeyError, match="no pseudonymization key"):
        load_key(None)
