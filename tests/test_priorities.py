"""Priorities and queues (issue 20): claim order urgent > normal > background (oldest first
within a class) on SQLite and PostgreSQL, background hours with a given clock, per-model
limits in the real JobRunner with spawned workers, the queue with estimated starts in the
console's API, and an urgent rule's job overtaking earlier normal ones in a real node."""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faultjob
import pytest
from conftest import NodeFactory, store_study_with_a_job, wait_until, write_model_card
from pydantic import ValidationError
from sqlalchemy import select, update

from dicomnode.config import Config, PipelineConfig, load_config
from dicomnode.jobs import child
from dicomnode.jobs.policy import (
    DEFAULT_JOB_SECONDS,
    background_open,
    claim_policy,
    model_limit,
    queue_report,
)
from dicomnode.jobs.queue import ClaimPolicy, claim_next, finish, pending
from dicomnode.jobs.runner import JobRunner
from dicomnode.node import Node
from dicomnode.states import JobPriority, JobState, JobTrigger
from dicomnode.store.db import Index, open_index
from dicomnode.store.tables import Job, Patient, Study, utcnow

ROOT = Path(__file__).resolve().parents[1]
URGENT, NORMAL, BACKGROUND = JobPriority.URGENT, JobPriority.NORMAL, JobPriority.BACKGROUND
DONE = {"ok": True, "timings": {}, "results": []}


@pytest.fixture
def sqlite_index(tmp_path: Path) -> Iterator[Index]:
    opened = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    yield opened
    opened.dispose()


def _add(index: Index, *jobs: tuple[JobPriority, str]) -> list[int]:
    """Pending jobs of (priority, model), created in this order; their ids."""
    with index.session() as session:
        study = session.scalars(select(Study)).first() or Study(
            study_instance_uid="1.2.3", patient=Patient(patient_id="P"))
        rows = [Job(rule_name=f"rule-{priority.value}", model=model, study=study,
                    inputs_key=f"k{time.monotonic_ns()}-{n}", bindings=[],
                    trigger=JobTrigger.COMPLETE, priority=priority.rank)
                for n, (priority, model) in enumerate(jobs)]
        session.add_all(rows)
        session.commit()
        return [row.id for row in rows]


def _config(tmp_path: Path, **pipeline: Any) -> Config:
    return Config.model_validate({
        "node": {"id": "n1"}, "storage": {"path": str(tmp_path / "store")},
        "models_dir": str(tmp_path / "models"),
        "inference": {"providers": ["CPUExecutionProvider"]}, "pipeline": pipeline})


# ------------------------------------------------------------------------- claim order


def test_claims_take_urgent_then_normal_then_background_oldest_first(index: Index) -> None:
    ids = _add(index, (BACKGROUND, "m"), (NORMAL, "m"), (URGENT, "m"), (NORMAL, "m"),
               (BACKGROUND, "m"), (URGENT, "m"))
    b1, n1, u1, n2, b2, u2 = ids
    assert pending(index, 10) == [u1, u2, n1, n2, b1, b2]
    assert claim_next(index, 3, owner="n1") == [u1, u2, n1]
    _add(index, (URGENT, "m"))  # a later urgent job goes before the waiting normal one
    u3 = ids[-1] + 1
    assert claim_next(index, 1, owner="n1") == [u3]
    assert claim_next(index, 10, owner="n1") == [n2, b1, b2]
    with index.session() as session:
        assert {j.priority for j in session.scalars(select(Job))} == {0, 1, 2}


def test_a_model_at_its_limit_is_passed_over_not_waited_for(index: Index) -> None:
    a1, a2, b1, a3 = _add(index, (NORMAL, "a"), (NORMAL, "a"), (NORMAL, "b"), (NORMAL, "a"))
    policy = ClaimPolicy(model_limit=lambda model: 1 if model == "a" else None)
    assert claim_next(index, 3, owner="n1", policy=policy) == [a1, b1]
    assert claim_next(index, 3, owner="n1", policy=policy) == []  # a is still running here
    # counted per node: another node runs its own job of model a
    assert claim_next(index, 3, owner="n2", policy=policy) == [a2]
    assert finish(index, a1, DONE, 3, owner="n1") is JobState.DONE
    assert claim_next(index, 3, owner="n1", policy=policy) == [a3]


