"""The running node: configuration, store, index, SCP, outbox and the scheduler, wired together.

Data flows one way: net -> store -> completion (and, in later stages,
rules -> pipeline -> outputs) -> outbox.

A node has a role (:class:`~dicomnode.states.NodeRole`): ``serve`` receives, completes
studies, fires rules, runs jobs (unless ``pipeline.workers`` is 0) and sends; ``worker``
only claims and runs jobs (no SCP, no console, no outbox), so that a GPU machine joins a
site without a DICOM port. Several nodes may share one index (PostgreSQL) and one storage
root: each says it is alive in the ``node`` table every ``node.heartbeat_seconds`` and takes
over the claims of nodes whose leases ended (:mod:`dicomnode.store.leases`).
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.background import BackgroundScheduler

from dicomnode.completion import AssociationActivity, CompletionMonitor
from dicomnode.config import Config
from dicomnode.jobs.feedbackqueue import discover
from dicomnode.jobs.queue import reset
from dicomnode.jobs.runner import JobRunner
from dicomnode.net.access import AccessPolicy
from dicomnode.receive.ingest import InstanceStore
from dicomnode.receive.processes import ReceiverProcesses
from dicomnode.receive.pull import Puller
from dicomnode.receive.recovery import recover_orphans
from dicomnode.receive.scp import StorageSCP
from dicomnode.rules.loader import RuleSet, rule_source
from dicomnode.rules.trigger import Firing, RuleTrigger
from dicomnode.scheduler import install_scheduled_jobs, install_scheduled_pulls
from dicomnode.send.notify import Notifier
from dicomnode.send.outbox import Outbox, relative_outbox_paths
from dicomnode.states import JobTrigger, NodeRole
from dicomnode.store.db import Index, open_index
from dicomnode.store.files import InstanceFiles
from dicomnode.store.leases import beat_node, register_node, stop_node
from dicomnode.web.metrics import RefusalCounter, metrics_text

if TYPE_CHECKING:
    from dicomnode.web.server import ConsoleServer

__all__ = ["Node"]

LOG = logging.getLogger(__name__)

#: How often (s) the node looks for changed rule files and model cards between uses.
RULES_CHECK_SECONDS = 2.0

#: The feedback check looks at every received instance (not only new ones) once in so many.
FEEDBACK_FULL_SCAN = 30


def _waits(rules: RuleSet) -> list[float]:
    """The rules' own quiet times, and when they act on incomplete studies (s)."""
    return [w for r in rules.enabled if r.schedule is None for w in (
        r.wait_seconds,
        r.when_incomplete.after_seconds if r.when_incomplete is not None else None)
        if w is not None]


