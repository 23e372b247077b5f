"""Typed configuration, loaded from YAML with precise error messages.

Every key is documented in ``config.example.yaml``. Relative paths in the file
(``storage.path``, ``rules_dir``, ``models_dir``) are resolved against the
directory holding the configuration file, so a configuration can be moved
together with its data.
"""

from __future__ import annotations

import datetime as dt
import re
import socket
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "CompletionConfig",
    "Config",
    "ConfigError",
    "DeidConfig",
    "DeidOption",
    "DicomwebAuthConfig",
    "DicomwebConfig",
    "FeedbackConfig",
    "InferenceBackend",
    "InferenceConfig",
    "NodeConfig",
    "NotifyConfig",
    "NotifyEvent",
    "NotifyTargetConfig",
    "OutboxConfig",
    "OutputsConfig",
    "PeerConfig",
    "PeerTlsConfig",
    "PipelineConfig",
    "PullConfig",
    "RetentionConfig",
    "RetrieveMethod",
    "StorageConfig",
    "TlsConfig",
    "TritonConfig",
    "TritonProtocol",
    "WebConfig",
    "background_window",
    "format_validation_errors",
    "load_config",
    "parse_date_bound",
    "read_yaml_mapping",
]

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no controls


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(value) or len(value) > 16:
        raise ValueError(
            f"{value!r} is not a valid AE title: 1 to 16 printable ASCII characters, "
            "no backslash, not only spaces"
        )
    return stripped


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeidOption(str, Enum):
    """A PS3.15 Table E.1-1 option that extends the Basic Profile (see docs/pseudonymization.md)."""

    RETAIN_LONGITUDINAL_TEMPORAL_MODIFIED_DATES = "retain_longitudinal_temporal_modified_dates"
    RETAIN_PATIENT_CHARACTERISTICS = "retain_patient_characteristics"
    CLEAN_DESCRIPTORS = "clean_descriptors"
    RETAIN_DEVICE_IDENTITY = "retain_device_identity"


def _fix(base: Path, path: Path | None) -> Path | None:
    return None if path is None or path.is_absolute() else (base / path).resolve()


class TlsConfig(_Section):
    """DICOM TLS (PS3.15 Annex B.1) of the node's SCP: its certificate and whom it trusts.

    ``certificate`` and ``private_key`` are PEM files (the certificate may hold its chain);
    ``ca_bundle`` holds the PEM certificates of the CAs whose client certificates are
    accepted, and is needed when ``require_client_certificate`` is set.
    """

    certificate: Path
    private_key: Path
    ca_bundle: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _ca_for_clients(self) -> TlsConfig:
        if self.require_client_certificate and self.ca_bundle is None:
            raise ValueError("require_client_certificate: true needs ca_bundle (the CAs whose "
                             "client certificates are accepted)")
        return self

    def resolved(self, base: Path) -> TlsConfig:
        return self.model_copy(update={
            "certificate": _fix(base, self.certificate) or self.certificate,
            "private_key": _fix(base, self.private_key) or self.private_key,
            "ca_bundle": _fix(base, self.ca_bundle) or self.ca_bundle})


class PeerTlsConfig(_Section):
    """DICOM TLS towards one peer (outbox, ``echo``, ``send``).

    The peer's certificate is verified against ``ca_bundle`` (default: the system's trust
    store) and ``server_hostname`` (default: the peer's ``host``); ``certificate`` and
    ``private_key`` (PEM) are the node's client certificate, for peers that require one.
    """

    ca_bundle: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    server_hostname: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> PeerTlsConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together (the node's client "
                             "certificate and its key)")
        return self

    def resolved(self, base: Path) -> PeerTlsConfig:
        return self.model_copy(update={
            "certificate": _fix(base, self.certificate) or self.certificate,
            "private_key": _fix(base, self.private_key) or self.private_key,
            "ca_bundle": _fix(base, self.ca_bundle) or self.ca_bundle})


class NodeConfig(_Section):
    """The node's own DICOM identity and listening socket."""

    ae_title: AETitle = "DICOMNODE"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    maximum_associations: int = Field(16, ge=1, le=1000)
    maximum_pdu_size: int = Field(
        1_048_576, ge=0, description="bytes; 0 means unlimited"
    )
    network_timeout_seconds: float = Field(60.0, gt=0)
    shutdown_grace_seconds: float = Field(
        10.0, ge=0, description="seconds in-flight associations get to finish on SIGTERM"
    )
    tls: TlsConfig | None = Field(None, description="DICOM TLS for the SCP (null: plain TCP)")
    association_request_timeout_seconds: float = Field(
        5.0, gt=0, le=300,
        description="seconds from connecting until the association is accepted, in all")
    maximum_associations_per_address: int = Field(
        8, ge=1, le=1000, description="concurrent associations from one source address")
    maximum_pending_connections: int = Field(
        64, ge=1, le=1000, description="connections not (yet) associated, in all")
    maximum_pending_connections_per_address: int = Field(
        8, ge=1, le=1000, description="connections not (yet) associated, per source address")
    receive_processes: int = Field(
        1, ge=1, le=64,
        description="processes receiving associations: 1 receives in the node's process; "
                    "N > 1 starts N receiver processes sharing the port, the store and the "
                    "index (one GIL per association; see dicomnode.receive.processes)")
    worker_sends_results: bool = Field(
        False, description="a `dicomnode worker` node also delivers results from the shared "
        "outbox (claims with leases, as serving nodes do): its own results go out at once "
        "from the machine that made them; it then needs to reach the destinations")

    id: str | None = Field(
        None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$",
        description="this node's name among the nodes sharing the index (owner of its claims; "
        "null: the host name); unique per running process")
    lease_seconds: float = Field(
        60.0, ge=1, le=86400, description="a claim (running job, item being sent) a node "
        "stops renewing is taken over by another node this many seconds later")
    heartbeat_seconds: float = Field(
        10.0, gt=0, le=3600, description="how often a node renews its claims and says it is "
        "alive (dicomnode status); less than half of lease_seconds")

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> NodeConfig:
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds:g}) must be at most half of "
                f"lease_seconds ({self.lease_seconds:g}): a claim would lapse between renewals")
        return self

    @property
    def node_id(self) -> str:
        """``id``, or the host name when none is set."""
        return self.id or socket.gethostname()


