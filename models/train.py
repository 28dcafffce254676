"""Train the default lesion-segmentation bundle on synthetic CT phantoms.

    python -m models.train --out models/medical_segmentation_v1 --steps 3000

Phantoms are generated on random acquisition grids (in-plane 0.6-1.0 mm, slices 0.8-5 mm) and
brought to the model grid by the same geometry code the engine uses at inference, so training
sees exactly what inference will feed the network. Most training grids are the production
spacing; some are the coarser fast_debug spacing, so one network serves both profiles.
After training, `models.evaluate` measures Dice on held-out phantoms through the real engine.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.losses import DiceLoss

from models.geometry import ModelGrid
from models.phantom import generate_phantom
from models.phantoms import generate_phantom as realistic_phantom

log = logging.getLogger("models.train")

Spacing = tuple[float, float, float]

TRAIN_SEED_BASE = 10_000
POSITIVE_WEIGHT = 5.0  # validation phantoms use seeds from models.evaluate.VALIDATION_SEED_BASE
# Where patches are centred: on a lesion, in the body, anywhere (air included: sliding windows
# cover the whole volume). Lower the first share to learn more of what to leave alone.
PATCH_SHARES = (0.7, 0.15, 0.15)
AIR_HU = -1000.0
SOFT_TISSUE_HU = -70.0  # what counts as body when patches are centred "in the body"


@dataclass
class Sample:
    image: torch.Tensor  # (X, Y, Z) float32 HU: the network windows it itself
    label: torch.Tensor  # (X, Y, Z) uint8
    lesion_voxels: np.ndarray  # (N, 3) indices of label voxels, for positive sampling
    body_voxels: np.ndarray  # (M, 3) a subsample of voxels inside the body


def load_bundle_config(bundle: Path) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    return parser


def make_sample(seed: int, spacing_mm: tuple[float, float, float], realistic: bool = False) -> Sample:
    # More lesions per scan than the validation phantoms: more positive patches per phantom.
    # The realistic world (bone, table, bowel, lungs...) teaches what to leave alone; the simple
    # one keeps the clean lesion cases the model started from.
    phantom = (
        realistic_phantom(seed, family="train", lesion_count=(2, 8))
        if realistic
        else generate_phantom(seed, lesion_count=(3, 8))
    )
    grid = ModelGrid.for_input(phantom.image.shape, phantom.affine, spacing_mm)
    img_t = grid.to_model(phantom.image)[0, 0]
    lab_t = grid.to_model(phantom.lesion_mask)[0, 0]
    label_u8 = (lab_t >= 0.5).to(torch.uint8)
    body = np.argwhere((img_t > SOFT_TISSUE_HU).numpy())
    rng = np.random.default_rng(seed)
    body = body[rng.choice(len(body), size=min(len(body), 20_000), replace=False)]
    return Sample(img_t.contiguous(), label_u8, np.argwhere(label_u8.numpy() > 0), body)


def crop(sample: Sample, center: np.ndarray, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = np.array(sample.image.shape)
    start = np.clip(center - patch // 2, 0, np.maximum(shape - patch, 0))
    sl = tuple(slice(int(s), int(s) + patch) for s in start)
    img = sample.image[sl]
    lab = sample.label[sl]
    pad = [p for n in reversed(img.shape) for p in (0, patch - n)]
    if any(pad):
        img = torch.nn.functional.pad(img, pad, value=AIR_HU)  # as the sliding window pads (cval)
        lab = torch.nn.functional.pad(lab, pad, value=0)
    return img, lab


def draw_batch(
    samples: list[Sample],
    batch: int,
    patch: int,
    rng: np.random.Generator,
    shares: tuple[float, float, float] = PATCH_SHARES,
) -> tuple[torch.Tensor, torch.Tensor]:
    lesion_share, body_share, _ = shares
    images, labels = [], []
    for _ in range(batch):
        sample = samples[int(rng.integers(len(samples)))]
        draw = rng.random()
        if draw < lesion_share and len(sample.lesion_voxels):
            center = sample.lesion_voxels[int(rng.integers(len(sample.lesion_voxels)))]
            center = center + rng.integers(-patch // 4, patch // 4 + 1, size=3)
        elif draw < lesion_share + body_share:
            center = sample.body_voxels[int(rng.integers(len(sample.body_voxels)))]
        else:
            # Anywhere, air included: sliding windows at inference cover the whole volume.
            center = rng.integers(0, np.array(sample.image.shape))
        img, lab = crop(sample, center, patch)
        for axis in range(3):
            if rng.random() < 0.5:
                img, lab = img.flip(axis), lab.flip(axis)
        # Small window shifts: scanners differ by a few HU in calibration.
        img = img + float(rng.normal(0.0, 3.0))
        images.append(img)
        labels.append(lab)
    return torch.stack(images)[:, None], torch.stack(labels)[:, None].float()


def as_spacing(values: list[float]) -> Spacing:
    x, y, z = (float(v) for v in values)
    return (x, y, z)


def training_samples(
    count: int, spacings: tuple[Spacing, Spacing], realistic_share: float, cache: Path | None
) -> list[Sample]:
    """Phantoms on the model grid: 2 of 3 at the production spacing, 1 of 3 at fast_debug's."""
    if cache is not None and cache.exists():
        samples: list[Sample] = torch.load(cache, weights_only=False)
        log.info("loaded %d training phantoms from %s", len(samples), cache)
        return samples
    t0 = time.perf_counter()
    fine, coarse = spacings
    samples = []
    for i in range(count):
        realistic = int((i + 1) * realistic_share) > int(i * realistic_share)  # spread evenly
        samples.append(make_sample(TRAIN_SEED_BASE + i, coarse if i % 3 == 2 else fine, realistic))
    log.info("generated %d training phantoms in %.0f s", count, time.perf_counter() - t0)
    if cache is not None:
        torch.save(samples, cache)
    return samples


