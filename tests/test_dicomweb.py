"""DICOMweb: STOW-RS into a real `dicomnode serve` (dicomweb-client, raw HTTP) and the
multipart parser; results to a DICOMweb destination are in tests/test_dicomweb_orthanc.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
import testdata
from conftest import NodeFactory, RunningNode, write_model_card
from dicomweb_client import DICOMwebClient

from dicomnode.web.stow import MultipartError, MultipartParser, store_response

PASSWORD = "archive-secret-password-1"
TOKEN = "console-token-0123456789"
PEER_TOKEN = "peer-bearer-token-0123456789"

RULES = """rules:
  - name: ct-any
    select: SELECT study WHERE series NAMED "CT" HAS Modality = "CT" AND NumImages >= 4
    model: body
"""


def _node(node_factory: NodeFactory, tmp: Path, *, rules: bool = False,
          **overrides: Any) -> RunningNode:
    (tmp / "secrets").mkdir(exist_ok=True)
    (tmp / "secrets" / "archive.pw").write_text(PASSWORD + "\n")
    (tmp / "secrets" / "scanner.token").write_text(PEER_TOKEN + "\n")
    (tmp / "secrets" / "console.token").write_text(TOKEN + "\n")
    peers = {
        "archive": {"ae_title": "ARCHIVE", "dicomweb": {"receive_auth": {
            "user": "archive", "password_file": str(tmp / "secrets" / "archive.pw")}}},
        "scanner": {"ae_title": "SCANNER", "host": "127.0.0.1", "dicomweb": {"receive_auth": {
            "token_file": str(tmp / "secrets" / "scanner.token")}}},
        "faraway": {"ae_title": "FARAWAY", "host": "192.0.2.1", "dicomweb": {"receive_auth": {
            "user": "faraway", "password_file": str(tmp / "secrets" / "archive.pw")}}},
    }
    extra: dict[str, Any] = {}
    if rules:
        (tmp / "rules").mkdir(exist_ok=True)
        (tmp / "rules" / "main.yaml").write_text(RULES)
        write_model_card(tmp / "models" / "body", [("CT", "CT")])
        extra = {"rules_dir": str(tmp / "rules"), "models_dir": str(tmp / "models")}
    web = {"port": 0, "token_file": str(tmp / "secrets" / "console.token"),
           **overrides.pop("web", {})}
    return node_factory(peers=peers, web=web, **extra, **overrides)


def _client(node: RunningNode, **auth: Any) -> DICOMwebClient:
    session = requests.Session()
    session.trust_env = False
    if "basic" in auth:
        session.auth = auth["basic"]
    if "token" in auth:
        session.headers["Authorization"] = f"Bearer {auth['token']}"
    return DICOMwebClient(url=node.console_url() + "/dicomweb", session=session)


def _multipart(parts: list[bytes], boundary: str = "b0undary") -> tuple[bytes, str]:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                    + part + b"\r\n" for part in parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _post(node: RunningNode, parts: list[bytes], *, study: str | None = None,
          auth: Any = ("archive", PASSWORD), headers: dict[str, str] | None = None,
          ) -> requests.Response:
    body, content_type = _multipart(parts)
    url = node.console_url() + "/dicomweb/studies" + (f"/{study}" if study else "")
    session = requests.Session()
    session.trust_env = False
    return session.post(url, data=body, auth=auth, timeout=60,
                        headers={"Content-Type": content_type, "Accept": "application/dicom+json",
                                 **(headers or {})})


def _failed(answer: requests.Response) -> list[tuple[str, int]]:
    ds = pydicom.Dataset.from_json(answer.json())
    return [(str(item.get("ReferencedSOPInstanceUID", "")), int(item.FailureReason))
            for item in ds.get("FailedSOPSequence", [])]


def _stored(answer: requests.Response) -> list[str]:
    ds = pydicom.Dataset.from_json(answer.json())
    return [str(item.ReferencedSOPInstanceUID) for item in ds.get("ReferencedSOPSequence", [])]


# ---------------------------------------------------------------- the parser


def _parse(body: bytes, size: int) -> tuple[list[bytes], list[dict[str, str]]]:
    got: list[bytearray] = []
    headers: list[dict[str, str]] = []

    def on_part(h: dict[str, str]) -> None:
        headers.append(h)
        got.append(bytearray())

    parser = MultipartParser(b"b0undary", on_part, lambda d: got[-1].extend(d), lambda: None)
    for i in range(0, len(body), size):
        parser.feed(body[i:i + size])
    parser.close()
    return [bytes(g) for g in got], headers


def test_multipart_parser_splits_parts_across_any_chunking() -> None:
    parts = [b"first part", b"--b0undar not a delimiter\r\n--b0und", b"", bytes(range(256)) * 40]
    body, _ = _multipart(parts)
    body = b"preamble\r\n" + body + b"epilogue"
    for size in (1, 2, 7, 64, 1000, len(body)):
        got, headers = _parse(body, size)
        assert got == parts, size
        assert headers[0] == {"content-type": "application/dicom"}


def test_multipart_parser_refuses_a_truncated_body_and_huge_headers() -> None:
    body, _ = _multipart([b"data"])
    parser = MultipartParser(b"b0undary", lambda h: None, lambda d: None, lambda: None)
    parser.feed(body[:-12])
    with pytest.raises(MultipartError, match="ended before"):
        parser.close()
    parser = MultipartParser(b"b0undary", lambda h: None, lambda d: None, lambda: None)
    with pytest.raises(MultipartError, match="headers are longer"):
        parser.feed(b"--b0undary\r\nX-Long: " + b"a" * 20_000)


def test_store_response_statuses() -> None:
    from dicomnode.web.stow import PartOutcome

    ok, bad = PartOutcome(0, "1.2", "1.2.3"), PartOutcome(0xC001, "", "")
    assert store_response([ok])[0] == 200
    assert store_response([ok, bad])[0] == 202
    status, body = store_response([bad])
    assert status == 409
    assert body["00081198"]["Value"][0]["00081197"] == {"vr": "US", "Value": [0xC001]}


# ---------------------------------------------------------------- a real node


@pytest.mark.slow
def test_stow_with_dicomweb_client_stores_indexes_completes_and_fires_a_rule(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    # the periodic completion check and the series quiet time are 30 s away: only the end
    # of the STOW-RS request (as an association's release) can have the rule fire at once
    node = _node(node_factory, tmp_path, rules=True, quiet_seconds=60.0,
                 completion={"series_quiet_seconds": 30, "check_interval_seconds": 30})
    study_uid = pydicom.uid.generate_uid()
    ct = testdata.synthetic_ct(tmp_path / "ct", slices=6, rows=32, columns=32,
                               study_uid=study_uid)
    datasets = [pydicom.dcmread(p) for p in ct]
    for ds in datasets:
        ds.ImagesInAcquisition = len(ct)
        ds.AcquisitionNumber = 1
    client = _client(node, basic=("archive", PASSWORD))
    answer = client.store_instances(datasets)
    ended = time.monotonic()
    assert sorted(str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence) == \
        sorted(str(ds.SOPInstanceUID) for ds in datasets)
    assert "FailedSOPSequence" not in answer
    # durable and indexed before the answer
    (study,) = node.studies()
    assert study["study_instance_uid"] == study_uid
    assert study["instance_count"] == len(ct)
    from test_rules_node import _wait_jobs

    (job,) = _wait_jobs(node, 1, timeout=20)
    assert time.monotonic() - ended < 5
    assert job.trigger == "early"
    index_ae = _calling_ae_titles(node)
    assert index_ae == {"ARCHIVE"}
    log = node.log()
    assert "STOW-RS from peer archive: 6 instance(s) stored, 0 failed" in log
    for secret in (PASSWORD, "Test^Patient", "DN-TEST-0001", study_uid):
        assert secret not in log


def _calling_ae_titles(node: RunningNode) -> set[str]:
    from sqlalchemy import select

    from dicomnode.store.db import open_index
    from dicomnode.store.tables import Instance

    index = open_index(f"sqlite:///{node.store / 'index.sqlite'}", create=False)
    try:
        with index.session() as session:
            return set(session.scalars(select(Instance.calling_ae_title)).all())
    finally:
        index.dispose()


@pytest.mark.slow
def test_stow_to_a_study_refuses_instances_of_another_and_a_bad_part(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    node = _node(node_factory, tmp_path)
    study_uid, other_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    mine = testdata.synthetic_ct(tmp_path / "a", slices=2, rows=16, columns=16,
                                 study_uid=study_uid)
    other = testdata.synthetic_ct(tmp_path / "b", slices=1, rows=16, columns=16,
                                  study_uid=other_uid)
    other_sop = str(pydicom.dcmread(other[0]).SOPInstanceUID)
    # some stored, some failed: 202, the failures with their reasons
    answer = _post(node, [p.read_bytes() for p in (*mine, *other)] + [b"not DICOM at all"],
                   study=study_uid)
    assert answer.status_code == 202, answer.text
    assert answer.headers["content-type"].startswith("application/dicom+json")
    assert len(_stored(answer)) == 2
    failed = dict(_failed(answer))
    assert failed[other_sop] == 0xA901  # another study than the URL's
    assert failed[""] >> 12 == 0xC  # cannot understand (does not parse)
    # none stored: 409
    answer = _post(node, [other[0].read_bytes()], study=study_uid)
    assert answer.status_code == 409
    assert _failed(answer) == [(other_sop, 0xA901)]
    studies = node.studies()
    assert [s["study_instance_uid"] for s in studies] == [study_uid]
    # the console's token may store too; the same study again is idempotent
    answer = _post(node, [other[0].read_bytes()], auth=None,
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200
    assert _stored(answer) == [other_sop]
    assert len(node.studies()) == 2
    assert not list((node.store / "tmp").iterdir())  # no spool file left behind


def test_stow_refuses_no_auth_wrong_auth_unknown_peer_and_other_hosts(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    node = _node(node_factory, tmp_path)
    ct = testdata.synthetic_ct(tmp_path / "a", slices=1, rows=16, columns=16)
    part = [ct[0].read_bytes()]
    assert _post(node, part, auth=None).status_code == 401
    assert _post(node, part, auth=("archive", "wrong")).status_code == 401
    assert _post(node, part, auth=("nobody", PASSWORD)).status_code == 401  # unknown peer
    assert _post(node, part, auth=None,
                 headers={"Authorization": "Bearer not-a-token"}).status_code == 401
    # a peer's credential from an address that is not its host
    assert _post(node, part, auth=("faraway", PASSWORD)).status_code == 403
    # a peer's bearer token, from its host
    answer = _post(node, part, auth=None, headers={"Authorization": f"Bearer {PEER_TOKEN}"})
    assert answer.status_code == 200, answer.text
    assert _calling_ae_titles(node) == {"SCANNER"}
    # not multipart/related application/dicom
    session = requests.Session()
    session.trust_env = False
    url = node.console_url() + "/dicomweb/studies"
    answer = session.post(url, data=part[0], auth=("archive", PASSWORD),
                          headers={"Content-Type": "application/dicom"}, timeout=30)
    assert answer.status_code == 415
    body, _ = _multipart(part)
    answer = session.post(url, data=body[:-20], auth=("archive", PASSWORD), timeout=30,
                          headers={"Content-Type": 'multipart/related; type="application/dicom";'
                                                   " boundary=b0undary"})
    assert answer.status_code == 400
    log = node.log()
    assert PASSWORD not in log and PEER_TOKEN not in log and TOKEN not in log


def test_stow_part_crossing_the_disk_reserve_is_refused_and_not_kept(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    """A 64 MiB part with 8 MiB left above the reserve: read on, not kept, 0xA700 (the
    margin absorbs what other processes write or free on this disk meanwhile)."""
    import shutil

    free = shutil.disk_usage(tmp_path).free
    node = _node(node_factory, tmp_path, min_free_bytes=max(0, free - 8 * 2**20))
    head = testdata.synthetic_ct(tmp_path / "a", slices=1, rows=16, columns=16)[0].read_bytes()

    def body() -> Iterator[bytes]:
        yield (b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + head)
        for _ in range(64):
            yield bytes(2**20)
        yield b"\r\n--b0undary--\r\n"

    session = requests.Session()
    session.trust_env = False
    answer = session.post(node.console_url() + "/dicomweb/studies", data=body(),
                          auth=("archive", PASSWORD), timeout=120, headers={
                              "Content-Type": 'multipart/related; type="application/dicom"; '
                                              "boundary=b0undary"})
    assert answer.status_code == 409, answer.text
    assert [code for _, code in _failed(answer)] == [0xA700]
    assert not list((node.store / "tmp").iterdir())
    assert node.studies() == []


def test_stow_chunked_body_with_a_quoted_uuid_boundary(node_factory: NodeFactory,
                                                      tmp_path: Path) -> None:
    """Chunked transfer encoding, and a quoted boundary of the form dicomweb-client sends."""
    node = _node(node_factory, tmp_path)
    ct = testdata.synthetic_ct(tmp_path / "a", slices=1, rows=16, columns=16)
    boundary = str(uuid.uuid4())
    body, _ = _multipart([ct[0].read_bytes()], boundary)
    session = requests.Session()
    session.trust_env = False
    answer = session.post(
        node.console_url() + "/dicomweb/studies", auth=("archive", PASSWORD),
        data=(body[i:i + 1000] for i in range(0, len(body), 1000)),  # chunked
        headers={"Content-Type": f'multipart/related; boundary="{boundary}"; '
                                 'type="application/dicom"'}, timeout=30)
    assert answer.status_code == 200, answer.text


@pytest.mark.slow
def test_stow_cut_off_mid_part_keeps_what_was_stored_and_no_spool_file(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    import base64
    import socket
    from urllib.parse import urlsplit

    from conftest import wait_until

    node = _node(node_factory, tmp_path)
    ct = testdata.synthetic_ct(tmp_path / "a", slices=2, rows=64, columns=64)
    body, content_type = _multipart([p.read_bytes() for p in ct])
    cut = body[:len(body) - len(ct[1].read_bytes()) // 2]  # the second part half sent
    where = urlsplit(node.console_url())
    credential = base64.b64encode(f"archive:{PASSWORD}".encode()).decode()
    head = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: {where.netloc}\r\n"
            f"Authorization: Basic {credential}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        sock.sendall(head + cut)
        wait_until(lambda: bool(node.studies()), 10, "the first part stored")
    wait_until(lambda: "STOW-RS from peer archive: 1 instance(s) stored" in node.log(), 10,
               "the cut request's end")
    (study,) = node.studies()
    assert study["instance_count"] == 1
    assert not list((node.store / "tmp").iterdir())


def test_stow_wrong_credentials_lock_the_address_out(node_factory: NodeFactory,
                                                     tmp_path: Path) -> None:
    node = _node(node_factory, tmp_path, web={"max_token_failures": 2})
    ct = testdata.synthetic_ct(tmp_path / "a", slices=1, rows=16, columns=16)
    part = [ct[0].read_bytes()]
    assert [_post(node, part, auth=("archive", "wrong")).status_code
            for _ in range(3)] == [401, 401, 429]
    assert _post(node, part).status_code == 429  # the right one too, for that time


def test_stow_a_few_concurrent_requests_all_stored(node_factory: NodeFactory,
                                                   tmp_path: Path) -> None:
    """An archive sending over 4 connections at once (within web.maximum_connections)."""
    from concurrent.futures import ThreadPoolExecutor

    node = _node(node_factory, tmp_path)
    series = [testdata.synthetic_ct(tmp_path / f"s{i}", slices=5, rows=32, columns=32)
              for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda s: _post(node, [p.read_bytes() for p in s]), series))
    assert [a.status_code for a in answers] == [200] * 4
    assert sum(s["instance_count"] for s in node.studies()) == 20


@pytest.mark.slow
def test_stow_body_slower_than_the_request_timeout_is_not_cut(node_factory: NodeFactory,
                                                              tmp_path: Path) -> None:
    """web.request_timeout_seconds bounds the wait for a request's header, not its body: an
    archive sending a large study slowly is not cut off."""
    import base64
    import socket
    from urllib.parse import urlsplit

    node = _node(node_factory, tmp_path, web={"request_timeout_seconds": 1})
    ct = testdata.synthetic_ct(tmp_path / "a", slices=3, rows=32, columns=32)
    body, content_type = _multipart([p.read_bytes() for p in ct])
    where = urlsplit(node.console_url())
    credential = base64.b64encode(f"archive:{PASSWORD}".encode()).decode()
    head = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: {where.netloc}\r\n"
            f"Authorization: Basic {credential}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((where.hostname, where.port), timeout=20) as sock:
        sock.sendall(head)
        step = len(body) // 6 + 1
        for i in range(0, len(body), step):  # 6 pieces, 0.5 s apart: 2.5 s in all
            sock.sendall(body[i:i + step])
            time.sleep(0.5)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert node.studies()[0]["instance_count"] == 3