class DicomwebAuthConfig(_Section):
    """A DICOMweb credential: a bearer token (``token_file``), or HTTP Basic (``user`` and
    ``password_file``). The secrets are read from the files (their first line), never
    from this configuration; a file is read when the credential is used, so it can be
    replaced without a restart."""

    token_file: Path | None = None
    user: str | None = Field(None, min_length=1, max_length=128)
    password_file: Path | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> DicomwebAuthConfig:
        basic = self.user is not None or self.password_file is not None
        if self.token_file is not None and basic:
            raise ValueError("give token_file (a bearer token) or user and password_file "
                             "(HTTP Basic), not both")
        if basic and (self.user is None or self.password_file is None):
            raise ValueError("HTTP Basic needs both user and password_file")
        if self.token_file is None and not basic:
            raise ValueError("give token_file (a bearer token) or user and password_file "
                             "(HTTP Basic)")
        if self.user is not None and ":" in self.user:
            raise ValueError("an HTTP Basic user name has no ':'")
        return self

    def resolved(self, base: Path) -> DicomwebAuthConfig:
        return self.model_copy(update={
            "token_file": _fix(base, self.token_file) or self.token_file,
            "password_file": _fix(base, self.password_file) or self.password_file})


_HTTP_URL = re.compile(r"^https?://[^/\s?#]+(/[^\s?#]*)?$")


class DicomwebConfig(_Section):
    """DICOMweb (PS3.18) with one peer (``peers.NAME.dicomweb``).

    ``url`` is the peer's DICOMweb base URL (its STOW-RS service is ``url/studies``): with
    it, the peer is a destination whose results go by STOW-RS (instead of C-STORE), with
    ``auth`` as the node's credential there and ``ca_bundle`` verifying an https peer.
    ``receive_auth`` is the credential the peer presents when it stores to the node
    (``POST /dicomweb/studies``); without it the peer cannot send to the node by STOW-RS.
    """

    url: str | None = Field(None, description="base URL, e.g. https://pacs/dicom-web")
    auth: DicomwebAuthConfig | None = Field(
        None, description="the node's credential at url (null: none)")
    receive_auth: DicomwebAuthConfig | None = Field(
        None, description="the credential this peer presents to the node's STOW-RS")
    ca_bundle: Path | None = Field(
        None, description="PEM CAs that sign an https peer's certificate (null: system store)")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not _HTTP_URL.match(v):
            raise ValueError(f"{v!r} is not an http or https URL (no query, no fragment)")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _something(self) -> DicomwebConfig:
        if self.url is None and self.receive_auth is None:
            raise ValueError("give url (send results to the peer by STOW-RS), receive_auth "
                             "(accept STOW-RS from the peer), or both")
        if self.url is None and (self.auth is not None or self.ca_bundle is not None):
            raise ValueError("auth and ca_bundle apply to url (sending to the peer)")
        return self

    def resolved(self, base: Path) -> DicomwebConfig:
        return self.model_copy(update={
            "auth": None if self.auth is None else self.auth.resolved(base),
            "receive_auth": None if self.receive_auth is None
            else self.receive_auth.resolved(base),
            "ca_bundle": _fix(base, self.ca_bundle) or self.ca_bundle})


class RetrieveMethod(str, Enum):
    """How a query/retrieve peer hands over what was found (``peers.NAME.retrieve``)."""

    MOVE = "move"  # C-MOVE to the node's own AE title: the peer sends to the node's SCP
    GET = "get"  # C-GET: the peer sends back on the pulling association


