"""Model approval (issue 20): the card's status, research peers, rules refused at load,
results marked RESEARCH, the send-time check, and results held for review until a console
user approves (sent) or rejects them (never sent), with the user recorded."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from conftest import DcmtkStoreSCP, NodeFactory, RunningNode, storescu, wait_until, write_model_card
from sqlalchemy import select

from dicomnode.config import PeerConfig, load_config
from dicomnode.models.card import RESEARCH_MARK, CardError, ModelStatus, load_card
from dicomnode.rules.loader import RuleFileError, load_rules
from dicomnode.states import OutboxState
from dicomnode.store.audit import EventKind
from dicomnode.store.db import open_index
from dicomnode.store.tables import Event, OutboxItem, Review

ROOT = Path(__file__).resolve().parents[1]
KEY = b"approval-test-key-0123456789"
REVIEWER = "Dr. Ada Reviewer"


def _card(folder: Path, status: str | None) -> Path:
    """A test card (no ONNX file) taking one CT input, with ``status`` (None: no key)."""
    path = write_model_card(folder, [("ct", "CT")])
    text = path.read_text().replace("status: clinical\n", "" if status is None
                                    else f"status: {status}\n")
    path.write_text(text)
    return path


# ------------------------------------------------------------------ the card


def test_a_card_s_status_is_clinical_research_or_qa_and_research_without_one(
        tmp_path: Path) -> None:
    for status in ("clinical", "research", "qa"):
        _card(tmp_path / status, status)
        card = load_card(tmp_path / status, verify_files=False)
        assert card.status is ModelStatus(status)
        assert card.clinical == (status == "clinical")
    _card(tmp_path / "unsaid", None)
    assert load_card(tmp_path / "unsaid", verify_files=False).status is ModelStatus.RESEARCH
    path = _card(tmp_path / "bad", "approved")
    with pytest.raises(CardError) as caught:
        load_card(tmp_path / "bad", verify_files=False)
    line = path.read_text().splitlines().index("status: approved") + 1
    assert str(caught.value) == (f"{path}:{line}: status: Input should be 'clinical', "
                                 "'research' or 'qa' (got 'approved')")


def test_the_shipped_cards_say_their_status() -> None:
    assert load_card(ROOT / "models" / "ct-body").status is ModelStatus.CLINICAL
    assert load_card(ROOT / "models" / "brain-mr").status is ModelStatus.RESEARCH
    assert load_card(ROOT / "models" / "hd-bet").status is ModelStatus.RESEARCH


def test_result_descriptions_of_a_model_that_is_not_clinical_are_marked(
        tmp_path: Path) -> None:
    from dicomnode.outputs.algorithm import result_description

    _card(tmp_path / "a-model-with-a-rather-long-name-for-its-results", "qa")
    card = load_card(tmp_path / "a-model-with-a-rather-long-name-for-its-results",
                     verify_files=False)
    text = result_description("RTSTRUCT", card, 12)
    assert text.startswith(RESEARCH_MARK + " ") and text.endswith("v0.0.1 result 12")
    assert len(text) == 64
    clinical = load_card(ROOT / "models" / "ct-body", verify_files=False)
    assert result_description("SEG", clinical, 2) == "SEG ct-body v1.0.0 result 2"


# ------------------------------------------------------------------ rules refused at load


def _peers() -> dict[str, PeerConfig]:
    return {
        "pacs": PeerConfig(ae_title="PACS", host="127.0.0.1", port=104),
        "lab": PeerConfig(ae_title="LAB", host="127.0.0.1", port=105, research=True),
        "anon": PeerConfig(ae_title="ANON", host="127.0.0.1", port=106, pseudonymize=True),
    }


def _rule_file(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rules.yaml"
    path.write_text(body)
    return path


_SELECT = 'SELECT study WHERE series NAMED "ct" HAS Modality = "CT"'


def test_a_rule_sending_a_research_model_s_results_to_a_clinical_peer_is_refused(
        tmp_path: Path) -> None:
    models = tmp_path / "models"
    _card(models / "trial", "research")
    _card(models / "shadow", "qa")
    _card(models / "approved", "clinical")
    path = _rule_file(tmp_path / "rules", f"""rules:
  - name: to-pacs
    select: '{_SELECT}'
    model: trial
    send_to: [lab, pacs]
  - name: qa-to-pacs
    select: '{_SELECT}'
    model: shadow
    send_to: [pacs]
  - name: typo
    select: '{_SELECT}'
    model: approved
    sned_to: [pacs]
