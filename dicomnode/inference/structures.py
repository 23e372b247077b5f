"""Structure names of imported models -> the card's labels (display name, codes, colour).

Importers (``dicomnode models import``) call :func:`labels_for` with the model's label names
as its framework writes them (nnU-Net's ``dataset.json`` labels, TotalSegmentator's class names
such as ``liver`` or ``kidney_left``). A ``--structures`` file (YAML) maps names to what the
card needs; names it does not cover are looked up in :data:`KNOWN`, a table of common anatomy
with SNOMED CT codes; what neither knows gets a generic code and ``needs_review: true``, which
``dicomnode models check`` lists.

A structures file::

    liver:                       # the model's label name
      name: Liver                # display name (ROI / segment label), default: from the table
      color: [221, 130, 101]
      type: {scheme: SCT, value: "10200004", meaning: Liver}
      category: {scheme: SCT, value: "123037004", meaning: Anatomical Structure}  # optional
      rt_roi_interpreted_type: ORGAN                                              # optional
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ANATOMY", "GENERIC", "KNOWN", "StructuresError", "labels_for", "read_structures"]

ANATOMY = {"scheme": "SCT", "value": "123037004", "meaning": "Anatomical Structure"}
GENERIC = {"scheme": "SCT", "value": "85756007", "meaning": "Tissue"}


class StructuresError(ValueError):
    """A structures file that cannot be used; the message names the file and the entry."""


def _t(value: str, meaning: str) -> dict[str, str]:
    return {"scheme": "SCT", "value": value, "meaning": meaning}


#: label name (lower case, as TotalSegmentator / nnU-Net datasets write it) -> (display name,
#: SNOMED CT type, RT ROI Interpreted Type). Only codes checked against SNOMED CT; laterality
#: is in the concept where SNOMED CT has a lateralised concept, else in the display name.
KNOWN: dict[str, tuple[str, dict[str, str], str]] = {
    "liver": ("Liver", _t("10200004", "Liver"), "ORGAN"),
    "spleen": ("Spleen", _t("78961009", "Spleen"), "ORGAN"),
    "kidney": ("Kidney", _t("64033007", "Kidney"), "ORGAN"),
    "kidney_right": ("Kidney R", _t("9846003", "Right kidney"), "ORGAN"),
    "kidney_left": ("Kidney L", _t("18639004", "Left kidney"), "ORGAN"),
    "right_kidney": ("Kidney R", _t("9846003", "Right kidney"), "ORGAN"),
    "left_kidney": ("Kidney L", _t("18639004", "Left kidney"), "ORGAN"),
    "gallbladder": ("Gallbladder", _t("28231008", "Gallbladder"), "ORGAN"),
    "stomach": ("Stomach", _t("69695003", "Stomach"), "ORGAN"),
    "pancreas": ("Pancreas", _t("15776009", "Pancreas"), "ORGAN"),
    "adrenal_gland": ("Adrenal gland", _t("23451007", "Adrenal gland"), "ORGAN"),
    "adrenal_gland_right": ("Adrenal gland R", _t("23451007", "Adrenal gland"), "ORGAN"),
    "adrenal_gland_left": ("Adrenal gland L", _t("23451007", "Adrenal gland"), "ORGAN"),
    "esophagus": ("Esophagus", _t("32849002", "Esophagus"), "ORGAN"),
    "trachea": ("Trachea", _t("44567001", "Trachea"), "ORGAN"),
    "heart": ("Heart", _t("80891009", "Heart"), "ORGAN"),
    "aorta": ("Aorta", _t("15825003", "Aorta"), "ORGAN"),
    "inferior_vena_cava": ("Inferior vena cava", _t("64131007", "Inferior vena cava"), "ORGAN"),
    "superior_vena_cava": ("Superior vena cava", _t("48345005", "Superior vena cava"), "ORGAN"),
    "portal_vein_and_splenic_vein": ("Portal and splenic vein", _t("32764006", "Portal vein"),
                                     "ORGAN"),
    "portal_vein": ("Portal vein", _t("32764006", "Portal vein"), "ORGAN"),
    "pulmonary_artery": ("Pulmonary artery", _t("81040000", "Pulmonary artery"), "ORGAN"),
    "urinary_bladder": ("Urinary bladder", _t("89837001", "Urinary bladder"), "ORGAN"),
    "bladder": ("Urinary bladder", _t("89837001", "Urinary bladder"), "ORGAN"),
    "prostate": ("Prostate", _t("41216001", "Prostate"), "ORGAN"),
    "brain": ("Brain", _t("12738006", "Brain"), "ORGAN"),
    "spinal_cord": ("Spinal cord", _t("2748008", "Spinal cord"), "ORGAN"),
    "small_bowel": ("Small bowel", _t("30315005", "Small intestine"), "ORGAN"),
    "duodenum": ("Duodenum", _t("38848004", "Duodenum"), "ORGAN"),
    "colon": ("Colon", _t("71854001", "Colon"), "ORGAN"),
    "thyroid_gland": ("Thyroid gland", _t("69748006", "Thyroid gland"), "ORGAN"),
    "lung": ("Lung", _t("39607008", "Lung"), "ORGAN"),
    "lung_right": ("Lung R", _t("3341006", "Right lung"), "ORGAN"),
    "lung_left": ("Lung L", _t("44029006", "Left lung"), "ORGAN"),
    "lung_upper_lobe_left": ("Lung upper lobe L", _t("44714003", "Upper lobe of left lung"),
                             "ORGAN"),
    "lung_lower_lobe_left": ("Lung lower lobe L", _t("90572001", "Lower lobe of left lung"),
                             "ORGAN"),
    "lung_upper_lobe_right": ("Lung upper lobe R", _t("45653009", "Upper lobe of right lung"),
                              "ORGAN"),
    "lung_middle_lobe_right": ("Lung middle lobe R",
                               _t("72481006", "Middle lobe of right lung"), "ORGAN"),
    "lung_lower_lobe_right": ("Lung lower lobe R", _t("50410001", "Lower lobe of right lung"),
                              "ORGAN"),
    "sternum": ("Sternum", _t("56873002", "Sternum"), "ORGAN"),
    "sacrum": ("Sacrum", _t("54735007", "Sacrum"), "ORGAN"),
    "skull": ("Skull", _t("89546000", "Skull"), "ORGAN"),
    "femur": ("Femur", _t("71341001", "Femur"), "ORGAN"),
    "femur_left": ("Femur L", _t("71341001", "Femur"), "ORGAN"),
    "femur_right": ("Femur R", _t("71341001", "Femur"), "ORGAN"),
    "humerus_left": ("Humerus L", _t("85050009", "Humerus"), "ORGAN"),
    "humerus_right": ("Humerus R", _t("85050009", "Humerus"), "ORGAN"),
    "clavicula_left": ("Clavicle L", _t("51299004", "Clavicle"), "ORGAN"),
    "clavicula_right": ("Clavicle R", _t("51299004", "Clavicle"), "ORGAN"),
    "scapula_left": ("Scapula L", _t("79601000", "Scapula"), "ORGAN"),
    "scapula_right": ("Scapula R", _t("79601000", "Scapula"), "ORGAN"),
    "body": ("External", _t("38266002", "Entire body as a whole"), "EXTERNAL"),
}

#: a colour per known structure, else from this cycle (RGB)
_PALETTE = (
    (221, 130, 101), (157, 108, 162), (185, 102, 83), (216, 101, 79), (230, 220, 70),
    (128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (244, 214, 49),
    (183, 156, 220), (47, 150, 103), (250, 250, 225), (0, 151, 206), (216, 191, 216),
    (255, 181, 158), (139, 126, 177), (145, 60, 66), (150, 98, 83), (177, 124, 92),
)


def read_structures(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a structures file (see the module docstring).

    Raises:
        StructuresError: not a mapping of label names to mappings, or an unknown key.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise StructuresError(f"{path}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise StructuresError(f"{path}: must map label names to their name, color and codes")
    allowed = {"name", "color", "type", "category", "rt_roi_interpreted_type"}
    out: dict[str, dict[str, Any]] = {}
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise StructuresError(
                f"{path}: {key}: must be a mapping ({', '.join(sorted(allowed))})")
        unknown = set(entry) - allowed
        if unknown:
            raise StructuresError(f"{path}: {key}: unknown key(s) {', '.join(sorted(unknown))}; "
                                  f"allowed: {', '.join(sorted(allowed))}")
        out[str(key)] = dict(entry)
    return out


def _display(name: str) -> str:
    text = name.replace("_", " ").strip()
    return (text[:1].upper() + text[1:])[:64] or "Structure"


def labels_for(names: Sequence[str] | Mapping[str, int],
               structures_file: str | Path | Mapping[str, Mapping[str, Any]] | None = None,
               ) -> tuple[list[dict[str, Any]], list[str]]:
    """Card label entries for a model's structures, and the names that need review.

    ``names`` lists the label names in value order (values 1, 2, ...) or maps each name to its
    label value. ``structures_file`` is a structures file, or its content already read.
    Each entry has ``value``, ``name``, ``color``, ``category``, ``type``,
    ``rt_roi_interpreted_type`` and ``needs_review`` (true when neither the structures file
    nor :data:`KNOWN` gave a code). Returns ``(labels, names needing review)``.

    Raises:
        StructuresError: the structures file is unusable.
    """
    values = dict(names) if isinstance(names, Mapping) else {n: i + 1 for i, n in
                                                             enumerate(names)}
    given: Mapping[str, Mapping[str, Any]] = (
        {} if structures_file is None
        else structures_file if isinstance(structures_file, Mapping)
        else read_structures(structures_file))
    labels: list[dict[str, Any]] = []
    review: list[str] = []
    used: set[str] = set()
    for index, (source, value) in enumerate(values.items()):
        key = source.lower()
        entry = given.get(source, given.get(key, {}))
        known = KNOWN.get(key) or KNOWN.get(key.replace(" ", "_").replace("-", "_"))
        display = str(entry.get("name") or (known[0] if known else _display(source)))
        base, n = display, 2
        while display in used:  # card label names are distinct
            display = f"{base[:60]} {n}"
            n += 1
        used.add(display)
        code = entry.get("type") or (known[1] if known else None)
        label = {
            "value": int(value),
            "name": display,
            "color": list(entry.get("color") or _PALETTE[index % len(_PALETTE)]),
            "category": entry.get("category") or ANATOMY,
            "type": code or GENERIC,
            "rt_roi_interpreted_type": entry.get("rt_roi_interpreted_type")
            or (known[2] if known else "ORGAN"),
            "needs_review": code is None,
        }
        if code is None:
            review.append(source)
        labels.append(label)
    return labels, review