class PeerConfig(_Section):
    """A DICOM application entity the node talks to (or accepts associations from)."""

    ae_title: AETitle
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    pseudonymize: bool = Field(
        False, description="a research destination: what is sent to it carries no identity")
    research: bool = Field(
        False, description="a research destination: it may receive the results of models "
        "that are not clinical (card status research or qa); a pseudonymize: true peer is "
        "one too. false (and pseudonymize false): a clinical peer, only clinical models' "
        "results go to it")
    deid_options: list[DeidOption] | None = Field(
        None, description="PS3.15 options for this research peer (null: deid.options)")
    tls: PeerTlsConfig | None = Field(None, description="DICOM TLS to this peer (null: plain)")
    query_retrieve: bool = Field(
        False, description="a Study Root Query/Retrieve SCP the node may pull from "
        "(`dicomnode pull`, pulls:)")
    retrieve: RetrieveMethod | None = Field(
        None, description="move (default): C-MOVE to the node's AE title, which the peer "
        "must know as a move destination; get: C-GET on the pulling association")
    dicomweb: DicomwebConfig | None = Field(
        None, description="DICOMweb with this peer: results by STOW-RS to its url, and "
        "its credential for the node's STOW-RS (docs/dicomweb.md)")

    @model_validator(mode="after")
    def _options_for_research(self) -> PeerConfig:
        if self.deid_options is not None and not self.pseudonymize:
            raise ValueError("deid_options applies to research peers only (pseudonymize: true)")
        if self.retrieve is not None and not self.query_retrieve:
            raise ValueError("retrieve applies to query/retrieve peers only "
                             "(query_retrieve: true)")
        if self.query_retrieve and (self.host is None or self.port is None):
            raise ValueError("query_retrieve: true needs the peer's host and port")
        return self

    @property
    def is_research(self) -> bool:
        """Whether results of models that are not clinical may go to this peer:
        ``research: true``, or ``pseudonymize: true`` (a pseudonymized peer is a research
        peer)."""
        return self.research or self.pseudonymize

    @property
    def stow_url(self) -> str | None:
        """The peer's DICOMweb base URL when its results go by STOW-RS, else None."""
        return None if self.dicomweb is None else self.dicomweb.url

    @property
    def retrieve_method(self) -> RetrieveMethod:
        """How studies found at this peer are retrieved (``move`` unless configured)."""
        return self.retrieve or RetrieveMethod.MOVE


_RELATIVE_DATE = re.compile(r"^([+-]?)(\d{1,4})d$")
_ABSOLUTE_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")


def parse_date_bound(value: str) -> int | dt.date:
    """A pull's date bound: ``-Nd`` (N days before the day of the run, ``0d`` that day;
    returned as the signed day offset) or a calendar date ``YYYY-MM-DD`` / ``YYYYMMDD``.

    Raises:
        ValueError: naming the accepted forms.
    """
    text = value.strip()
    relative = _RELATIVE_DATE.match(text)
    if relative is not None:
        days = int(relative.group(2))
        return -days if relative.group(1) == "-" else days
    absolute = _ABSOLUTE_DATE.match(text)
    if absolute is not None:
        try:
            return dt.date(*(int(g) for g in absolute.groups()))
        except ValueError:
            pass
    raise ValueError(f"{value!r} is not a date: use -Nd (N days before the day of the run, "
                     "0d for that day) or YYYY-MM-DD")


def _check_date_bound(value: str) -> str:
    parse_date_bound(value)
    return value.strip()


DateBound = Annotated[str, AfterValidator(_check_date_bound)]
_PULL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CODE_STRING = re.compile(r"^[A-Z0-9 _]{1,16}$")


def _check_cron(value: str) -> str:
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(value, timezone="UTC")
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a crontab line (minute hour day month weekday, "
                         f"UTC): {exc}") from None
    return value


class PullConfig(_Section):
    """A scheduled pull (``pulls.NAME``): at each time of ``schedule`` (a crontab line, in UTC)
    the studies matching the filters are found at ``peer`` (C-FIND) and retrieved (C-MOVE or
    C-GET, ``peers.PEER.retrieve``); they are received like pushed studies.

    ``since`` and ``until`` are dates: ``-Nd`` counts days back from the day (UTC) the run
    was due, so ``since: -1d, until: -1d`` is the day before; or a calendar date
    ``YYYY-MM-DD``. ``modality`` and ``station`` are matched per series (only the matching
    series are retrieved).
    """

    schedule: Annotated[str, AfterValidator(_check_cron)]
    peer: str = Field(min_length=1)
    since: DateBound | None = None
    until: DateBound | None = None
    modality: str | None = Field(None, description="a series' Modality, e.g. CT")
    station: str | None = Field(None, min_length=1, max_length=16,
                                description="a series' Station Name")
    accession: str | None = Field(None, min_length=1, max_length=16)
    patient_id: str | None = Field(None, min_length=1, max_length=64)
    enabled: bool = True

    @field_validator("modality")
    @classmethod
    def _modality(cls, v: str | None) -> str | None:
        if v is not None and not _CODE_STRING.match(v):
            raise ValueError(f"{v!r} is not a modality (a DICOM code string such as CT, MR)")
        return v

    @model_validator(mode="after")
    def _some_filter(self) -> PullConfig:
        if self.since is None and self.accession is None and self.patient_id is None:
            raise ValueError("a scheduled pull needs since (e.g. -1d), accession or patient_id: "
                             "it would otherwise pull the whole archive at every run")
        return self


class StorageConfig(_Section):
    """Where received instances and the index live."""

    path: Path = Path("var")
    database_url: str | None = None
    min_free_bytes: int = Field(1_073_741_824, ge=0)
    max_inflated_bytes: int = Field(
        1_073_741_824, ge=1,
        description="bytes; a deflated dataset inflating to more is refused (0xC007)")
    fsync: bool = True
    upgrade_index: bool = Field(
        False, description="upgrade an index made by an earlier release to this release's "
        "schema revision when it is opened (else it is refused: `dicomnode db upgrade`)")