""")
    with pytest.raises(RuleFileError) as caught:
        load_rules(tmp_path / "rules", peers=_peers(), models_dir=models)
    assert caught.value.problems == [
        f"{path}:13: unknown key 'sned_to'; allowed: name, select, model, outputs, send_to, "
        "priority, enabled, schedule, wait_seconds, require_series, when_incomplete, review",
        f"{path}:2: rule 'to-pacs' would send the results of model 'trial' (status "
        "research) to clinical peer 'pacs': only clinical models' results may go to clinical "
        "peers (mark the peer research: true, or approve the model with status: clinical in "
        "its card)",
        f"{path}:6: rule 'qa-to-pacs' would send the results of model 'shadow' (status qa) to "
        "clinical peer 'pacs': only clinical models' results may go to clinical peers (mark "
        "the peer research: true, or approve the model with status: clinical in its card)",
    ]


def test_research_peers_and_pseudonymized_peers_take_research_results(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _card(models / "trial", "research")
    _card(models / "approved", "clinical")
    _rule_file(tmp_path / "rules", f"""rules:
  - name: to-research
    select: '{_SELECT}'
    model: trial
    send_to: [lab, anon]
    review: required
  - name: clinical-everywhere
    select: '{_SELECT}'
    model: approved
    send_to: [pacs, lab, anon]
  - name: kept-in-the-node
    select: '{_SELECT}'
    model: trial
""")
    rules = load_rules(tmp_path / "rules", peers=_peers(), models_dir=models)
    assert rules.get("to-research").review_required
    assert not rules.get("clinical-everywhere").review_required
    assert rules.get("kept-in-the-node").send_to == ()


def test_review_is_required_or_none(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _card(models / "approved", "clinical")
    path = _rule_file(tmp_path / "rules", f"""name: one
