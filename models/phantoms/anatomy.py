"""The anatomy of a synthetic trunk, drawn in millimetres in a canonical RAS array.

What is here is what real scans have and a lesion model must leave alone: a body of varied size
with fat and muscle, the table and blankets outside it, spine (vertebral bodies with cortex and
marrow, discs, canal, posterior elements), ribs with marrow and costal cartilage, sternum,
pelvis and femoral heads, lungs with vessels and airways, heart, enhanced aorta and vena cava,
liver with its vessels, spleen, kidneys (cortex, medulla, sinus), pancreas, stomach and bowel
loops with gas, fluid or oral contrast, sometimes arms and metal. Contrast phase varies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

# Tissue labels of the phantom's `tissue` map: what each voxel was drawn as.
AIR, OUTSIDE, SOFT, FAT, LUNG, BONE, VESSEL, BOWEL, METAL = 0, 1, 2, 3, 4, 5, 6, 7, 8
LIVER, SPLEEN, KIDNEY, PANCREAS = 10, 11, 12, 13
ORGAN_LABELS = {"liver": LIVER, "spleen": SPLEEN, "kidney": KIDNEY, "pancreas": PANCREAS, "lung": LUNG}

CORTEX_HU = (650.0, 1100.0)
MARROW_HU = (120.0, 280.0)
METAL_HU = 3000.0

# Contrast phases: HU of blood, liver, spleen, kidney cortex, kidney medulla, pancreas.
PHASES = {
    "native": dict(blood=40.0, liver=58.0, spleen=48.0, cortex=35.0, medulla=30.0, pancreas=42.0),
    "arterial": dict(blood=300.0, liver=70.0, spleen=115.0, cortex=190.0, medulla=70.0, pancreas=115.0),
    "portal": dict(blood=165.0, liver=110.0, spleen=110.0, cortex=170.0, medulla=140.0, pancreas=95.0),
}


@dataclass
class Trunk:
    """Where things ended up, for lesion placement and the scanner."""

    organ_hu: dict[str, float] = field(default_factory=dict)
    streak_sources: list[tuple[np.ndarray, float, tuple[int, int]]] = field(default_factory=list)
    body2d: np.ndarray | None = None  # in-plane body mask of the middle slice, for the noise model


class Painter:
    """Box-limited drawing of shapes into image and tissue arrays (mm coordinates, RAS)."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator):
        self.shape = shape
        self.spacing = np.asarray(spacing, dtype=float)
        self.rng = rng
        self.axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing, strict=True)]
        self.image = np.full(shape, -1000.0, dtype=np.float32)
        self.tissue = np.zeros(shape, dtype=np.uint8)

    def box(self, center: np.ndarray, extent: np.ndarray) -> tuple[tuple[slice, ...], list[np.ndarray]] | None:
        """Slices of the axis-aligned box around center and the local mm coordinates in it."""
        slices, local = [], []
        for axis in range(3):
            coords = self.axes[axis]
            lo = int(np.searchsorted(coords, center[axis] - extent[axis], side="left"))
            hi = int(np.searchsorted(coords, center[axis] + extent[axis], side="right"))
            if hi <= lo:
                return None
            slices.append(slice(lo, hi))
            local.append(coords[lo:hi] - center[axis])
        return tuple(slices), local

    def paint(self, sl: tuple[slice, ...], mask: np.ndarray, hu: float | np.ndarray, label: int | None) -> None:
        region = self.image[sl]
        region[mask] = hu if np.isscalar(hu) else np.asarray(hu)[mask]
        if label is not None:
            self.tissue[sl][mask] = label

    def blob(
        self,
        center: np.ndarray,
        radii: np.ndarray,
        hu: float,
        label: int | None,
        *,
        rotation: np.ndarray | None = None,
        bumps: int = 0,
        shell: tuple[float, float] | None = None,
        keep: np.ndarray | None = None,
    ) -> None:
        """An ellipsoid (optionally rotated, with smooth bumps); `shell` = (thickness mm, HU of the inside)."""
        rotation = np.eye(3) if rotation is None else rotation
        extent = np.abs(rotation) @ radii * (1.3 if bumps else 1.0)
        found = self.box(center, extent)
        if found is None:
            return
        sl, (x, y, z) = found
        x, y, z = np.meshgrid(x, y, z, indexing="ij", sparse=True)
        d = [rotation[0, k] * x + rotation[1, k] * y + rotation[2, k] * z for k in range(3)]
        rho = np.sqrt(sum((d[k] / radii[k]) ** 2 for k in range(3))) + 1e-6
        bound = np.ones_like(rho)
        for _ in range(bumps):
            n = self.rng.normal(size=3)
            n /= np.linalg.norm(n)
            cos = sum(d[k] / radii[k] * n[k] for k in range(3)) / rho
            bound = bound + float(self.rng.uniform(-0.15, 0.2)) * np.exp(3.0 * (cos - 1.0))
        inside = rho <= bound
        if keep is not None:
            inside &= keep[sl]
        self.paint(sl, inside, hu, label)
        if shell is not None:
            thickness, inner_hu = shell
            inner = inside & (rho <= bound * (1.0 - thickness / float(radii.min())))
            self.paint(sl, inner, inner_hu, None)

    def tube(
        self,
        points: np.ndarray,
        radius: float | np.ndarray,
        hu: float,
        label: int | None,
        *,
        lumen: tuple[float, float] | None = None,
        keep_label: int | None = None,
    ) -> None:
        """Capsules along a polyline; `lumen` = (wall thickness mm, HU inside) makes it hollow."""
        radii = np.broadcast_to(np.asarray(radius, dtype=float), (len(points),))
        passes = [(0.0, hu, label)] + ([(lumen[0], lumen[1], None)] if lumen is not None else [])
        for inset, value, lab in passes:
            for a, b, r in zip(points[:-1], points[1:], radii[:-1], strict=True):
                r_in = r - inset
                if r_in <= 0:
                    continue
                found = self.box((a + b) / 2.0, np.abs(b - a) / 2.0 + r_in)
                if found is None:
                    continue
                sl, (x, y, z) = found
                x, y, z = np.meshgrid(x, y, z, indexing="ij", sparse=True)
                ab = (b - a) / 2.0
                length2 = float(ab @ ab) + 1e-9
                t = np.clip((x * ab[0] + y * ab[1] + z * ab[2]) / length2, -1.0, 1.0)
                dist2 = (x - t * ab[0]) ** 2 + (y - t * ab[1]) ** 2 + (z - t * ab[2]) ** 2
                inside = dist2 <= r_in * r_in
                if keep_label is not None:
                    inside &= self.tissue[sl] == keep_label
                self.paint(sl, inside, value, lab)


def rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_walk(
    rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, steps: int, step_mm: float, turn: float
) -> np.ndarray:
    points = [np.asarray(start, dtype=float)]
    d = np.asarray(direction, dtype=float) / np.linalg.norm(direction)
    for _ in range(steps):
        d = d + rng.normal(0.0, turn, size=3)
        d /= np.linalg.norm(d)
        points.append(points[-1] + step_mm * d)
    return np.array(points)


class TrunkBuilder:
    """Draws one trunk. Axial structures are drawn slice by slice, organs and tubes in boxes."""

    def __init__(self, painter: Painter, body_scale: float, z_offset: float, family: str):
        self.p = painter
        self.rng = painter.rng
        self.family = family
        self.z_offset = z_offset  # anatomical z (mm) of the volume centre; 0 is about L1
        self.trunk = Trunk()
        rng = self.rng
        self.phase = PHASES[str(rng.choice(list(PHASES), p=[0.25, 0.2, 0.55]))]
        fov = np.asarray(painter.shape) * painter.spacing
        # Absolute body size, but never larger than the field of view allows (small test grids).
        rx = float(rng.uniform(125.0, 195.0)) * body_scale
        self.rx = min(rx, 0.47 * fov[0])
        self.ry = min(rx * float(rng.uniform(0.68, 0.85)), 0.37 * fov[1])
        self.cy = float(rng.uniform(-0.05, 0.08)) * fov[1]
        self.fat = float(rng.uniform(6.0, 35.0)) * min(1.0, self.rx / 150.0)
        self.wall = float(rng.uniform(7.0, 15.0)) * min(1.0, self.rx / 150.0)

    # -- helpers ----------------------------------------------------------------------------------
    def za(self) -> np.ndarray:
        return self.p.axes[2] + self.z_offset

    def at(self, x: float, y: float, za: float) -> np.ndarray:
        """Anatomical position (x and y as fractions of the cavity radii) in volume mm."""
        return np.array([x * self.cav[0], self.cy + y * self.cav[1], za - self.z_offset])

    def body_radii(self, za: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        chest = 1.0 / (1.0 + np.exp(-(za - 60.0) / 40.0))
        pelvis = 1.0 / (1.0 + np.exp((za + 170.0) / 30.0))
        return self.rx * (1.0 + 0.06 * pelvis), self.ry * (1.0 + 0.07 * chest)

    # -- outside the body -------------------------------------------------------------------------
    def table_and_blankets(self) -> None:
        p, rng = self.p, self.rng
        x = p.axes[0][:, None]
        y = p.axes[1][None, :]
        _, ry = self.body_radii(self.za())
        bottom = self.cy - float(ry.max())
        pad = float(rng.uniform(0.0, 30.0)) if rng.random() < 0.6 else 0.0
        top = bottom - pad
        thickness = float(rng.uniform(25.0, 60.0))
        half_width = self.rx + float(rng.uniform(30.0, 120.0))
        curve = float(rng.uniform(0.0, 4e-4))
        surface = top + curve * x**2
        slab = (y <= surface) & (y >= surface - thickness) & (np.abs(x) <= half_width)
        skin = slab & ((y >= surface - 2.5) | (y <= surface - thickness + 2.5))
        mattress = (y > surface) & (y <= surface + pad) & (np.abs(x) <= half_width - 10.0)
        core_hu = float(rng.uniform(-950.0, -700.0))
        shell_hu = float(rng.uniform(80.0, 450.0))
        pad_hu = float(rng.uniform(-950.0, -450.0))  # foam; a gel pad (~0 HU) would join body and table
        for mask, hu in ((slab, core_hu), (skin, shell_hu), (mattress, pad_hu)):
            p.image[mask] = hu
            p.tissue[mask] = OUTSIDE
        if rng.random() < 0.6:
            self._blanket()

    def _blanket(self) -> None:
        """Folded cloth over the front and sides: a wavy low-density layer near the skin."""
        p, rng = self.p, self.rng
        x = p.axes[0][:, None]
        y = p.axes[1][None, :] - self.cy
        angle = np.arctan2(y, x)
        gap = float(rng.uniform(0.0, 15.0))
        thick = float(rng.uniform(3.0, 14.0))
        hu = float(rng.uniform(-600.0, -150.0))
        waves = rng.uniform(2.0, 9.0)
        za = self.za()
        rx, ry = self.body_radii(za)
        for k in range(p.shape[2]):
            r = np.hypot(x / rx[k], y / ry[k]) * min(rx[k], ry[k])
            wave = 4.0 * np.sin(waves * angle + 0.02 * za[k])
            layer = (r >= min(rx[k], ry[k]) + gap + wave) & (r <= min(rx[k], ry[k]) + gap + wave + thick)
            layer &= angle > -0.3
            layer &= p.tissue[:, :, k] == AIR
            p.image[:, :, k][layer] = hu
            p.tissue[:, :, k][layer] = OUTSIDE

    # -- the body wall, slice by slice --------------------------------------------------------------
    def body(self) -> None:
        p, rng = self.p, self.rng
        x = p.axes[0][:, None]
        y = p.axes[1][None, :] - self.cy
        za = self.za()
        rx, ry = self.body_radii(za)
        fat_hu = float(rng.uniform(-115.0, -80.0))
        muscle_hu = float(rng.uniform(40.0, 60.0))
        visceral = float(rng.uniform(-110.0, -60.0))
        texture = smooth_texture(p.shape, p.spacing, rng, 12.0, 20.0)
        # Superellipse exponent: some bodies are boxier than an ellipse.
        power = float(rng.uniform(2.0, 2.6))
        for k in range(p.shape[2]):
            outer = np.abs(x / rx[k]) ** power + np.abs(y / ry[k]) ** power <= 1.0
            inner = np.abs(x / (rx[k] - self.fat)) ** power + np.abs(y / (ry[k] - self.fat)) ** power <= 1.0
            crx, cry = rx[k] - self.fat - self.wall, ry[k] - self.fat - self.wall
            cavity = np.abs(x / crx) ** power + np.abs(y / cry) ** power <= 1.0
            sl = p.image[:, :, k]
            tl = p.tissue[:, :, k]
            sl[outer] = fat_hu
            tl[outer] = FAT
            sl[inner] = muscle_hu
            tl[inner] = SOFT
            sl[cavity] = visceral + texture[:, :, k][cavity]
            tl[cavity] = FAT
        self.cav = np.array([self.rx - self.fat - self.wall, self.ry - self.fat - self.wall])
        self.muscle_hu = muscle_hu
        self.vertebra_r = float(rng.uniform(17.0, 25.0)) * min(1.0, self.cav[0] / 110.0)
        self.spine_y = self.cy - self.ry + 0.66 * self.ry
        middle = p.shape[2] // 2
        self.trunk.body2d = np.abs(x / rx[middle]) ** power + np.abs(y / ry[middle]) ** power <= 1.0
        if rng.random() < (0.3 if self.family == "train" else 0.2):
            self._arms(fat_hu, muscle_hu)

    def _arms(self, fat_hu: float, muscle_hu: float) -> None:
        for side in (-1.0, 1.0):
            centre = np.array([side * (self.rx + 55.0), self.cy, 0.0])
            length = np.array([0.0, 0.0, 1.0]) * 1000.0
            self.p.tube(np.array([centre - length, centre + length]), 48.0, fat_hu, FAT)
            self.p.tube(np.array([centre - length, centre + length]), 38.0, muscle_hu, SOFT)
            bone = centre + np.array([side * 5.0, 0.0, 0.0])
            self.p.tube(np.array([bone - length, bone + length]), 11.0, 900.0, BONE, lumen=(3.0, 200.0))

    # -- organs -----------------------------------------------------------------------------------
    def organs(self) -> None:
        p, rng, ph = self.p, self.rng, self.phase
        jitter = lambda s: float(rng.normal(0.0, s))  # noqa: E731
        hu = {k: v + jitter(6.0) for k, v in ph.items()}
        self.trunk.organ_hu.update(liver=hu["liver"], spleen=hu["spleen"], kidney=hu["cortex"], pancreas=hu["pancreas"])
        tex = smooth_texture(p.shape, p.spacing, rng, 4.0, 15.0)
        size = self.cav / 120.0
        # Liver: right lobe and a left lobe reaching across the midline in front.
        liver_centre = self.at(0.45 + jitter(0.04), 0.05 + jitter(0.04), -5.0 + jitter(12.0))
        radii = np.array([0.5 * self.cav[0], 0.72 * self.cav[1], 90.0]) * rng.uniform(0.85, 1.15, 3)
        p.blob(liver_centre, radii, hu["liver"] + 0.0, LIVER, rotation=rotation(rng, 12.0), bumps=4)
        p.blob(
            self.at(0.0, 0.38, 15.0 + jitter(10.0)),
            np.array([0.38 * self.cav[0], 0.28 * self.cav[1], 50.0]),
            hu["liver"],
            LIVER,
            rotation=rotation(rng, 10.0),
            bumps=3,
        )
        self._organ_texture(LIVER, tex)
        # Liver vessels: portal branches enhanced in the portal phase, dark in native scans.
        vessel_hu = ph["blood"] * float(rng.uniform(0.7, 1.1))
        hilum = self.at(0.3, 0.0, -10.0)
        for _ in range(int(rng.integers(4, 9))):
            path = random_walk(rng, hilum, rng.normal(size=3) + np.array([1.0, 0.2, 0.3]), 8, 9.0 * size[0], 0.35)
            radius = np.linspace(6.0, 1.5, len(path)) * size[0]
            p.tube(path, radius, vessel_hu, VESSEL, keep_label=LIVER)
        # Spleen, kidneys, pancreas.
        p.blob(
            self.at(-0.62, -0.35, 25.0 + jitter(10.0)),
            np.array([0.17 * self.cav[0], 0.32 * self.cav[1], 55.0]) * rng.uniform(0.8, 1.2, 3),
            hu["spleen"],
            SPLEEN,
            rotation=rotation(rng, 20.0),
            bumps=3,
        )
        self._organ_texture(SPLEEN, tex)
        for side, za in ((1.0, -45.0), (-1.0, -30.0)):
            centre = self.at(side * 0.45, -0.45, za + jitter(10.0))
            radii = np.array([26.0, 30.0, 55.0]) * size.mean() * rng.uniform(0.85, 1.15, 3)
            rot = rotation(rng, 15.0)
            p.blob(centre, radii, hu["cortex"], KIDNEY, rotation=rot)
            p.blob(centre, radii * 0.7, hu["medulla"], KIDNEY, rotation=rot)
            sinus = centre + np.array([-side * 0.4 * radii[0], 0.0, 0.0])
            p.blob(sinus, radii * np.array([0.35, 0.3, 0.5]), float(rng.uniform(-90.0, 10.0)), KIDNEY, rotation=rot)
        pancreas = np.array([self.at(-0.5, -0.1, 5.0), self.at(-0.1, 0.0, -5.0), self.at(0.15, 0.05, -20.0)])
        pancreas += rng.normal(0.0, 4.0, size=pancreas.shape)
        p.tube(pancreas, np.array([9.0, 11.0, 16.0]) * size.mean(), hu["pancreas"], PANCREAS)
        self._organ_texture(PANCREAS, tex)

    def _organ_texture(self, label: int, texture: np.ndarray) -> None:
        inside = self.p.tissue == label
        self.p.image[inside] += texture[inside]

    def vessels(self) -> None:
        """Aorta and inferior vena cava along the spine, iliac arteries below the bifurcation."""
        p, rng = self.p, self.rng
        blood = self.phase["blood"] + float(rng.normal(0.0, 15.0))
        r_a = float(rng.uniform(9.0, 14.0))
        y_a = self.spine_y + self.vertebra_r + r_a + 3.0
        aorta = np.array([[-15.0, y_a, -190.0], [-12.0, y_a, 80.0], [-18.0, y_a - 10.0, 250.0]])
        aorta[:, 2] -= self.z_offset
        p.tube(aorta, r_a, blood, VESSEL)
        if rng.random() < 0.25:  # calcified plaque
            spot = aorta[0] + rng.uniform(0.0, 1.0) * (aorta[1] - aorta[0]) + np.array([r_a, 0.0, 0.0])
            p.blob(spot, np.array([2.5, 2.5, 6.0]), 700.0, VESSEL)
        ivc = np.array([[22.0, y_a, -190.0], [22.0, y_a + 5.0, 90.0]])
        ivc[:, 2] -= self.z_offset
        p.tube(ivc, r_a * 1.1, blood * 0.6 + 30.0, VESSEL)
        for side in (-1.0, 1.0):
            iliac = np.array(
                [[-15.0, y_a, -190.0], [side * 55.0, y_a + 10.0, -290.0], [side * 75.0, y_a + 30.0, -360.0]]
            )
            iliac[:, 2] -= self.z_offset
            p.tube(iliac, r_a * 0.6, blood, VESSEL)

    def bowel(self) -> None:
        """Stomach and bowel loops: enhancing walls around gas, fluid, oral contrast or stool."""
        p, rng = self.p, self.rng
        wall_hu = float(rng.uniform(35.0, 110.0))
        oral = float(rng.uniform(150.0, 600.0)) if rng.random() < 0.4 else None
        contents = [-1000.0, float(rng.uniform(0.0, 25.0))] + ([oral] if oral is not None else [])
        stomach = self.at(-0.35, 0.3, 35.0)
        radii = np.array([0.28 * self.cav[0], 0.3 * self.cav[1], 55.0]) * rng.uniform(0.7, 1.1, 3)
        p.blob(stomach, radii, wall_hu, BOWEL, shell=(4.0, contents[1] if oral is None else oral))
        # Gas rises: the anterior part of the stomach is air in a supine patient.
        found = p.box(stomach, radii * 0.85)
        if found is not None:
            sl, (_, y, _) = found
            level = float(rng.uniform(0.2, 0.7)) * radii[1]
            gas = (p.tissue[sl] == BOWEL) & (y[None, :, None] > level) & (p.image[sl] != wall_hu)
            p.image[sl][gas] = -1000.0
        scale = self.cav.mean() / 120.0
        for _ in range(int(rng.integers(6, 16))):
            start = self.at(rng.uniform(-0.6, 0.6), rng.uniform(-0.2, 0.6), rng.uniform(-320.0, -20.0))
            path = random_walk(rng, start, rng.normal(size=3), int(rng.integers(6, 16)), 12.0 * scale, 0.5)
            path[:, 0] = np.clip(path[:, 0], -0.8 * self.cav[0], 0.8 * self.cav[0])
            path[:, 1] = np.clip(path[:, 1], self.cy - 0.3 * self.cav[1], self.cy + 0.8 * self.cav[1])
            colon = rng.random() < 0.3
            radius = float(rng.uniform(16.0, 26.0) if colon else rng.uniform(8.0, 14.0)) * scale
            content = float(rng.choice(contents))
            p.tube(path, radius, wall_hu, BOWEL, lumen=(float(rng.uniform(1.5, 3.5)), content))
            if colon and rng.random() < 0.5:  # stool: gas bubbles in soft matter
                for point in path[::2]:
                    p.blob(point + rng.normal(0.0, radius / 3, 3), np.full(3, radius / 4), -900.0, None)

    # -- skeleton ---------------------------------------------------------------------------------
    def skeleton(self) -> None:
        p, rng = self.p, self.rng
        cortex, marrow = float(rng.uniform(*CORTEX_HU)), float(rng.uniform(*MARROW_HU))
        # Vertebrae: bodies with cortex and marrow, discs between, the canal, posterior elements.
        level = float(rng.uniform(26.0, 34.0))
        za0 = self.za()
        first = np.floor((za0.min() - 40.0) / level) * level
        for zc in np.arange(first, za0.max() + 40.0, level):
            centre = np.array([0.0, self.spine_y, zc - self.z_offset])
            height = level * 0.78 / 2.0
            axis = np.array([[0.0, 0.0, -height], [0.0, 0.0, height]])
            p.tube(centre + axis, self.vertebra_r, cortex, BONE, lumen=(1.8, marrow))
            disc = centre + np.array([0.0, 0.0, level / 2.0])
            p.tube(disc + axis * 0.2, self.vertebra_r * 0.95, float(rng.uniform(70.0, 100.0)), SOFT)
            canal = centre - np.array([0.0, self.vertebra_r + 9.0, 0.0])
            ring = canal + np.array([[0.0, 0.0, -height], [0.0, 0.0, height]])
            p.tube(ring, 13.0, cortex * 0.8, BONE, lumen=(4.0, 15.0))
            spinous = np.array([canal - [0, 10, 0], canal - [0, 0.55 * (self.spine_y - self.cy + self.ry), 8]])
            p.tube(spinous, 5.0, cortex * 0.8, BONE, lumen=(1.5, marrow))
            for side in (-1.0, 1.0):
                transverse = canal + np.array([[0.0, 0.0, 0.0], [side * 38.0, -4.0, 0.0]])
                p.tube(transverse, 5.0, cortex * 0.8, BONE, lumen=(1.5, marrow))
        self.trunk.streak_sources.append(
            (self._vox([0.0, self.spine_y]), float(rng.uniform(2.0, 10.0)), (0, p.shape[2]))
        )
        self._ribs(cortex, marrow)
        self._pelvis(cortex, marrow)

    def _vox(self, xy: list[float] | np.ndarray) -> np.ndarray:
        """In-plane mm position -> voxel indices (for the streak model)."""
        return np.array([(xy[i] - self.p.axes[i][0]) / self.p.spacing[i] for i in range(2)])

    def _ribs(self, cortex: float, marrow: float) -> None:
        p, rng = self.p, self.rng
        za = self.za()
        spacing = float(rng.uniform(24.0, 32.0))
        cage = self.cav + 5.0
        cartilage_hu = float(rng.uniform(80.0, 200.0))
        for level in np.arange(-70.0, 330.0, spacing):
            if level - 90.0 > za.max() or level + 20.0 < za.min():
                continue
            for side in (-1.0, 1.0):
                psi = np.linspace(-1.35, 0.95, 14)
                z = level - 75.0 * (psi + 1.35) / 2.3
                pts = np.stack([side * cage[0] * np.cos(psi), self.cy + cage[1] * np.sin(psi), z - self.z_offset], 1)
                r = float(rng.uniform(4.0, 6.0))
                p.tube(pts, r, cortex, BONE, lumen=(1.2, marrow))
                # Costal cartilage from the rib's end towards the sternum, rising slightly.
                psi_c = np.linspace(0.95, 1.4, 5)
                zc = z[-1] + 15.0 * (psi_c - 0.95)
                cart = np.stack(
                    [side * cage[0] * np.cos(psi_c), self.cy + cage[1] * np.sin(psi_c), zc - self.z_offset], 1
                )
                p.tube(cart, r * 0.9, cartilage_hu, BONE)
                if rng.random() < 0.2:
                    p.blob(cart[2], np.full(3, 2.0), 500.0, BONE)
        sternum = np.array([[0.0, self.cy + cage[1] + 2.0, 60.0], [0.0, self.cy + cage[1] + 4.0, 260.0]])
        sternum[:, 2] -= self.z_offset
        p.tube(sternum, 8.0, cortex, BONE, lumen=(1.5, marrow))

    def _pelvis(self, cortex: float, marrow: float) -> None:
        p, rng = self.p, self.rng
        za = self.za()
        if za.min() > -140.0:
            return
        for side in (-1.0, 1.0):
            wing = self.at(side * 0.62, -0.15, -215.0)
            radii = np.array([0.28 * self.cav[0], 0.38 * self.cav[1], 55.0])
            rot = rotation(rng, 10.0)
            p.blob(wing, radii, cortex, BONE, rotation=rot, shell=(3.0, marrow))
            p.blob(
                wing + np.array([-side * 8.0, 0.0, 0.0]), radii * np.array([0.8, 0.95, 0.95]), -90.0, FAT, rotation=rot
            )
            head = self.at(side * 0.55, 0.05, -330.0)
            if rng.random() < (0.08 if self.family == "train" else 0.12):  # hip prosthesis
                p.blob(head, np.full(3, 24.0), METAL_HU, METAL)
                k = int(np.clip(np.searchsorted(p.axes[2], head[2]), 0, p.shape[2]))
                z0, z1 = max(0, k - int(30 / p.spacing[2])), min(p.shape[2], k + int(30 / p.spacing[2]) + 1)
                self.trunk.streak_sources.append((self._vox(head[:2]), float(rng.uniform(150.0, 400.0)), (z0, z1)))
            else:
                p.blob(head, np.full(3, 24.0), cortex, BONE, shell=(2.5, marrow))
        sacrum = np.array([[0.0, self.spine_y, -180.0], [0.0, self.spine_y - 15.0, -300.0]])
        sacrum[:, 2] -= self.z_offset
        p.tube(sacrum, 26.0, cortex, BONE, lumen=(2.0, marrow))

    # -- chest ------------------------------------------------------------------------------------
    def chest(self) -> None:
        """Lungs above the diaphragm domes, with vessels and airways; heart in the mediastinum."""
        p, rng = self.p, self.rng
        za = self.za()
        if za.max() < 20.0:
            return
        x = p.axes[0][:, None]
        y = p.axes[1][None, :] - self.cy
        dome_top = {1.0: float(rng.uniform(50.0, 80.0)), -1.0: float(rng.uniform(35.0, 65.0))}
        lung_hu = float(rng.uniform(-900.0, -820.0))
        cage = self.cav - 2.0
        mediastinum = ((x + 0.08 * self.cav[0]) / (0.24 * self.cav[0])) ** 2 + (
            (y - 0.1 * self.cav[1]) / (0.8 * self.cav[1])
        ) ** 2 <= 1.0
        spine_r = self.vertebra_r + 14.0
        spine = (x / spine_r) ** 2 + ((y - (self.spine_y - self.cy)) / (1.6 * spine_r)) ** 2 <= 1.0
        side_of = np.where(x >= 0, 1.0, -1.0)
        dome = np.where(side_of > 0, dome_top[1.0], dome_top[-1.0]) - 60.0 * (
            ((np.abs(x) - 0.5 * cage[0]) / (0.6 * cage[0])) ** 2 + (y / cage[1]) ** 2
        )
        # Dependent lung is a little denser (gravity): a gradient from back to front.
        gradient = (40.0 * (1.0 - (y + cage[1]) / (2.0 * cage[1]))).astype(np.float32)
        for k in range(p.shape[2]):
            if za[k] < 0.0:
                continue
            taper = np.clip((za[k] - 0.0) / 80.0, 0.6, 1.0)
            inside = (x / cage[0]) ** 2 + (y / cage[1]) ** 2 <= taper
            lung = inside & ~mediastinum & ~spine & (za[k] > dome)
            lung &= p.tissue[:, :, k] != BONE
            sl = p.image[:, :, k]
            sl[lung] = (lung_hu + gradient + np.zeros_like(sl))[lung]
            p.tissue[:, :, k][lung] = LUNG
        blood = self.phase["blood"] * float(rng.uniform(0.5, 1.0))
        heart = self.at(-0.15, 0.2, 170.0)
        p.blob(heart, np.array([0.33 * self.cav[0], 0.38 * self.cav[1], 60.0]), 45.0, SOFT, shell=(9.0, blood))
        # Airways: trachea to the carina, then bronchi; all hollow with a thin wall.
        carina = self.at(0.0, 0.05, 210.0)
        trachea = carina + np.array([[0.0, 0.0, 150.0], [0.0, 0.0, 0.0]])
        p.tube(trachea, 9.0, 40.0, SOFT, lumen=(2.0, -1000.0))
        for side in (-1.0, 1.0):
            hilum = self.at(side * 0.3, 0.0, 170.0)
            p.tube(np.array([carina, hilum]), 6.0, 40.0, SOFT, lumen=(1.5, -1000.0))
            for za_root in (230.0, 170.0, 110.0):
                root = self.at(side * 0.35, 0.0, za_root)
                self._tree(root, side, 4.0, 5, 40.0, -1000.0)
                self._tree(root, side, 5.0, 6, blood, None)

    def _tree(
        self, root: np.ndarray, side: float, radius: float, depth: int, hu: float, lumen_hu: float | None
    ) -> None:
        """Branching vessels (lumen_hu None) or airways inside lung parenchyma."""
        rng = self.rng
        stack = [(root, np.array([side, 0.0, -0.3]) + rng.normal(0.0, 0.6, 3), radius, depth)]
        while stack:
            start, direction, r, d = stack.pop()
            if d == 0 or r < 0.7:
                continue
            length = float(rng.uniform(4.0, 7.0)) * r * 2.0
            path = random_walk(rng, start, direction, 3, length / 3.0, 0.2)
            lumen = (max(0.6, 0.25 * r), lumen_hu) if lumen_hu is not None else None
            # Still lung tissue: nodules may sit on vessels and airways, as they do.
            self.p.tube(path, r, hu, LUNG, lumen=lumen, keep_label=LUNG)
            for _ in range(2):
                stack.append((path[-1], path[-1] - path[-2] + rng.normal(0.0, 0.7 * length / 3.0, 3), r * 0.7, d - 1))

    def metal(self) -> None:
        """Surgical clips or spinal rods, sometimes: dense and streaking."""
        p, rng = self.p, self.rng
        roll = rng.random()
        if roll < 0.08:
            for side in (-1.0, 1.0):
                rod = np.array([[side * 12.0, self.spine_y - 30.0, -60.0], [side * 12.0, self.spine_y - 30.0, 60.0]])
                p.tube(rod, 3.0, METAL_HU, METAL)
            self.trunk.streak_sources.append(
                (self._vox([0.0, self.spine_y - 30.0]), float(rng.uniform(150.0, 350.0)), (0, p.shape[2]))
            )
        elif roll < 0.2:
            for _ in range(int(rng.integers(2, 6))):
                clip = self.at(rng.uniform(-0.4, 0.6), rng.uniform(-0.2, 0.4), rng.uniform(-80.0, 40.0))
                p.blob(clip, np.array([1.0, 1.0, 3.5]), METAL_HU, METAL, rotation=rotation(rng, 90.0))
                k = int(np.clip(np.searchsorted(p.axes[2], clip[2]), 0, p.shape[2] - 1))
                self.trunk.streak_sources.append(
                    (self._vox(clip[:2]), float(rng.uniform(60.0, 200.0)), (max(0, k - 2), k + 3))
                )


def smooth_texture(
    shape: tuple[int, int, int], spacing: np.ndarray, rng: np.random.Generator, amplitude_hu: float, scale_mm: float
) -> np.ndarray:
    """Slowly varying inhomogeneity (amplitude in HU over `scale_mm`), interpolated from a coarse grid.

    torch's trilinear upsampling: scipy's zoom took ~1 s a volume here, most of a phantom's time.
    """
    coarse_shape = [max(2, int(n * s / scale_mm)) for n, s in zip(shape, spacing, strict=True)]
    coarse = torch.from_numpy(rng.normal(0.0, amplitude_hu, size=coarse_shape).astype(np.float32))
    fine = F.interpolate(coarse[None, None], size=tuple(shape), mode="trilinear", align_corners=False)
    return fine[0, 0].numpy()
