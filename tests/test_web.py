"""The operator console of a real `dicomnode serve` after a real job: pages, JSON, overlay
pictures, actions, /metrics and /healthz, identity only with the token; and the page in
headless Chromium (Debian `chromium` and `chromium-driver`)."""

from __future__ import annotations

import http.client
import json
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import NodeFactory, RunningNode, storescu, wait_until
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "console-token-0123456789abcdef"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# identity of the test series (tools/testdata.py defaults) that must never show unasked
IDENTITY = ("Test^Patient", "DN-TEST-0001", "Synthetic CT phantom")


def _get(url: str, *, token: str | None = None) -> tuple[int, bytes, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read(), reply.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def _post(url: str, *, header: bool = True) -> tuple[int, str]:
    request = urllib.request.Request(url, data=b"", method="POST")
    if header:
        request.add_header("X-Dicomnode", "1")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _login(base: str, token: str) -> str:
    """POST the login form; returns the Set-Cookie header ("" when refused)."""
    opener = urllib.request.build_opener(_NoRedirect)
    data = urllib.parse.urlencode({"token": token}).encode()
    try:
        with opener.open(urllib.request.Request(f"{base}/login", data=data), timeout=30) as r:
            return str(r.headers.get("Set-Cookie", ""))
    except urllib.error.HTTPError as exc:
        return str(exc.headers.get("Set-Cookie", "")) if exc.code == 303 else ""


def _raw(base: str, method: str, target: str,
         headers: dict[str, str]) -> tuple[int, str, http.client.HTTPMessage]:
    """A request with exactly these headers (urllib would set Host itself); the reply's
    headers are looked up without regard to case, as HTTP says."""
    host, port = urllib.parse.urlsplit(base).netloc.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest(method, target, skip_host=True)
        for key, value in headers.items():
            connection.putheader(key, value)
        connection.endheaders()
        reply = connection.getresponse()
        return reply.status, reply.read().decode(), reply.headers
    finally:
        connection.close()


def _rules(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rules.yaml").write_text("""rules:
  - name: ct-external
    select: SELECT study FROM patient WHERE series NAMED "ct" HAS Modality = "CT"
    model: ct-body
""")
    return folder


@pytest.fixture
def node_with_job(node_factory: NodeFactory, tmp_path: Path,
                  small_ct: list[Path]) -> Iterator[RunningNode]:
    node = node_factory(rules_dir=str(_rules(tmp_path / "rules")),
                        models_dir=str(ROOT / "models"))
    assert storescu(node.port, *small_ct).returncode == 0
    base = node.console_url()

    def done() -> bool:
        jobs = json.loads(_get(f"{base}/api/v1/jobs")[1])["jobs"]
        return bool(jobs) and jobs[0]["state"] == "done"

    wait_until(done, 90, f"a finished job; log:\n{node.log()}")
    yield node


@pytest.mark.slow
def test_pages_json_overlay_and_health_without_identity(node_with_job: RunningNode) -> None:
    base = node_with_job.console_url()
    status, body, kind = _get(f"{base}/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, page, kind = _get(f"{base}/")
    assert status == 200 and kind.startswith("text/html")
    html = page.decode()
    assert 'id="job-1"' in html and "ct-external" in html and "study 1" in html
    assert "/jobs/1/overlay.png" in html
    # ct-body finds no lung in the small phantom: its RTSTRUCT leaves Lungs out, and says so
    (job,) = json.loads(_get(f"{base}/api/v1/jobs")[1])["jobs"]
    assert [r.get("omitted") for r in job["results"]] == [None, ["Lungs"]]
    assert "RTSTRUCT without Lungs (found empty)" in html
    for text in IDENTITY:
        assert text not in html
    studies = json.loads(_get(f"{base}/api/v1/studies")[1])
    assert "study_instance_uid" not in studies["studies"][0]
    assert studies["studies"][0]["series"][0]["geometry"]["state"] == "whole"
    status, study_page, _ = _get(f"{base}/studies/1")
    assert status == 200 and "rule ct-external: MATCH" in study_page.decode()
    assert not any(text in study_page.decode() for text in IDENTITY)
    status, png, kind = _get(f"{base}/jobs/1/overlay.png")
    assert status == 200 and kind == "image/png" and png.startswith(b"\x89PNG\r\n\x1a\n")
    assert _get(f"{base}/jobs/99/overlay.png")[0] == 404
    jobs = json.loads(_get(f"{base}/api/v1/jobs")[1])["jobs"]
    assert jobs[0]["timings"]["model"] > 0


@pytest.mark.slow
def test_metrics_in_prometheus_format(node_with_job: RunningNode) -> None:
    base = node_with_job.console_url()
    status, body, kind = _get(f"{base}/metrics")
    assert status == 200 and kind.startswith("text/plain")
    text = body.decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("dicomnode_jobs", (("state", "done"),))] == 1
    assert samples[("dicomnode_studies", (("state", "complete"),))] == 1
    assert samples[("dicomnode_instances_received_total", ())] == 24
    assert samples[("dicomnode_inference_seconds_count", ())] == 1
    assert samples[("dicomnode_free_disk_bytes", ())] > 0
    assert not any(t in text for t in IDENTITY)


@pytest.mark.slow
def test_actions_need_their_header_and_rerun_the_job(node_with_job: RunningNode) -> None:
    base = node_with_job.console_url()
    assert _post(f"{base}/api/v1/jobs/1/retry", header=False)[0] == 403
    status, message = _post(f"{base}/api/v1/jobs/1/retry")
    assert status == 200 and "job 1 queued again" in message

    def rerun() -> bool:
        (job,) = json.loads(_get(f"{base}/api/v1/jobs")[1])["jobs"]
        return bool(job["state"] == "done" and job["attempts"] == 1
                    and job["finished_at"] > job["created_at"])

    wait_until(rerun, 60, "the job run again")
    assert _post(f"{base}/api/v1/jobs/42/retry")[0] == 409
    assert _post(f"{base}/api/v1/outbox/42/resend")[0] == 409


@pytest.mark.slow
def test_identity_only_with_the_token(node_factory: NodeFactory, tmp_path: Path,
                                      small_ct: list[Path]) -> None:
    token_file = tmp_path / "console.token"
    token_file.write_text(TOKEN + "\n")
    node = node_factory(web={"port": 0, "token_file": str(token_file)})
    assert storescu(node.port, *small_ct).returncode == 0
    node.wait_for(lambda s: len(s) == 1 and s[0]["state"] == "complete")
    base = node.console_url()
    anonymous = _get(f"{base}/")[1].decode()
    assert not any(t in anonymous for t in IDENTITY)
    status, page, _ = _get(f"{base}/", token=TOKEN)
    assert status == 200 and "Test^Patient" in page.decode() and "DN-TEST-0001" in page.decode()
    assert _get(f"{base}/", token="wrong-token-0123456789")[0] == 401
    # the login form sets a cookie, so links work in a browser
    cookie = _login(base, TOKEN)
    assert cookie.startswith("dicomnode_token=") and "HttpOnly" in cookie
    request = urllib.request.Request(f"{base}/", headers={"Cookie": cookie.split(";")[0]})
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert "DN-TEST-0001" in reply.read().decode()
    # the JSON API: identity only with the token, from the same allow-listed views
    for route in ("/api/v1/studies", "/api/v1/studies/1", "/api/v1/outbox", "/api/v1/jobs"):
        status, body, _ = _get(f"{base}{route}")
        assert status == 200 and not any(t in body.decode() for t in IDENTITY), route
    (study,) = json.loads(_get(f"{base}/api/v1/studies", token=TOKEN)[1])["studies"]
    assert study["patient"]["name"] == "Test^Patient" and study["patient"]["id"] == "DN-TEST-0001"
    assert study["study_description"] and study["study_instance_uid"]
    assert study["series"][0]["series_instance_uid"]
    detail = json.loads(_get(f"{base}/api/v1/studies/1", token=TOKEN)[1])
    assert detail["patient"]["id"] == "DN-TEST-0001"
    assert _get(f"{base}/api/v1/studies", token="wrong-token-0123456789")[0] == 401
    # POST needs the token when one is configured
    assert _post(f"{base}/api/v1/jobs/1/retry")[0] == 401


def test_a_console_bound_beyond_loopback_needs_a_token(node_factory: NodeFactory) -> None:
    node = node_factory(web={"host": "0.0.0.0", "port": 0}, start=False)
    proc = node.cli("serve", check=False)
    assert proc.returncode == 2
    assert "not a loopback address" in proc.stderr and "token" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                    reason="headless Chromium needs the Debian packages chromium and "
                           "chromium-driver (tools/test.sh installs them)")
def test_the_page_in_headless_chromium_shows_the_job_and_its_overlay(
        node_with_job: RunningNode) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    profile = Path(tempfile.mkdtemp(prefix="dicomnode-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(node_with_job.console_url() + "/")
        row = driver.find_element(By.ID, "job-1")
        assert "ct-external" in row.text and "done" in row.text
        image = row.find_element(By.CSS_SELECTOR, "img.overlay")

        def loaded() -> bool:
            width: Any = driver.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth", image)
            return bool(width and width > 100)

        wait_until(loaded, 30, "the overlay image to load")
        assert "Test^Patient" not in driver.page_source
        # the action runs from /static/console.js under the Content-Security-Policy
        row.find_element(By.CSS_SELECTOR, "button[data-action]").click()
        result = driver.find_element(By.ID, "action-result")
        wait_until(lambda: "job 1" in result.text, 30, "the retry action's answer")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_a_console_port_in_use_stops_the_start_with_a_clear_error(
        node_factory: NodeFactory) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        node = node_factory(web={"port": port}, start=False)
        proc = node.cli("serve", check=False)
    assert proc.returncode == 2
    assert f"cannot serve the console on 127.0.0.1:{port}" in proc.stderr
    assert "listening as" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_console_defences(node_factory: NodeFactory, tmp_path: Path) -> None:
    """Host header, token never in a URL nor in the DEBUG log, lockout, security headers."""
    token_file = tmp_path / "console.token"
    token_file.write_text(TOKEN + "\n")
    node = node_factory(web={"port": 0, "token_file": str(token_file), "max_token_failures": 3,
                             "allowed_hosts": ["console.example"]},
                        logging={"level": "DEBUG"})
    base = node.console_url()
    netloc = urllib.parse.urlsplit(base).netloc
    port = netloc.split(":")[1]
    # DNS rebinding: a page of evil.example resolving to 127.0.0.1 sends Host: evil.example
    for host in ("evil.example", f"evil.example:{port}"):
        assert _raw(base, "GET", "/api/v1/studies", {"Host": host})[0] == 421, host
    # no Host at all: HTTP/1.1 requires one (h11 answers 400 before the application)
    assert _raw(base, "GET", "/api/v1/studies", {})[0] in (400, 421)
    for host in (netloc, f"localhost:{port}", "console.example"):
        assert _raw(base, "GET", "/api/v1/studies", {"Host": host})[0] == 200, host
    # the token never in a URL: refused, and no cookie for it
    status, _, headers = _raw(base, "GET", f"/?token={TOKEN}", {"Host": netloc})
    assert status == 400 and "Set-Cookie" not in headers
    # security headers on pages, JSON and errors; no inline script in the pages
    status, page, headers = _raw(base, "GET", "/", {"Host": netloc})
    assert status == 200
    for reply in (headers, _raw(base, "GET", "/nothing", {"Host": netloc})[2]):
        assert "default-src 'self'" in reply["Content-Security-Policy"]
        assert "script-src 'self'" in reply["Content-Security-Policy"]
        assert reply["X-Frame-Options"] == "DENY"
        assert reply["X-Content-Type-Options"] == "nosniff"
        assert reply["Referrer-Policy"] == "no-referrer"
    assert "<script>" not in page and "onclick" not in page and "<style>" not in page
    assert _raw(base, "GET", "/static/console.js", {"Host": netloc})[0] == 200
    assert _login(base, TOKEN).startswith("dicomnode_token=")
    # wrong tokens: 401, then the address is locked out (429), even with the right token
    for _ in range(3):
        assert _get(f"{base}/", token="wrong-token-0123456789")[0] == 401
    assert _login(base, TOKEN) == ""
    assert _get(f"{base}/", token=TOKEN)[0] == 429
    assert _get(f"{base}/healthz")[0] == 200
    node.terminate()
    assert TOKEN not in node.log()
    assert "wrong token from 127.0.0.1" in node.log()


@pytest.mark.slow
def test_a_job_error_quoting_a_value_is_hidden_without_the_token(
        node_with_job: RunningNode) -> None:
    import sqlite3

    with sqlite3.connect(node_with_job.store / "index.sqlite") as db:
        db.execute("UPDATE job SET error = ? WHERE id = 1",
                   ("ValueError: Invalid value for VR DA: '1980-01-02' (Doe^John)",))
    base = node_with_job.console_url()
    for route in ("/", "/api/v1/jobs"):
        status, body, _ = _get(f"{base}{route}")
        assert status == 200 and "Invalid value for VR DA" in body.decode()
        assert "1980-01-02" not in body.decode() and "Doe^John" not in body.decode()


def test_job_errors_quote_no_value_without_the_token() -> None:
    from dicomnode.web.api import jobs_view, outbox_view

    report = {"schema": 1, "jobs": [{
        "id": 1, "error": "ValueError: Invalid value for VR DA: '1980-01-02' "
                          "in 1.2.826.0.1.3680043.8.498.1001", "results": []}]}
    (job,) = jobs_view(report, authenticated=False, overlays=set())["jobs"]
    assert "1980-01-02" not in job["error"] and "3680043" not in job["error"]
    assert job["error"].startswith("ValueError: Invalid value for VR DA")
    outbox = {"schema": 1, "counts": {}, "items": [{
        "id": 1, "last_error": "status 0xC000: 'Doe^John' refused",
        "sop_instance_uid": "1.2.3", "file_path": "/x"}]}
    (item,) = outbox_view(outbox, authenticated=False)["items"]
    assert "Doe" not in item["last_error"] and "sop_instance_uid" not in item


def test_fields_a_report_gains_never_reach_the_console() -> None:
    """Allow-listed views: a key the reports add later is not passed on, with or without
    the token, at any depth."""
    from dicomnode.web.api import (
        JobList,
        OutboxList,
        StudyList,
        jobs_view,
        outbox_view,
        studies_view,
    )

    geometry = {"state": "whole", "whole": True, "reason": None, "frames": 3,
                "slice_spacing_mm": 1.0, "orientation": "axial", "stated_size": None,
                "settled_by_size": None, "leak": "Doe^John"}
    studies = {"schema": 1, "studies": [{
        "id": 1, "state": "complete", "instance_count": 3, "reopened_count": 0,
        "study_instance_uid": "1.2.3", "leak": "Doe^John",
        "series": [{"id": 2, "modality": "CT", "instance_count": 3, "frame_count": 3,
                    "series_instance_uid": "1.2.3.4", "leak": "Doe^John",
                    "geometry": geometry}]}]}
    jobs = {"schema": 1, "jobs": [{
        "id": 1, "rule": "r", "model": "m", "study": 1, "inputs": ["ct"], "trigger": "manual",
        "version": 1, "state": "done", "attempts": 1, "leak": "Doe^John",
        "results": [{"kind": "seg", "sop_instance_uid": "1.2", "file": "x", "leak": "Doe"}]}]}
    outbox = {"schema": 1, "counts": {"sent": 1}, "items": [{
        "id": 1, "state": "sent", "destination": "pacs", "sop_class_uid": "1.2",
        "attempts": 1, "sop_instance_uid": "1.2.5", "file_path": "x", "leak": "Doe^John"}]}
    identity = {1: {"accession_number": "A1", "patient": {"name": "Doe^John", "id": "P1",
                                                          "leak": "Doe"}}}
    for auth in (False, True):
        views = [
            StudyList.model_validate(studies_view(
                studies, identity=identity if auth else None)).model_dump(exclude_unset=True),
            JobList.model_validate(jobs_view(jobs, authenticated=auth, overlays={1}))
            .model_dump(exclude_unset=True),
            OutboxList.model_validate(outbox_view(outbox, authenticated=auth))
            .model_dump(exclude_unset=True)]
        text = json.dumps(views)
        assert "leak" not in text
        assert ("Doe^John" in text) is auth and ("1.2.3.4" in text) is auth
        assert ("1.2.5" in text) is auth


@pytest.mark.slow
def test_the_api_lists_rules_and_models_and_describes_itself(
        node_with_job: RunningNode) -> None:
    base = node_with_job.console_url()
    status, body, kind = _get(f"{base}/api/v1/openapi.json")
    assert status == 200 and kind.startswith("application/json")
    schema = json.loads(body)
    paths = set(schema["paths"])
    assert {"/api/v1/studies", "/api/v1/studies/{study_id}", "/api/v1/jobs",
            "/api/v1/outbox", "/api/v1/models", "/api/v1/rules",
            "/api/v1/jobs/{job_id}/retry", "/api/v1/outbox/{item_id}/resend",
            "/api/v1/studies/{study_id}/rules/{rule}/run", "/healthz"} <= paths
    assert not paths & {"/", "/login", "/metrics", "/studies/{study_id}"}
    (rule,) = json.loads(_get(f"{base}/api/v1/rules")[1])["rules"]
    assert rule["name"] == "ct-external" and rule["model"] == "ct-body"
    assert rule["inputs"] == ["ct"] and rule["source"] == "rules.yaml"
    models = {m["name"]: m for m in json.loads(_get(f"{base}/api/v1/models")[1])["models"]}
    assert models["ct-body"]["used_by"] == ["ct-external"]
    assert models["ct-body"]["inputs"][0]["modality"] == "CT" and models["ct-body"]["version"]
    study = json.loads(_get(f"{base}/api/v1/studies/1")[1])
    assert "rule ct-external: MATCH" in study["explanation"]
    assert study["runnable_rules"] == ["ct-external"] and "patient" not in study
    assert _get(f"{base}/api/v1/studies/99")[0] == 404
    (job,) = json.loads(_get(f"{base}/api/v1/jobs")[1])["jobs"]
    assert job["overlay"] == "/jobs/1/overlay.png"
    # no identity without the token: the kind, and an RTSTRUCT's empty structures left out
    assert all(set(r) <= {"kind", "omitted"} for r in job["results"])
    assert job["results"]


def test_importing_the_console_leaves_the_model_stack_out() -> None:
    """The console runs in the receiving process: it never imports the pipeline, ONNX
    Runtime, SimpleITK, OpenCV or highdicom."""
    import os
    import subprocess
    import sys

    code = ("import sys, dicomnode.web.server, dicomnode.web.app; "
            "heavy = ('onnxruntime', 'SimpleITK', 'highdicom', 'cv2', 'dicomnode.jobs.pipeline', "
            "'dicomnode.inference.runtime', 'dicomnode.outputs'); "
            "print(sorted(m for m in heavy if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env, check=True).stdout
    assert out.strip() == "[]"


def test_the_console_stops_within_its_request_timeout(tmp_path: Path) -> None:
    """In-process: uvicorn in the thread "console", a keep-alive connection left open and a
    peer that never finishes its request; stop() returns within the bound, the port closed."""
    import socket
    import threading
    import time

    from dicomnode.config import Config
    from dicomnode.send.outbox import Outbox
    from dicomnode.store.db import open_index
    from dicomnode.web.metrics import RefusalCounter, metrics_text
    from dicomnode.web.server import ConsoleServer

    config = Config.model_validate({"storage": {"path": str(tmp_path / "store")},
                                    "web": {"port": 0, "request_timeout_seconds": 2.0}})
    index = open_index(f"sqlite:///{tmp_path}/index.sqlite")
    console = ConsoleServer(config, index, Outbox.from_config(config, index), None,
                            lambda: metrics_text(index, refused=RefusalCounter(),
                                                 storage_path=tmp_path / "store"))
    console.start()
    try:
        assert any(t.name == "console" for t in threading.enumerate())
        base = f"http://127.0.0.1:{console.port}"
        assert json.loads(_get(f"{base}/api/v1/studies")[1])["studies"] == []
        assert _get(f"{base}/metrics")[0] == 200
        kept = http.client.HTTPConnection("127.0.0.1", console.port, timeout=10)
        kept.request("GET", "/healthz")
        assert kept.getresponse().read() == b'{"status":"ok"}'
        stalled = socket.create_connection(("127.0.0.1", console.port), timeout=10)
        stalled.sendall(b"GET /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no end
    finally:
        started = time.monotonic()
        console.stop()
        seconds = time.monotonic() - started
    assert seconds < 2.0 + 5, seconds
    assert not any(t.name == "console" for t in threading.enumerate())
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", console.port), timeout=2).close()
    kept.close()
    stalled.close()
    index.dispose()


def test_a_node_without_its_console_imports_no_web_stack(tmp_path: Path) -> None:
    """``web.enabled: false``: neither FastAPI nor uvicorn is imported (a lighter serve)."""
    import os
    import subprocess
    import sys

    code = ("import sys; from dicomnode.config import Config; from dicomnode.node import Node; "
            f"node = Node(Config.model_validate({{'storage': {{'path': {str(tmp_path)!r}}}, "
            "'web': {'enabled': False}})); node.index.dispose(); "
            "print(node.console, sorted(m for m in ('fastapi', 'starlette', 'uvicorn') "
            "if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None []"


@pytest.mark.slow
def test_a_peer_trickling_its_request_is_cut_off(tmp_path: Path) -> None:
    """A request must arrive whole within web.request_timeout_seconds: a byte every 0.2 s
    (each read well within the timeout) does not hold a connection open, neither as the
    first request nor after an answer on a kept-alive connection."""
    import socket
    import time

    from dicomnode.config import Config
    from dicomnode.send.outbox import Outbox
    from dicomnode.store.db import open_index
    from dicomnode.web.server import ConsoleServer

    config = Config.model_validate({"storage": {"path": str(tmp_path / "store")},
                                    "web": {"port": 0, "request_timeout_seconds": 1.0}})
    index = open_index(f"sqlite:///{tmp_path}/index.sqlite")
    console = ConsoleServer(config, index, Outbox.from_config(config, index), None,
                            lambda: (b"", "text/plain"))
    console.start()
    try:
        for answered_first in (False, True):
            peer = socket.create_connection(("127.0.0.1", console.port), timeout=5)
            if answered_first:
                peer.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert peer.recv(4096).startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            closed = False
            for byte in b"GET /api/v1/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1":
                try:
                    peer.sendall(bytes([byte]))
                    time.sleep(0.2)
                except OSError:
                    closed = True
                    break
                if time.monotonic() - started > 4:
                    break
            if not closed:
                peer.settimeout(0.5)
                try:
                    closed = peer.recv(1) == b""
                except OSError:
                    closed = True
            peer.close()
            assert closed and time.monotonic() - started < 4, answered_first
    finally:
        console.stop()
        index.dispose()
