"""Which lesions the network sees, by size and site: fresh lesions drawn into a lesion-free phantom.

    python -m models.probe [--bundle DIR] [--sites 6] [--diameters 4 6 8 ...] CANDIDATE [CANDIDATE ...]

The validation report holds about 20 lesions, too few to tell sensitivity by size and site. This
draws one lesion at a time (the training family's outlines, kinds and contrasts, as
`models.augment` draws them, a fresh one each time) into 96^3 windows of a lesion-free
validation-family phantoms, centred on organ or lung sites, and prints per site kind and diameter
the share of lesions whose maximum probability reaches the bundle's threshold, and how often the
window without the lesion already does so near the site (a false alarm). The network alone runs, at production's
grid: no post-processing, so it tells what the network sees, not what a job reports.

A candidate is a weights file (run in --bundle's network_def) or a bundle directory.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.augment import LUNG_SITE, Insertion, insert_lesions
from models.geometry import ModelGrid
from models.phantoms import generate_phantom
from models.train import AIR_HU, as_spacing, lesion_sites, load_bundle_config, padded_crop, window_start

DEFAULT_BUNDLE = Path(__file__).parent / "medical_segmentation_v1"
PROBE_SEED = 97_950  # validation family, lesion-free; neither evaluate's nor checkpoints' seeds
MAX_PHANTOMS = 20  # to look through for sites
NEAR_MM = 12.0  # a false alarm counts within this distance of the site
WINDOW = 96  # the bundle's sliding-window size
DIAMETERS_MM = (4.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0)


@dataclass(frozen=True)
class Window:
    image: torch.Tensor  # (W, W, W) HU, padded with air where it passes the scan (as training pads)
    site: np.ndarray  # (4,): the site in window coordinates, and whether it is lung (augment's sites)

    @property
    def lung(self) -> bool:
        return bool(self.site[3] == LUNG_SITE)


def probe_windows(seed: int, spacing: tuple[float, float, float], count: int, per_phantom: int = 2) -> list[Window]:
    """`count` windows on lung sites and `count` on organ sites, at most `per_phantom` of each kind
    from each of lesion-free phantoms seed, seed + 1, ... (a field of view may hold no lung)."""
    windows: list[Window] = []
    for offset in range(MAX_PHANTOMS):
        wanted = {kind: count - sum(w.lung == kind for w in windows) for kind in (True, False)}
        if not any(wanted.values()):
            break
        phantom = generate_phantom(seed + offset, family="validation", lesion_count=(0, 0))
        assert phantom.tissue is not None  # the realistic world always records its tissue
        grid = ModelGrid.for_input(phantom.image.shape, phantom.affine, spacing)
        image = grid.to_model(phantom.image)[0, 0]
        rng = np.random.default_rng(seed + offset)
        sites = lesion_sites(grid, phantom.tissue, image.numpy(), np.zeros(image.shape, np.uint8), rng)
        for lung, missing in wanted.items():
            chosen = sites[(sites[:, 3] == LUNG_SITE) == lung]
            take = min(missing, per_phantom, len(chosen))
            windows += [_window(image, site) for site in chosen[rng.choice(len(chosen), take, replace=False)]]
    return windows


def _window(image: torch.Tensor, site: np.ndarray) -> Window:
    start = window_start(tuple(image.shape), site[:3], WINDOW)
    crop = padded_crop(image, start, WINDOW, AIR_HU)  # as training pads
    return Window(crop.contiguous(), np.concatenate([site[:3] - start, site[3:]]))


def with_lesion(
    window: Window, diameter_mm: float, spacing: tuple[float, float, float], rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The window with one fresh lesion of about `diameter_mm` at its site, and the lesion's mask."""
    image, numbers = window.image.clone(), torch.zeros(window.image.shape, dtype=torch.long)
    once = Insertion(share=1.0, count=(1, 1), diameter_mm=(diameter_mm, diameter_mm))
    if not insert_lesions(image, numbers, window.site[None], spacing, rng, once):
        return None
    return image, numbers > 0


def near_site(window: Window, spacing: tuple[float, float, float]) -> torch.Tensor:
    """Voxels within NEAR_MM of the site: where a drawn lesion would be, and where, without one,
    a high probability is a false alarm that would make "found" meaningless."""
    axes = [(torch.arange(WINDOW) - int(c)) * s for c, s in zip(window.site[:3], spacing, strict=True)]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return z**2 + y**2 + x**2 <= NEAR_MM**2


def load_network(bundle: Path, candidate: Path) -> torch.nn.Module:
    weights = candidate / "models" / "model.pt" if candidate.is_dir() else candidate
    net = load_bundle_config(bundle).get_parsed_content("network_def", lazy=False)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval()


def probability(net: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.sigmoid(net(image[None, None]))[0, 0]


def probe(
    nets: dict[str, torch.nn.Module],
    windows: list[Window],
    diameters: list[float],
    spacing: tuple[float, float, float],
    seed: int,
) -> dict[tuple[str, str, float], list[float]]:
    """(model, site kind, diameter) -> each drawn lesion's maximum probability; diameter 0: no lesion.

    Every model sees the same drawn lesions.
    """
    rng = np.random.default_rng(seed)
    found: dict[tuple[str, str, float], list[float]] = {}
    for window in windows:
        kind = "lung" if window.lung else "organ"
        near = near_site(window, spacing)
        for name, net in nets.items():
            found.setdefault((name, kind, 0.0), []).append(float(probability(net, window.image)[near].max()))
        for diameter in diameters:
            drawn = with_lesion(window, diameter, spacing, rng)
            if drawn is None:
                continue
            image, mask = drawn
            for name, net in nets.items():
                found.setdefault((name, kind, diameter), []).append(float(probability(net, image)[mask].max()))
    return found


def table(found: dict[tuple[str, str, float], list[float]], names: list[str], threshold: float) -> str:
    head = "| site | diameter | " + " | ".join(names) + " |"
    lines = [head, "|" + " --- |" * (len(names) + 2)]
    rows = sorted({(kind, d) for _, kind, d in found})
    for kind, diameter in rows:
        cells = []
        for name in names:
            peaks = np.array(found.get((name, kind, diameter), []))
            cells.append(f"{int((peaks >= threshold).sum())}/{len(peaks)} (mean max p {peaks.mean():.2f})")
        shown = f"no lesion: alarm within {NEAR_MM:g} mm" if diameter == 0.0 else f"{diameter:g} mm"
        lines.append(f"| {kind} | {shown} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidates", nargs="+", type=Path)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--sites", type=int, default=6, help="windows per site kind (lung, organ)")
    parser.add_argument("--diameters", type=float, nargs="+", default=list(DIAMETERS_MM))
    parser.add_argument("--seed", type=int, default=PROBE_SEED)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_bundle_config(args.bundle)
    spacing = as_spacing(config["spacing"])
    nets = {str(c): load_network(args.bundle, c) for c in args.candidates}
    found = probe(nets, probe_windows(args.seed, spacing, args.sites), args.diameters, spacing, args.seed)
    print(f"found: maximum probability in the lesion >= {config['threshold']} (phantom seed {args.seed})")
    print(table(found, list(nets), float(config["threshold"])))


if __name__ == "__main__":
    main()