def lesion_loss(positive_weight: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """BCE with lesion voxels up-weighted, plus batch Dice.

    Lesions are under 1 % of the voxels even in lesion-centred patches: plain BCE (and BCE
    inside DiceCE) settles on "no lesion anywhere" first and stays there for hundreds of steps
    (measured). Up-weighting lesion voxels in the BCE breaks that at once; the batch Dice term
    then sharpens the boundaries.
    """
    dice_loss = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
    pos_weight = torch.tensor(positive_weight)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=pos_weight)
        return bce + dice_loss(logits, labels)

    return loss_fn


def train(
    bundle: Path,
    steps: int,
    n_phantoms: int,
    batch: int,
    patch: int,
    seed: int,
    threads: int,
    cache: Path | None = None,
    lr: float = 1e-3,
    init: Path | None = None,
    realistic_share: float = 0.0,
    shares: tuple[float, float, float] = PATCH_SHARES,
    positive_weight: float = POSITIVE_WEIGHT,
) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    config = load_bundle_config(bundle)
    # The network reads HU (its CT window is inside it); production's grid is the config's
    # spacing, fast_debug's comes from profiles.json.
    fine = as_spacing(config["spacing"])
    coarse = as_spacing(json.loads((bundle / "configs" / "profiles.json").read_text())["fast_debug"]["spacing"])

    samples = training_samples(n_phantoms, (fine, coarse), realistic_share, cache)
    net = config.get_parsed_content("network_def")
    if init is not None:
        net.load_state_dict(torch.load(init, map_location="cpu", weights_only=True))
        log.info("continuing from %s", init)
    net.train()
    loss_fn = lesion_loss(positive_weight)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps, eta_min=1e-5)
    monitor = draw_batch(samples, 8, patch, np.random.default_rng(seed + 1))
    running = 0.0
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        images, labels = draw_batch(samples, batch, patch, rng, shares)
        loss = loss_fn(net(images), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 50 == 0 or step == steps:
            log.info("step %d/%d loss %.4f (%.1f s)", step, steps, running, time.perf_counter() - t0)
        if step % 250 == 0:
            log_separation(net, monitor)
        if step % 500 == 0 or step == steps:
            save_weights(net, bundle)
    log.info("trained %d steps in %.0f s", steps, time.perf_counter() - t0)


def log_separation(net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Mean probability inside and outside lesions on fixed patches: is it learning lesions?"""
    net.eval()
    with torch.no_grad():
        probability = torch.sigmoid(net(batch[0]))
    net.train()
    lesion = batch[1] > 0
    log.info(
        "  lesion p %.3f, background p %.4f", probability[lesion].mean().item(), probability[~lesion].mean().item()
    )


def save_weights(net: torch.nn.Module, bundle: Path) -> None:
    target = bundle / "models" / "model.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.replace(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "medical_segmentation_v1")
    parser.add_argument("--steps", type=int, default=2200)
    parser.add_argument("--phantoms", type=int, default=36)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, help="keep the generated training set here and reuse it")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--init", type=Path, help="start from these weights (fine-tuning)")
    parser.add_argument(
        "--realistic-share",
        type=float,
        default=0.0,
        help="share of phantoms from the realistic world (models.phantoms)",
    )
    parser.add_argument(
        "--patch-shares", type=float, nargs=3, default=PATCH_SHARES, metavar=("LESION", "BODY", "ANYWHERE")
    )
    parser.add_argument("--positive-weight", type=float, default=POSITIVE_WEIGHT, help="of lesion voxels in the BCE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(
        args.out,
        args.steps,
        args.phantoms,
        args.batch,
        args.patch,
        args.seed,
        args.threads,
        args.cache,
        args.lr,
        args.init,
        args.realistic_share,
        tuple(args.patch_shares),
        args.positive_weight,
    )
    print(json.dumps({"weights": str(args.out / "models" / "model.pt"), "steps": args.steps}))


if __name__ == "__main__":
    main()
