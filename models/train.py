"""Train the default lesion-segmentation bundle on synthetic CT phantoms.

    python -m models.train [--out models/medical_segmentation_v1] [--minutes 72] [--checkpoints DIR]

Starts from bundle 1.0's weights (`--init none` for scratch) and trains for a wall-clock budget
on one core while a second, niced process draws fresh phantoms into the pool
(`models.train_pool`): three in four from the realistic world (`models.phantoms`, training
family), one in four simple (`models.phantom`). Phantoms are generated on random acquisition
grids and brought to the model grid by the same geometry code the engine uses at inference;
grids are production's spacing, fast_debug's, or in between, so one network serves both
profiles. `models.evaluate` then measures it on the held-out validation family through the
real engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cc3d
import numpy as np
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.losses import DiceLoss

from models import confidence_fit
from models.augment import LUNG_SITE, ORGAN_SITE, Insertion, insert_lesions, no_sites, sites_in_patch
from models.bundle import ENGINE_KEYS, OWN_NETWORK_PROFILES, PROFILE_WEIGHTS, SMALL_PATIENTS
from models.device import autocast, choose_precision
from models.geometry import ModelGrid, nonzero_box
from models.networks import warm_start
from models.phantom import Phantom as SimplePhantom
from models.phantom import generate_phantom, small_body_acquisition
from models.phantoms import Phantom as RealisticPhantom
from models.phantoms import generate_phantom as realistic_phantom
from models.phantoms.anatomy import BOWEL, KIDNEY, LUNG, ORGAN_LABELS, VESSEL
from models.train_pool import SamplePool

log = logging.getLogger("models.train")

Spacing = tuple[float, float, float]

TRAIN_SEED_BASE = 10_000
POSITIVE_WEIGHT = 5.0  # validation phantoms use seeds from models.evaluate.VALIDATION_SEED_BASE
# Small lesions weigh more in the loss (up to SMALL_WEIGHT_MAX x, for those under REFERENCE_MM):
# by voxel count a 40 mm lesion outweighs a 5 mm one 500-fold, and 1.4.0 gave most lesions under
# 12 mm a probability of 0.00 (measured on validation and training phantoms).
REFERENCE_MM = 15.0
SMALL_WEIGHT_MAX = 3.0
# --size-weighting: "diameter" weighs a lesion's voxels by REFERENCE_MM / d (up to 3x, 1.5.0's
# run); "volume" by (REFERENCE_MM / d)^3, so a lesion under REFERENCE_MM weighs in all as much
# as one of REFERENCE_MM (up to 30x a voxel). With "diameter", fine-tuning one batch left a 5 mm
# lesion at 0.00 after 40 steps while a 12.8 mm nodule reached 1.00 in 10; with "volume" the
# 5 mm lesion reached 0.99 in 30 (one batch: a hint, not a result).
SIZE_WEIGHTINGS = {"diameter": (1.0, SMALL_WEIGHT_MAX), "volume": (3.0, 30.0)}  # power, cap
SIZE_WEIGHTING = "diameter"
# Where patches are centred: on a lesion, in the body, on a look-alike (bone, contrast, gas and
# their edges: what false findings sat on), anywhere (air included: sliding windows cover the
# patient's box and the air in it, and a scan of air whole).
PATCH_SHARES = (0.45, 0.2, 0.25, 0.1)
AIR_HU = -1000.0
SOFT_TISSUE_HU = -70.0  # what counts as body when patches are centred "in the body"
BRIGHT_HU, DARK_HU = 150.0, -300.0  # look-alikes: brighter or darker than any parenchyma
BODY_POINTS = 20_000
LOOKALIKE_TISSUES = (BOWEL, VESSEL, KIDNEY)
SOLID_ORGANS = [label for name, label in ORGAN_LABELS.items() if name != "lung"]
NO_INSERTION = Insertion()
DEFAULT_INIT = Path(__file__).parent.parent / "tests" / "data" / "medical_segmentation_v1.0" / "models" / "model.pt"


@dataclass
class Sample:
    image: torch.Tensor  # (X, Y, Z) float32 HU: the network windows it itself
    label: torch.Tensor  # (X, Y, Z) uint8 lesion numbers: 0 background, k the k-th lesion
    lesions: list[np.ndarray]  # per lesion number k (from 1), the (N_k, 3) indices of its voxels
    body_voxels: np.ndarray  # (M, 3) a subsample of voxels inside the body
    hard_voxels: np.ndarray  # (K, 3) look-alikes: bright or dark voxels in the body, bowel, vessels, kidneys
    size_weight: np.ndarray  # (L + 1,) float32 loss weight of lesion k's voxels; index 0 (background) is 1
    spacing_mm: Spacing = (1.25, 1.25, 1.25)  # of the model grid it is on
    # (K, 4) organ and lung voxels where fresh lesions may be drawn (models.augment), lung in column 4
    sites: np.ndarray = field(default_factory=no_sites)
    size_weighting: str = SIZE_WEIGHTING  # how size_weight was made; fresh lesions are weighed alike


@dataclass(frozen=True)
class World:
    """Which phantoms training sees and on which model grids."""

    fine: Spacing  # production's grid
    coarse: Spacing  # fast_debug's grid
    realistic_share: float
    coarse_share: float = 0.3
    between_share: float = 0.2  # grids between the two: the network must not depend on one scale

    def draw(self, rng: np.random.Generator) -> tuple[Spacing, bool]:
        realistic = bool(rng.random() < self.realistic_share)
        u = rng.random()
        if u < self.coarse_share:
            return self.coarse, realistic
        if u < self.coarse_share + self.between_share:
            t = float(rng.random())
            return as_spacing([f + t * (c - f) for f, c in zip(self.fine, self.coarse, strict=True)]), realistic
        return self.fine, realistic


def load_bundle_config(bundle: Path) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    return parser


def _subsample(points: np.ndarray, rng: np.random.Generator, count: int = BODY_POINTS) -> np.ndarray:
    return points[rng.choice(len(points), size=min(len(points), count), replace=False)]


def make_sample(
    seed: int,
    spacing_mm: Spacing,
    realistic: bool = False,
    size_weighting: str = SIZE_WEIGHTING,
    small_body: bool = False,
) -> Sample:
    # More lesions per scan than the validation phantoms: more positive patches per phantom.
    # The realistic world (bone, table, bowel, lungs...) teaches what to leave alone; the simple
    # one keeps the clean lesion cases the model started from.
    phantom: SimplePhantom | RealisticPhantom
    if realistic:
        phantom = realistic_phantom(seed, family="train", lesion_count=(2, 8))
    else:
        # A child's trunk when asked for; else the simple world's own random acquisition.
        shape, spacing = small_body_acquisition(np.random.default_rng([seed, 2])) if small_body else (None, None)
        phantom = generate_phantom(seed, shape, spacing, lesion_count=(3, 8))
    grid = ModelGrid.for_input(phantom.image.shape, phantom.affine, spacing_mm)
    img_t = grid.to_model(phantom.image)[0, 0]
    lab_t = grid.to_model(phantom.lesion_mask)[0, 0]
    label_u8 = (lab_t >= 0.5).to(torch.uint8)
    hu = img_t.numpy()
    body = hu > SOFT_TISSUE_HU
    # Look-alikes inside the body's extent: a filled outline would need a 3-D fill per phantom;
    # the bounding box of the soft tissue is close enough for sampling.
    box = nonzero_box(body)
    hard = np.zeros_like(body)
    if box is not None:
        hard[box] = (hu[box] > BRIGHT_HU) | (hu[box] < DARK_HU)
    rng = np.random.default_rng(seed)
    # Half the look-alike points from what the phantom drew as bowel, vessels and kidneys: fluid
    # in bowel, unenhanced veins in the liver and the kidney's cortex are within the lesions' HU
    # and were most false findings (measured on unseen training-family phantoms); by HU alone
    # lung, bone and gas would fill nearly all of them.
    tissue = getattr(phantom, "tissue", None)
    drawn = np.zeros_like(body)
    if tissue is not None:
        drawn = _on_model_grid(grid, np.isin(tissue, LOOKALIKE_TISSUES))
        # A kidney lesion keeps its organ's tissue label: its voxels are lesion points, not look-alikes.
        drawn &= label_u8.numpy() == 0
    numbers, lesions, size_weight = number_lesions(label_u8.numpy(), float(np.prod(spacing_mm)), size_weighting)
    sites = lesion_sites(grid, tissue, hu, numbers, rng) if tissue is not None else no_sites()
    return Sample(
        img_t.contiguous(),
        torch.from_numpy(numbers),
        lesions,
        _subsample(np.argwhere(body), rng),
        np.concatenate(
            [
                _subsample(np.argwhere(hard), rng, BODY_POINTS // 2),
                _subsample(np.argwhere(drawn), rng, BODY_POINTS // 2),
            ]
        ),
        size_weight,
        spacing_mm,
        sites,
        size_weighting,
    )


def lesion_sites(
    grid: ModelGrid, tissue: np.ndarray, hu: np.ndarray, numbers: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """(K, 4) model-grid voxels where a lesion can grow, the fourth column 1 where it is lung.

    The kind of site is what the phantom drew there: lung (parenchyma, and the vessels and airways
    in it, where nodules sit too) or a solid organ. By HU alone a vessel in lung (40-300 HU) was an
    organ site, whose lesion took the surrounding lung's median as its organ and came out as
    lung 15-100 HU denser: invisible, yet labelled a lesion (4 of 20 probe sites were such).
    """
    free = numbers == 0
    lung = _on_model_grid(grid, tissue == LUNG) & free
    # An organ's edge in partial volume with lung, fat or gas is no organ site (measured: one at
    # -449 HU got a -547 HU lesion that no model could see).
    solid = _on_model_grid(grid, np.isin(tissue, SOLID_ORGANS)) & (hu > SOFT_TISSUE_HU) & free & ~lung
    points = _subsample(np.argwhere(lung | solid), rng)
    kind = np.where(lung[tuple(points.T)], LUNG_SITE, ORGAN_SITE) if len(points) else np.zeros(0, np.int64)
    return np.concatenate([points, kind[:, None]], axis=1).astype(np.int64)


def _on_model_grid(grid: ModelGrid, mask: np.ndarray) -> np.ndarray:
    """Where most of a model voxel is `mask`."""
    return (grid.to_model(mask.astype(np.float32))[0, 0] >= 0.5).numpy()


def number_lesions(
    label: np.ndarray, voxel_mm3: float, size_weighting: str = SIZE_WEIGHTING
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Lesion numbers on the model grid, each lesion's voxels, and each lesion's loss weight.

    A lesion's weight grows as its equivalent diameter falls below REFERENCE_MM (SIZE_WEIGHTINGS).
    """
    numbers, count = cc3d.connected_components(label > 0, connectivity=26, return_N=True)
    if count > 255:  # never seen: phantoms hold at most a few dozen lesions
        numbers[numbers > 255] = 255
        count = 255
    numbers = numbers.astype(np.uint8)
    voxels = np.argwhere(numbers > 0)
    order = np.argsort(numbers[tuple(voxels.T)], kind="stable")
    voxels = voxels[order]
    counts = np.bincount(numbers.ravel(), minlength=count + 1)[1:]
    lesions = np.split(voxels, np.cumsum(counts)[:-1]) if count else []
    weights = lesion_weights(counts, voxel_mm3, size_weighting)
    return numbers, lesions, np.concatenate([[1.0], weights]).astype(np.float32)


