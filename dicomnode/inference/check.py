"""``dicomnode models check``: does a package's ONNX model fit its card?

Checks what can be known before any image arrives: the card is valid and names
existing files, the model loads, its input and output have the rank the card's
dimensionality needs, fixed dimensions agree with the card (channels, resize or
patch size, batch size), and a dry run on a zero input of the card's shape gives
an output of the expected shape.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dicomnode.inference.runtime import ModelSession, open_card_session
from dicomnode.models.card import Card

__all__ = ["CHECK_REPORT", "PackageReport", "check_package", "imported_facts"]

#: written by ``dicomnode models import``: the package against the framework's own output
CHECK_REPORT = "check_report.json"


@dataclass
class PackageReport:
    """What :func:`check_package` found: problems (empty when usable) and facts."""

    problems: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)


def _spatial_shape(card: Card) -> list[int]:
    """A small spatial shape the card would feed, in the model's axis order."""
    pre = card.preprocessing
    if pre.patch_size is not None:
        return list(pre.patch_size)
    if pre.resize is not None:
        xyz = list(pre.resize)
        shape = xyz if pre.axes == "xyz" else xyz[::-1]
        return shape[1:] if pre.spatial_dims == 2 else shape
    return [32] * pre.spatial_dims


def _fixed(dim: int | str | None) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _check_shapes(card: Card, session: ModelSession, report: PackageReport) -> list[int] | None:
    pre = card.preprocessing
    rank = pre.spatial_dims + 2
    in_shape, out_shape = session.input_shape, session.output_shape
    report.facts.append(f"input {session.input_name} {list(in_shape)}")
    report.facts.append(f"output {session.output_name} {list(out_shape)}")
    if len(in_shape) != rank:
        report.problems.append(
            f"a {pre.dimensionality} model takes rank-{rank} input (batch, channels, "
            f"{'d, h, w' if rank == 5 else 'h, w'}); input {session.input_name} has rank "
            f"{len(in_shape)}"
        )
        return None
    if len(out_shape) not in (0, rank):
        report.problems.append(
            f"output {session.output_name} has rank {len(out_shape)}, expected {rank}"
        )
    channels = _fixed(in_shape[1])
    if channels is not None and channels != card.input_channels:
        report.problems.append(
            f"the model takes {channels} input channel(s); the card feeds {card.input_channels} "
            f"({len(card.inputs)} input(s) x {pre.slices_per_input} slice(s))"
        )
    spatial = _spatial_shape(card)
    fixed_spatial = [_fixed(d) for d in in_shape[2:]]
    if any(f is not None for f in fixed_spatial):
        if pre.patch_size is None and pre.resize is None:
            report.problems.append(
                f"the model has fixed spatial size {list(in_shape[2:])}: the card must set "
                "preprocessing resize or patch_size"
            )
        elif any(f is not None and f != s for f, s in zip(fixed_spatial, spatial, strict=True)):
            report.problems.append(
                f"the model's spatial size {list(in_shape[2:])} differs from what the card "
                f"feeds {spatial}"
            )
    batch = _fixed(in_shape[0])
    if batch is not None and batch < pre.batch_size:
        report.facts.append(f"fixed batch size {batch}: batch_size {pre.batch_size} is lowered")
    needed = card.outputs.channels_needed
    out_channels = _fixed(out_shape[1]) if len(out_shape) > 1 else None
    if out_channels is not None and out_channels < needed:
        report.problems.append(
            f"the model outputs {out_channels} channel(s) but the card's labels use channel "
            f"{needed - 1}"
        )
    return [channels or card.input_channels, *[f or s for f, s in zip(fixed_spatial, spatial,
                                                                      strict=True)]]


def imported_facts(card: Card) -> list[str]:
    """For an imported package: the framework version it was checked against and the
    agreement figures (from ``check_report.json``), and the labels whose codes need review.
    A profile module with its own ``facts(card)`` says them itself."""
    if card.profile is not None:
        from dicomnode.inference.profiles import profile_module

        own = getattr(profile_module(str(card.profile["framework"])), "facts", None)
        if own is not None:
            lines: list[str] = own(card)
            return lines
    facts = []
    path = card.package / CHECK_REPORT
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            dice = data.get("dice") or {}
            facts.append(
                f"checked against {data['framework']} {data['framework_version']} on a "
                f"{data.get('input', 'volume')}: voxel agreement "
                f"{100 * float(data['voxel_agreement']):.3f} %, min Dice "
                f"{float(data.get('min_dice', 1.0)):.4f} over {len(dice)} structure(s), "
                f"probabilities max |diff| {float(data['max_probability_difference']):.1e} "
                f"on the model grid"
                + ("" if data.get("passed", False) else " - FAILED"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            facts.append(f"{CHECK_REPORT} unreadable: {exc}")
    review = [label.name for label in card.outputs.labels if label.needs_review]
    if review:
        facts.append(f"labels needing review (no SNOMED CT code mapped): {', '.join(review)}")
    return facts


def check_package(
    card: Card, *, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> PackageReport:
    """Check that ``card``'s model loads and fits the card (see the module docstring)."""
    report = PackageReport()
    try:
        session = open_card_session(card, providers=providers)
    except (ValueError, RuntimeError, OSError) as exc:
        report.problems.append(f"the model does not load: {exc}")
        return report
    report.facts.append(f"runs on {session.provider}")
    report.facts.extend(imported_facts(card))
    shape = _check_shapes(card, session, report)
    if shape is None or report.problems:
        return report
    dummy = np.zeros([1, *shape], dtype=np.float32)
    try:
        out = session.run(dummy)
    except Exception as exc:  # onnxruntime raises its own exception types
        report.problems.append(f"a dry run on zeros {list(dummy.shape)} fails: {exc}")
        return report
    if out.ndim != dummy.ndim or out.shape[0] != 1 or out.shape[2:] != dummy.shape[2:]:
        report.problems.append(
            f"a dry run on {list(dummy.shape)} returns {list(out.shape)}: expected "
            "(1, channels, same spatial size)"
        )
    else:
        report.facts.append(f"dry run {list(dummy.shape)} -> {list(out.shape)}")
    return report

