"""dicomnode: a DICOM node that brings segmentation models into the imaging workflow."""

__version__ = "0.1.0"