def lesion_weights(counts: np.ndarray, voxel_mm3: float, size_weighting: str) -> np.ndarray:
    """Each lesion's loss weight from its voxel count (SIZE_WEIGHTINGS)."""
    power, cap = SIZE_WEIGHTINGS[size_weighting]
    diameters = np.cbrt(6.0 * np.asarray(counts, dtype=float) * voxel_mm3 / np.pi)
    return np.clip((REFERENCE_MM / np.maximum(diameters, 1e-3)) ** power, 1.0, cap)


def window_start(shape: tuple[int, ...], center: np.ndarray, patch: int) -> np.ndarray:
    """The corner of a `patch`-sized window centred on `center`, kept inside the volume."""
    return np.clip(center - patch // 2, 0, np.maximum(np.array(shape) - patch, 0))


def padded_crop(volume: torch.Tensor, start: np.ndarray, patch: int, value: float) -> torch.Tensor:
    """A `patch`-sized view from `start`, padded with `value` past the volume's end."""
    crop = volume[tuple(slice(int(s), int(s) + patch) for s in start)]
    pad = [p for n in reversed(crop.shape) for p in (0, patch - n)]
    return torch.nn.functional.pad(crop, pad, value=value) if any(pad) else crop


def crop_start(sample: Sample, center: np.ndarray, patch: int) -> np.ndarray:
    return window_start(tuple(sample.image.shape), center, patch)


def crop(sample: Sample, center: np.ndarray, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image and the lesion numbers of a patch, padded with air where a patch passes the
    volume's edge (rare: a phantom is larger than a patch; inference repeats edge planes since
    bundle 1.8.3, so a patch with a slab of air is one inference no longer sees)."""
    start = crop_start(sample, center, patch)
    return padded_crop(sample.image, start, patch, AIR_HU), padded_crop(sample.label, start, patch, 0)


def patch_center(
    sample: Sample, patch: int, rng: np.random.Generator, shares: tuple[float, float, float, float]
) -> np.ndarray:
    lesion_share, body_share, hard_share, _ = shares
    draw = rng.random()
    if draw < lesion_share and sample.lesions:
        # Every lesion as often as any other, whatever its size.
        voxels = sample.lesions[int(rng.integers(len(sample.lesions)))]
        center = voxels[int(rng.integers(len(voxels)))]
        return center + rng.integers(-patch // 4, patch // 4 + 1, size=3)
    if draw < lesion_share + body_share and len(sample.body_voxels):
        return sample.body_voxels[int(rng.integers(len(sample.body_voxels)))]
    if draw < lesion_share + body_share + hard_share and len(sample.hard_voxels):
        return sample.hard_voxels[int(rng.integers(len(sample.hard_voxels)))]
    return rng.integers(0, np.array(sample.image.shape))


class Batch(NamedTuple):
    images: torch.Tensor  # (B, 1, P, P, P) HU
    labels: torch.Tensor  # (B, 1, P, P, P) 0/1
    sizes: torch.Tensor  # (B, 1, P, P, P) each voxel's size weight
    numbers: torch.Tensor  # (B, 1, P, P, P) lesion numbers, unique within a patch


def draw_batch(
    samples: list[Sample],
    batch: int,
    patch: int,
    rng: np.random.Generator,
    shares: tuple[float, float, float, float] = PATCH_SHARES,
    insertion: Insertion = NO_INSERTION,
) -> Batch:
    images, numbered, weights = [], [], []
    for _ in range(batch):
        sample = samples[int(rng.integers(len(samples)))]
        center = patch_center(sample, patch, rng, shares)
        img, numbers = crop(sample, center, patch)
        # Copies: a crop is a view of the pool's phantom, and lesions may be drawn into it.
        img, numbers = img.clone(), numbers.long()
        weight = torch.from_numpy(sample.size_weight)[numbers]
        if insertion.share > 0.0 and rng.random() < insertion.share:
            draw_fresh_lesions(sample, crop_start(sample, center, patch), (img, numbers, weight), rng, insertion)
        for axis in range(3):
            if rng.random() < 0.5:
                img, numbers, weight = img.flip(axis), numbers.flip(axis), weight.flip(axis)
        # Small window shifts: scanners differ by a few HU in calibration.
        images.append(img + float(rng.normal(0.0, 3.0)))
        numbered.append(numbers)
        weights.append(weight)
    numbers = torch.stack(numbered)[:, None]
    return Batch(torch.stack(images)[:, None], (numbers > 0).float(), torch.stack(weights)[:, None], numbers)


def draw_fresh_lesions(
    sample: Sample,
    start: np.ndarray,
    patch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    rng: np.random.Generator,
    insertion: Insertion,
) -> None:
    """Fresh lesions into a patch's (image, numbers, weights), weighed as the sample's own are."""
    image, numbers, weight = patch
    sites = sites_in_patch(sample.sites, start, image.shape[0])
    drawn = insert_lesions(image, numbers, sites, sample.spacing_mm, rng, insertion)
    if not drawn:
        return
    voxel_mm3 = float(np.prod(sample.spacing_mm))
    weights = lesion_weights(np.array([voxels for _, voxels in drawn]), voxel_mm3, sample.size_weighting)
    for (number, _), lesion_weight in zip(drawn, weights, strict=True):
        weight[numbers == number] = float(lesion_weight)


def as_spacing(values: Sequence[float]) -> Spacing:
    x, y, z = (float(v) for v in values)
    return (x, y, z)


@dataclass(frozen=True)
class SampleMaker:
    """seed -> Sample, picklable for the pool's producer process."""

    world: World
    size_weighting: str = SIZE_WEIGHTING
    small_body_share: float = 0.0  # of simple phantoms: a trunk of 15-25 cm (small_body_acquisition)

    def __call__(self, seed: int) -> Sample:
        rng = np.random.default_rng([seed, 1])
        spacing, realistic = self.world.draw(rng)
        small = not realistic and bool(rng.random() < self.small_body_share)
        return make_sample(seed, spacing, realistic, self.size_weighting, small)


LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]