def test_gpu_models_run_one_at_a_time_in_all_and_cpu_models_beside_them(index: Index,
                                                                      tmp_path: Path) -> None:
    """``pipeline.gpu_jobs: 1``: two GPU models' jobs never run at once on one node (each
    model alone would be allowed one); a CPU model's job is claimed beside them."""
    g1, h1, c1, g2 = _add(index, (NORMAL, "gpu-a"), (NORMAL, "gpu-b"), (NORMAL, "cpu"),
                          (NORMAL, "gpu-a"))
    config = _config(tmp_path, workers=4)
    providers = {"gpu-a": "CUDAExecutionProvider", "gpu-b": "TensorrtExecutionProvider",
                 "cpu": "CPUExecutionProvider"}
    policy = claim_policy(config, dt.datetime(2026, 12, 4, 12), providers)
    assert claim_next(index, 4, owner="n1", policy=policy) == [g1, c1]
    assert claim_next(index, 4, owner="n1", policy=policy) == []  # gpu-b waits for gpu-a
    assert claim_next(index, 4, owner="n2", policy=policy) == [h1]  # another node's GPU
    assert finish(index, g1, DONE, 3, owner="n1") is JobState.DONE
    assert claim_next(index, 4, owner="n1", policy=policy) == [g2]
    # null: only each model's own limit (1 per GPU model)
    unlimited = claim_policy(_config(tmp_path, workers=4, gpu_jobs=None),
                             dt.datetime(2026, 12, 4, 12), providers)
    assert unlimited.group_limits == {}
    with pytest.raises(ValidationError):
        _config(tmp_path, gpu_jobs=0)


# ----------------------------------------------------------------------- background hours


def test_background_hours_are_checked_and_wrap_midnight(tmp_path: Path) -> None:
    config = _config(tmp_path, background_hours="22:00-06:00")
    at = {hour: dt.datetime(2026, 12, 4, hour, 30) for hour in range(24)}
    assert [h for h in range(24) if background_open(config, at[h])] == [0, 1, 2, 3, 4, 5,
                                                                        22, 23]
    assert background_open(config, dt.datetime(2026, 12, 4, 22, 0))  # start included
    assert not background_open(config, dt.datetime(2026, 12, 4, 6, 0))  # end excluded
    day = _config(tmp_path, background_hours="09:15-17:00")
    assert background_open(day, dt.datetime(2026, 12, 4, 9, 15))
    assert not background_open(day, dt.datetime(2026, 12, 4, 17, 0))
    assert background_open(_config(tmp_path), at[12])  # null: any time
    for bad, message in [("22-06", "'22-06' is not HH:MM-HH:MM with 24-hour times"),
                         ("24:00-06:00", "is not HH:MM-HH:MM"),
                         ("22:00 - 06:00", "is not HH:MM-HH:MM"),
                         ("07:00-07:00", "the window is empty (start equals end)")]:
        with pytest.raises(ValidationError, match=r"background_hours\n") as info:
            PipelineConfig(background_hours=bad)
        assert message in str(info.value)
    with pytest.raises(ValidationError, match="model 'a': 0 is not a number of jobs from 1"):
        PipelineConfig(model_concurrency={"a": 0})


def test_background_jobs_wait_outside_their_hours_unless_nothing_else_waits(
        sqlite_index: Index, tmp_path: Path) -> None:
    index = sqlite_index
    config = _config(tmp_path, background_hours="22:00-06:00", workers=4)
    noon, night = dt.datetime(2026, 12, 4, 12, 0), dt.datetime(2026, 12, 4, 23, 0)
    background, normal = _add(index, (BACKGROUND, "m"), (NORMAL, "m"))
    # at noon a normal job is pending: the background one is held, workers or not
    assert claim_next(index, 4, owner="n1", policy=claim_policy(config, noon)) == [normal]
    # the normal job runs, none is pending: nothing else waits, the background job goes
    assert claim_next(index, 4, owner="n1", policy=claim_policy(config, noon)) == [background]
    later_bg, later_normal = _add(index, (BACKGROUND, "m"), (NORMAL, "m"))
    # at night both go, normal first
    assert claim_next(index, 4, owner="n1", policy=claim_policy(config, night)) == [
        later_normal, later_bg]


