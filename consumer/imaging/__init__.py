"""Blocking image code: what an input is, NIfTI, ZIP and DICOM reading, the DICOM SEG, findings from a probability map."""
