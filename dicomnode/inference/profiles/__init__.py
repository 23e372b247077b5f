"""Framework profiles: a model imported from a framework (nnU-Net v2, MONAI) runs the way the
framework itself runs it, pre-processing, sliding windows, ensembling and the way back onto
the source grid included, so its labels are the framework's labels.

A card names its profile in ``profile.framework``; the rest of ``profile`` holds the
framework's parameters (e.g. nnU-Net's plan), validated by the profile module when the card
loads. Each profile module provides::

    def validate(card: Card) -> None                     # raise ValueError, precise message
    def segment(card: Card, volumes: Sequence[sitk.Image], *, providers: Sequence[str],
                intra_op_threads: int) -> Segmentation   # like inference.segment.segment

Only ONNX Runtime, numpy, SciPy and SimpleITK run here: never torch nor the framework.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import SimpleITK as sitk

    from dicomnode.inference.segment import Segmentation
    from dicomnode.models.card import Card

__all__ = ["FRAMEWORKS", "profile_module", "segment_with_profile"]

#: framework name -> module (imported when a card uses it)
FRAMEWORKS: dict[str, str] = {
    "nnunet": "dicomnode.inference.profiles.nnunet",
    "monai": "dicomnode.inference.profiles.monai",
}


def profile_module(framework: str) -> ModuleType:
    """The module implementing ``framework``'s profile.

    Raises:
        ValueError: no profile of that name.
    """
    if framework not in FRAMEWORKS:
        known = ", ".join(sorted(FRAMEWORKS)) or "none"
        raise ValueError(f"profile.framework {framework!r} is not known; known: {known}")
    return importlib.import_module(FRAMEWORKS[framework])


def segment_with_profile(card: Card, volumes: Sequence[sitk.Image], *,
                         providers: Sequence[str], intra_op_threads: int) -> Segmentation:
    assert card.profile is not None
    module = profile_module(str(card.profile["framework"]))
    result: Segmentation = module.segment(card, volumes, providers=providers,
                                          intra_op_threads=intra_op_threads)
    return result