def test_the_runner_claims_with_its_clock(sqlite_index: Index, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The real JobRunner and worker processes, with a clock the test sets."""
    folder = tmp_path / "faultjob"
    folder.mkdir()
    monkeypatch.setenv("DICOMNODE_FAULTJOB_DIR", str(folder))
    monkeypatch.setattr(child, "work", faultjob.work)
    config = _config(tmp_path, background_hours="22:00-06:00", workers=2,
                     model_concurrency={"gpu": 1})
    config = config.model_copy(update={"storage": config.storage.model_copy(
        update={"database_url": str(sqlite_index.engine.url)})})
    now = [dt.datetime(2026, 12, 4, 12, 0)]
    runner = JobRunner(config, sqlite_index, clock=lambda: now[0])
    try:
        background, normal = _add(sqlite_index, (BACKGROUND, "cpu"), (NORMAL, "gpu"))
        (folder / f"block-{normal}").touch()
        assert runner.dispatch() == [normal]  # a free worker, but the background job waits
        late = _add(sqlite_index, (NORMAL, "gpu"))[0]
        # the second gpu job waits for the model, not for a worker; it is pending, so the
        # background job still waits during the day
        assert runner.dispatch() == []
        now[0] = dt.datetime(2026, 12, 4, 22, 30)
        assert runner.dispatch() == [background]  # its hours: it takes the free worker
        _wait(lambda: _state(sqlite_index, background) is JobState.DONE, 60, "background")
        (folder / f"block-{normal}").unlink()
        _wait(lambda: _state(sqlite_index, normal) is JobState.DONE, 60, "the first gpu job")
        assert runner.dispatch() == [late]
        _wait(lambda: _state(sqlite_index, late) is JobState.DONE, 60, "the second gpu job")
    finally:
        runner.stop()


# ------------------------------------------------------------------ per-model limits


def test_model_limits_come_from_the_configuration_the_card_or_the_providers(
        tmp_path: Path) -> None:
    card = write_model_card(tmp_path / "models" / "big", [("ct", "CT")])
    card.write_text(card.read_text() + "runtime:\n  max_concurrent: 2\n")
    write_model_card(tmp_path / "models" / "small", [("ct", "CT")])
    cpu = _config(tmp_path)
    assert model_limit(cpu, "big") == 2  # the card says
    assert model_limit(cpu, "small") is None  # CPU only: pipeline.workers bounds it
    assert model_limit(cpu, "missing") is None
    gpu = Config.model_validate({**cpu.model_dump(mode="json"),
                                 "inference": {"providers": ["CUDAExecutionProvider",
                                                             "CPUExecutionProvider"]}})
    assert model_limit(gpu, "small") == 1  # one at a time on the node's GPU
    assert model_limit(gpu, "big") == 2
    assert model_limit(Config.model_validate({}), "small") == 1  # the default lists GPUs
    configured = _config(tmp_path, model_concurrency={"big": 3, "small": 1})
    assert model_limit(configured, "big") == 3 and model_limit(configured, "small") == 1
    # where the workers' warm-up found a model runs decides, once known
    assert model_limit(gpu, "small", {"small": "CPUExecutionProvider"}) is None
    assert model_limit(cpu, "small", {"small": "CUDAExecutionProvider"}) == 1
    assert model_limit(gpu, "big", {"big": "CPUExecutionProvider"}) == 2  # the card still
    triton = Config.model_validate({**gpu.model_dump(mode="json"), "inference": {
        "backend": "triton", "triton": {"url": "localhost:8000"}}})
    assert model_limit(triton, "small") is None  # the server queues its GPU's requests


def test_a_models_limit_follows_the_provider_the_workers_warm_up_found(
        sqlite_index: Index, tmp_path: Path) -> None:
    """The real ct-body model warmed up in a spawned worker: on this machine's provider
    (the CPU, or a GPU where one is usable) the default limit follows it."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text("name: ct\nselect: SELECT study WHERE series NAMED \"ct\" "
                                  "HAS Modality = \"CT\"\nmodel: ct-body\n")
    config = Config.model_validate({
        "node": {"id": "n1"}, "storage": {"path": str(tmp_path / "store"),
                                          "database_url": str(sqlite_index.engine.url)},
        "rules_dir": str(rules), "models_dir": str(ROOT / "models"),
        "pipeline": {"workers": 1}})
    assert model_limit(config, "ct-body") == 1  # the default providers list GPU ones
    runner = JobRunner(config, sqlite_index)
    try:
        runner.start()
        provider = _wait(lambda: runner.providers.get("ct-body"), 120, "the warm-up")
        expected = 1 if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") \
            else None
        assert model_limit(config, "ct-body", runner.providers) == expected
    finally:
        runner.stop()


