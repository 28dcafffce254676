"""DICOM: headers, series selection, frame geometry, the regular grid, pixels, and the SEG written back."""
