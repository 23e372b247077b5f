"""Rules on a running node: files, validation, firing over real associations, explanations."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import testdata
from conftest import NodeFactory, RunningNode, write_model_card
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, build_context
from sqlalchemy import select

from dicomnode.store.db import open_index
from dicomnode.store.tables import Job

FOUR = '''rules:
  - name: four-channel
    select: |
      SELECT study FROM patient
        WHERE series NAMED "T1w" HAS SeriesDescription = "T1w"
        ALSO WHERE series NAMED "T2w" HAS SeriesDescription = "T2w"
        ALSO WHERE series NAMED "FLAIR" HAS SeriesDescription = "FLAIR"
        ALSO WHERE series NAMED "T1wCE" HAS SeriesDescription = "T1wCE"
    model: glioma
    send_to: [self]
  - name: ct-any
    select: SELECT study WHERE series NAMED "CT" HAS Modality = "CT" AND NumImages >= 10
    model: body
'''


def _models(base: Path) -> Path:
    models = base / "models"
    write_model_card(models / "glioma", [(n, "MR") for n in ("T1w", "T2w", "FLAIR", "T1wCE")])
    write_model_card(models / "body", [("CT", "CT")])
    return models


def _rule_node(node_factory: NodeFactory, tmp_path: Path, text: str = FOUR,
               **kwargs: object) -> RunningNode:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "main.yaml").write_text(text)
    models = tmp_path / "models" if (tmp_path / "models").exists() else _models(tmp_path)
    return node_factory(rules_dir=str(rules), models_dir=str(models), **kwargs)


def _send(port: int, paths: list[Path], *, release: bool = True) -> AE:
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="TESTSCU")
    metas = [read_file_meta_info(p) for p in paths]
    ae.requested_contexts = [build_context(str(s), str(t)) for s, t in
                             {(m.MediaStorageSOPClassUID, m.TransferSyntaxUID) for m in metas}]
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    for p in paths:
        assert int(assoc.send_c_store(p).Status) == 0
    if release:
        assoc.release()
    return ae


def _jobs(node: RunningNode) -> list[Job]:
    index = open_index(f"sqlite:///{node.store / 'index.sqlite'}", create=False)
    try:
        with index.session() as session:
            return list(session.scalars(select(Job).order_by(Job.id)).all())
    finally:
        index.dispose()


def _wait_jobs(node: RunningNode, count: int, timeout: float = 20.0) -> list[Job]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = _jobs(node) if (node.store / "index.sqlite").exists() else []
        if len(jobs) >= count:
            return jobs
        time.sleep(0.2)
    raise AssertionError(f"expected {count} job(s); log:\n{node.log()[-3000:]}")


@pytest.mark.slow
def test_four_named_series_bind_in_rule_order_whatever_the_arrival_order(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    node = _rule_node(node_factory, tmp_path)
    study_uid = pydicom.uid.generate_uid()
    names = ["T1w", "T2w", "FLAIR", "T1wCE"]
    series = {n: testdata.sagittal_series(tmp_path / n, slices=6, rows=32, columns=32,
                                          study_uid=study_uid, series_description=n,
                                          series_number=10 + i)
              for i, n in enumerate(names)}
    order = names[:]
    random.Random(7).shuffle(order)
    assert order != names
    for name in order:
        _send(node.port, series[name])
    (job,) = _wait_jobs(node, 1)
    assert job.rule_name == "four-channel"
    assert job.model == "glioma"
    uid = {n: str(pydicom.dcmread(series[n][0]).SeriesInstanceUID) for n in names}
    assert job.bindings == [[n, uid[n]] for n in names]
    assert "rule four-channel fired on study 1" in node.log()

    # the same rule on the same series never fires twice, even when the study re-opens
    node.wait_for(lambda s: s[0]["state"] == "complete")
    extra = testdata.sagittal_series(tmp_path / "extra", slices=4, rows=32, columns=32,
                                     study_uid=study_uid, series_description="localizer")
    _send(node.port, extra)
    node.wait_for(lambda s: s[0]["state"] == "complete" and s[0]["reopened_count"] >= 1)
    time.sleep(1.0)
    assert len(_jobs(node)) == 1


def _state_size(paths: list[Path], size: int) -> list[Path]:
    """Make each instance state the size of its series (ImagesInAcquisition)."""
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.AcquisitionNumber = 1
        ds.ImagesInAcquisition = size
        ds.save_as(p)
    return paths


@pytest.mark.slow
def test_whole_series_without_stated_size_waits_for_the_quiet_time(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    # the association's release and a whole stack say nothing about whether the series is
    # finished: the rule waits for the study's quiet time
    node = _rule_node(node_factory, tmp_path, quiet_seconds=6.0,
                      completion={"series_quiet_seconds": 0.5, "check_interval_seconds": 0.2})
    ct = testdata.synthetic_ct(tmp_path / "ct", slices=12, rows=32, columns=32)
    _send(node.port, ct)
    sent = time.monotonic()
    time.sleep(4.0)
    assert _jobs(node) == [], "fired before the study's quiet time"
    (job,) = _wait_jobs(node, 1, timeout=15)
    assert time.monotonic() - sent >= 5.5
    assert job.trigger in ("complete", "settled")
    assert job.version == 1 and job.instance_count == 12


def test_series_that_reaches_its_stated_size_fires_at_once(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    # the first periodic check comes 30 s after the start, the series quiet time is 30 s:
    # only the stated size (checked when the association that delivered the last instance
    # closes) can have the rule fire within a second or so
    node = _rule_node(node_factory, tmp_path, quiet_seconds=60.0,
                      completion={"series_quiet_seconds": 30, "check_interval_seconds": 30})
    ct = _state_size(testdata.synthetic_ct(tmp_path / "ct", slices=12, rows=32, columns=32), 12)
    _send(node.port, ct)
    released = time.monotonic()
    (job,) = _wait_jobs(node, 1, timeout=20)
    assert time.monotonic() - released < 3
    assert job.trigger == "early"


@pytest.mark.slow
def test_series_short_of_its_stated_size_does_not_settle_early(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    node = _rule_node(node_factory, tmp_path, quiet_seconds=60.0,
                      completion={"series_quiet_seconds": 4, "check_interval_seconds": 0.2})
    ct = _state_size(testdata.synthetic_ct(tmp_path / "ct", slices=12, rows=32, columns=32), 14)
    _send(node.port, ct)
    time.sleep(2.5)
    (study,) = node.studies()
    assert study["series"][0]["geometry"]["state"] == "pending"
    assert _jobs(node) == []
    # after its quiet time it settles like any series, saying what is missing
    node.wait_for(lambda s: s[0]["series"][0]["geometry"]["state"] != "pending", timeout=10)
    reason = node.studies()[0]["series"][0]["geometry"]["reason"]
    assert "12 of the 14 images its instances state" in reason
    assert _jobs(node) == []  # the study's quiet time (60 s) has not passed


@pytest.mark.slow
def test_series_with_a_gap_does_not_fire(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = _rule_node(node_factory, tmp_path)
    ct = testdata.synthetic_ct(tmp_path / "gap", slices=14, rows=32, columns=32, missing=[5])
    _send(node.port, ct)
    node.wait_for(lambda s: bool(s) and s[0]["state"] == "complete")
    time.sleep(0.5)
    assert _jobs(node) == []
    assert "rule ct-any matched study 1 but did not fire: series CT (series 1) is not whole: " \
           "gap of 1 slice at z=" in node.log()


@pytest.mark.slow
def test_rules_test_explains_per_clause_with_values(node_factory: NodeFactory,
                                                    tmp_path: Path) -> None:
    node = _rule_node(node_factory, tmp_path)
    ct = testdata.synthetic_ct(tmp_path / "ct", slices=8, rows=32, columns=32)
    _send(node.port, ct)
    (study,) = node.wait_for(lambda s: bool(s) and s[0]["state"] == "complete")
    out = node.cli("rules", "test", "--study", study["study_instance_uid"]).stdout
    assert "rule ct-any: no match" in out
    assert 'NumImages >= 10: got ["8"] -> false' in out
    assert "rule four-channel: no match" in out
    assert 'SeriesDescription = "T1w": got ["Synthetic CT phantom"] -> false' in out
    by_path = node.cli("rules", "test", "--rule", "ct-any", "--path", str(tmp_path / "ct"))
    assert "rule ct-any: no match" in by_path.stdout
    assert "four-channel" not in by_path.stdout


@pytest.mark.slow
def test_broken_rules_are_reported_with_position_and_stop_the_node(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    broken = FOUR.replace('HAS SeriesDescription = "FLAIR"', 'HAS SeriesDescripton = "FLAIR"')
    node = _rule_node(node_factory, tmp_path, text=broken, start=False)
    result = node.cli("rules", "check", check=False)
    assert result.returncode == 2
    rule_file = tmp_path / "rules" / "main.yaml"
    assert f"{rule_file}:7:45: unknown field 'SeriesDescripton'" in result.stderr
    assert "        ALSO WHERE series NAMED \"FLAIR\" HAS SeriesDescripton = \"FLAIR\"\n" \
           + " " * 44 + "^~~~~~~~~~~~~~~~" in result.stderr
    serve = subprocess.run([sys.executable, "-m", "dicomnode", "serve", "--config",
                            str(node.config_path)], capture_output=True, text=True, timeout=60)
    assert serve.returncode == 2
    assert "unknown field 'SeriesDescripton'" in serve.stderr

    wrong_model = FOUR.replace("model: glioma", "model: nosuchmodel").replace(
        "send_to: [self]", "send_to: [nowhere]")
    rule_file.write_text(wrong_model)
    result = node.cli("rules", "check", check=False)
    assert "names model 'nosuchmodel', which is not in" in result.stderr
    assert "sends to unknown peer 'nowhere'" in result.stderr

    reordered = FOUR.replace('NAMED "T2w"', 'NAMED "T2x"')
    rule_file.write_text(reordered)
    result = node.cli("rules", "check", check=False)
    assert ("binds series T1w, T2x, FLAIR, T1wCE but model 'glioma' takes inputs "
            "T1w, T2w, FLAIR, T1wCE") in result.stderr

    rule_file.write_text(FOUR)
    ok = node.cli("rules", "check")
    assert "2 rule(s) OK" in ok.stdout
