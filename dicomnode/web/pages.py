"""HTML of the operator console: one dashboard and one page per study.

Pages are built from the same allow-listed views as the JSON API (:mod:`dicomnode.web.api`,
``/api/v1/...``), and their buttons call its actions: without the token a view carries no
patient identity (no names, identifiers, UIDs, dates or descriptions; the rule explanation
reduced to each rule's verdict), so neither does the page.
"""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import quote

from dicomnode.store.queries import format_timings
from dicomnode.web.api import API_PREFIX

__all__ = ["CONTENT_SECURITY_POLICY", "SCRIPT", "STYLE", "dashboard", "login_page", "page",
           "reviews_page", "study_page"]

#: Pages load their script and style from the console itself (/static/...): no inline
#: script or style, no other origin, no framing.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; "
                           "img-src 'self'; object-src 'none'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1d2433; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 1.6rem; }
table { border-collapse: collapse; margin: .4rem 0; }
td, th { border-bottom: 1px solid #d9dde5; padding: .25rem .6rem; text-align: left;
         vertical-align: top; font-size: .9rem; }
th { background: #f2f4f8; }
.state-done, .state-sent, .state-complete, .state-whole, .state-results-sent { color: #146c2e; }
.state-failed, .state-not-whole { color: #b3261e; font-weight: 600; }
.state-running, .state-sending, .state-receiving, .state-pending,
.state-processing, .state-held, .state-awaiting, .state-awaiting-review { color: #8a5a00; }
.state-rejected { color: #b3261e; }
.muted { color: #6b7385; } .error { color: #b3261e; }
img.overlay { max-width: 420px; border: 1px solid #d9dde5; display: block; }
button { font-size: .8rem; }
pre { background: #f7f8fa; padding: .6rem; font-size: .85rem; }
"""

SCRIPT = """
async function act(url, body) {
  const headers = {'X-Dicomnode': '1'};
  if (body !== undefined) { headers['Content-Type'] = 'application/json'; }
  const reply = await fetch(url, {method: 'POST', headers: headers, credentials: 'same-origin',
                                  body: body === undefined ? undefined : JSON.stringify(body)});
  let text = await reply.text();
  try { text = JSON.parse(text).detail; } catch (error) { /* a plain-text answer */ }
  document.getElementById('action-result').textContent = text;
  if (reply.ok) { setTimeout(() => location.reload(), 800); }
}
document.addEventListener('click', (event) => {
  const button = event.target.closest('button[data-action]');
  if (button) { act(button.dataset.action); }
  const review = event.target.closest('button[data-review]');
  if (review) {  // approve or reject: the reviewer's name goes with the decision
    act(review.dataset.review, {user: document.getElementById('reviewer').value});
  }
});
"""
def _state(value: str) -> str:
    return f'<span class="state-{escape(value.replace(" ", "-"))}">{escape(value)}</span>'


def _status(study: dict[str, Any]) -> str:
    """What an operator sees of a study (dicomnode.store.studystatus), else its state."""
    return str(study.get("status") or study["state"])


def _cell(value: Any) -> str:
    return "" if value is None else escape(str(value))


def page(title: str, body: str, *, authenticated: bool) -> bytes:
    """A console page around ``body`` (HTML already escaped)."""
    return _page(title, body, authenticated=authenticated)


def _page(title: str, body: str, *, authenticated: bool) -> bytes:
    note = ("" if authenticated else
            '<p class="muted">Patient identity is hidden: <a href="/login">log in</a> with '
            "the console's token to see names, identifiers and descriptions.</p>")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
            f'<title>{escape(title)}</title><link rel="stylesheet" href="/static/console.css">'
            f'<script src="/static/console.js" defer></script></head><body>'
            f'<h1>{escape(title)}</h1>{note}<p id="action-result" class="muted"></p>'
            f"{body}</body></html>").encode()


def _patient(study: dict[str, Any]) -> str | None:
    """"name (ID)" of a study's patient, when the view carries it (token holders)."""
    patient = study.get("patient")
    if not patient:
        return None
    return f"{patient.get('name') or ''} ({patient.get('id') or ''})"


def _studies_table(studies: list[dict[str, Any]], authenticated: bool) -> str:
    rows = []
    for study in studies:
        who = ""
        if authenticated:
            who = (f"<td>{_cell(_patient(study))}</td>"
                   f"<td>{_cell(study.get('study_description'))}</td>")
        rows.append(
            f'<tr id="study-{study["id"]}"><td><a href="/studies/{study["id"]}">study '
            f'{study["id"]}</a></td>{who}<td>{_state(_status(study))}</td>'
            f'<td>{len(study["series"])}</td><td>{study["instance_count"]}</td>'
            f'<td>{_cell(study["last_received_at"])}</td></tr>')
    head = "<th>patient</th><th>description</th>" if authenticated else ""
    return (f"<table><tr><th>study</th>{head}<th>status</th><th>series</th><th>instances</th>"
            f"<th>last received</th></tr>{''.join(rows)}</table>") if rows else \
        '<p class="muted">no studies yet</p>'


def _jobs_table(jobs: list[dict[str, Any]]) -> str:
    rows = []
    for job in jobs:
        steps = format_timings(job["timings"])
        picture = (f'<img class="overlay" alt="job {job["id"]} overlay" '
                   f'src="{escape(job["overlay"])}">' if job.get("overlay") else "")
        retry = ("" if job["state"] == "running" else
                 f'<button data-action="{API_PREFIX}/jobs/{job["id"]}/retry">retry</button>')
        error = f'<div class="error">{_cell(job["error"])}</div>' if job["error"] else ""
        omitted = [f'<div class="muted">{escape(str(r["kind"]))} without '
                   f'{escape(", ".join(r["omitted"]))} (found empty)</div>'
                   for r in job.get("results") or [] if r.get("omitted")]
        rows.append(
            f'<tr id="job-{job["id"]}" class="job"><td>job {job["id"]}</td>'
            f'<td>{_cell(job["rule"])}<br><a class="muted" title="feedback" '
            f'href="/models/{quote(str(job["model"]))}/feedback">{_cell(job["model"])}</a></td>'
            f'<td><a href="/studies/{job["study"]}">study {job["study"]}</a></td>'
            f'<td>{_state(job["state"])}<br><span class="muted">{job["attempts"]} attempt(s), '
            f'{_cell(job["trigger"])}</span></td>'
            f'<td>{_cell(job["seconds"])} s<br><span class="muted">{escape(steps)}</span>'
            f'{error}</td><td>{picture}{"".join(omitted)}</td><td>{retry}</td></tr>')
    return ("<table><tr><th>job</th><th>rule / model</th><th>study</th><th>state</th>"
            f"<th>time</th><th>result</th><th></th></tr>{''.join(rows)}</table>") if rows else \
        '<p class="muted">no jobs yet</p>'


def _queue_table(queue: dict[str, Any]) -> str:
    rows = []
    for job in queue["jobs"]:
        when = ("running since " + str(job["started_at"]) if job["position"] is None
                else f'{_cell(job["expected_start"])} (in about '
                     f'{_cell(job["expected_in_seconds"])} s)'
                if job["expected_start"] is not None else "no worker on this node")
        rows.append(
            f'<tr id="queued-{job["id"]}" class="queued"><td>{_cell(job["position"])}</td>'
            f'<td>job {job["id"]}</td><td>{_cell(job["priority"])}</td>'
            f'<td>{_cell(job["rule"])}<br><span class="muted">{_cell(job["model"])}</span></td>'
            f'<td><a href="/studies/{job["study"]}">study {job["study"]}</a></td>'
            f'<td>{_state(job["state"])}</td><td>{escape(when)}</td></tr>')
    hours = queue.get("background_hours")
    note = (f'<p class="muted">claim order: urgent, normal, background (oldest first); '
            f'expected starts are estimates from each model\'s mean run time and '
            f'{queue["workers"]} worker(s)'
            + (f"; background hours {escape(str(hours))} "
               f'({"open" if queue["background_open"] else "closed"})' if hours else "")
            + "</p>")
    return (note + "<table><tr><th>#</th><th>job</th><th>priority</th><th>rule / model</th>"
            f"<th>study</th><th>state</th><th>expected start (UTC)</th></tr>{''.join(rows)}"
            "</table>") if rows else '<p class="muted">no job waiting</p>'


def _outbox_table(items: list[dict[str, Any]]) -> str:
    rows = []
    for item in items:
        resend = ("" if item["state"] in ("pending", "sending", "held", "rejected") else
                  f'<button data-action="{API_PREFIX}/outbox/{item["id"]}/resend">resend</button>')
        status = "" if item["last_status"] is None else f"0x{item['last_status']:04X} "
        rows.append(
            f'<tr id="item-{item["id"]}"><td>item {item["id"]}</td>'
            f'<td>{_cell(item["job_id"])}</td><td>{_cell(item["sop_class_name"])}</td>'
            f'<td>{_cell(item["destination"])}</td><td>{_state(item["state"])}</td>'
            f'<td>{item["attempts"]}</td>'
            f'<td>{escape(status)}{_cell(item["last_error"])}</td><td>{resend}</td></tr>')
    return ("<table><tr><th>item</th><th>job</th><th>object</th><th>destination</th>"
            "<th>state</th><th>attempts</th><th>last error</th><th></th></tr>"
            f"{''.join(rows)}</table>") if rows else '<p class="muted">nothing to send</p>'


def _detail_text(details: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in details.items())


def timeline(events: list[dict[str, Any]]) -> str:
    """The audit events of a study and its jobs (``/api/v1/studies/ID/events``), oldest
    first: keys, counts and status codes only."""
    rows = [
        f'<tr id="event-{e["id"]}" class="event"><td>{_cell(e["at"])}</td>'
        f'<td>{_cell(e["kind"])}</td>'
        f'<td>{"" if e.get("job") is None else "job " + str(int(e["job"]))}</td>'
        f'<td>{escape(_detail_text(e["details"]))}</td></tr>' for e in events]
    return ("<table><tr><th>time (UTC)</th><th>event</th><th>job</th><th>details</th></tr>"
            f"{''.join(rows)}</table>") if rows else '<p class="muted">no events</p>'


def dashboard(studies: dict[str, Any], jobs: dict[str, Any], outbox: dict[str, Any], *,
              authenticated: bool, queue: dict[str, Any] | None = None) -> bytes:
    """The console's front page: studies, the queue, jobs (with overlays) and the outbox,
    from the views of ``/api/v1/studies``, ``/api/v1/queue``, ``/api/v1/jobs`` and
    ``/api/v1/outbox``."""
    counts = outbox.get("counts", {})
    summary = ", ".join(f"{n} {state}" for state, n in counts.items())
    body = ('<p><a href="/reviews">results awaiting review</a></p>'
            f"<h2>Studies</h2>{_studies_table(studies['studies'], authenticated)}"
            + (f"<h2>Queue</h2>{_queue_table(queue)}" if queue is not None else "")
            + f"<h2>Jobs</h2>{_jobs_table(jobs['jobs'])}"
            f"<h2>Outbox</h2><p class=muted>{escape(summary)}</p>"
            f"{_outbox_table(outbox['items'])}")
    return _page("dicomnode", body, authenticated=authenticated)


def study_page(study: dict[str, Any], *, authenticated: bool) -> bytes:
    """One study (the view of ``/api/v1/studies/ID``): its series with geometry verdicts,
    how each rule evaluates on it, and a "run now" button per runnable rule."""
    explanation: str = study["explanation"]
    rules: list[str] = study["runnable_rules"]
    patient = _patient(study)
    rows = []
    for s in study["series"]:
        geo = s["geometry"]
        desc = f"<td>{_cell(s.get('series_description'))}</td>" if authenticated else ""
        rows.append(
            f'<tr id="series-{s["id"]}"><td>series {s["id"]}</td><td>{_cell(s["modality"])}</td>'
            f'<td>{_cell(s["series_number"])}</td>{desc}<td>{s["instance_count"]}</td>'
            f'<td>{_state(geo["state"])} {_cell(geo["reason"])}</td>'
            f'<td>{_cell(geo["orientation"])}</td><td>{_cell(geo["slice_spacing_mm"])}</td></tr>')
    head = "<th>description</th>" if authenticated else ""
    who = f"<p>{escape(patient)}</p>" if patient is not None else ""
    body = (f'{who}<p>{_state(_status(study))} (study {escape(study["state"])}), '
            f'{study["instance_count"]} instances; '
            f'<a href="/">back</a></p>'
            f"<h2>Series</h2><table><tr><th>series</th><th>modality</th><th>number</th>{head}"
            f"<th>instances</th><th>geometry</th><th>orientation</th><th>spacing (mm)</th></tr>"
            f"{''.join(rows)}</table><h2>Rules</h2><pre>{escape(explanation)}</pre>"
            f"<h2>Timeline</h2>{timeline(study.get('events', []))}")
    if rules:  # force completion: settle the series now and fire without waiting
        buttons = "".join(
            f'<button data-action="{API_PREFIX}/studies/{study["id"]}/rules/{quote(r)}/run">'
            f"run {escape(r)} now</button> " for r in rules)
        body += f'<p id="run-now">{buttons}</p>'
    return _page(f"study {study['id']}", body, authenticated=authenticated)


def reviews_page(reviews: dict[str, Any], *, authenticated: bool) -> bytes:
    """The jobs whose results are held for review (``/api/v1/reviews``), with approve and
    reject buttons; the reviewer's name is recorded with the decision."""
    rows = []
    for r in reviews["reviews"]:
        held = ", ".join(f"{n} for {escape(str(d))}" for d, n in r["held_items"].items())
        job = int(r["job"])
        rows.append(
            f'<tr id="review-{job}" class="review"><td>job {job}</td>'
            f'<td><a href="/studies/{int(r["study"])}">study {int(r["study"])}</a></td>'
            f'<td>{_cell(r["rule"])}</td><td>{_cell(r["model"])}</td>'
            f'<td>{_cell(r["held_at"])}</td><td>{escape(", ".join(r["objects"]))}</td>'
            f'<td>{held or "nothing"}</td><td>'
            f'<button data-review="{API_PREFIX}/jobs/{job}/approve">approve</button> '
            f'<button data-review="{API_PREFIX}/jobs/{job}/reject">reject</button></td></tr>')
    table = ("<table><tr><th>job</th><th>study</th><th>rule</th><th>model</th>"
             "<th>held since (UTC)</th><th>objects</th><th>held items</th><th></th></tr>"
             f"{''.join(rows)}</table>") if rows else \
        '<p class="muted">no results await a review</p>'
    body = ('<p><label>your name (recorded with each decision) <input id="reviewer" '
            'maxlength="64" autocomplete="name"></label> <a href="/">back</a></p>'
            f"{table}")
    return _page("results awaiting review", body, authenticated=authenticated)


def login_page(message: str = "") -> bytes:
    """The form that sets the console's cookie (the token never goes in a URL)."""
    note = f'<p class="error">{escape(message)}</p>' if message else ""
    body = (f'{note}<form method="post" action="/login">'
            '<label>token <input type="password" name="token" autocomplete="current-password" '
            'required></label> <button type="submit">log in</button></form>')
    return _page("dicomnode: log in", body, authenticated=True)