def test_two_workers_run_models_a_and_b_together_and_the_second_a_waits(
        sqlite_index: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``runtime.max_concurrent: 1`` on model a's card; real JobRunner, spawned workers."""
    index = sqlite_index
    folder = tmp_path / "faultjob"
    folder.mkdir()
    monkeypatch.setenv("DICOMNODE_FAULTJOB_DIR", str(folder))
    monkeypatch.setattr(child, "work", faultjob.work)
    card = write_model_card(tmp_path / "models" / "a", [("ct", "CT")])
    card.write_text(card.read_text() + "runtime:\n  max_concurrent: 1\n")
    write_model_card(tmp_path / "models" / "b", [("ct", "CT")])
    config = _config(tmp_path, workers=2)
    config = config.model_copy(update={"storage": config.storage.model_copy(
        update={"database_url": str(index.engine.url)})})
    runner = JobRunner(config, index)
    try:
        a1, a2, b1 = _add(index, (NORMAL, "a"), (NORMAL, "a"), (NORMAL, "b"))
        for job_id in (a1, b1):
            (folder / f"block-{job_id}").touch()
        assert runner.dispatch() == [a1, b1]  # not [a1, a2]: a runs one job at a time
        for job_id in (a1, b1):
            _wait(lambda j=job_id: (folder / f"{j}.1.pid").exists(), 60, f"job {job_id} runs")
        assert runner.busy() == 2 and _state(index, a2) is JobState.PENDING
        (folder / f"block-{b1}").unlink()  # b ends: a worker is free, a is still busy
        _wait(lambda: _state(index, b1) is JobState.DONE, 60, "job b done")
        assert runner.dispatch() == [] and _state(index, a2) is JobState.PENDING
        (folder / f"block-{a1}").unlink()
        _wait(lambda: _state(index, a1) is JobState.DONE, 60, "the first a done")
        assert runner.dispatch() == [a2]
        _wait(lambda: _state(index, a2) is JobState.DONE, 60, "the second a done")
    finally:
        runner.stop()


# ------------------------------------------------------------------------ the queue view


def _ran(index: Index, model: str, seconds: float) -> None:
    """A finished job of ``model`` that ran ``seconds``."""
    (job_id,) = _add(index, (NORMAL, model))
    end = utcnow() - dt.timedelta(hours=1)
    with index.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            state=JobState.DONE, started_at=end - dt.timedelta(seconds=seconds),
            finished_at=end))
        session.commit()