class CompletionConfig(_Section):
    """When a study counts as complete."""

    quiet_seconds: float = Field(
        5.0, ge=0, description="a study with no new instance for this long is complete")
    series_quiet_seconds: float = Field(
        10.0, ge=0, description="a series with no new instance for this long has settled "
        "(one that reaches the size its instances state settles at once)")
    check_interval_seconds: float = Field(0.5, gt=0, le=60)


class OutboxConfig(_Section):
    """How result objects are sent back: retry policy and timeouts of the outbox.

    A transient failure (peer down, association rejected or aborted, no response,
    status 0xA7xx) is retried after ``retry_initial_seconds``, doubling per attempt up
    to ``retry_max_seconds``; after ``max_attempts`` attempts the item is failed.
    """

    retry_initial_seconds: float = Field(10.0, gt=0)
    retry_max_seconds: float = Field(3600.0, gt=0)
    max_attempts: int = Field(72, ge=1, le=1_000_000)
    check_interval_seconds: float = Field(5.0, gt=0, le=3600)
    timeout_seconds: float = Field(
        30.0, gt=0, description="connection, ACSE, DIMSE and network timeouts of one association")

    @model_validator(mode="after")
    def _retry_bounds(self) -> OutboxConfig:
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ValueError(
                f"retry_max_seconds ({self.retry_max_seconds:g}) must not be less than "
                f"retry_initial_seconds ({self.retry_initial_seconds:g})")
        return self


class NotifyEvent(str, Enum):
    """What a notification target may ask to be told of (``notify.targets.NAME.events``)."""

    JOB_FAILED = "job_failed"  # a job failed for good (no attempt left, or a permanent error)
    DELIVERY_FAILED = "delivery_failed"  # an outbox item failed for good (per job and peer)
    RESULTS_SENT = "results_sent"  # every result object of a job was delivered
    DAILY_SUMMARY = "daily_summary"  # counts of the day, at ``summary_at`` (UTC)


#: The fields a notification's template may use, per event (``$field``); every event also
#: has ``node`` (the node's AE title), ``event``, ``target`` and ``time`` (UTC, ISO 8601).
#: Keys and counts only: the index key of a study, never its UID.
NOTIFY_FIELDS: dict[NotifyEvent, frozenset[str]] = {
    NotifyEvent.JOB_FAILED: frozenset({
        "job", "rule", "model", "model_version", "digest", "study", "attempts", "error"}),
    NotifyEvent.DELIVERY_FAILED: frozenset({
        "job", "rule", "model", "study", "peer", "item", "status", "attempts"}),
    NotifyEvent.RESULTS_SENT: frozenset({
        "job", "rule", "model", "model_version", "study", "peers", "objects"}),
    NotifyEvent.DAILY_SUMMARY: frozenset({
        "date", "studies_received", "studies_completed", "jobs_finished", "jobs_failed",
        "items_sent", "items_failed", "instances_deleted"}),
}
NOTIFY_COMMON_FIELDS = frozenset({"node", "event", "target", "time"})
#: Fields that identify the patient: allowed only for a target with ``identity: true``
#: (a clinical channel), and only in the events about a study's job.
NOTIFY_IDENTITY_FIELDS = frozenset({"study_uid", "accession_number", "patient_id",
                                    "patient_name"})

_TEMPLATE_FIELD = re.compile(r"\$(?:(\$)|([_a-z][_a-z0-9]*)|\{([_a-z][_a-z0-9]*)\}|())",
                             re.IGNORECASE)


def template_fields(text: str) -> list[str]:
    """The ``$field``/``${field}`` names of a ``string.Template`` text.

    Raises:
        ValueError: a ``$`` that starts no field (write ``$$`` for a dollar sign).
    """
    names = []
    for match in _TEMPLATE_FIELD.finditer(text):
        if match.group(4) is not None:
            raise ValueError(f"a '$' at character {match.start() + 1} starts no field "
                             "(write $$ for a dollar sign)")
        name = match.group(2) or match.group(3)
        if name:
            names.append(name)
    return names


class NotifyTemplate(_Section):
    """A message's text (``string.Template``: ``$field`` or ``${field}``, ``$$`` for $):
    ``subject`` (the mail's subject) and ``body`` (the mail's text, the webhook's ``text``)."""

    subject: str | None = Field(None, min_length=1, max_length=200)
    body: str | None = Field(None, min_length=1, max_length=4000)


class WebhookConfig(_Section):
    """An HTTP(S) endpoint that gets each message POSTed as JSON."""

    url: str = Field(min_length=1, max_length=2000)
    timeout_seconds: float = Field(10.0, gt=0, le=300)
    headers: dict[str, str] = Field(
        default_factory=dict, description="extra request headers, e.g. Authorization")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", v):
            raise ValueError(f"{v!r} is not an http:// or https:// URL")
        return v