class Node:
    """One dicomnode process. ``start()`` returns once the SCP listens (a ``worker``: once
    its job runner runs); ``stop()`` is graceful."""

    def __init__(self, config: Config, role: NodeRole = NodeRole.SERVE) -> None:
        self.config = config
        self.role = role
        self.node_id = config.node.node_id
        self.files = InstanceFiles(config.storage.path, fsync=config.storage.fsync,
                                   node_id=config.node.id)
        self.index: Index = open_index(config.db_url, upgrade=config.storage.upgrade_index)
        self.store = InstanceStore(self.files, self.index,
                                   min_free_bytes=config.storage.min_free_bytes,
                                   max_inflated_bytes=config.storage.max_inflated_bytes)
        # parsed once, again when a rule file or card changes; invalid at start: not started
        self.rule_source = rule_source(config.rules_dir, peers=config.peers,
                                       models_dir=config.models_dir)
        self.rules = self.rule_source.load()
        self._rules_lock = threading.Lock()
        self.trigger = RuleTrigger(self.index, self.rules, config.storage.path,
                                   quiet_seconds=config.completion.quiet_seconds)
        # an association that delivered and closed may have completed a series: check now
        self.activity = AssociationActivity(on_closed=[self._check_completion_now],
                                            index=self.index)
        self.completion = CompletionMonitor(
            self.index, self.activity,
            quiet_seconds=config.completion.quiet_seconds,
            series_quiet_seconds=config.completion.series_quiet_seconds,
            listeners=[self._on_study_complete],
            settled_listeners=[self._on_series_settled],
            # rules' own quiet times, and when they act on incomplete studies
            waits=_waits(self.rules),
            wait_listeners=[self._on_study_waited])
        self.refused = RefusalCounter()
        self.scp = StorageSCP(config.node, self.store,
                              AccessPolicy(config.node.ae_title, config.peers), self.activity,
                              on_refused=self.refused.increment)
        # node.receive_processes > 1: receiver processes share the port (one GIL each)
        self.receivers = (ReceiverProcesses(config, self.activity, self.refused.increment)
                          if config.node.receive_processes > 1 else None)
        self.outbox = Outbox.from_config(config, self.index)
        # results go out as soon as a job has queued them, not at the outbox's next tick
        # (a worker node leaves them to the serving nodes' outboxes, unless told to send)
        self.sends = role is NodeRole.SERVE or config.node.worker_sends_results
        self.jobs = JobRunner(config, self.index, on_done=(
            self.outbox.start_due if self.sends else None))
        # messages queued with the transitions they tell of, sent by the scheduler
        self.notifier = Notifier(config, self.index) if config.notify.targets else None
        self.console: ConsoleServer | None = None
        # the web stack (uvicorn, FastAPI) only when it is on, never on a worker
        if config.web.enabled and role is NodeRole.SERVE:
            from dicomnode.web.server import ConsoleServer

            self.console = ConsoleServer(
                config, self.index, self.outbox, self.rules,
                partial(metrics_text, self.index, refused=self.refused,
                        storage_path=config.storage.path), run_now=self.run_now,
                store=self.store, activity=self.activity,  # STOW-RS: ingest, completion
                providers=self.jobs.providers)  # the queue's estimates: per-model limits
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self._feedback_after = 0  # the newest instance the feedback check looked at
        self._feedback_ticks = 0
        self._stopped = threading.Event()
        self._stop_requested = threading.Event()

    def _check_completion_now(self) -> None:
        """Run the completion check at once, in the scheduler's thread (not the caller's)."""
        try:
            self.scheduler.modify_job("completion", next_run_time=dt.datetime.now(dt.timezone.utc))
        except (JobLookupError, SchedulerNotRunningError):  # stopping: nothing to check
            pass

    def fresh_rules(self) -> RuleSet:
        """The rules now: reloaded when a rule file or model card changed; when an edit made
        them invalid, the rules loaded last (the error is logged once)."""
        rules = self.rule_source.current()
        with self._rules_lock:
            if rules is not self.rules:
                self._use_rules(rules)
        return rules

    def _check_rules(self) -> None:
        try:
            self.fresh_rules()
        except Exception as exc:  # logged; the rules in use stay
            LOG.error("rules not checked: %s", type(exc).__name__)

    def _use_rules(self, rules: RuleSet) -> None:
        old, self.rules = self.rules, rules
        self.trigger.rules = rules
        self.completion.waits = [dt.timedelta(seconds=w) for w in sorted(set(_waits(rules)))]
        if self.console is not None:
            self.console.rules = rules
        scheduled = {r.name: r for r in rules.enabled if r.schedule is not None}
        if scheduled != {r.name: r for r in old.enabled if r.schedule is not None} \
                and self.scheduler.running and self.role is NodeRole.SERVE:
            for job in self.scheduler.get_jobs():
                if job.id.startswith("rule:") and job.id.removeprefix("rule:") not in scheduled:
                    job.remove()
            install_scheduled_jobs(self)

    def _on_study_complete(self, study_pk: int) -> None:
        self.fresh_rules()
        self._dispatch_new(self.trigger.on_study(study_pk, trigger=JobTrigger.COMPLETE))

    def _on_series_settled(self, study_pk: int) -> None:
        self.fresh_rules()
        self._dispatch_new(self.trigger.on_study(study_pk, trigger=JobTrigger.SETTLED))

    def _on_study_waited(self, study_pk: int, seconds: float) -> None:
        """The study has been quiet for ``seconds``: some rule's wait or incomplete time."""
        arriving = [r for r in self.fresh_rules().enabled if r.schedule is None]
        firings = self.trigger.on_study(
            study_pk, trigger=JobTrigger.QUIET, quiet_for=seconds,
            rules=[r for r in arriving if r.wait_seconds == seconds])
        firings += self.trigger.on_incomplete(study_pk, [
            r for r in arriving
            if r.when_incomplete is not None and r.when_incomplete.after_seconds == seconds])
        self._dispatch_new(firings)

    def run_now(self, study_pk: int, rule_name: str) -> list[Firing]:
        """An operator's "run now" (force completion): settle the study's series and fire the
        rule without waiting for quiet times; a job that already ran on the same input runs
        again as the same version (same UIDs)."""
        rule = self.fresh_rules().get(rule_name)
        self.completion.settle_study(study_pk)
        firings = self.trigger.on_study(study_pk, trigger=JobTrigger.MANUAL, rules=[rule])
        for f in firings:
            if f.existing_job is not None:
                reset(self.index, f.existing_job)
        self.jobs.dispatch()
        return firings

    def _check_feedback(self) -> None:
        """Queue received RTSTRUCT/SEG objects of contoured studies and hand them to free
        workers (the comparison itself runs in a worker process)."""
        # new instances only, and every FEEDBACK_FULL_SCAN-th time all of them (an object
        # received before its study's job had finished)
        self._feedback_ticks += 1
        after = 0 if self._feedback_ticks % FEEDBACK_FULL_SCAN == 1 else self._feedback_after
        try:
            _added, self._feedback_after = discover(self.index, after=after)
            self.jobs.dispatch_feedback()
        except Exception as exc:  # the next tick tries again
            LOG.warning("feedback not checked: %s", type(exc).__name__)

    def puller(self, peer_name: str) -> Puller:
        """Pulls from a query/retrieve peer into this node: C-MOVE to its SCP, or C-GET
        stored through its store (and counted as an open association delivering)."""
        return Puller(self.config.node.ae_title, self.config.peers[peer_name], peer_name,
                      store=self.store, receive=self.scp.receive, activity=self.activity,
                      timeout=self.config.node.network_timeout_seconds)

    def _dispatch_new(self, firings: list[Firing]) -> None:
        # a job a rule just created starts now, not at the dispatcher's next tick
        if any(f.job_id is not None for f in firings):
            self.jobs.dispatch()

    def start(self) -> None:
        serving = self.role is NodeRole.SERVE
        register_node(self.index, self.node_id, self.role)
        removed = self.files.clean_tmp()
        if removed:
            LOG.info("removed %d partial file(s) left by an interrupted transfer", removed)
        if serving:
            recovered = recover_orphans(self.files, self.store)
            if recovered:
                LOG.info("indexed %d stored file(s) whose index row was lost in a crash",
                         recovered)
            relative_outbox_paths(self.index, self.config.storage.path)
        if self.sends:
            self.outbox.recover()
        self.jobs.recover(at_start=True)
        # say it is alive; take over the jobs of nodes whose leases ended
        self.scheduler.add_job(self._heartbeat, "interval",
                               seconds=self.config.node.heartbeat_seconds,
                               id="heartbeat", max_instances=1, coalesce=True)
        if serving:
            self.scheduler.add_job(self.completion.check, "interval",
                                   seconds=self.config.completion.check_interval_seconds,
                                   id="completion", max_instances=1, coalesce=True)
        if self.config.pipeline.workers:
            # models run in worker processes, never in the SCP's threads
            self.scheduler.add_job(self.jobs.dispatch, "interval",
                                   seconds=self.config.pipeline.check_interval_seconds,
                                   id="jobs", max_instances=1, coalesce=True)
        if self.sends:
            # each due destination is delivered in its own thread: a slow one delays no other
            self.scheduler.add_job(self.outbox.start_due, "interval",
                                   seconds=self.config.outbox.check_interval_seconds,
                                   id="outbox", max_instances=1, coalesce=True)
        # a changed rule file or card is picked up at its next use, or by this check
        self.scheduler.add_job(self._check_rules, "interval", seconds=RULES_CHECK_SECONDS,
                               id="rules", max_instances=1, coalesce=True)
        if self.config.feedback.enabled and self.config.pipeline.workers:
            # edited RTSTRUCT/SEG: compared in the workers
            self.scheduler.add_job(self._check_feedback, "interval",
                                   seconds=self.config.feedback.check_interval_seconds,
                                   id="feedback", max_instances=1, coalesce=True)
        if serving:
            install_scheduled_jobs(self)  # scheduled rules (cron) and retention
        if self.notifier is not None and serving:
            self.notifier.install()
            self.scheduler.add_job(self.notifier.tick, "interval",
                                   seconds=self.config.notify.check_interval_seconds,
                                   id="notify", max_instances=1, coalesce=True,
                                   next_run_time=dt.datetime.now(dt.timezone.utc))
        if self.console is not None:
            self.console.bind()  # first: a port in use stops the start before any listening
        self.scheduler.start()
        if serving:
            if self.receivers is not None:
                self.receivers.start()
            else:
                self.scp.start()
            # after the SCP listens: pulled instances arrive there (C-MOVE) or use its
            # spool (C-GET)
            install_scheduled_pulls(self.scheduler, self.config, self.index, self.puller)
        if self.console is not None:
            self.console.serve()  # after the SCP listens: building it delays no C-STORE
        if self.rules.enabled:
            self.jobs.start()  # worker processes spawn and load the rules' models meanwhile
        LOG.info("node %s started as %s", self.node_id, self.role.value)

    def _heartbeat(self) -> None:
        """Say this node is alive, and take over the jobs whose leases ended (their node is
        gone); lapsed outbox claims are due again by themselves."""
        try:
            beat_node(self.index, self.node_id)
            if self.config.pipeline.workers:
                self.jobs.recover()
        except Exception as exc:  # the index unreachable for a moment: the next beat
            LOG.warning("heartbeat failed: %s", type(exc).__name__)

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        LOG.info("stopping")
        if self.console is not None:
            self.console.stop()
        if self.receivers is not None:
            self.receivers.stop(self.config.node.shutdown_grace_seconds)
        self.scp.stop(self.config.node.shutdown_grace_seconds)
        self.scheduler.shutdown(wait=True)
        self.jobs.stop()
        self.outbox.stop(self.config.node.shutdown_grace_seconds)
        if self.notifier is not None:
            self.notifier.uninstall()
        self.files.clean_tmp()
        try:
            stop_node(self.index, self.node_id)
        except Exception as exc:  # the index gone: the node table shows the last heartbeat
            LOG.warning("stop not recorded in the node table: %s", type(exc).__name__)
        self.index.dispose()
        LOG.info("stopped")

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            LOG.info("received %s", signal.Signals(signum).name)
            self._stop_requested.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        try:
            while not self._stop_requested.wait(1.0):
                pass
        finally:
            self.stop()