select: '{_SELECT}'
model: approved
review: yes please
""")
    with pytest.raises(RuleFileError) as caught:
        load_rules(tmp_path / "rules", peers=_peers(), models_dir=models)
    assert caught.value.problems == [
        f"{path}:4: review must be one of required, none (got 'yes please')"]


# ------------------------------------------------------------------ checked again at sending


def test_results_of_a_model_no_longer_clinical_are_not_queued_for_clinical_peers(
        tmp_path: Path) -> None:
    """The card changed after the rules loaded: the pipeline leaves the clinical peers out,
    logs it and records ``job.send_refused``."""
    from dicomnode.jobs.pipeline import _approved_destinations

    _card(tmp_path / "models" / "trial", "research")
    config_file = tmp_path / "dicomnode.yaml"
    config_file.write_text(json.dumps({
        "storage": {"path": "store"}, "models_dir": "models",
        "peers": {name: peer.model_dump(mode="json", exclude_defaults=True)
                  | {"ae_title": peer.ae_title} for name, peer in _peers().items()}}))
    config = load_config(config_file)
    card = load_card(tmp_path / "models" / "trial", verify_files=False)
    index = open_index(f"sqlite:///{tmp_path / 'store' / 'index.sqlite'}")
    job_id = 42  # the events name the job; its row is not needed here
    try:
        kept = _approved_destinations(index, config, job_id, card, ["pacs", "lab", "anon"])
        assert kept == ["lab", "anon"]
        with index.session() as session:
            events = session.scalars(select(Event).where(
                Event.kind == EventKind.SEND_REFUSED.value)).all()
        assert [(e.job_id, (e.details or {})["peer"]) for e in events] == [(job_id, "pacs")]
        assert "research" in (events[0].details or {})["reason"]
        clinical = load_card(ROOT / "models" / "ct-body", verify_files=False)
        assert _approved_destinations(index, config, job_id, clinical, ["pacs"]) == ["pacs"]
    finally:
        index.dispose()


# ------------------------------------------------------------------ a real node


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[DcmtkStoreSCP]:
    scp = DcmtkStoreSCP(tmp_path / "received")
    yield scp
    scp.close()


def _node(node_factory: NodeFactory, tmp_path: Path, receiver: DcmtkStoreSCP, *,
          status: str, review: bool, research: bool) -> RunningNode:
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "ct-body", models / "ct-body")
    card = models / "ct-body" / "card.yaml"
    card.write_text(card.read_text().replace("status: clinical", f"status: {status}"))
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text(f"""rules:
  - name: ct-external
    select: SELECT study FROM patient WHERE series NAMED "ct" HAS Modality = "CT"
    model: ct-body
    send_to: [dest]
{"    review: required" if review else ""}
""")
    key = tmp_path / "deid.key"
    key.write_bytes(KEY)
    return node_factory(
        peers={"dest": {"ae_title": "DEST", "host": "127.0.0.1", "port": receiver.port,
                        "research": research}},
        rules_dir=str(rules), models_dir=str(models), deid={"key_file": str(key)},
        outputs={"sr": True},
        outbox={"retry_initial_seconds": 1, "check_interval_seconds": 0.3})


def _done_job(node: RunningNode) -> dict[str, Any]:
    def done() -> bool:
        jobs = json.loads(node.cli("jobs", "--json").stdout)["jobs"]
        return len(jobs) == 1 and jobs[0]["state"] == "done"

    wait_until(done, 60, "the job done")
    job: dict[str, Any] = json.loads(node.cli("jobs", "--json").stdout)["jobs"][0]
    return job


def _items(node: RunningNode) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(node.cli("outbox", "--json").stdout)["items"]
    return items


def _trail(node: RunningNode, job: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = json.loads(
        node.cli("audit", "--job", str(job), "--json").stdout)["events"]
    return events


def test_a_research_model_s_results_say_so_in_every_object_sent(
        node_factory: NodeFactory, tmp_path: Path, receiver: DcmtkStoreSCP,
        small_ct: list[Path]) -> None:
    node = _node(node_factory, tmp_path, receiver, status="research", review=False,
                 research=True)
    assert storescu(node.port, *small_ct).returncode == 0
    job = _done_job(node)
    assert sorted(r["kind"] for r in job["results"]) == ["RTSTRUCT", "SEG", "SR"]
    wait_until(lambda: sum(receiver.received().values()) == 3, 30, "three objects received")
    received = {ds.Modality: ds for ds in (
        pydicom.dcmread(p) for p in sorted(receiver.folder.iterdir()) if p.is_file())}
    assert set(received) == {"SEG", "RTSTRUCT", "SR"}
    for modality, ds in received.items():
        assert ds.SeriesDescription.startswith(RESEARCH_MARK), modality
        assert len(ds.SeriesDescription) <= 64
    assert received["SEG"].ContentDescription.startswith(RESEARCH_MARK)
    assert received["RTSTRUCT"].StructureSetDescription.startswith(RESEARCH_MARK)
    texts = [item.TextValue for container in received["SR"].ContentSequence
             if container.ValueType == "CONTAINER"
             for item in container.get("ContentSequence", []) if item.ValueType == "TEXT"]
    assert texts == [RESEARCH_MARK]


def _decide(node: RunningNode, job: int, verdict: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{node.console_url()}/api/v1/jobs/{job}/{verdict}", timeout=10,
                      **kwargs)


def test_held_results_go_out_only_once_a_console_user_approves_them(
        node_factory: NodeFactory, tmp_path: Path, receiver: DcmtkStoreSCP,
        small_ct: list[Path]) -> None:
    node = _node(node_factory, tmp_path, receiver, status="clinical", review=True,
                 research=False)
    assert storescu(node.port, *small_ct).returncode == 0
    job = _done_job(node)["id"]
    items = _items(node)
    assert len(items) == 3 and {i["state"] for i in items} == {"held"}
    time.sleep(1.5)  # several outbox rounds: nothing held is sent
    assert not receiver.received()
    assert {i["state"] for i in _items(node)} == {"held"}
    assert [s["status"] for s in node.studies()] == ["awaiting review"]
    base = node.console_url()
    (review,) = httpx.get(f"{base}/api/v1/reviews", timeout=10).json()["reviews"]
    assert review["job"] == job and review["rule"] == "ct-external"
    assert review["held_items"] == {"dest": 3} and review["state"] == "awaiting"
    assert "1.2." not in json.dumps(review)  # no UID, no identity
    page = httpx.get(f"{base}/reviews", timeout=10).text
    assert f'id="review-{job}"' in page and "/approve" in page
    # an item held for review cannot be re-sent around it
    refused = httpx.post(f"{base}/api/v1/outbox/{items[0]['id']}/resend",
                         headers={"X-Dicomnode": "1"}, timeout=10)
    assert refused.status_code == 409 and "review" in refused.json()["detail"]
    # an action without the header, or without a name, decides nothing
    assert _decide(node, job, "approve", json={"user": REVIEWER}).status_code == 403
    assert _decide(node, job, "approve", json={"user": ""},
                   headers={"X-Dicomnode": "1"}).status_code == 409
    assert not receiver.received()

    approved = _decide(node, job, "approve", json={"user": REVIEWER},
                       headers={"X-Dicomnode": "1"})
    assert approved.status_code == 200, approved.text
    assert approved.json()["detail"] == f"job {job}: results approved by {REVIEWER} (3 item(s))"
    wait_until(lambda: sum(receiver.received().values()) == 3, 30, "three objects received")
    wait_until(lambda: [s["status"] for s in node.studies()] == ["results sent"], 10,
               "results sent")
    again = _decide(node, job, "reject", json={"user": "someone else"},
                    headers={"X-Dicomnode": "1"})
    assert again.status_code == 409 and f"approved already, by {REVIEWER}" in again.text
    kinds = [e["kind"] for e in _trail(node, job)]
    assert kinds.index("job.held") < kinds.index("job.approved") < kinds.index("item.sent")
    (event,) = [e for e in _trail(node, job) if e["kind"] == "job.approved"]
    assert event["details"]["user"] == REVIEWER and event["details"]["count"] == 3
    assert httpx.get(f"{base}/api/v1/reviews", timeout=10).json()["reviews"] == []
    study = node.studies()[0]["id"]
    timeline = httpx.get(f"{base}/studies/{study}", timeout=10).text
    assert "job.held" in timeline and "job.approved" in timeline and REVIEWER in timeline
    index = open_index(f"sqlite:///{node.store / 'index.sqlite'}", create=False)
    try:
        with index.session() as session:
            row = session.scalars(select(Review)).one()
            assert (row.job_pk, row.state.value, row.decided_by) == (job, "approved", REVIEWER)
            assert row.decided_at is not None
    finally:
        index.dispose()


def test_rejected_results_are_never_sent(node_factory: NodeFactory, tmp_path: Path,
                                         receiver: DcmtkStoreSCP,
                                         small_ct: list[Path]) -> None:
    node = _node(node_factory, tmp_path, receiver, status="clinical", review=True,
                 research=False)
    assert storescu(node.port, *small_ct).returncode == 0
    job = _done_job(node)["id"]
    listed = node.cli("review").stdout
    assert listed.startswith(f"job {job} ") and "ct-external" in listed and "3 for dest" in listed
    rejected = _decide(node, job, "reject", json={"user": REVIEWER},
                       headers={"X-Dicomnode": "1"})
    assert rejected.status_code == 200, rejected.text
    items = _items(node)
    assert {i["state"] for i in items} == {"rejected"}
    assert {i["last_error"] for i in items} == {f"rejected in review by {REVIEWER}"}
    resend = node.cli("outbox", "resend", str(items[0]["id"]), check=False)
    assert resend.returncode != 0 and "rejected in review" in resend.stderr
    time.sleep(1.5)
    assert not receiver.received()
    (event,) = [e for e in _trail(node, job) if e["kind"] == "job.review_rejected"]
    assert event["details"]["user"] == REVIEWER and event["details"]["count"] == 3
    later = _decide(node, job, "approve", json={"user": REVIEWER},
                    headers={"X-Dicomnode": "1"})
    assert later.status_code == 409 and "rejected already" in later.text
    again = node.cli("review", "approve", str(job), "--user", "Someone", check=False)
    assert again.returncode == 1 and f"rejected already, by {REVIEWER}" in again.stderr
    assert node.cli("review").stdout == "no results await a review\n"
    assert not receiver.received()
    index = open_index(f"sqlite:///{node.store / 'index.sqlite'}", create=False)
    try:
        with index.session() as session:
            states = set(session.scalars(select(OutboxItem.state)))
    finally:
        index.dispose()
    assert states == {OutboxState.REJECTED}