class EmailConfig(_Section):
    """Mail through an SMTP host: ``sender`` (From) to ``to`` (one or more addresses)."""

    host: str = Field(min_length=1)
    port: int = Field(25, ge=1, le=65535)
    sender: str = Field(min_length=3, max_length=320)
    to: list[str] = Field(min_length=1)
    starttls: bool = False
    username: str | None = None
    password_env: str | None = Field(
        None, min_length=1, description="environment variable holding the SMTP password")
    timeout_seconds: float = Field(10.0, gt=0, le=300)

    @field_validator("sender", "to")
    @classmethod
    def _addresses(cls, v: Any) -> Any:
        for address in [v] if isinstance(v, str) else v:
            if not re.match(r"^[^@\s<>]+@[^@\s<>]+$", address):
                raise ValueError(f"{address!r} is not a mail address (name@host)")
        return v


class NotifyTargetConfig(_Section):
    """One notification target (``notify.targets.NAME``): a webhook or an email, the
    events it wants, and its own templates (else the defaults, docs/notifications.md)."""

    webhook: WebhookConfig | None = None
    email: EmailConfig | None = None
    events: list[NotifyEvent] = Field(min_length=1)
    summary_at: str | None = Field(
        None, description="HH:MM (UTC) of the daily summary; needs daily_summary in events")
    identity: bool = Field(
        False, description="a clinical channel: templates may use the identity fields")
    templates: dict[NotifyEvent, NotifyTemplate] = Field(default_factory=dict)

    @field_validator("summary_at")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                dt.datetime.strptime(v, "%H:%M")
            except ValueError:
                raise ValueError(f"{v!r} is not a time of day HH:MM (UTC)") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> NotifyTargetConfig:
        if (self.webhook is None) == (self.email is None):
            raise ValueError("a target is either a webhook or an email (give one of them)")
        summary = NotifyEvent.DAILY_SUMMARY in self.events
        if summary and self.summary_at is None:
            raise ValueError("daily_summary needs summary_at (HH:MM, UTC)")
        if not summary and self.summary_at is not None:
            raise ValueError("summary_at is set but daily_summary is not in events")
        for event, template in self.templates.items():
            allowed = NOTIFY_FIELDS[event] | NOTIFY_COMMON_FIELDS
            if self.identity and event is not NotifyEvent.DAILY_SUMMARY:
                allowed |= NOTIFY_IDENTITY_FIELDS
            for part in ("subject", "body"):
                text = getattr(template, part)
                if text is None:
                    continue
                try:
                    names = template_fields(text)
                except ValueError as exc:
                    raise ValueError(f"templates.{event.value}.{part}: {exc}") from None
                for name in names:
                    if name in allowed:
                        continue
                    why = (" (an identity field: only for a target with identity: true)"
                           if name in NOTIFY_IDENTITY_FIELDS else "")
                    raise ValueError(
                        f"templates.{event.value}.{part}: ${name} is not a field of "
                        f"{event.value}{why}; fields: {', '.join(sorted(allowed))}")
        return self


class NotifyConfig(_Section):
    """Notifications (``notify``): the targets, and how their messages are retried (like the
    outbox: after ``retry_initial_seconds``, doubling up to ``retry_max_seconds``, failed
    after ``max_attempts``); sent by the node's scheduler every ``check_interval_seconds``."""

    targets: dict[str, NotifyTargetConfig] = Field(default_factory=dict)
    retry_initial_seconds: float = Field(30.0, gt=0)
    retry_max_seconds: float = Field(3600.0, gt=0)
    max_attempts: int = Field(48, ge=1, le=100_000)
    check_interval_seconds: float = Field(10.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _names(self) -> NotifyConfig:
        for name in self.targets:
            if not _PULL_NAME.match(name):
                raise ValueError(f"targets: {name!r} is not a target name (letters, digits, "
                                 "'_', '.', '-'; at most 64)")
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ValueError(
                f"retry_max_seconds ({self.retry_max_seconds:g}) must not be less than "
                f"retry_initial_seconds ({self.retry_initial_seconds:g})")
        return self


class LoggingConfig(_Section):
    level: str = "INFO"

    @field_validator("level")
    @classmethod
    def _level(cls, v: str) -> str:
        allowed = ("DEBUG", "INFO", "WARNING", "ERROR")
        if v.upper() not in allowed:
            raise ValueError(f"{v!r} is not a log level; allowed: {', '.join(allowed)}")
        return v.upper()


KNOWN_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
"""The ONNX Runtime execution providers a configuration may list."""


class InferenceBackend(str, Enum):
    """Where the models' windows run: in the worker's own ONNX Runtime session, or on an
    NVIDIA Triton Inference Server (pre- and post-processing stay in the worker)."""

    ONNXRUNTIME = "onnxruntime"
    TRITON = "triton"


class TritonProtocol(str, Enum):
    """The KServe v2 protocol binding used to reach Triton."""

    HTTP = "http"
    GRPC = "grpc"


_TRITON_URL = re.compile(r"^(?:(?P<scheme>[a-z]+)://)?(?P<host>[^/:\s]+|\[[0-9a-fA-F:.]+\])"
                         r":(?P<port>[0-9]{1,5})/?$")


class TritonConfig(_Section):
    """The Triton Inference Server of ``inference.backend: triton`` (models exported with
    ``dicomnode models export-triton``; each model is named after its package)."""

    url: str | None = Field(
        None, description="host:port of Triton's HTTP (default 8000) or gRPC (8001) endpoint; "
        "http://, https:// or grpc:// may prefix it")
    protocol: TritonProtocol = TritonProtocol.HTTP
    timeout_seconds: float = Field(
        60.0, gt=0, le=3600, description="connecting and each request (one batch of windows)")
    model_prefix: str = Field(
        "", pattern=r"^[A-Za-z0-9_.-]*$",
        description="prepended to every model name (the same as export-triton --prefix)")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        match = _TRITON_URL.match(v.strip())
        if match is None or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"{v!r} is not host:port (optionally http://, https:// or grpc:// "
                             "before it, e.g. localhost:8000)")
        if match["scheme"] not in (None, "http", "https", "grpc", "grpcs"):
            raise ValueError(f"{v!r}: the scheme must be http, https, grpc or grpcs")
        return v.strip().rstrip("/")


