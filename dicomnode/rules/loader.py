"""Rule files: ``rules_dir/*.yaml``, each holding one rule or a ``rules:`` list of them.

A rule::

    name: brain-extraction            # unique across all files
    select: |                         # a statement in the select language
      SELECT study WHERE series NAMED "T1w" HAS Modality = "MR" AND IsVolume = true
    model: brain-mr                   # a model package in models_dir
    outputs: [seg, rtstruct, measurements]   # optional; default: the configuration's outputs
    send_to: [pacs]                   # peer names from the configuration
    priority: normal                  # urgent | normal | background (optional, see below)
    review: required                  # optional: results held until approved in the console
    enabled: true                     # optional
    schedule: "0 22 * * *"            # optional cron: run as an off-hours batch instead
    wait_seconds: 30                  # optional: the study's quiet time for this rule
    require_series: [T1w, FLAIR]      # optional: fire as soon as these are there and settled
    when_incomplete:                  # optional: what to do when they never arrive
      after_seconds: 3600
      action: run                     # run | discard | wait (the default)

``priority`` is the class of the rule's jobs (:class:`~dicomnode.states.JobPriority`): urgent
jobs are claimed first, then normal ones (the default), then background ones, which wait
for ``pipeline.background_hours`` unless no other job is pending. The integers of earlier
releases are still read: greater than 0 is urgent, 0 normal, less than 0 background, and
the integer stays the order of evaluation within its class (higher first). Rules are
evaluated by class, then that integer (0 for a word), then name.

Model approval: a rule whose model's card is not ``status: clinical`` (research, qa) and
whose ``send_to`` names a clinical peer (neither ``research: true`` nor ``pseudonymize:
true``) is refused when the rules load, with the reason; the job pipeline checks it again
when it queues the results (a card may change after the rules loaded). ``review: required``
holds the job's results in the outbox until a console user approves (or rejects) them
(:mod:`dicomnode.jobs.review`).

A ``require_series`` entry is either a series name of the statement (that series must be
bound, settled and whole) or, like mercure's "series received" list, a text that the
SeriesDescription of some settled series of the study must contain (case-insensitive).

Problems are reported as :class:`RuleFileError` naming the file, the line and the
column; select-statement errors are positioned in the YAML file itself, with the
offending line and a caret under the token.

The node and its workers read the rules through a :class:`RuleSource`: the files are parsed
once per process and again only when a rule file or a model card changes, appears or
disappears (its size, mtime or inode). An edit that makes the rules invalid leaves a running
node with the rules it loaded last, and the error is logged once (:meth:`RuleSource.current`).
"""

from __future__ import annotations

import enum
import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dicomnode.models.card import CARD_FILE, Card, CardError, FileStat, cached_card, file_stat
from dicomnode.states import JobPriority

from .errors import RuleSyntaxError
from .nodes import SelectStatement
from .parser import parse

__all__ = ["OUTPUT_KINDS", "REVIEW_VALUES", "IncompleteAction", "Rule", "RuleFileError",
           "RuleSet", "RuleSource", "WhenIncomplete", "clinical_peers_refused",
           "is_research_peer", "load_rules", "rule_source"]

LOG = logging.getLogger(__name__)

OUTPUT_KINDS = ("seg", "rtstruct", "measurements")


class IncompleteAction(str, enum.Enum):
    """What a rule does on a study whose required series have not all arrived in time."""

    RUN = "run"  # fire with what the statement binds, without the missing series
    DISCARD = "discard"  # give up on the study (recorded as a discarded job)
    WAIT = "wait"  # keep waiting (the default)


@dataclass(frozen=True)
class WhenIncomplete:
    """``when_incomplete``: after ``after_seconds`` of quiet (s), take ``action``."""

    after_seconds: float
    action: IncompleteAction
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEYS = ("name", "select", "model", "outputs", "send_to", "priority", "enabled", "schedule",
         "wait_seconds", "require_series", "when_incomplete", "review")
REVIEW_VALUES = ("required", "none")
_REQUIRED = ("name", "select", "model")


