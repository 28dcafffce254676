"""A picture for people: axial slices through the largest findings, outlined, as one PNG montage.

Slices are shown as radiologists read them (patient's right on the viewer's left, anterior at
the top), at a soft-tissue window for CT (W 400 / L 40 HU) or the 1st-99th percentile for other
intensities, with each pixel drawn at its physical size.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from schemas.results import Finding

TILE_MM = 1.0  # millimetres per displayed pixel
MAX_TILES = 6
COLUMNS = 3
SOFT_TISSUE_HU = (-160.0, 240.0)
# One colour per label value (cycled): red, yellow, cyan, green, magenta, orange.
COLOURS = [(230, 40, 40), (250, 210, 40), (40, 210, 230), (60, 200, 80), (220, 60, 220), (250, 140, 30)]
_RAS = nib.orientations.axcodes2ornt(("R", "A", "S"))


@dataclass(frozen=True)
class Tile:
    image: Image.Image
    caption: str


def render_preview(
    volume: np.ndarray, labels: np.ndarray, affine: np.ndarray, findings: Sequence[Finding], ct: bool
) -> bytes:
    """Blocking: the montage as PNG bytes."""
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), _RAS)
    ras_volume = nib.orientations.apply_orientation(volume, transform)
    ras_labels = nib.orientations.apply_orientation(labels, transform)
    spacing = _ras_spacing(affine, transform)
    low, high = SOFT_TISSUE_HU if ct else _percentiles(ras_volume)
    tiles = [
        _tile(ras_volume[:, :, z], ras_labels[:, :, z], spacing, (low, high), caption)
        for z, caption in _slices(ras_labels, findings, affine, transform)
    ]
    return _montage(tiles)


def _ras_spacing(affine: np.ndarray, transform: np.ndarray) -> tuple[float, float]:
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    ras = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(transform):
        ras[int(target)] = float(zooms[axis])
    return ras[0], ras[1]


def _percentiles(volume: np.ndarray) -> tuple[float, float]:
    sample = volume[:: max(1, volume.shape[0] // 64), :: max(1, volume.shape[1] // 64), :]
    low, high = np.percentile(sample, [1.0, 99.0])
    return float(low), float(high if high > low else low + 1.0)


def _slices(
    ras_labels: np.ndarray, findings: Sequence[Finding], affine: np.ndarray, transform: np.ndarray
) -> list[tuple[int, str]]:
    """Axial slice indices (RAS array) through the largest findings, or the middle slice."""
    chosen: dict[int, list[str]] = {}
    for finding in sorted(findings, key=lambda f: -f.volume):
        index = np.array([finding.location.x, finding.location.y, finding.location.z])
        z = int(np.rint(_to_ras_index(index, ras_labels.shape, transform)[2]))
        z = min(max(z, 0), ras_labels.shape[2] - 1)
        if z in chosen or len(chosen) < MAX_TILES:
            chosen.setdefault(z, []).append(finding.id)
    if not chosen:
        return [(ras_labels.shape[2] // 2, "no findings: middle slice")]
    return [(z, f"slice {z}: {', '.join(ids)}") for z, ids in sorted(chosen.items())]


def _to_ras_index(index: np.ndarray, ras_shape: tuple[int, ...], transform: np.ndarray) -> np.ndarray:
    out = np.zeros(3)
    for axis, (target, flip) in enumerate(transform):
        value = index[axis]
        out[int(target)] = (ras_shape[int(target)] - 1 - value) if flip < 0 else value
    return out


def _tile(
    plane: np.ndarray, label_plane: np.ndarray, spacing: tuple[float, float], window: tuple[float, float], caption: str
) -> Tile:
    grey = np.clip((plane - window[0]) / (window[1] - window[0]), 0.0, 1.0)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    for value in np.unique(label_plane[label_plane > 0]):
        region = label_plane == value
        edge = region & ~ndimage.binary_erosion(region)
        rgb[edge] = COLOURS[(int(value) - 1) % len(COLOURS)]
    # Display: rows from anterior to posterior, columns from the patient's right to left.
    shown = np.ascontiguousarray(rgb[::-1, ::-1].transpose(1, 0, 2))
    image = Image.fromarray(shown, "RGB")
    size = (max(1, round(shown.shape[1] * spacing[0] / TILE_MM)), max(1, round(shown.shape[0] * spacing[1] / TILE_MM)))
    return Tile(image.resize(size, Image.Resampling.NEAREST), caption)


def _montage(tiles: list[Tile]) -> bytes:
    width = max(tile.image.width for tile in tiles)
    height = max(tile.image.height for tile in tiles) + 16
    columns = min(COLUMNS, len(tiles))
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * width, rows * height), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for index, tile in enumerate(tiles):
        x, y = (index % columns) * width, (index // columns) * height
        sheet.paste(tile.image, (x, y + 16))
        draw.text((x + 4, y + 2), tile.caption[:60], fill=(255, 255, 255))
    out = io.BytesIO()
    sheet.save(out, format="PNG", optimize=True)
    return out.getvalue()