class InferenceConfig(_Section):
    """How models run: ONNX Runtime execution providers, tried in order, and threads;
    or (``backend: triton``) on a Triton Inference Server."""

    backend: InferenceBackend = InferenceBackend.ONNXRUNTIME
    triton: TritonConfig = TritonConfig()

    providers: tuple[str, ...] = KNOWN_PROVIDERS
    intra_op_threads: int = Field(0, ge=0, le=1024)
    device_id: int = Field(0, ge=0, le=255, description="the CUDA device the GPU providers use")
    tensorrt_cache: Path | None = Field(
        None, description="TensorRT engine and timing cache folder (default: "
        "data_dir/tensorrt-cache); an engine is built once per model and shape")
    tensorrt_fp16: bool = Field(
        True, description="let TensorRT run in half precision the models whose card allows "
        "it (runtime.fp16: true)")
    io_binding: bool = Field(True, description="run GPU batches through IO binding")

    @field_validator("providers")
    @classmethod
    def _providers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError(f"list at least one provider; allowed: {', '.join(KNOWN_PROVIDERS)}")
        for name in v:
            if name not in KNOWN_PROVIDERS:
                raise ValueError(
                    f"{name!r} is not a known provider; allowed: {', '.join(KNOWN_PROVIDERS)}"
                )
        if len(set(v)) != len(v):
            raise ValueError("a provider is listed twice")
        return v

    @model_validator(mode="after")
    def _triton_url(self) -> InferenceConfig:
        if self.backend is InferenceBackend.TRITON and self.triton.url is None:
            raise ValueError("backend triton needs triton.url (host:port of the server)")
        return self


class PipelineConfig(_Section):
    """Jobs: worker processes that run models, and how often a failing job is tried."""

    workers: int = Field(1, ge=0, le=64, description="worker processes (spawned); 0: this "
                         "node runs no jobs (receive only), `dicomnode worker` nodes do")
    max_attempts: int = Field(3, ge=1, le=100)
    check_interval_seconds: float = Field(0.5, gt=0, le=60)
    background_hours: str | None = Field(
        None, description="HH:MM-HH:MM in the node's local time (may wrap midnight, e.g. "
        "22:00-06:00): when background rules' jobs run; outside it only when no urgent or "
        "normal job is pending. null: at any time")
    model_concurrency: dict[str, int] = Field(
        default_factory=dict, description="jobs of a model (by name) that may run at once on "
        "this node; overrides the card's runtime.max_concurrent and the default (1 for a "
        "model whose session runs on a GPU, else pipeline.workers)")

    gpu_jobs: int | None = Field(
        1, ge=1, le=64, description="jobs of GPU models (all of them together) that may run at "
        "once on this node: 1 (the default), one GPU model at a time; null: only each model's "
        "own limit (model_concurrency, the card, 1 per GPU model)")

    @field_validator("background_hours")
    @classmethod
    def _background_hours(cls, v: str | None) -> str | None:
        if v is not None:
            background_window(v)
        return v

    @field_validator("model_concurrency")
    @classmethod
    def _model_concurrency(cls, v: dict[str, int]) -> dict[str, int]:
        for name, limit in v.items():
            if isinstance(limit, bool) or not 1 <= limit <= 64:
                raise ValueError(f"model {name!r}: {limit!r} is not a number of jobs from 1 "
                                 "to 64")
        return v

    @property
    def background_window(self) -> tuple[dt.time, dt.time] | None:
        """``background_hours`` as (start, end) local times; None: at any time."""
        return None if self.background_hours is None else background_window(
            self.background_hours)


_HOURS = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-3]):([0-5][0-9])$")


def background_window(text: str) -> tuple[dt.time, dt.time]:
    """``HH:MM-HH:MM`` as (start, end) times; the end is excluded and may be earlier than the
    start (the window wraps midnight).

    Raises:
        ValueError: not two 24-hour times, or an empty window (start equals end).
    """
    match = _HOURS.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not HH:MM-HH:MM with 24-hour times (e.g. 22:00-06:00)")
    hour, minute, end_hour, end_minute = (int(g) for g in match.groups())
    start, end = dt.time(hour, minute), dt.time(end_hour, end_minute)
    if start == end:
        raise ValueError(f"{text!r}: the window is empty (start equals end); null runs "
                         "background jobs at any time")
    return start, end


class RetentionConfig(_Section):
    """When received instances are deleted: ``raw_days`` after all their study's results
    were delivered (null: never)."""

    raw_days: float | None = Field(None, ge=0)
    check_interval_minutes: float = Field(60.0, gt=0)