class RuleFileError(Exception):
    """One or more problems in the rule files; ``problems`` lists each message."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Rule:
    """One validated rule. ``statement`` is parsed once, at load time."""

    name: str
    statement: SelectStatement
    model: str
    outputs: tuple[str, ...] | None  # None: the configuration's ``outputs`` decide
    send_to: tuple[str, ...]
    priority: JobPriority
    enabled: bool
    schedule: str | None
    source: str
    wait_seconds: float | None = None  # None: ``completion.quiet_seconds``
    require_series: tuple[str, ...] = ()
    when_incomplete: WhenIncomplete | None = None
    order: int = 0  # an integer ``priority`` (earlier releases): higher is evaluated first
    review_required: bool = False  # ``review: required``: results held until approved

    @property
    def input_names(self) -> tuple[str, ...]:
        """The named series in clause order: the model's input channel order."""
        return tuple(c.name for c in self.statement.clauses)


@dataclass(frozen=True)
class RuleSet:
    """All rules, in evaluation order (priority class, integer priority descending, name)."""

    rules: tuple[Rule, ...]

    def get(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        known = ", ".join(r.name for r in self.rules) or "none"
        raise KeyError(f"no rule named {name!r}; rules: {known}")

    @property
    def enabled(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.enabled)


def _where(file: Path, node: yaml.Node | None) -> str:
    return f"{file}:{node.start_mark.line + 1}" if node is not None else str(file)


def _statement_error(file: Path, text: str, value: yaml.ScalarNode,
                     exc: RuleSyntaxError) -> str:
    """Re-position a statement error at its line and column in the YAML file."""
    lines = text.splitlines()
    start = value.start_mark
    if value.style in ("|", ">"):
        # block scalar: content starts on the next line, indented
        line0 = start.line + 1 + (exc.line - 1)
        first = next((ln for ln in lines[start.line + 1:] if ln.strip()), "")
        indent = len(first) - len(first.lstrip(" "))  # the block's indentation
        if line0 < len(lines):
            raw = lines[line0]
            column = indent + exc.column
            moved = RuleSyntaxError(exc.message, source=str(file), line=line0 + 1, column=column,
                                    token=exc.token, source_line=raw, length=exc.length)
            return str(moved)
    elif exc.line == 1 and start.line < len(lines):
        column = start.column + exc.column + (1 if value.style in ("'", '"') else 0)
        moved = RuleSyntaxError(exc.message, source=str(file), line=start.line + 1,
                                column=column, token=exc.token,
                                source_line=lines[start.line], length=exc.length)
        return str(moved)
    # folded plain or quoted scalars: positions inside the statement
    return f"{file}:{start.line + 1}: in the select statement:\n{exc}"


def _rule_nodes(file: Path, root: yaml.Node | None) -> list[yaml.MappingNode]:
    if isinstance(root, yaml.MappingNode):
        keys = {k.value: v for k, v in root.value}
        if "rules" in keys and isinstance(keys["rules"], yaml.SequenceNode):
            items = keys["rules"].value
            bad = [i for i in items if not isinstance(i, yaml.MappingNode)]
            if bad:
                raise RuleFileError([f"{_where(file, bad[0])}: each rule must be a mapping"])
            return [i for i in items if isinstance(i, yaml.MappingNode)]
        return [root]
    raise RuleFileError([f"{file}: expected a rule (a mapping) or 'rules:' with a list of rules"])


def _load_rule(file: Path, text: str, node: yaml.MappingNode, data: Mapping[str, Any],
               problems: list[str]) -> Rule | None:
    nodes = {k.value: (k, v) for k, v in node.value}
    before = len(problems)
    for key, (knode, _) in nodes.items():
        if key not in _KEYS:
            problems.append(f"{_where(file, knode)}: unknown key {key!r}; allowed: "
                            f"{', '.join(_KEYS)}")
    missing = [key for key in _REQUIRED if key not in data or data[key] in (None, "")]
    for key in missing:
        problems.append(f"{_where(file, node)}: rule lacks {key!r}")
    if missing:
        return None

    def val(key: str) -> yaml.Node | None:
        return nodes[key][1] if key in nodes else None

    name = str(data["name"])
    if not _NAME.match(name):
        problems.append(f"{_where(file, val('name'))}: rule name {name!r} must be 1-64 letters, "
                        "digits, '.', '_' or '-'")
    statement: SelectStatement | None = None
    select_node = val("select")
    try:
        statement = parse(str(data["select"]), source=str(file))
    except RuleSyntaxError as exc:
        assert isinstance(select_node, yaml.ScalarNode)
        problems.append(_statement_error(file, text, select_node, exc))
    outputs = data.get("outputs")
    if outputs is not None and (not isinstance(outputs, list) or not outputs
                                or any(o not in OUTPUT_KINDS for o in outputs)):
        problems.append(f"{_where(file, val('outputs'))}: outputs must be a non-empty list of "
                        f"{', '.join(OUTPUT_KINDS)}")
        outputs = None
    send_to = data.get("send_to", [])
    if not isinstance(send_to, list) or not all(isinstance(p, str) for p in send_to):
        problems.append(f"{_where(file, val('send_to'))}: send_to must be a list of peer names")
        send_to = []
    priority, order = _priority(file, val("priority"), data.get("priority"), problems)
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        problems.append(f"{_where(file, val('enabled'))}: enabled must be true or false")
    schedule = data.get("schedule")
    if schedule is not None:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(str(schedule), timezone="UTC")
        except ValueError as exc:
            problems.append(f"{_where(file, val('schedule'))}: schedule {schedule!r} is not a "
                            f"cron expression (minute hour day month weekday): {exc}")
    wait_seconds = data.get("wait_seconds")
    if wait_seconds is not None and (isinstance(wait_seconds, bool)
                                     or not isinstance(wait_seconds, (int, float))
                                     or not 0 <= wait_seconds <= 7 * 86400):
        problems.append(f"{_where(file, val('wait_seconds'))}: wait_seconds must be a number "
                        "of seconds from 0 to 604800 (a week)")
    required = data.get("require_series", [])
    if (not isinstance(required, list)
            or not all(isinstance(r, str) and r.strip() for r in required)):
        problems.append(f"{_where(file, val('require_series'))}: require_series must be a "
                        "list of series names (of the statement) or SeriesDescription texts")
        required = []
    when_incomplete = _when_incomplete(file, val("when_incomplete"),
                                       data.get("when_incomplete"), problems)
    if when_incomplete is not None and not required:
        problems.append(f"{_where(file, val('when_incomplete'))}: when_incomplete needs "
                        "require_series (it acts when those have not all arrived)")
    review = data.get("review")
    review = "none" if review is None else review
    if review not in REVIEW_VALUES:
        problems.append(f"{_where(file, val('review'))}: review must be one of "
                        f"{', '.join(REVIEW_VALUES)} (got {review!r})")
    if len(problems) > before or statement is None:
        return None
    return Rule(name=name, statement=statement, model=str(data["model"]),
                outputs=None if outputs is None else tuple(outputs), send_to=tuple(send_to),
                priority=priority, enabled=bool(enabled),
                schedule=None if schedule is None else str(schedule),
                source=f"{_where(file, node)}",
                wait_seconds=None if wait_seconds is None else float(wait_seconds),
                require_series=tuple(r.strip() for r in required),
                when_incomplete=when_incomplete, order=order,
                review_required=review == "required")


def _priority(file: Path, node: yaml.Node | None, value: Any,
              problems: list[str]) -> tuple[JobPriority, int]:
    """A rule's ``priority``: a class, or an integer of earlier releases (> 0 urgent, 0
    normal, < 0 background; kept as the evaluation order)."""
    if value is None:
        return JobPriority.NORMAL, 0
    if isinstance(value, int) and not isinstance(value, bool):
        if value > 0:
            return JobPriority.URGENT, value
        return (JobPriority.NORMAL if value == 0 else JobPriority.BACKGROUND), value
    if isinstance(value, str) and value in {p.value for p in JobPriority}:
        return JobPriority(value), 0
    problems.append(f"{_where(file, node)}: priority {value!r} is not one of "
                    f"{', '.join(p.value for p in JobPriority)} (or an integer: greater than 0 "
                    "is urgent, 0 normal, less than 0 background)")
    return JobPriority.NORMAL, 0


def _when_incomplete(file: Path, node: yaml.Node | None, value: Any,
                     problems: list[str]) -> WhenIncomplete | None:
    if value is None:
        return None
    actions = ", ".join(a.value for a in IncompleteAction)
    where = _where(file, node)
    if not isinstance(value, dict) or set(value) - {"after_seconds", "action"}:
        problems.append(f"{where}: when_incomplete must be a mapping with after_seconds and "
                        f"action ({actions})")
        return None
    after = value.get("after_seconds")
    if isinstance(after, bool) or not isinstance(after, (int, float)) or after <= 0:
        problems.append(f"{where}: when_incomplete.after_seconds must be a number of seconds "
                        "greater than 0")
        return None
    try:
        action = IncompleteAction(value.get("action", "wait"))
    except ValueError:
        problems.append(f"{where}: when_incomplete.action {value.get('action')!r} is not one "
                        f"of {actions}")
        return None
    return WhenIncomplete(float(after), action)


def _card(models_dir: Path, model: str) -> Card | str:
    """The model's card, or why it cannot be used."""
    try:
        return cached_card(models_dir / model, verify_files=False)
    except CardError as exc:
        return str(exc)


def is_research_peer(peer: Any) -> bool:
    """Whether a configured peer (:class:`dicomnode.config.PeerConfig`) may receive results
    of models that are not clinical; anything else (a bare name) counts as clinical."""
    return bool(getattr(peer, "is_research", False))


def clinical_peers_refused(rule: Rule, card: Card, peers: Mapping[str, Any]) -> list[str]:
    """Why ``rule`` may not send its model's results where it says: one reason per clinical
    peer of its ``send_to`` when ``card`` is not ``status: clinical`` (empty otherwise)."""
    if card.clinical:
        return []
    return [f"rule {rule.name!r} would send the results of model {card.name!r} (status "
            f"{card.status.value}) to clinical peer {peer!r}: only clinical models' results "
            f"may go to clinical peers (mark the peer research: true, or approve the model "
            f"with status: clinical in its card)"
            for peer in rule.send_to if peer in peers and not is_research_peer(peers[peer])]


def load_rules(rules_dir: Path, *, peers: Mapping[str, Any] | None = None,
               models_dir: Path | None = None) -> RuleSet:
    """Load and validate every ``*.yaml``/``*.yml`` file in ``rules_dir`` (sorted by name).

    Args:
        rules_dir: the folder of rule files; a missing folder holds no rules.
        peers: configured peers (:class:`dicomnode.config.PeerConfig`); ``send_to`` names
            must be among them when given.
        models_dir: model packages; when given, each rule's model must exist there,
            and its named series must equal the card's inputs, in order; with ``peers``, a
            model that is not clinical may send only to research peers.

    Raises:
        RuleFileError: listing every problem found, each with file and line.
    """
    problems: list[str] = []
    rules: list[Rule] = []
    for file in _rule_files(rules_dir):
        text = file.read_text(encoding="utf-8")
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
            problems.append(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}")
            continue
        if root is None:
            continue
        try:
            nodes = _rule_nodes(file, root)
        except RuleFileError as exc:
            problems.extend(exc.problems)
            continue
        items = data["rules"] if isinstance(data, dict) and "rules" in data else [data]
        for node, item in zip(nodes, items, strict=True):
            rule = _load_rule(file, text, node, item, problems)
            if rule is not None:
                rules.append(rule)
    seen: dict[str, Rule] = {}
    for rule in rules:
        if rule.name in seen:
            problems.append(f"{rule.source}: rule name {rule.name!r} is already used at "
                            f"{seen[rule.name].source}")
        seen[rule.name] = rule
        for peer in rule.send_to:
            if peers is not None and peer not in peers:
                problems.append(f"{rule.source}: rule {rule.name!r} sends to unknown peer "
                                f"{peer!r}; peers: {', '.join(sorted(peers)) or 'none'}")
        if models_dir is not None:
            if not (models_dir / rule.model).is_dir():
                problems.append(f"{rule.source}: rule {rule.name!r} names model {rule.model!r}, "
                                f"which is not in {models_dir}")
                continue
            card = _card(models_dir, rule.model)
            if isinstance(card, str):
                problems.append(f"{rule.source}: rule {rule.name!r} names model {rule.model!r}, "
                                f"whose card is not valid:\n  " + card.replace("\n", "\n  "))
                continue
            if peers is not None:
                problems.extend(f"{rule.source}: {reason}"
                                for reason in clinical_peers_refused(rule, card, peers))
            inputs = card.input_names
            if inputs != rule.input_names:
                problems.append(
                    f"{rule.source}: rule {rule.name!r} binds series "
                    f"{', '.join(rule.input_names)} but model {rule.model!r} takes inputs "
                    f"{', '.join(inputs)} (names and order must match)")
    if problems:
        raise RuleFileError(problems)
    ordered = sorted(rules, key=lambda r: (r.priority.rank, -r.order, r.name))
    return RuleSet(tuple(ordered))


def _rule_files(rules_dir: Path) -> list[Path]:
    """The rule files of ``rules_dir``, sorted by name (none when it is missing)."""
    return sorted([*rules_dir.glob("*.yaml"), *rules_dir.glob("*.yml")]) \
        if rules_dir.is_dir() else []


Fingerprint = tuple[tuple[str, FileStat], ...]


class RuleSource:
    """The rules of a folder, parsed once and again only when their files change.

    What the rules depend on is fingerprinted at each use: every rule file (name, size,
    mtime, inode) and, with ``models_dir``, every package folder's ``card.yaml``. Unchanged,
    the last result is returned without reading a file; changed, the files are parsed and
    validated again by :func:`load_rules`. Thread-safe; ``parses`` counts the loads.

    Args:
        rules_dir: the folder of rule files.
        peers: configured peers (``send_to`` is checked against their names).
        models_dir: model packages (each rule's model and inputs are checked).
    """

    def __init__(self, rules_dir: Path, *, peers: Mapping[str, Any] | None = None,
                 models_dir: Path | None = None) -> None:
        self.rules_dir = Path(rules_dir)
        self.peers = None if peers is None else dict(peers)
        self.models_dir = None if models_dir is None else Path(models_dir)
        self.parses = 0
        self._lock = threading.Lock()
        self._fingerprint: Fingerprint | None = None
        self._result: RuleSet | RuleFileError | None = None
        self._valid: RuleSet | None = None  # the last rules that loaded
        self._reported: Fingerprint | None = None  # the error logged last, by its files

    def _files(self) -> Fingerprint:
        stats = [(f"rules/{f.name}", file_stat(f)) for f in _rule_files(self.rules_dir)]
        if self.models_dir is not None and self.models_dir.is_dir():
            stats += [(f"models/{p.name}", file_stat(p / CARD_FILE))
                      for p in sorted(self.models_dir.iterdir()) if p.is_dir()]
        return tuple(stats)

    def _now(self) -> tuple[RuleSet | RuleFileError, Fingerprint, bool]:
        """The rules (or their error) for the files as they are now; whether they were
        parsed now."""
        with self._lock:
            fingerprint = self._files()
            if fingerprint == self._fingerprint and self._result is not None:
                return self._result, fingerprint, False
            result: RuleSet | RuleFileError
            try:
                result = load_rules(self.rules_dir, peers=self.peers,
                                    models_dir=self.models_dir)
            except RuleFileError as exc:
                result = exc
            self.parses += 1
            # a file written while it was read is read again at the next use
            self._fingerprint = fingerprint if self._files() == fingerprint else None
            self._result = result
            if isinstance(result, RuleSet):
                self._valid = result
            return result, fingerprint, True

    def load(self) -> RuleSet:
        """The rules as the files say now.

        Raises:
            RuleFileError: the files have problems (the same message :func:`load_rules`
                gives), each time this is called until they are fixed.
        """
        result, _fingerprint, _parsed = self._now()
        if isinstance(result, RuleFileError):
            raise RuleFileError(list(result.problems))
        return result

    def current(self) -> RuleSet:
        """The rules as the files say now or, when an edit made them invalid, the rules
        that loaded last (the error is logged once per change of the files).

        Raises:
            RuleFileError: the files have problems and no rules ever loaded.
        """
        result, fingerprint, parsed = self._now()
        if isinstance(result, RuleSet):
            if parsed and self._reported is not None:
                LOG.info("rule files fixed: %d rule(s) loaded from %s", len(result.rules),
                         self.rules_dir)
                self._reported = None
            elif parsed and self.parses > 1:
                LOG.info("rule files changed: %d rule(s) loaded from %s", len(result.rules),
                         self.rules_dir)
            return result
        if self._valid is None:
            raise RuleFileError(list(result.problems))
        if fingerprint != self._reported:
            self._reported = fingerprint
            LOG.error("rule files in %s have errors; the node keeps the %d rule(s) it loaded "
                      "last until they are fixed:\n%s", self.rules_dir,
                      len(self._valid.rules), result)
        return self._valid


_SOURCES: dict[tuple[str, str | None, tuple[str, ...] | None], RuleSource] = {}
_SOURCES_LOCK = threading.Lock()


def rule_source(rules_dir: Path, *, peers: Mapping[str, Any] | None = None,
                models_dir: Path | None = None) -> RuleSource:
    """The process's :class:`RuleSource` for these folders and peers (one per process)."""
    key = (str(Path(rules_dir).resolve()),
           None if models_dir is None else str(Path(models_dir).resolve()),
           None if peers is None else tuple(sorted(
               f"{name}{'/research' if is_research_peer(peer) else ''}"
               for name, peer in peers.items())))
    with _SOURCES_LOCK:
        source = _SOURCES.get(key)
        if source is None:
            source = _SOURCES[key] = RuleSource(rules_dir, peers=peers, models_dir=models_dir)
        return source
