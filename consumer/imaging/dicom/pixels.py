"""Decoding pixel data into one preallocated float32 stack, in parallel threads.

Pixel data goes through pydicom's handlers (pylibjpeg, gdcm and pyjpegls as installed plugins);
the modality LUT (RescaleSlope/Intercept, HU for CT) is applied per frame; a tilted stack's
slices are shifted in-plane back onto the regular grid.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut
from scipy import ndimage

from consumer.errors import InputError
from consumer.imaging.dicom.frames import FrameRef
from consumer.imaging.dicom.geometry import StackGeometry
from consumer.imaging.dicom.headers import DicomFile
from schemas.errors import ErrorCode


def decode(file: DicomFile) -> np.ndarray:
    """All frames of one file as (frames, rows, columns) stored values (no rescale yet)."""
    try:
        ds = pydicom.dcmread(file.path)
        pixels = ds.pixel_array
        if "ModalityLUTSequence" in ds:
            pixels = apply_modality_lut(pixels, ds)
        return np.asarray(pixels).reshape(file.frames, int(ds.Rows), int(ds.Columns))
    except Exception as error:  # decoders raise many kinds for corrupt or truncated data
        meta = getattr(file.header, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        raise InputError(
            f"pixel data of {file.name} could not be decoded "
            f"(transfer syntax {syntax or 'unknown'}): {type(error).__name__}: {error}",
            code=ErrorCode.DICOM_DECODE_FAILED,
        ) from error


def decode_stack(files: list[DicomFile], frames: list[FrameRef], geometry: StackGeometry, workers: int) -> np.ndarray:
    """Blocking: the (slices, rows, columns) stack of the kept frames, in stack order, rescaled."""
    columns, rows, slices = geometry.shape
    stack = np.empty((slices, rows, columns), dtype=np.float32)
    # Which slices each file fills: every file is decoded once, whatever its frame count.
    needed: dict[int, list[tuple[int, FrameRef]]] = defaultdict(list)
    for k, plane_index in enumerate(geometry.order):
        ref = frames[plane_index]
        needed[ref.file].append((k, ref))

    def fill(file_index: int) -> None:
        pixels = decode(files[file_index])
        for k, ref in needed[file_index]:
            stack[k] = _slice(pixels[ref.frame], ref, geometry, k)

    # Threads: uncompressed data is mostly I/O, and the JPEG 2000 decoder runs threads of its own
    # (measured: decoder processes gave no gain on 2 cores).
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(fill, needed))
    if not np.all(np.isfinite(stack)):
        raise InputError("the decoded pixel values are not finite", code=ErrorCode.DICOM_DECODE_FAILED)
    return stack


def _slice(stored: np.ndarray, ref: FrameRef, geometry: StackGeometry, k: int) -> np.ndarray:
    frame = stored.astype(np.float32)
    if ref.slope != 1.0 or ref.intercept != 0.0:
        frame *= ref.slope
        frame += ref.intercept
    if geometry.shifts is not None:
        shift_cols, shift_rows = geometry.shifts[k]
        frame = ndimage.shift(frame, (shift_rows, shift_cols), order=1, mode="constant", cval=float(frame.min()))
    return frame