class FeedbackConfig(_Section):
    """The feedback loop: RTSTRUCT and SEG objects received for a study that dicomnode
    contoured are compared, structure by structure, with the node's result (Dice, HD95,
    mean surface distance, volume change; in a worker process, see docs/feedback.md)."""

    enabled: bool = True
    check_interval_seconds: float = Field(
        10.0, gt=0, le=3600, description="how often received objects are looked for")


class WebConfig(_Section):
    """The operator console (status pages, /metrics, /healthz) served by ``dicomnode serve``.

    Bound to the loopback interface by default. Bound elsewhere, it needs a token (from
    ``token_file``, else the environment variable ``token_env``); patient identity is shown
    only to requests that carry the token.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535, description="0 picks a free port")
    token_file: Path | None = None
    token_env: str = Field("DICOMNODE_WEB_TOKEN", min_length=1)
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host header names accepted besides localhost, 127.0.0.1, ::1 and host")
    max_token_failures: int = Field(
        10, ge=1, description="wrong tokens per client address before it is locked out")
    lockout_seconds: float = Field(
        300.0, gt=0, description="how long a locked-out address is answered 429")
    maximum_connections: int = Field(
        32, ge=1, le=1000, description="open console connections; more are answered 503")
    request_timeout_seconds: float = Field(
        10.0, gt=0, le=600, description="seconds a console connection may wait for a whole "
        "request, or stay idle between requests; the longest a stop waits for requests")


class DeidConfig(_Section):
    """Pseudonymization (PS3.15 Basic Profile) at the boundary: the key and the options.

    The secret key is read from ``key_file`` when given, else from the environment
    variable ``key_env``; never from this file, never logged.
    """

    key_file: Path | None = None
    key_env: str = Field("DICOMNODE_DEID_KEY", min_length=1)
    options: list[DeidOption] = Field(
        default_factory=lambda: [DeidOption.RETAIN_LONGITUDINAL_TEMPORAL_MODIFIED_DATES],
        description="PS3.15 options on top of the Basic Profile (docs/pseudonymization.md)")

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            old = sorted(k for k in data if k in {o.value for o in DeidOption})
            if old:
                raise ValueError(f"deid.{old[0]} is now an entry of deid.options (a list, e.g. "
                                 f"options: [{old[0]}]); remove the key")
        return data


class OutputsConfig(_Section):
    """Which result objects a model run writes (measurements JSON is always written)."""

    seg: bool = True
    seg_type: Literal["binary", "labelmap"] = Field(
        "binary", description="SEG type when the model card does not name one")
    seg_omit_empty_frames: bool | Literal["auto"] = Field(
        True, description="leave out SEG frames where a segment has no voxel: true (the "
        "default, as highdicom and MONAI do), false (a frame for every source slice and "
        "segment, for a viewer that places frames by their index), or auto (keep every "
        "frame for up to 16 segments, leave empty ones out above)")
    rtstruct: bool = True
    rtstruct_empty_structures: Literal["omit", "keep"] = Field(
        "omit", description="a structure the model found empty (no contour): omit leaves it "
        "out of the RTSTRUCT (rt-utils and several planning systems fail on an ROI without "
        "contours; volumes.json lists it under rtstruct_omitted), keep writes its ROI "
        "without contours")
    sr: bool = Field(False, description="a TID 1500 measurement report (needs seg)")
    reject_superseded: bool = Field(
        True, description="when a job's newer version sends its results, send an IHE IOCM "
        "rejection note (KOS, Rejected for Quality Reasons) withdrawing the earlier ones")

    def for_rule(self, kinds: Sequence[str] | None) -> OutputsConfig:
        """These options with the objects a rule asks for (``seg``, ``rtstruct``,
        ``measurements`` = the TID 1500 report); ``None`` keeps them as they are."""
        if kinds is None:
            return self
        return self.model_copy(update={"seg": "seg" in kinds or "measurements" in kinds,
                                       "rtstruct": "rtstruct" in kinds,
                                       "sr": "measurements" in kinds})

    @model_validator(mode="after")
    def _sr_needs_seg(self) -> OutputsConfig:
        if self.sr and not self.seg:
            raise ValueError("sr: true needs seg: true (the report references the SEG's segments)")
        return self


class Config(_Section):
    """The whole configuration of one node."""

    node: NodeConfig = NodeConfig()
    storage: StorageConfig = StorageConfig()
    peers: dict[str, PeerConfig] = {}
    completion: CompletionConfig = CompletionConfig()
    rules_dir: Path = Path("rules")
    models_dir: Path = Path("models")
    inference: InferenceConfig = InferenceConfig()
    outputs: OutputsConfig = OutputsConfig()
    deid: DeidConfig = DeidConfig()
    pipeline: PipelineConfig = PipelineConfig()
    retention: RetentionConfig = RetentionConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    web: WebConfig = WebConfig()
    outbox: OutboxConfig = OutboxConfig()
    pulls: dict[str, PullConfig] = Field(
        default_factory=dict, description="scheduled pulls from query/retrieve peers")
    logging: LoggingConfig = LoggingConfig()
    notify: NotifyConfig = NotifyConfig()
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _pull_peers(self) -> Config:
        for name, pull in self.pulls.items():
            if not _PULL_NAME.match(name):
                raise ValueError(f"pulls: {name!r} is not a pull name (letters, digits, "
                                 "'_', '.', '-'; at most 64)")
            peer = self.peers.get(pull.peer)
            if peer is None:
                known = ", ".join(sorted(self.peers)) or "none configured"
                raise ValueError(f"pulls.{name}.peer: unknown peer {pull.peer!r}; peers: {known}")
            if not peer.query_retrieve:
                raise ValueError(f"pulls.{name}.peer: peer {pull.peer!r} is not a query/retrieve "
                                 f"peer (set peers.{pull.peer}.query_retrieve: true)")
        return self

    @property
    def db_url(self) -> str:
        """The SQLAlchemy URL of the index (default: SQLite file under storage.path)."""
        if self.storage.database_url:
            return self.storage.database_url
        return f"sqlite:///{(self.storage.path / 'index.sqlite').as_posix()}"

    def peer_by_ae_title(self, ae_title: str) -> list[tuple[str, PeerConfig]]:
        return [(n, p) for n, p in self.peers.items() if p.ae_title == ae_title.strip()]

    def resolved(self, base: Path) -> Config:
        """Return a copy with relative paths made absolute against ``base``."""

        def fix(p: Path) -> Path:
            return p if p.is_absolute() else (base / p).resolve()

        return self.model_copy(
            update={
                "storage": self.storage.model_copy(update={"path": fix(self.storage.path)}),
                "rules_dir": fix(self.rules_dir),
                "inference": self.inference.model_copy(update={"tensorrt_cache": (
                    None if self.inference.tensorrt_cache is None
                    else fix(self.inference.tensorrt_cache))}),
                "models_dir": fix(self.models_dir),
                "deid": self.deid.model_copy(update={
                    "key_file": None if self.deid.key_file is None else fix(self.deid.key_file)}),
                "web": self.web.model_copy(update={"token_file": (
                    None if self.web.token_file is None else fix(self.web.token_file))}),
                "node": self.node.model_copy(update={"tls": (
                    None if self.node.tls is None else self.node.tls.resolved(base))}),
                "peers": {name: peer.model_copy(update={"tls": (
                    None if peer.tls is None else peer.tls.resolved(base)), "dicomweb": (
                    None if peer.dicomweb is None else peer.dicomweb.resolved(base))})
                    for name, peer in self.peers.items()},
            }
        )


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names file, line and key."""


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML mapping tree to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node | None, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, str(key_node.value))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                key = (*path, str(index))
                lines[key] = item.start_mark.line + 1
                walk(item, key)

    walk(root, ())
    return lines


