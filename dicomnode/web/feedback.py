"""The console's page per model: how the clinicians' corrections compare with its results.

``GET /api/v1/models/NAME/feedback`` (JSON, :func:`feedback_view`) and
``GET /models/NAME/feedback`` (HTML, :func:`feedback_page`): the figures of every compared
structure (Dice, HD95, mean surface distance, volume change) with the model version and
time, per structure their distribution and how often it was edited (Dice below
:data:`EDITED_BELOW` or deleted), the objects' states, and the inputs of the jobs the
corrections answer (slice thickness, kVp, manufacturer, intensity percentiles: the input
drift that comes with them). Plots are inline SVG drawn here (no script, nothing from
another origin: the console's Content-Security-Policy holds).

Keys only: index keys of jobs and comparisons, model names, structure names of the card.
The name a received structure had (``received_name``: typed by a clinician) is an identity
field: sent only with the token.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from html import escape
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select

from dicomnode.store.db import Index
from dicomnode.store.tables import FeedbackObject, FeedbackStructure, JobInput

__all__ = ["EDITED_BELOW", "FeedbackView", "feedback_page", "feedback_view"]

#: A structure counts as edited when its Dice is below this (or it was deleted).
EDITED_BELOW = 0.99


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Figure(_Out):
    feedback: int
    job: int
    model_version: str
    structure: str
    received_name: str | None = None  # identity field (token only)
    outcome: str
    dice: float
    hd95_mm: float | None
    msd_mm: float | None
    volume_ours_ml: float
    volume_received_ml: float
    volume_change_ml: float
    computed_at: str


class StructureSummary(_Out):
    structure: str
    compared: int
    edited: int
    deleted: int
    dice_median: float | None
    hd95_median_mm: float | None
    msd_median_mm: float | None
    volume_change_median_ml: float | None


class InputRow(_Out):
    job: int
    model_version: str
    modality: str | None
    manufacturer: str | None
    slice_thickness_mm: float | None
    kvp: float | None
    intensity_p01: float | None
    intensity_p50: float | None
    intensity_p99: float | None
    recorded_at: str
    dice_mean: float | None  # of the corrections of this job's result (None: none yet)


class FeedbackView(_Out):
    model: str
    objects: dict[str, int]
    structures: list[StructureSummary]
    figures: list[Figure]
    inputs: list[InputRow]


def _iso(value: Any) -> str:
    return f"{value.isoformat(timespec='seconds')}Z"


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 4) if known else None


def feedback_view(index: Index, model: str, *, authenticated: bool) -> dict[str, Any]:
    """The figures, summaries and inputs of ``model`` (oldest first)."""
    with index.session() as session:
        counts = dict(session.execute(
            select(FeedbackObject.state, func.count()).where(FeedbackObject.model == model)
            .group_by(FeedbackObject.state)).all())
        rows = session.execute(
            select(FeedbackStructure, FeedbackObject.job_pk)
            .join(FeedbackObject, FeedbackStructure.feedback_pk == FeedbackObject.id)
            .where(FeedbackStructure.model == model)
            .order_by(FeedbackStructure.computed_at, FeedbackStructure.id)).all()
        inputs = session.scalars(select(JobInput).where(JobInput.model == model)
                                 .order_by(JobInput.job_pk)).all()
        figures: list[dict[str, Any]] = []
        for s, job_pk in rows:
            figure: dict[str, Any] = {"feedback": s.feedback_pk, "job": int(job_pk or 0),
                      "model_version": s.model_version, "structure": s.structure,
                      "outcome": s.outcome, "dice": s.dice, "hd95_mm": s.hd95_mm,
                      "msd_mm": s.msd_mm, "volume_ours_ml": s.volume_ours_ml,
                      "volume_received_ml": s.volume_received_ml,
                      "volume_change_ml": s.volume_change_ml,
                      "computed_at": _iso(s.computed_at)}
            if authenticated:
                figure["received_name"] = s.received_name
            figures.append(figure)
        by_job: dict[int, list[float]] = defaultdict(list)
        for f in figures:
            by_job[f["job"]].append(f["dice"])
        input_rows = [{
            "job": i.job_pk, "model_version": i.model_version, "modality": i.modality,
            "manufacturer": i.manufacturer, "slice_thickness_mm": i.slice_thickness_mm,
            "kvp": i.kvp, "intensity_p01": i.intensity_p01, "intensity_p50": i.intensity_p50,
            "intensity_p99": i.intensity_p99, "recorded_at": _iso(i.recorded_at),
            "dice_mean": (round(statistics.fmean(by_job[i.job_pk]), 4)
                          if by_job.get(i.job_pk) else None)} for i in inputs]
    per_structure: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for f in figures:
        per_structure[f["structure"]].append(f)
    summaries: list[dict[str, Any]] = [{
        "structure": name, "compared": len(items),
        "edited": sum(1 for f in items if f["outcome"] == "deleted" or f["dice"] < EDITED_BELOW),
        "deleted": sum(1 for f in items if f["outcome"] == "deleted"),
        "dice_median": _median([f["dice"] for f in items]),
        "hd95_median_mm": _median([f["hd95_mm"] for f in items]),
        "msd_median_mm": _median([f["msd_mm"] for f in items]),
        "volume_change_median_ml": _median([f["volume_change_ml"] for f in items]),
    } for name, items in per_structure.items()]
    summaries.sort(key=lambda s: (-s["edited"], s["dice_median"] or 0.0, s["structure"]))
    view = {"model": model, "objects": {str(k): int(v) for k, v in counts.items()},
            "structures": summaries, "figures": figures, "inputs": input_rows}
    return FeedbackView.model_validate(view).model_dump(exclude_unset=True)


# ------------------------------------------------------------------------------ SVG plots

_W, _H, _PAD = 560, 180, 36
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")


def _svg(title: str, body: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
            f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{escape(title)}">'
            f'<rect x="0" y="0" width="{_W}" height="{_H}" fill="#fbfcfe" stroke="#d9dde5"/>'
            f"{body}</svg>")


def _axes(low: float, high: float, unit: str) -> str:
    out = [f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - 8}" y2="{_H - _PAD}" '
           'stroke="#6b7385"/>',
           f'<line x1="{_PAD}" y1="8" x2="{_PAD}" y2="{_H - _PAD}" stroke="#6b7385"/>']
    for value in (low, (low + high) / 2, high):
        y = _y(value, low, high)
        out.append(f'<text x="{_PAD - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
                   f"{value:g}</text>")
    out.append(f'<text x="{_PAD}" y="{_H - 8}" font-size="10">{escape(unit)}</text>')
    return "".join(out)


def _y(value: float, low: float, high: float) -> float:
    span = (high - low) or 1.0
    return (_H - _PAD) - (value - low) / span * (_H - _PAD - 8)


def trend_svg(figures: Sequence[dict[str, Any]], key: str, unit: str) -> str:
    """``key`` of each figure in the order computed (x), one colour per structure."""
    points = [(i, f[key], f["structure"]) for i, f in enumerate(figures) if f[key] is not None]
    if not points:
        return '<p class="muted">no figures yet</p>'
    values = [float(v) for _, v, _ in points]
    low, high = (0.0, 1.0) if key == "dice" else (0.0, max(max(values), 1.0))
    names = sorted({name for _, _, name in points})
    colour = {name: _COLOURS[i % len(_COLOURS)] for i, name in enumerate(names)}
    step = (_W - _PAD - 16) / max(len(figures) - 1, 1)
    dots = "".join(
        f'<circle cx="{_PAD + 4 + i * step:.1f}" cy="{_y(float(v), low, high):.1f}" r="3" '
        f'fill="{colour[name]}"><title>{escape(name)}: {float(v):.3f}</title></circle>'
        for i, v, name in points)
    legend = "".join(
        f'<text x="{_W - 10}" y="{14 + 12 * k}" font-size="10" text-anchor="end" '
        f'fill="{colour[name]}">{escape(name)}</text>' for k, name in enumerate(names))
    return _svg(f"{key} over time", _axes(low, high, f"{unit}, in the order received")
                + dots + legend)


def histogram_svg(values: Sequence[float], bins: int = 10) -> str:
    """How the Dice values are distributed over [0, 1]."""
    if not values:
        return '<p class="muted">no figures yet</p>'
    counts = [0] * bins
    for v in values:
        counts[min(int(v * bins), bins - 1)] += 1
    top = max(counts)
    width = (_W - _PAD - 16) / bins
    bars = "".join(
        f'<rect x="{_PAD + 4 + k * width:.1f}" y="{_y(c, 0, top):.1f}" width="{width - 2:.1f}" '
        f'height="{(_H - _PAD) - _y(c, 0, top):.1f}" fill="#1f77b4">'
        f"<title>Dice {k / bins:.1f}-{(k + 1) / bins:.1f}: {c}</title></rect>"
        for k, c in enumerate(counts))
    ticks = "".join(
        f'<text x="{_PAD + 4 + k * width:.1f}" y="{_H - _PAD + 12}" font-size="10">'
        f"{k / bins:.1f}</text>" for k in range(0, bins, 2))
    return _svg("Dice distribution", _axes(0, top, "structures per Dice bin") + bars + ticks)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return escape(str(value))


def feedback_page(view: dict[str, Any]) -> str:
    """The body of a model's feedback page from :func:`feedback_view`'s answer."""
    figures, structures, inputs = view["figures"], view["structures"], view["inputs"]
    states = ", ".join(f"{n} {escape(s)}" for s, n in sorted(view["objects"].items()))
    rows = "".join(
        f'<tr class="structure"><td>{escape(s["structure"])}</td><td>{s["compared"]}</td>'
        f'<td>{s["edited"]}</td><td>{s["deleted"]}</td><td>{_cell(s["dice_median"])}</td>'
        f'<td>{_cell(s["hd95_median_mm"])}</td><td>{_cell(s["msd_median_mm"])}</td>'
        f'<td>{_cell(s["volume_change_median_ml"])}</td></tr>' for s in structures)
    table = ("<table><tr><th>structure</th><th>compared</th><th>edited</th><th>deleted</th>"
             "<th>Dice (median)</th><th>HD95 mm</th><th>MSD mm</th><th>volume change ml</th>"
             f"</tr>{rows}</table>") if rows else '<p class="muted">no corrections yet</p>'
    recent = "".join(
        f'<tr><td>{f["feedback"]}</td><td>job {f["job"]}</td><td>{escape(f["model_version"])}'
        f'</td><td>{escape(f["structure"])}</td><td>{escape(f["outcome"])}</td>'
        f'<td>{_cell(f["dice"])}</td><td>{_cell(f["hd95_mm"])}</td><td>{_cell(f["msd_mm"])}'
        f'</td><td>{_cell(f["volume_change_ml"])}</td><td>{escape(f["computed_at"])}</td></tr>'
        for f in reversed(figures[-50:]))
    drift = "".join(
        f'<tr><td>job {i["job"]}</td><td>{escape(i["model_version"])}</td>'
        f'<td>{_cell(i["modality"])}</td><td>{_cell(i["manufacturer"])}</td>'
        f'<td>{_cell(i["slice_thickness_mm"])}</td><td>{_cell(i["kvp"])}</td>'
        f'<td>{_cell(i["intensity_p01"])} / {_cell(i["intensity_p50"])} / '
        f'{_cell(i["intensity_p99"])}</td><td>{_cell(i["dice_mean"])}</td></tr>'
        for i in reversed(inputs[-50:]))
    return (f'<p>{states or "no received objects yet"}; <a href="/">back</a></p>'
            f"<h2>Structures, most edited first</h2>{table}"
            f"<h2>Dice over time</h2>{trend_svg(figures, 'dice', 'Dice')}"
            f"<h2>HD95 over time</h2>{trend_svg(figures, 'hd95_mm', 'HD95 mm')}"
            f"<h2>Dice distribution</h2>{histogram_svg([f['dice'] for f in figures])}"
            "<h2>Inputs (drift)</h2><table><tr><th>job</th><th>version</th><th>modality</th>"
            "<th>manufacturer</th><th>slice thickness mm</th><th>kVp</th>"
            "<th>intensity p1 / p50 / p99</th><th>Dice (mean of corrections)</th></tr>"
            f"{drift}</table>"
            "<h2>Latest figures</h2><table><tr><th>comparison</th><th>job</th><th>version</th>"
            "<th>structure</th><th>outcome</th><th>Dice</th><th>HD95 mm</th><th>MSD mm</th>"
            f"<th>volume change ml</th><th>computed</th></tr>{recent}</table>")