def lesion_loss(positive_weight: float, blob_weight: float = 0.0) -> LossFn:
    """BCE with lesion voxels up-weighted (small lesions more), plus batch Dice, plus blob Dice.

    Lesions are under 1 % of the voxels even in lesion-centred patches: plain BCE (and BCE
    inside DiceCE) settles on "no lesion anywhere" first and stays there for hundreds of steps
    (measured). Up-weighting lesion voxels in the BCE breaks that at once; the batch Dice term
    then sharpens the boundaries. The batch Dice is the voxels' Dice, which a large lesion
    decides; `blob_weight` adds the mean of every lesion's own Dice (`blob_dice_loss`).
    """
    dice_loss = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)

    def loss_fn(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        weight = torch.where(batch.labels > 0, positive_weight * batch.sizes, 1.0)
        bce = F.binary_cross_entropy_with_logits(logits, batch.labels, weight=weight)
        loss = bce + dice_loss(logits, batch.labels)
        if blob_weight > 0.0:
            loss = loss + blob_weight * blob_dice_loss(logits, batch.numbers)
        return loss

    return loss_fn


def blob_dice_loss(logits: torch.Tensor, numbers: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - the mean over lesions of each lesion's soft Dice against the background (blob loss).

    Kofler et al., "blob loss: instance imbalance aware loss functions for semantic
    segmentation" (IPMI 2023): lesion k is scored on its own voxels and the patch's background,
    the other lesions masked out, so a missed 5 mm lesion costs as much as a missed 30 mm one and
    a false finding costs in every lesion's term. Patches without a lesion add nothing.
    """
    probability = torch.sigmoid(logits.float()).flatten(1)
    flat = numbers.flatten(1)
    patches, lesions = flat.shape[0], int(flat.max()) + 1
    # Lesion k of patch b is bin b * lesions + k; bin b * lesions holds patch b's background.
    bins = (flat + lesions * torch.arange(patches, device=flat.device)[:, None]).flatten()
    mass = torch.zeros(patches * lesions, dtype=probability.dtype, device=probability.device)
    mass = mass.index_add(0, bins, probability.flatten()).view(patches, lesions)
    count = torch.bincount(bins, minlength=patches * lesions).view(patches, lesions).to(probability.dtype)
    present = count[:, 1:] > 0
    if not present.any():
        return probability.sum() * 0.0  # keeps the graph: every loss term backpropagates
    inside, background = mass[:, 1:], mass[:, :1]
    dice = (2.0 * inside + smooth) / (inside + background + count[:, 1:] + smooth)
    return 1.0 - dice[present].mean()


@dataclass(frozen=True)
class Recipe:
    steps: int = 6000
    minutes: float = 68.0  # wall-clock budget: the schedule ends at whichever comes first
    pool: int = 40
    refresh_every: int = 2  # steps between swapping a fresh phantom into the pool
    batch: int = 4
    patch: int = 64
    seed: int = 0
    threads: int = 1  # the other core draws fresh phantoms (models.train_pool)
    lr: float = 1e-3
    realistic_share: float = 0.75
    shares: tuple[float, float, float, float] = PATCH_SHARES
    positive_weight: float = POSITIVE_WEIGHT
    size_weighting: str = SIZE_WEIGHTING  # of a lesion's voxels by its size: SIZE_WEIGHTINGS
    blob_weight: float = 0.0  # of the per-lesion Dice (blob_dice_loss); 0 leaves it out
    insert_share: float = 0.0  # of patches that get fresh lesions drawn in (models.augment)
    small_body_share: float = 0.0  # of simple phantoms drawn as a child's trunk (15-25 cm across)


def progress(step: int, started: float, recipe: Recipe) -> float:
    return max(step / recipe.steps, (time.perf_counter() - started) / (60.0 * recipe.minutes))


def cosine_lr(fraction: float, recipe: Recipe, floor: float = 1e-5) -> float:
    return floor + 0.5 * (recipe.lr - floor) * (1.0 + math.cos(math.pi * min(fraction, 1.0)))


@dataclass(frozen=True)
class Target:
    """What a run trains: the bundle's network, or a profile's own (configs/profiles.json names
    its weights), the grids it sees and where its weights go."""

    bundle: Path
    world: World
    weights: Path
    profile: str | None = None

    @classmethod
    def of(cls, bundle: Path, realistic_share: float, profile: str | None = None) -> Target:
        config = load_bundle_config(bundle)
        profiles = json.loads((bundle / "configs" / "profiles.json").read_text())
        if profile is None:
            # Production's grid is the config's spacing; the coarse one is that of fast_debug's
            # setup that runs the bundle's network (its own, or the one for small patients), if any.
            fine = as_spacing(config["spacing"])
            coarse = as_spacing(bundle_network_setup(profiles.get("fast_debug", {})).get("spacing", fine))
            return cls(bundle, World(fine, coarse, realistic_share), weights_file(bundle))
        grid = as_spacing(profiles.get(profile, {}).get("spacing", config["spacing"]))
        # The profile's network serves its grid alone.
        return cls(bundle, World(grid, grid, realistic_share), weights_file(bundle, profile), profile)

    def network(self) -> torch.nn.Module:
        """network_def as the engine builds it: under profiles.json's "all" and the profile's own
        config ids (a `windows` it overrides reaches network_def through "@windows")."""
        config = load_bundle_config(self.bundle)
        profiles = json.loads((self.bundle / "configs" / "profiles.json").read_text())
        own = profiles.get(self.profile, {}) if self.profile is not None else {}
        config.update(profiles.get("all", {}) | {key: value for key, value in own.items() if key not in ENGINE_KEYS})
        network = config.get_parsed_content("network_def")
        assert isinstance(network, torch.nn.Module)
        return network

    def reset_fit(self) -> None:
        reset_fit(self.bundle, self.profile)


def bundle_network_setup(entry: dict[str, Any]) -> dict[str, Any]:
    """A profile's entry, or its small-patient setup, whichever runs the bundle's network ({}: neither)."""
    for setup in (entry, entry.get(SMALL_PATIENTS, {})):
        if PROFILE_WEIGHTS not in setup:
            return setup
    return {}


def weights_file(bundle: Path, profile: str | None = None) -> Path:
    """Where the bundle's weights are, or those of a profile with a network of its own."""
    if profile is None:
        return bundle / "models" / "model.pt"
    own = json.loads((bundle / "configs" / "profiles.json").read_text()).get(profile, {})
    if PROFILE_WEIGHTS not in own:
        raise ValueError(f"profiles.json gives {profile} no network of its own (no '{PROFILE_WEIGHTS}')")
    return bundle / own[PROFILE_WEIGHTS]


def reset_fit(bundle: Path, profile: str | None = None) -> None:
    """The fits of the weights replaced: all of them, or the profile's own (made raw, so that it
    never runs production's fit, made for other weights), its lesion score included."""
    if profile is None:
        confidence_fit.reset(bundle)
    else:
        confidence_fit.reset_profile(bundle, profile)


def train(
    bundle: Path, recipe: Recipe, init: Path | None = None, checkpoints: Path | None = None, profile: str | None = None
) -> tuple[int, Path]:
    """Train into `bundle`'s models/model.pt, or into `profile`'s own weights; -> the steps run and
    the weights file written."""
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    rng = np.random.default_rng(recipe.seed)
    target = Target.of(bundle, recipe.realistic_share, profile)
    world = target.world
    # The network reads HU (its CT window is inside it).
    net = target.network()
    if init is not None:
        # A network_def that grew (e.g. LesionUNet's `detail`) starts as the old network did.
        fresh = warm_start(net, torch.load(init, map_location="cpu", weights_only=True))
        log.info("continuing from %s%s", init, f"; new: {', '.join(fresh)}" if fresh else "")
    pool = SamplePool(
        SampleMaker(world, recipe.size_weighting, recipe.small_body_share),
        recipe.pool,
        TRAIN_SEED_BASE + 100_000 * recipe.seed,
        Sample,
    )
    try:
        return _steps(net, pool, recipe, rng, target, checkpoints), target.weights
    finally:
        pool.close()


def _steps(
    net: torch.nn.Module,
    pool: SamplePool,
    recipe: Recipe,
    rng: np.random.Generator,
    target: Target,
    checkpoints: Path | None,
) -> int:
    net.train()
    loss_fn = lesion_loss(recipe.positive_weight, recipe.blob_weight)
    insertion = Insertion(share=recipe.insert_share)
    optimiser = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    monitor = draw_batch(pool.samples, 8, recipe.patch, np.random.default_rng(recipe.seed + 1))
    # bf16 autocast where the CPU does bf16 in hardware (3x faster steps measured on AMX),
    # fp32 where it would be emulated; the weights and the loss stay fp32 either way.
    precision = choose_precision(torch.device("cpu"))
    mixed = autocast(torch.device("cpu"), precision)
    log.info("training in %s", precision)
    running, step, started = 0.0, 0, time.perf_counter()
    while progress(step, started, recipe) < 1.0:
        step += 1
        for group in optimiser.param_groups:
            group["lr"] = cosine_lr(progress(step, started, recipe), recipe)
        batch = draw_batch(pool.samples, recipe.batch, recipe.patch, rng, recipe.shares, insertion)
        with mixed:
            logits = net(batch.images)
        loss = loss_fn(logits.float(), batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % recipe.refresh_every == 0:
            pool.refresh()
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 50 == 0:
            elapsed = time.perf_counter() - started
            log.info("step %d loss %.4f (%.0f s, %d fresh phantoms)", step, running, elapsed, pool.replaced)
        if step % 250 == 0:
            log_separation(net, monitor)
        if step % 500 == 0 and checkpoints is not None:
            save_weights(net, checkpoints / f"step{step:05d}.pt")
    # The bundle's weights change once, at the end: an interrupted run leaves them as they were.
    save_weights(net, target.weights)
    target.reset_fit()
    if checkpoints is not None:
        save_weights(net, checkpoints / f"step{step:05d}.pt")
    seen = recipe.pool + pool.replaced
    log.info("trained %d steps in %.0f s on %d phantoms", step, time.perf_counter() - started, seen)
    return step


def log_separation(net: torch.nn.Module, batch: Batch) -> None:
    """Mean probability inside and outside lesions on fixed patches: is it learning lesions?"""
    net.eval()
    with torch.no_grad():
        probability = torch.sigmoid(net(batch.images))
    net.train()
    lesion = batch.labels > 0
    if not lesion.any():
        return  # no lesion in the monitor patches: nothing to compare
    log.info(
        "  lesion p %.3f, background p %.4f", probability[lesion].mean().item(), probability[~lesion].mean().item()
    )


def save_weights(net: torch.nn.Module, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.replace(target)


def main() -> None:
    defaults = Recipe()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "medical_segmentation_v1")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--minutes", type=float, default=defaults.minutes, help="wall-clock budget")
    parser.add_argument("--pool", type=int, default=defaults.pool, help="phantoms held at once")
    parser.add_argument("--refresh-every", type=int, default=defaults.refresh_every)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--patch", type=int, default=defaults.patch)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--init", type=Path, default=DEFAULT_INIT, help="start from these weights; 'none' for scratch")
    parser.add_argument("--checkpoints", type=Path, help="keep a checkpoint every 500 steps here (stepNNNNN.pt)")
    parser.add_argument(
        "--profile",
        choices=OWN_NETWORK_PROFILES,
        help="train this profile's own network (its 'weights' in profiles.json) at its grid alone",
    )
    parser.add_argument(
        "--realistic-share",
        type=float,
        default=defaults.realistic_share,
        help="share of phantoms from the realistic world (models.phantoms); the rest are simple",
    )
    parser.add_argument(
        "--patch-shares",
        dest="shares",
        type=float,
        nargs=4,
        default=defaults.shares,
        metavar=("LESION", "BODY", "LOOKALIKE", "ANYWHERE"),
    )
    parser.add_argument("--positive-weight", type=float, default=defaults.positive_weight, help="of lesion voxels")
    parser.add_argument(
        "--size-weighting",
        choices=sorted(SIZE_WEIGHTINGS),
        default=defaults.size_weighting,
        help="small lesions' voxels weigh (15 mm / d) up to 3x (diameter) or (15 mm / d)^3 up to 30x (volume)",
    )
    for name, text in (
        ("blob_weight", "of the mean per-lesion Dice (blob loss), so each lesion counts whatever its size; 0: none"),
        ("insert_share", "share of patches that get 1-3 fresh lesions of 3-16 mm drawn in (models.augment); 0: none"),
        ("small_body_share", "share of simple phantoms drawn as a trunk of 15-25 cm (a child's); 0: as they come"),
    ):
        option = "--" + name.replace("_", "-")
        parser.add_argument(option, type=float, default=getattr(defaults, name), help=text)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # Every recipe field has its option of the same name.
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)}
    recipe = Recipe(**{**values, "shares": tuple(values["shares"])})
    init = None if str(args.init) == "none" else args.init
    steps, weights = train(args.out, recipe, init, args.checkpoints, args.profile)
    print(json.dumps({"weights": str(weights), "steps": steps}))


if __name__ == "__main__":
    main()
