"""The operator console of a real `dicomnode serve` after a real job: pages, JSON, overlay
pictures, actions, /metrics and /healthz, identity only with the token; and the page in
headless Chromium (Debian `chromium` and `chromium-driver`)."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.error
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
        jobs = json.loads(_get(f"{base}/api/jobs")[1])["jobs"]
        return bool(jobs) and jobs[0]["state"] == "done"

    wait_until(done, 90, f"a finished job; log:\n{node.log()}")
    yield node


def test_pages_json_overlay_and_health_without_identity(node_with_job: RunningNode) -> None:
    base = node_with_job.console_url()
    status, body, kind = _get(f"{base}/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, page, kind = _get(f"{base}/")
    assert status == 200 and kind.startswith("text/html")
    html = page.decode()
    assert 'id="job-1"' in html and "ct-external" in html and "study 1" in html
    assert "/jobs/1/overlay.png" in html
    for text in IDENTITY:
        assert text not in html
    studies = json.loads(_get(f"{base}/api/studies")[1])
    assert "study_instance_uid" not in studies["studies"][0]
    assert studies["studies"][0]["series"][0]["geometry"]["state"] == "whole"
    status, study_page, _ = _get(f"{base}/studies/1")
    assert status == 200 and "rule ct-external: MATCH" in study_page.decode()
    assert not any(text in study_page.decode() for text in IDENTITY)
    status, png, kind = _get(f"{base}/jobs/1/overlay.png")
    assert status == 200 and kind == "image/png" and png.startswith(b"\x89PNG\r\n\x1a\n")
    assert _get(f"{base}/jobs/99/overlay.png")[0] == 404
    jobs = json.loads(_get(f"{base}/api/jobs")[1])["jobs"]
    assert jobs[0]["timings"]["model"] > 0


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


def test_actions_need_their_header_and_rerun_the_job(node_with_job: RunningNode) -> None:
    base = node_with_job.console_url()
    assert _post(f"{base}/api/jobs/1/retry", header=False)[0] == 403
    status, message = _post(f"{base}/api/jobs/1/retry")
    assert status == 200 and "job 1 queued again" in message

    def rerun() -> bool:
        (job,) = json.loads(_get(f"{base}/api/jobs")[1])["jobs"]
        return bool(job["state"] == "done" and job["attempts"] == 1
                    and job["finished_at"] > job["created_at"])

    wait_until(rerun, 60, "the job run again")
    assert _post(f"{base}/api/jobs/42/retry")[0] == 409
    assert _post(f"{base}/api/outbox/42/resend")[0] == 409


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
    # the token in the query sets a cookie, so links work in a browser
    with urllib.request.urlopen(f"{base}/?token={TOKEN}", timeout=30) as reply:
        assert "dicomnode_token=" in reply.headers.get("Set-Cookie", "")
    # POST needs the token when one is configured
    assert _post(f"{base}/api/jobs/1/retry")[0] == 401


def test_a_console_bound_beyond_loopback_needs_a_token(node_factory: NodeFactory) -> None:
    node = node_factory(web={"host": "0.0.0.0", "port": 0}, start=False)
    proc = node.cli("serve", check=False)
    assert proc.returncode == 2
    assert "not a loopback address" in proc.stderr and "token" in proc.stderr


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
