"""``dicomnode models import FRAMEWORK FOLDER --name NAME``: turn a trained model as a framework
writes it (an nnU-Net v2 result folder, a MONAI bundle) into a model package: ONNX file(s)
exported from the real network (:mod:`dicomnode.inference.export`), a card with the
framework's profile (:mod:`dicomnode.inference.profiles`), the licence and provenance found,
and the report of the check that the package reproduces the framework's own output. An import
whose check fails leaves no package behind.

These need torch and the framework (``pip install 'dicomnode[import]'``). Each importer module
provides::

    def add_arguments(parser: argparse.ArgumentParser) -> None   # its own options
    def run(args: argparse.Namespace, models_dir: Path) -> int   # exit code; prints a report
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["IMPORTERS", "importer_module"]

#: ``models import`` sub-command -> module
IMPORTERS: dict[str, str] = {
    "nnunet": "dicomnode.inference.importers.nnunet",
    "monai-bundle": "dicomnode.inference.importers.monai",
}


def importer_module(kind: str) -> ModuleType:
    """The module importing models of ``kind`` (a key of :data:`IMPORTERS`)."""
    return importlib.import_module(IMPORTERS[kind])
