"""The DICOM header model shared by every stage (see :mod:`dicomnode.dicom.header`).

Light imports only (pydicom, numpy at most): the receiving process imports it.
"""

from dicomnode.dicom.frames import FrameGeometry, FrameSource, frames_from_index, frames_to_index
from dicomnode.dicom.header import HeaderProblem, ImageHeader, Rescale

__all__ = ["FrameGeometry", "FrameSource", "HeaderProblem", "ImageHeader", "Rescale",
           "frames_from_index", "frames_to_index"]