def test_the_queue_report_estimates_starts_in_claim_order(sqlite_index: Index,
                                                          tmp_path: Path) -> None:
    index = sqlite_index
    for seconds in (50.0, 70.0):
        _ran(index, "slow", seconds)  # mean 60 s
    _ran(index, "fast", 10.0)
    config = _config(tmp_path, workers=2, model_concurrency={"slow": 1})
    running = _add(index, (NORMAL, "slow"))[0]
    now = utcnow()
    assert claim_next(index, 1, owner="n1") == [running]
    with index.session() as session:  # it started 20 s ago: 40 s left of its mean
        session.execute(update(Job).where(Job.id == running)
                        .values(started_at=now - dt.timedelta(seconds=20)))
        session.commit()
    bg, s1, f1, u1 = _add(index, (BACKGROUND, "fast"), (NORMAL, "slow"), (NORMAL, "fast"),
                          (URGENT, "other"))
    report = queue_report(index, config, now=now, local=dt.datetime(2026, 12, 4, 12, 0))
    assert report["estimate"] is True and report["mean_seconds"] == {"fast": 10.0,
                                                                     "slow": 60.0}
    rows = [(r["position"], r["id"], r["priority"], r["expected_in_seconds"])
            for r in report["jobs"]]
    # running first; then claim order. One worker is free now: the urgent job (a model
    # with no history: the mean of the others, 35 s) starts now; the second slow job waits
    # for the running one (40 s) though a worker frees at 35 s, which the fast job takes;
    # the background job follows the fast one (no hours configured)
    assert rows == [(None, running, "normal", None), (1, u1, "urgent", 0.0),
                    (2, s1, "normal", 40.0), (3, f1, "normal", 35.0),
                    (4, bg, "background", 45.0)]
    assert report["jobs"][1]["mean_seconds"] == 35.0
    idle = queue_report(index, _config(tmp_path, workers=0), now=now)
    assert all(r["expected_start"] is None for r in idle["jobs"])
    empty_index = open_index(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    try:
        _add(empty_index, (NORMAL, "x"), (NORMAL, "x"))
        lone = queue_report(empty_index, _config(tmp_path, workers=1), now=now)
        assert [r["expected_in_seconds"] for r in lone["jobs"]] == [0.0, DEFAULT_JOB_SECONDS]
    finally:
        empty_index.dispose()


def test_the_console_api_and_page_show_the_queue_without_identity(
        sqlite_index: Index, tmp_path: Path) -> None:
    from dicomnode.send.outbox import Outbox
    from dicomnode.web.metrics import RefusalCounter, metrics_text
    from dicomnode.web.server import ConsoleServer

    index = sqlite_index
    _ran(index, "m", 30.0)
    normal, urgent = _add(index, (NORMAL, "m"), (URGENT, "m"))
    config = Config.model_validate({**_config(tmp_path, workers=1).model_dump(mode="json"),
                                    "web": {"port": 0}})
    console = ConsoleServer(config, index, Outbox.from_config(config, index), None,
                            lambda: metrics_text(index, refused=RefusalCounter(),
                                                 storage_path=tmp_path / "store"))
    console.start()
    try:
        base = f"http://127.0.0.1:{console.port}"
        with urllib.request.urlopen(f"{base}/api/v1/queue", timeout=30) as reply:
            queue = json.loads(reply.read())
        assert queue["estimate"] is True and queue["workers"] == 1
        assert [(j["position"], j["id"], j["priority"], j["expected_in_seconds"])
                for j in queue["jobs"]] == [(1, urgent, "urgent", 0.0),
                                            (2, normal, "normal", 30.0)]
        assert set(queue["jobs"][0]) == {
            "position", "id", "rule", "model", "priority", "state", "study", "attempts",
            "created_at", "started_at", "expected_start", "expected_in_seconds",
            "mean_seconds"}
        assert "1.2.3" not in json.dumps(queue)  # no study UID
        with urllib.request.urlopen(f"{base}/api/v1/jobs", timeout=30) as reply:
            jobs = json.loads(reply.read())["jobs"]
        assert {j["id"]: j["priority"] for j in jobs}[urgent] == "urgent"
        with urllib.request.urlopen(f"{base}/", timeout=30) as reply:
            page = reply.read().decode()
        assert "<h2>Queue</h2>" in page and "expected starts are estimates" in page
        assert page.index(f'id="queued-{urgent}"') < page.index(f'id="queued-{normal}"')
    finally:
        console.stop()


# ------------------------------------------------------------------------- a real node


RULES = """rules:
  - name: routine
    select: SELECT study WHERE series NAMED "CT" HAS SeriesDescription = "routine"
    model: body
  - name: stroke
    priority: urgent
    select: SELECT study WHERE series NAMED "CT" HAS SeriesDescription = "stroke"
    model: body
"""


def test_an_urgent_rules_job_is_claimed_before_earlier_normal_ones(
        node_factory: NodeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An in-process node (its store, completion, rules and JobRunner with one spawned
    worker): three routine studies, then a stroke study; the stroke job runs second."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "main.yaml").write_text(RULES)
    write_model_card(tmp_path / "models" / "body", [("CT", "CT")])
    folder = tmp_path / "faultjob"
    folder.mkdir()
    monkeypatch.setenv("DICOMNODE_FAULTJOB_DIR", str(folder))
    monkeypatch.setattr(child, "work", faultjob.work)
    running = node_factory(start=False, rules_dir=str(rules),
                           models_dir=str(tmp_path / "models"), pipeline={"workers": 1})
    node = Node(load_config(running.config_path))
    try:
        (folder / "block-1").touch()  # the first routine job holds the only worker
        jobs = [_study(node, tmp_path / f"s{n}", description)
                for n, description in enumerate(["routine", "routine", "routine", "stroke"])]
        assert jobs == [1, 2, 3, 4]
        assert _state(node.index, 1) is JobState.RUNNING
        with node.index.session() as session:
            assert session.get(Job, 4).priority == URGENT.rank  # type: ignore[union-attr]
        # `dicomnode jobs --queue`: the running job, then the claim order
        queue = json.loads(running.cli("jobs", "--queue", "--json").stdout)
        assert [(j["position"], j["id"], j["priority"]) for j in queue["jobs"]] == [
            (None, 1, "normal"), (1, 4, "urgent"), (2, 2, "normal"), (3, 3, "normal")]
        text = running.cli("jobs", "--queue").stdout
        assert "   1 job 4     urgent     stroke" in text and "are estimates" in text
        assert "normal     routine" in running.cli("jobs").stdout
        (folder / "block-1").unlink()
        _wait(lambda: _state(node.index, 1) is JobState.DONE, 60, "the first job done")
        order = []
        while len(order) < 3:
            started = node.jobs.dispatch()
            order += started
            for job_id in started:
                _wait(lambda j=job_id: _state(node.index, j) is JobState.DONE, 60,
                      f"job {job_id} done")
        assert order == [4, 2, 3]
    finally:
        node.jobs.stop()
        node.index.dispose()


def _study(node: Node, folder: Path, description: str) -> int:
    return store_study_with_a_job(node, folder, slices=3, rows=8, columns=8,
                                  series_description=description)


# ------------------------------------------------------------------------------ helpers


def _state(index: Index, job_id: int) -> JobState:
    with index.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.state


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    return wait_until(predicate, timeout, what, interval=0.05)

