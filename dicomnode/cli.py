"""The ``dicomnode`` command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode import __version__
from dicomnode.config import Config, ConfigError, PeerConfig, load_config
from dicomnode.logs import setup_logging
from dicomnode.rules.loader import RuleFileError, RuleSet
from dicomnode.store.schema import IndexSchemaError

if TYPE_CHECKING:
    from dicomnode.models.card import Card
    from dicomnode.store.db import Index

__all__ = ["main"]


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _peer(config: Config, name: str) -> tuple[str, PeerConfig]:
    if name not in config.peers:
        known = ", ".join(sorted(config.peers)) or "none configured"
        raise ConfigError(f"unknown peer {name!r}; peers in the configuration: {known}")
    return name, config.peers[name]


def cmd_serve(args: argparse.Namespace) -> int:
    from dicomnode.node import Node
    from dicomnode.states import NodeRole

    config = _config(args)
    if args.upgrade_index:
        config = config.model_copy(update={
            "storage": config.storage.model_copy(update={"upgrade_index": True})})
    setup_logging(config.logging.level)
    node = Node(config, NodeRole(args.command))
    node.serve_forever()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """``dicomnode worker``: a node that only claims and runs jobs."""
    config = _config(args)
    if config.pipeline.workers == 0:
        raise ConfigError("pipeline.workers is 0: a worker node needs at least one worker "
                          "process")
    return cmd_serve(args)


def cmd_status(args: argparse.Namespace) -> int:
    from dicomnode.store.leases import nodes_report

    config = _config(args)
    report = _index_report(args, lambda index: nodes_report(
        index, lease_seconds=config.node.lease_seconds))
    if args.json:
        return _print_json(report)
    if not report["nodes"]:
        print("no node has started on this index yet")
    for node in report["nodes"]:
        state = ("stopped " + node["stopped_at"] if node["stopped_at"] else
                 "alive" if node["alive"] else "silent (lease lapsed: presumed gone)")
        print(f"{node['id']:<24} {node['role']:<7} {node['version']:<8} "
              f"{node['host']}:{node['pid']:<8} heartbeat {node['heartbeat_at']} "
              f"({node['seconds_since_heartbeat']:g} s ago)  {state}")
    return 0


def _open_index(config: Config) -> Index:
    """The configured index; an older one is upgraded only with ``storage.upgrade_index``."""
    from dicomnode.store.db import open_index

    return open_index(config.db_url, upgrade=config.storage.upgrade_index)


def _index_report(args: argparse.Namespace, build: Callable[[Index], dict[str, Any]],
                  ) -> dict[str, Any]:
    """A report built from the configured index (opened and closed here)."""
    index = _open_index(_config(args))
    try:
        return build(index)
    finally:
        index.dispose()


def _print_json(report: dict[str, Any]) -> int:
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    from dicomnode.store.queries import studies_report

    report = _index_report(args, lambda index: studies_report(index, study_uid=args.study))
    if args.json:
        return _print_json(report)
    if not report["studies"]:
        print("no studies")
    for study in report["studies"]:
        print(f"study {study['id']}  {study['status']:<18}  {study['instance_count']:>5} instances"
              f"  {study['study_instance_uid']}  {study['study_description'] or ''}")
        for s in study["series"]:
            geo = s["geometry"]
            verdict = geo["state"] + (f" ({geo['reason']})" if geo["reason"] else "")
            print(f"  series {s['id']:<4} {s['modality'] or '?':<4} #{s['series_number'] or '-':<4}"
                  f" {s['instance_count']:>5} inst  {s['series_description'] or '':<24}"
                  f"  {verdict}")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from dicomnode.send.scu import SendError, echo

    config = _config(args)
    setup_logging("WARNING")
    name, peer = _peer(config, args.peer)
    try:
        status = echo(config.node.ae_title, peer, name)
    except SendError as exc:
        print(f"echo {name}: {exc}", file=sys.stderr)
        return 1
    print(f"echo {name}: {'Success' if status == 0 else f'status 0x{status:04X}'}")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    import tempfile

    from dicomnode.boundary import BoundaryError, PeerBoundary, PeerCopy
    from dicomnode.deid import DeidKeyError
    from dicomnode.send.scu import SendError, SendResult, collect_files, send_files
    from dicomnode.store.pseudonyms import PseudonymMap

    config = _config(args)
    setup_logging("WARNING")
    name, peer = _peer(config, args.to)
    failed = 0
    sent = 0

    def show(result: SendResult) -> None:
        nonlocal failed, sent
        sent += 1
        if not result.ok:
            failed += 1
        print(f"{result.path}: {result.message}", flush=True)

    try:
        files = list(collect_files([Path(p) for p in args.paths]))
    except FileNotFoundError as exc:
        print(f"send: {exc}", file=sys.stderr)
        return 1
    index = _open_index(config)
    try:
        with tempfile.TemporaryDirectory(prefix="dicomnode-send-") as scratch:
            # every file crosses the boundary: pseudonymized for a research peer,
            # re-identified (or refused) for a clinical one
            boundary = PeerBoundary.from_config(config, PseudonymMap(index),
                                                out_dir=Path(scratch))
            copies: list[PeerCopy] = []
            for path in files:
                try:
                    copies.append(boundary.copy(path, name))
                except (BoundaryError, DeidKeyError) as exc:
                    show(SendResult(path, None, f"not sent: {exc}"))
                except Exception as exc:  # its message could quote values
                    show(SendResult(path, None, f"not a DICOM file: {type(exc).__name__}"))
            if peer.stow_url:  # a DICOMweb destination: STOW-RS, as the outbox sends it
                from dicomnode.send.stow import stow_files

                stow_files(peer, name, copies, on_result=show)
            else:
                send_files(config.node.ae_title, peer, name, copies, on_result=show)
    except SendError as exc:
        print(f"send: {exc}", file=sys.stderr)
        return 1
    finally:
        index.dispose()
    print(f"{sent - failed} sent, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def cmd_pull(args: argparse.Namespace) -> int:
    import datetime as dt

    from dicomnode.config import RetrieveMethod
    from dicomnode.net.access import printable
    from dicomnode.receive.pull import Puller, PullError, PullQuery, RetrieveOutcome, parse_cli_date

    config = _config(args)
    setup_logging("WARNING")
    name, peer = _peer(config, args.from_peer)
    if not peer.query_retrieve:
        raise ConfigError(f"peer {name!r} is not a query/retrieve peer (set "
                          f"peers.{name}.query_retrieve: true and its host and port)")
    today = dt.datetime.now(dt.timezone.utc).date()
    try:
        query = PullQuery(
            study_uid=args.study, accession=args.accession, patient_id=args.patient_id,
            modality=args.modality, station=args.station,
            since=None if args.since is None else parse_cli_date(args.since, today),
            until=None if args.until is None else parse_cli_date(args.until, today))
    except ValueError as exc:
        print(f"pull: {exc}", file=sys.stderr)
        return 2

    def show(study_uid: str, outcomes: list[RetrieveOutcome]) -> None:
        done = sum(o.completed + o.warning for o in outcomes)
        failed = sum(o.failed for o in outcomes)
        problems = "; ".join(dict.fromkeys(o.message for o in outcomes if not o.ok and o.message))
        what = "" if outcomes[0].series_uid is None else f" ({len(outcomes)} series)"
        print(f"study {printable(study_uid)}{what}: {done} instance(s) retrieved"
              + (f", {failed} failed" if failed else "") + (f": {problems}" if problems else ""),
              flush=True)

    index = None
    try:
        store = None
        if peer.retrieve_method is RetrieveMethod.GET:
            from dicomnode.receive.ingest import InstanceStore
            from dicomnode.store.files import InstanceFiles

            index = _open_index(config)
            store = InstanceStore(InstanceFiles(config.storage.path, fsync=config.storage.fsync),
                                  index, min_free_bytes=config.storage.min_free_bytes,
                                  max_inflated_bytes=config.storage.max_inflated_bytes)
        puller = Puller(config.node.ae_title, peer, name, store=store,
                        timeout=config.node.network_timeout_seconds)
        report = puller.pull(query, on_study=show)
    except PullError as exc:
        print(f"pull: {exc}", file=sys.stderr)
        return 3
    finally:
        if index is not None:
            index.dispose()
    for problem in report.problems:
        print(f"pull: {problem}", file=sys.stderr)
    print(f"{len(report.studies)} study(ies) found, {report.instances} instance(s) retrieved "
          f"by {report.method.value}, {report.failed} failure(s)", file=sys.stderr)
    return 1 if report.failed else 0


def cmd_pseudonymize(args: argparse.Namespace) -> int:
    from dicomnode.boundary import pseudonymize_files, pseudonymizer
    from dicomnode.deid import DeidKeyError
    from dicomnode.send.scu import collect_files
    from dicomnode.store.pseudonyms import PseudonymMap

    config = _config(args)
    setup_logging(config.logging.level)
    source, target = Path(args.in_dir), Path(args.out_dir)
    if not source.is_dir():
        print(f"pseudonymize: {source} is not a folder", file=sys.stderr)
        return 2
    if target.resolve() == source.resolve() or source.resolve() in target.resolve().parents:
        print("pseudonymize: OUT_DIR must not be IN_DIR or inside it", file=sys.stderr)
        return 2
    try:
        engine = pseudonymizer(config)
    except DeidKeyError as exc:
        print(f"pseudonymize: {exc}", file=sys.stderr)
        return 2
    index = _open_index(config)
    try:
        files = list(collect_files([source], skip_hidden=True))
        report = pseudonymize_files(files, target, engine, PseudonymMap(index))
    finally:
        index.dispose()
    for path, reason in report.failed:
        print(f"{path.relative_to(source)}: {reason}", file=sys.stderr)
    print(f"{len(report.written)} instance(s) of {len(report.studies)} study(ies) pseudonymized "
          f"into {target}; {len(report.failed)} failed")
    return 1 if report.failed else 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from dicomnode.jobs.queue import jobs_report
    from dicomnode.store.queries import format_timings

    if args.queue:
        return _print_queue(args)
    report = _index_report(args, lambda index: jobs_report(index, state=args.state))
    if args.json:
        return _print_json(report)
    if not report["jobs"]:
        print("no jobs")
    for job in report["jobs"]:
        took = f"{job['seconds']:.1f} s" if job["seconds"] is not None else ""
        line = (f"job {job['id']:<5} {job['state']:<9} {job['priority']:<10} {job['rule']:<20} "
                f"{job['model']:<12} "
                f"v{job['version']:<3} study {job['study']:<5} attempts {job['attempts']:<2} "
                f"{job['trigger']:<10} {took}")
        if job["changes"]:
            line += f"\n      changed: {job['changes']}"
        if job["withdrawn_by"]:
            line += f"\n      results withdrawn by job {job['withdrawn_by']}"
        steps = format_timings(job["timings"])
        if steps:
            line += f"\n      {steps}"
        if job["error"]:
            line += f"\n      error: {job['error']}"
        print(line.rstrip())
    return 0


def _print_queue(args: argparse.Namespace) -> int:
    """``jobs --queue``: running jobs, then pending ones in claim order with their
    estimated start."""
    from dicomnode.jobs.policy import queue_report

    config = _config(args)
    report = _index_report(args, lambda index: queue_report(index, config))
    if args.json:
        return _print_json(report)
    if not report["jobs"]:
        print("no job running or waiting")
    for job in report["jobs"]:
        if job["position"] is None:
            when = f"running since {job['started_at']}"
        elif job["expected_start"] is None:
            when = "no worker on this node"
        else:
            when = f"expected {job['expected_start']} (in {job['expected_in_seconds']:.0f} s)"
        position = "" if job["position"] is None else str(job["position"])
        print(f"{position:>4} job {job['id']:<5} {job['priority']:<10} {job['rule']:<20} "
              f"{job['model']:<12} study {job['study']:<5} {when}")
    hours = report["background_hours"]
    print(f"expected starts are estimates (each model's mean run time, {report['workers']} "
          "worker(s) of this node)" + (f"; background hours {hours} "
                                      f"({'open' if report['background_open'] else 'closed'})"
                                      if hours else ""))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from dicomnode.store.audit import audit_report, format_event

    if (args.study is None) == (args.job is None):
        print("give --study UID or --job ID", file=sys.stderr)
        return 2
    try:
        report = _index_report(args, lambda index: audit_report(
            index, study_uid=args.study, job_id=args.job))
    except LookupError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if args.json:
        return _print_json(report)
    what = f"job {args.job}" if args.job is not None else f"study {report['study']}"
    print(f"{what}: {len(report['events'])} event(s)")
    for event in report["events"]:
        print(f"  {format_event(event)}")
    return 0


def _run_now(config: Config, job_id: int, *, wait_seconds: float = 3600.0) -> int:
    """Run a job now: in this process when this process claims it, else (the running node's
    workers took it first) wait for it to end. Prints the outcome."""
    import time

    from dicomnode.jobs.child import run_claimed
    from dicomnode.jobs.queue import claim, finish, renew, reset
    from dicomnode.store.leases import Heartbeat
    from dicomnode.store.tables import Job, JobState

    index = _open_index(config)
    try:
        with index.session() as session:
            if session.get(Job, job_id) is None:
                print(f"no job {job_id}", file=sys.stderr)
                return 2
        owner = f"{config.node.node_id}/cli-{os.getpid()}"
        lease = config.node.lease_seconds
        if reset(index, job_id) and claim(index, job_id, owner=owner, lease_seconds=lease):
            with Heartbeat(config.node.heartbeat_seconds, partial(
                    renew, index, [job_id], owner=owner, lease_seconds=lease),
                    name="jobs-heartbeat"):
                outcome = run_claimed(config, index, job_id)
            state = finish(index, job_id, outcome, config.pipeline.max_attempts, owner=owner)
            ok, error = outcome["ok"], outcome.get("error")
        else:
            deadline = time.monotonic() + wait_seconds
            while True:
                with index.session() as session:
                    job = session.get(Job, job_id)
                    assert job is not None
                    state, error = job.state, job.error
                if state in (JobState.DONE, JobState.FAILED) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            ok = state is JobState.DONE
        with index.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            results = list(job.results or [])
    finally:
        index.dispose()
    if ok:
        print(f"job {job_id} done: {len(results)} object(s) written")
        return 0
    print(f"job {job_id} {state.value}: {error or 'did not finish in time'}", file=sys.stderr)
    return 1


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    config = _config(args)
    setup_logging(config.logging.level)
    return _run_now(config, args.id)


def cmd_run(args: argparse.Namespace) -> int:
    from dicomnode.rules.trigger import RuleTrigger
    from dicomnode.states import JobTrigger
    from dicomnode.store.queries import study_pk

    config = _config(args)
    setup_logging(config.logging.level)
    rules = _load_rules(config)
    try:
        rule = rules.get(args.rule)
    except KeyError as exc:
        print(str(exc.args[0]), file=sys.stderr)
        return 2
    index = _open_index(config)
    try:
        found = study_pk(index, args.study)
        if found is None:
            print("no such study in the index", file=sys.stderr)
            return 2
        firings = RuleTrigger(index, rules, config.storage.path).on_study(
            found, trigger=JobTrigger.MANUAL, rules=[rule])
    finally:
        index.dispose()
    job_ids = [f.job_id for f in firings if f.job_id is not None]
    # an operator asking again re-runs the job that already fired on these inputs
    job_ids += [f.existing_job for f in firings if f.existing_job is not None]
    if not job_ids:
        reasons = "; ".join(f.reason for f in firings) or "no match"
        print(f"rule {rule.name} does not fire on study {found}: {reasons}", file=sys.stderr)
        return 1
    return max(_run_now(config, job_id) for job_id in job_ids)


def cmd_outbox(args: argparse.Namespace) -> int:
    from dicomnode.send.outbox import outbox_report

    root = _config(args).storage.path
    report = _index_report(args, lambda index: outbox_report(
        index, state=args.state, destination=args.destination, root=root))
    if args.json:
        return _print_json(report)
    for item in report["items"]:
        status = item["last_status"]
        when = (f"sent {item['sent_at']}" if item["state"] == "sent" else
                f"next {item['next_attempt_at']}" if item["next_attempt_at"] else "")
        line = (f"item {item['id']:<5} {item['state']:<8} -> {item['destination']:<12} "
                f"attempts {item['attempts']:<3} {item['sop_class_name']:<28} "
                f"{item['sop_instance_uid']}  {when}")
        if item["state"] != "sent" and (status is not None or item["last_error"]):
            code = f"0x{status:04X} " if status is not None else ""
            line += f"\n      last: {code}{item['last_error'] or ''}".rstrip()
        print(line)
    counts = report["counts"]
    print(", ".join(f"{counts[state]} {state}" for state in counts))
    return 0


def cmd_outbox_send(args: argparse.Namespace) -> int:
    from dicomnode.send.outbox import Outbox

    config = _config(args)
    setup_logging(config.logging.level)
    index = _open_index(config)
    try:
        outbox = Outbox.from_config(config, index)
        outbox.owner = f"{config.node.node_id}/cli-{os.getpid()}"  # not the node's claims
        report = outbox.deliver_due()
    finally:
        index.dispose()
    if not report.destinations:
        print("nothing due")
    for name, d in report.destinations.items():
        print(f"{name}: {d.sent} sent, {d.failed} failed, {d.retrying} to retry"
              + (f" ({d.error})" if d.error else ""))
    return 1 if report.failed or report.retrying else 0


def cmd_review(args: argparse.Namespace) -> int:
    from dicomnode.jobs.review import reviews_report

    report = _index_report(args, lambda index: {"schema": 1,
                                                "reviews": reviews_report(index)})
    if args.json:
        return _print_json(report)
    if not report["reviews"]:
        print("no results await a review")
    for r in report["reviews"]:
        held = ", ".join(f"{n} for {d}" for d, n in r["held_items"].items()) or "nothing"
        print(f"job {r['job']:<5} study {r['study']:<5} {r['rule']:<20} {r['model']:<12} "
              f"held {r['held_at']}  {', '.join(r['objects'])}; items: {held}")
    return 0


def cmd_review_decide(args: argparse.Namespace) -> int:
    from dicomnode.jobs.review import ReviewError, decide
    from dicomnode.send.outbox import Outbox

    config = _config(args)
    setup_logging(config.logging.level)
    index = _open_index(config)
    try:
        decision = decide(index, Outbox.from_config(config, index), args.id,
                          approve=args.review_command == "approve", user=args.user)
    except ReviewError as exc:
        print(f"review: {exc}", file=sys.stderr)
        return 1
    finally:
        index.dispose()
    print(f"job {decision.job_id}: results {decision.state.value} by {decision.user} "
          f"({decision.items} item(s))")
    return 0


def cmd_outbox_resend(args: argparse.Namespace) -> int:
    from dicomnode.send.outbox import Outbox, OutboxError

    config = _config(args)
    index = _open_index(config)
    code = 0
    try:
        outbox = Outbox.from_config(config, index)
        for item_id in args.ids:
            try:
                was = outbox.resend(item_id)
            except OutboxError as exc:
                print(f"resend: {exc}", file=sys.stderr)
                code = 1
                continue
            print(f"item {item_id}: pending (was {was.value})")
    finally:
        index.dispose()
    return code


def cmd_db_current(args: argparse.Namespace) -> int:
    from sqlalchemy.engine import make_url

    from dicomnode.store.db import create_index_engine
    from dicomnode.store.schema import SchemaState, SchemaStatus, head_revision, schema_status

    config = _config(args)
    url = make_url(config.db_url)
    where = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
            and not Path(str(url.database)).exists():  # not made by looking at it
        status = SchemaStatus(None, head_revision(), SchemaState.EMPTY)
    else:
        engine = create_index_engine(config.db_url)
        try:
            status = schema_status(engine)
        finally:
            engine.dispose()
    said = {
        SchemaState.EMPTY: "no index yet (created at the newest revision when first opened)",
        SchemaState.CURRENT: "up to date",
        SchemaState.OLDER: "older: run `dicomnode db upgrade`",
        SchemaState.NEWER: "newer than this dicomnode: refused",
        SchemaState.UNVERSIONED: ("made before schema migrations" + (
            "; stamped when next opened" if status.revision == status.head
            else ": run `dicomnode db upgrade`")),
    }[status.state]
    print(f"index:  {where}")
    print(f"revision: {status.revision or '-'}  (newest known: {status.head})  {said}")
    return 1 if status.state in (SchemaState.OLDER, SchemaState.NEWER) or status.needs_upgrade \
        else 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from dicomnode.store.db import create_index_engine
    from dicomnode.store.schema import SchemaState, upgrade_schema

    config = _config(args)
    setup_logging("WARNING")
    engine = create_index_engine(config.db_url)
    try:
        before, after = upgrade_schema(engine)
    finally:
        engine.dispose()
    if before.state is SchemaState.EMPTY:
        print(f"index created at revision {after.revision}")
    elif before.revision == after.revision and before.state is SchemaState.CURRENT:
        print(f"index already at the newest revision {after.revision}")
    else:
        made = " (made before schema migrations)" if before.state is SchemaState.UNVERSIONED \
            else ""
        print(f"index upgraded from revision {before.revision}{made} to {after.revision}")
    return 0


def _load_rules(config: Config) -> RuleSet:
    from dicomnode.rules.loader import load_rules

    return load_rules(config.rules_dir, peers=config.peers, models_dir=config.models_dir)


def cmd_rules_check(args: argparse.Namespace) -> int:
    config = _config(args)
    rules = _load_rules(config)
    for rule in rules.rules:
        state = "enabled" if rule.enabled else "disabled"
        when = f"schedule {rule.schedule!r}" if rule.schedule else "on arrival"
        print(f"{rule.name}: {state}, {when}, model {rule.model}, inputs "
              f"{', '.join(rule.input_names)}  ({rule.source})")
    print(f"{len(rules.rules)} rule(s) OK in {config.rules_dir}")
    return 0


def cmd_rules_test(args: argparse.Namespace) -> int:
    import tempfile

    from dicomnode.receive.folder import index_folder
    from dicomnode.rules.explain import explain_study

    config = _config(args)
    rules = _load_rules(config)
    chosen = [rules.get(args.rule)] if args.rule else list(rules.rules)
    if not chosen:
        print(f"no rules in {config.rules_dir}", file=sys.stderr)
        return 1
    if args.path:
        with tempfile.TemporaryDirectory(prefix="dicomnode-rules-") as tmp:
            index, study_pks = index_folder(Path(args.path), Path(tmp))
            try:
                for pk in study_pks:
                    print(explain_study(index, Path(tmp), pk, chosen))
            finally:
                index.dispose()
        return 0
    from dicomnode.store.queries import study_pk

    index = _open_index(config)
    try:
        found = study_pk(index, args.study)
        if found is None:
            print(f"no study {args.study} in the index", file=sys.stderr)
            return 1
        print(explain_study(index, config.storage.path, found, chosen))
    finally:
        index.dispose()
    return 0


def _packages(config: Config) -> list[Path]:
    folder = config.models_dir
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if (p / "card.yaml").is_file())


def cmd_models_list(args: argparse.Namespace) -> int:
    from dicomnode.models.card import CardError, load_card

    config = _config(args)
    packages = _packages(config)
    if not packages:
        print(f"no model packages in {config.models_dir}")
        return 0
    bad = 0
    for folder in packages:
        try:
            card = load_card(folder)
        except CardError as exc:
            bad += 1
            first = str(exc).splitlines()[0]
            print(f"{folder.name:<16} INVALID  {first}")
            continue
        inputs = ", ".join(f"{i.name} ({i.modality})" for i in card.inputs)
        labels = ", ".join(label.name for label in card.outputs.labels)
        kind = "rule-based" if card.rule_based else card.preprocessing.dimensionality
        print(f"{card.name:<16} {card.version:<8} {kind:<10} {card.status.value:<8} "
              f"inputs: {inputs}  structures: {labels}")
    return 1 if bad else 0


def _card(config: Config, model: str) -> Card | None:
    """The validated card of a package name or folder, or None after printing why not."""
    from dicomnode.models.card import CardError, load_card, package_dir

    try:
        return load_card(package_dir(config.models_dir, model))
    except CardError as exc:
        print(f"model {model}: card not valid:\n{exc}", file=sys.stderr)
        return None


def cmd_models_check(args: argparse.Namespace) -> int:
    config = _config(args)
    setup_logging("WARNING")
    card = _card(config, args.model)
    if card is None:
        return 1
    folder = card.package
    from dicomnode.inference.check import check_package
    from dicomnode.inference.runtime import configure_from

    configure_from(config)
    report = check_package(card, providers=config.inference.providers)
    for fact in report.facts:
        print(f"  {fact}")
    for problem in report.problems:
        print(f"{folder / card.file}: {problem}", file=sys.stderr)
    if report.problems:
        return 1
    print(f"model {card.name} {card.version}: ok")
    return 0


def cmd_models_export_triton(args: argparse.Namespace) -> int:
    from dicomnode.inference.triton import ExportOptions, InstanceKind, export_repository

    config = _config(args)
    setup_logging("WARNING")
    card = _card(config, args.model)
    if card is None:
        return 1
    try:
        gpus = tuple(int(g) for g in args.gpus.split(",") if g.strip())
        options = ExportOptions(
            kind=InstanceKind(args.kind), count=args.count, gpus=gpus, tensorrt=args.tensorrt,
            fp16=not args.no_fp16, max_batch_size=args.max_batch_size,
            dynamic_batching=args.dynamic_batching, prefix=args.prefix)
    except ValueError as exc:
        print(f"export-triton: {exc}", file=sys.stderr)
        return 2
    try:
        folders = export_repository(card, args.out_dir, options)
    except (OSError, ValueError) as exc:
        print(f"model {card.name}: {exc}", file=sys.stderr)
        return 1
    for folder in folders:
        print(f"{folder.name}: {folder / 'config.pbtxt'}")
    return 0


def cmd_models_import(args: argparse.Namespace) -> int:
    from dicomnode.inference.importers import importer_module

    config = _config(args)
    setup_logging(config.logging.level)
    code: int = importer_module(args.import_kind).run(args, config.models_dir)
    return code


def cmd_models_run(args: argparse.Namespace) -> int:
    from dicomnode.inference.predict import InferenceError
    from dicomnode.inference.preprocess import PreprocessingError
    from dicomnode.inference.runtime import configure_from
    from dicomnode.inference.segment import load_inputs, segment
    from dicomnode.inference.volume import VolumeError, write_nifti
    from dicomnode.outputs.source import OutputError
    from dicomnode.outputs.write import write_results
    from dicomnode.send.scu import collect_files

    config = _config(args)
    setup_logging(config.logging.level)
    card = _card(config, args.model)
    if card is None:
        return 1
    inputs: dict[str, list[Path]] = {}
    for item in args.input:
        name, sep, path = item.partition("=")
        if not sep:
            if len(card.inputs) != 1:
                print(f"model {card.name} takes inputs {', '.join(card.input_names)}: "
                      "give each as --input NAME=DIR", file=sys.stderr)
                return 2
            name, path = card.input_names[0], item
        if name in inputs:
            print(f"input {name} given twice", file=sys.stderr)
            return 2
        try:
            inputs[name] = list(collect_files([Path(path)], skip_hidden=True))
        except FileNotFoundError as exc:
            print(str(exc), file=sys.stderr)
            return 2
    configure_from(config)
    try:
        volumes = load_inputs(card, inputs)
        result = segment(card, [v.image for v in volumes], providers=config.inference.providers,
                         intra_op_threads=config.inference.intra_op_threads)
    except (InferenceError, PreprocessingError, VolumeError) as exc:
        print(f"model {card.name}: {exc}", file=sys.stderr)
        return 1
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_nifti(result.label_image(), out / "labels.nii.gz")
    extra = {
        "source_series": {
            name: {"modality": v.modality, "instances": len(set(v.sop_instance_uids))}
            for name, v in zip(card.input_names, volumes, strict=True)
        },
        "timings_seconds": {k: round(v, 4) for k, v in vars(result.timings).items()},
    }
    try:
        written = write_results(result, volumes[0], inputs[card.input_names[0]], out,
                                config.outputs, extra=extra)
    except OutputError as exc:
        print(f"model {card.name}: cannot write results: {exc}", file=sys.stderr)
        return 1
    for s in result.structures:
        print(f"{s.label.value:>3} {s.label.name:<24} {s.volume_ml:10.1f} mL "
              f"{s.voxel_count:>10} voxels")
    t = result.timings
    names = ", ".join(["labels.nii.gz", *(o.path.name for o in written.objects), "volumes.json"])
    print(f"{card.name} {card.version} on {result.provider}: {t.total:.2f} s "
          f"({t.session_run:.2f} s in the model); wrote {names} in {out}")
    return 0


def cmd_qa_export(args: argparse.Namespace) -> int:
    from dicomnode.jobs.feedback import FeedbackError, export_model
    from dicomnode.models.card import CardError

    config = _config(args)
    setup_logging(config.logging.level)
    index = _open_index(config)
    try:
        report = export_model(config, index, args.model, Path(args.out_dir))
    except (FeedbackError, CardError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    finally:
        index.dispose()
    print(f"{report.cases} image + corrected mask pair(s) of model {args.model} written; "
          f"manifest {report.manifest}" + (f"; {report.skipped} left out (logged)"
                                           if report.skipped else ""))
    return 0 if report.cases else 1


def build_parser(*, importers: bool = True) -> argparse.ArgumentParser:
    """The command line; ``importers=False`` leaves the options of ``models import``'s
    importers out (they import numpy and SimpleITK: not for ``serve``)."""
    parser = argparse.ArgumentParser(prog="dicomnode", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", type=Path, default=None,
                       help="configuration file (YAML); default: embedded defaults")
        return p

    p = add("serve", "receive DICOM instances and process them")
    p.add_argument("--upgrade-index", action="store_true",
                   help="upgrade an index made by an earlier release at start "
                   "(storage.upgrade_index); back it up first")
    p.set_defaults(func=cmd_serve)
    p = add("worker", "run jobs only (no DICOM port, no console): join the nodes that share "
            "the index (storage.database_url) and the storage root")
    p.add_argument("--upgrade-index", action="store_true",
                   help="upgrade an index made by an earlier release at start "
                   "(storage.upgrade_index); back it up first")
    p.set_defaults(func=cmd_worker)
    p = add("status", "list the nodes sharing the index: role, release, last heartbeat")
    p.add_argument("--json", action="store_true", help="stable JSON (docs/several-nodes.md)")
    p.set_defaults(func=cmd_status)
    p = add("studies", "list studies with their state and series")
    p.add_argument("--json", action="store_true", help="stable JSON (docs/studies-json.md)")
    p.add_argument("--study", help="only this StudyInstanceUID")
    p.set_defaults(func=cmd_studies)
    p = add("echo", "C-ECHO a configured peer")
    p.add_argument("peer", help="peer name from the configuration")
    p.set_defaults(func=cmd_echo)
    p = add("send", "C-STORE files and folders to a configured peer")
    p.add_argument("paths", nargs="+", help="files or folders (searched recursively)")
    p.add_argument("--to", required=True, help="peer name from the configuration")
    p.set_defaults(func=cmd_send)
    p = add("pull", "find studies at a query/retrieve peer (C-FIND) and retrieve them into "
            "the node (C-MOVE to its running SCP, or C-GET: peers.PEER.retrieve)")
    p.add_argument("--from", dest="from_peer", required=True, metavar="PEER",
                   help="peer name from the configuration (query_retrieve: true)")
    p.add_argument("--study", metavar="UID", help="StudyInstanceUID")
    p.add_argument("--accession", metavar="N", help="AccessionNumber")
    p.add_argument("--patient-id", metavar="ID", help="PatientID")
    p.add_argument("--modality", help="only series of this modality, e.g. CT")
    p.add_argument("--station", metavar="NAME", help="only series of this Station Name")
    p.add_argument("--since", metavar="DATE",
                   help="studies dated on or after: YYYY-MM-DD, or -Nd (N days before today, UTC)")
    p.add_argument("--until", metavar="DATE", help="studies dated on or before (as --since)")
    p.set_defaults(func=cmd_pull)
    p = add("pseudonymize", "write pseudonymized copies of a folder of DICOM files (PS3.15 "
            "Basic Profile, keyed UIDs) for research; the map stays in the index")
    p.add_argument("in_dir", metavar="IN_DIR", help="folder of DICOM files (searched recursively)")
    p.add_argument("out_dir", metavar="OUT_DIR",
                   help="folder for the copies: STUDY/SERIES/SOP.dcm, pseudonymous UIDs")
    p.set_defaults(func=cmd_pseudonymize)
    p = add("jobs", "list jobs with state, timings and errors; retry one")
    p.add_argument("--json", action="store_true", help="stable JSON (docs/jobs-json.md)")
    p.add_argument("--state", choices=["pending", "running", "done", "failed"],
                   help="only jobs in this state")
    p.add_argument("--queue", action="store_true",
                   help="running and waiting jobs in claim order (urgent, normal, background) "
                   "with estimated starts")
    p.set_defaults(func=cmd_jobs)
    jobs_sub = p.add_subparsers(dest="jobs_command", metavar="{retry}")
    q = jobs_sub.add_parser("retry", help="run a job again now, in this process")
    q.add_argument("id", type=int, metavar="ID", help="job id")
    q.add_argument("--config", "-c", type=Path, default=argparse.SUPPRESS)
    q.set_defaults(func=cmd_jobs_retry)
    p = add("audit", "the audit trail of a study (with its jobs) or of a job: received, "
            "completed, rules, jobs, sent, rejected, deleted (docs/audit.md)")
    p.add_argument("--study", metavar="UID", help="StudyInstanceUID")
    p.add_argument("--job", type=int, metavar="ID", help="job id")
    p.add_argument("--json", action="store_true", help="stable JSON (docs/audit.md)")
    p.set_defaults(func=cmd_audit)
    p = add("run", "run a rule on an indexed study now (a manual job)")
    p.add_argument("--rule", required=True, help="rule name")
    p.add_argument("--study", required=True, help="StudyInstanceUID")
    p.set_defaults(func=cmd_run)
    p = add("outbox", "list the result objects to send back, with state, attempts and last "
            "error; send what is due; re-send items")
    p.add_argument("--json", action="store_true", help="stable JSON (docs/outbox-json.md)")
    p.add_argument("--state", choices=["pending", "sending", "sent", "failed", "cancelled",
                                       "held", "rejected"],
                   help="only items in this state")
    p.add_argument("--destination", help="only items for this peer")
    p.set_defaults(func=cmd_outbox)
    outbox_sub = p.add_subparsers(dest="outbox_command", metavar="{send,resend}")
    # SUPPRESS: `outbox --config F send` keeps F (a subcommand default would override it)
    q = outbox_sub.add_parser("send", help="deliver the items due now, then exit")
    q.add_argument("--config", "-c", type=Path, default=argparse.SUPPRESS)
    q.set_defaults(func=cmd_outbox_send)
    q = outbox_sub.add_parser("resend", help="make items pending again, due now")
    q.add_argument("ids", nargs="+", type=int, metavar="ID", help="outbox item id")
    q.add_argument("--config", "-c", type=Path, default=argparse.SUPPRESS)
    q.set_defaults(func=cmd_outbox_resend)
    p = add("review", "results held for review (a rule's review: required): list them; "
            "approve (send) or reject (never send) a job's results, recording who")
    p.add_argument("--json", action="store_true", help="JSON: {schema, reviews}")
    p.set_defaults(func=cmd_review)
    review_sub = p.add_subparsers(dest="review_command", metavar="{approve,reject}")
    for verdict, what in (("approve", "its held results are sent"),
                          ("reject", "its held results are never sent")):
        q = review_sub.add_parser(verdict, help=f"{verdict} a job's results: {what}")
        q.add_argument("id", type=int, metavar="JOB", help="job id")
        q.add_argument("--user", required=True,
                       help="the reviewer's name, recorded with the decision")
        q.add_argument("--config", "-c", type=Path, default=argparse.SUPPRESS)
        q.set_defaults(func=cmd_review_decide)

    db = sub.add_parser("db", help="the index's schema revision: show it, upgrade it")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    p = db_sub.add_parser("current", aliases=["status"],
                          help="print the index's schema revision and the newest this "
                          "dicomnode knows (exit status 1 when they differ)")
    p.add_argument("--config", "-c", type=Path, default=None)
    p.set_defaults(func=cmd_db_current)
    p = db_sub.add_parser("upgrade", help="upgrade the index to the newest schema revision "
                          "(back it up first; stop the node meanwhile)")
    p.add_argument("--config", "-c", type=Path, default=None)
    p.set_defaults(func=cmd_db_upgrade)

    rules = sub.add_parser("rules", help="check and test routing rules")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    p = rules_sub.add_parser("check", help="validate every rule file")
    p.add_argument("--config", "-c", type=Path, default=None)
    p.set_defaults(func=cmd_rules_check)
    p = rules_sub.add_parser("test", help="explain how rules evaluate on a study or a folder")
    p.add_argument("--config", "-c", type=Path, default=None)
    p.add_argument("--rule", help="only this rule")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--study", help="an indexed StudyInstanceUID")
    target.add_argument("--path", help="a folder of DICOM files")
    p.set_defaults(func=cmd_rules_test)

    qa = sub.add_parser("qa", help="the feedback loop: clinicians' corrections of results")
    qa_sub = qa.add_subparsers(dest="qa_command", required=True)
    p = qa_sub.add_parser("export", help="write image + corrected mask pairs (NIfTI) of a "
                          "model's corrected results, with a manifest, for retraining "
                          "(pseudonymous: no identity in names or manifest)")
    p.add_argument("model", help="model name")
    p.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty folder")
    p.add_argument("--config", "-c", type=Path, default=None)
    p.set_defaults(func=cmd_qa_export)

    models = sub.add_parser("models", help="list, check and run model packages")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    p = models_sub.add_parser("list", help="list the model packages in models_dir")
    p.add_argument("--config", "-c", type=Path, default=None)
    p.set_defaults(func=cmd_models_list)
    p = models_sub.add_parser("check", help="validate a package: card, files, model shapes")
    p.add_argument("model", help="package name in models_dir, or a package folder")
    p.add_argument("--config", "-c", type=Path, default=None)
    p.set_defaults(func=cmd_models_check)
    p = models_sub.add_parser(
        "run", help="run a model on a folder holding one DICOM series per input")
    p.add_argument("model", help="package name in models_dir, or a package folder")
    p.add_argument("--input", "-i", action="append", required=True, metavar="[NAME=]DIR",
                   help="series folder; NAME=DIR per input for multi-input models")
    p.add_argument("--output", "-o", required=True, help="folder for labels.nii.gz, seg.dcm, "
                   "rtstruct.dcm (sr.dcm) and volumes.json")
    p.add_argument("--config", "-c", type=Path, default=None)
    p.set_defaults(func=cmd_models_run)
    p = models_sub.add_parser(
        "export-triton", help="write a Triton model repository for a package (one model "
        "per ONNX file: MODEL/config.pbtxt, MODEL/1/model.onnx)")
    p.add_argument("model", help="package name in models_dir, or a package folder")
    p.add_argument("out_dir", type=Path, help="the model repository (created if missing)")
    p.add_argument("--kind", choices=("gpu", "cpu"), default="gpu",
                   help="instance group kind: KIND_GPU (default) or KIND_CPU")
    p.add_argument("--count", type=int, default=1, help="instances per GPU (or on the CPU)")
    p.add_argument("--gpus", default="", help="comma-separated GPU ids (default: all)")
    p.add_argument("--tensorrt", action="store_true",
                   help="run through TensorRT (fp16 where the card's runtime.fp16 allows)")
    p.add_argument("--no-fp16", action="store_true", help="keep TensorRT in float32")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="override the batch size derived from the card")
    p.add_argument("--dynamic-batching", action="store_true",
                   help="let Triton gather several workers' requests into one batch")
    p.add_argument("--prefix", default="", help="prepended to the model names "
                   "(inference.triton.model_prefix)")
    p.add_argument("--config", "-c", type=Path, default=None)
    p.set_defaults(func=cmd_models_export_triton)
    from dicomnode.inference.importers import IMPORTERS, importer_module

    p = models_sub.add_parser(
        "import", help="make a package from a trained model (needs dicomnode[import])")
    kinds = p.add_subparsers(dest="import_kind", required=True)
    for kind in IMPORTERS:
        q = kinds.add_parser(kind, help=f"import a {kind} model")
        q.add_argument("folder", type=Path, help="the trained model's folder")
        q.add_argument("--name", required=True, help="the package name in models_dir")
        q.add_argument("--config", "-c", type=Path, default=None)
        if importers:
            importer_module(kind).add_arguments(q)
        q.set_defaults(func=cmd_models_import)
    return parser


def _relative_dates(words: list[str]) -> list[str]:
    """``--since -1d`` as ``--since=-1d`` (argparse takes ``-1d`` for an option)."""
    out: list[str] = []
    for word in words:
        if out and out[-1] in ("--since", "--until") and re.fullmatch(r"-\d+d", word):
            out[-1] = f"{out[-1]}={word}"
        else:
            out.append(word)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    words = _relative_dates(list(sys.argv[1:] if argv is None else argv))
    args = build_parser(importers="import" in words).parse_args(words)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    except RuleFileError as exc:
        print(f"rule error:\n{exc}", file=sys.stderr)
        return 2
    except IndexSchemaError as exc:
        print(f"index error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