def _unwrap(annotation: Any) -> Any:
    """Strip ``X | None`` from an annotation."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _allowed_keys(model: type[BaseModel], path: tuple[str, ...]) -> list[str]:
    """The keys allowed in the mapping at ``path`` (walking dict and list values too)."""
    current: Any = model
    for part in path:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            if field is None:
                return []
            current = field.annotation
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        elif get_origin(current) in (list, tuple):
            current = get_args(current)[0]
        else:
            return []
    current = _unwrap(current)
    if get_origin(current) is dict:
        return []
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(k for k in current.model_fields if k != "source")
    return []


def format_validation_errors(
    file: str, text: str, exc: ValidationError, model: type[BaseModel]
) -> str:
    """One line per error: ``file:line: dotted.key: what is wrong (got value)``.

    ``text`` is the YAML the data came from (for line numbers) and ``model`` the
    pydantic model it was validated against (for the keys allowed where an unknown
    key was found).
    """
    lines = _key_lines(text)
    out = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "(top level)"
        line = None
        for n in range(len(loc), 0, -1):
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
        where = f"{file}:{line}" if line else file
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            msg = f"unknown key; allowed here: {', '.join(allowed)}"
        else:
            msg = err["msg"]
            if err["type"] == "value_error":  # our validators' messages say it all
                msg = msg.removeprefix("Value error, ")
            if "input" in err and err["type"] != "missing" and not isinstance(
                err["input"], dict
            ):
                msg += f" (got {err['input']!r})"
        out.append(f"{where}: {key}: {msg}")
    return "\n".join(out)


def read_yaml_mapping(
    file: Path, what: str, error: type[Exception]
) -> tuple[str, dict[str, Any]]:
    """Read a YAML file whose top level is a mapping; return its text and data.

    An empty file is an empty mapping. Raises ``error`` naming the file (and the line
    and column for YAML syntax errors).
    """
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{file}: cannot read {what}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(f"{where}: not valid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{file}: the top level must be a mapping of keys, not {type(data).__name__}")
    return text, data


def load_config(path: Path | str | None) -> Config:
    """Load and validate a configuration file; ``None`` gives the embedded defaults.

    Raises:
        ConfigError: the file is missing, is not YAML, or a key is wrong; the
            message names the file, the line, the key, what is wrong and what
            is allowed.
    """
    if path is None:
        return Config().resolved(Path.cwd())
    file = Path(path)
    text, data = read_yaml_mapping(file, "configuration", ConfigError)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_errors(str(file), text, exc, Config)) from None
    return config.resolved(file.resolve().parent).model_copy(update={"source": file.resolve()})
