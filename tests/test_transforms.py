"""The bundle's own transforms: CT windows in, typed and gated findings out (pure logic)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientationd, Spacingd

from models.geometry import nonzero_box
from models.transforms import (
    HYPERDENSE,
    HYPODENSE,
    LUNG_NODULE,
    Calibration,
    CoarseMask,
    InvertToInputd,
    LesionFindingsd,
    PaintFindingsd,
    above_or_all,
    coarse_body,
    elongation,
)

SPACING = (1.5, 1.5, 1.5)


def ball(shape: tuple[int, ...], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2  # type: ignore[return-value]


def scene() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A body (liver-like tissue, a lung, a vertebra) on a table, with candidate spots everywhere."""
    shape = (120, 100, 40)
    x, y, _ = np.indices(shape)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = ((x - 60) / 50.0) ** 2 + ((y - 55) / 38.0) ** 2 <= 1.0
    hu[body] = 60.0
    lung = ((x - 85) / 14.0) ** 2 + ((y - 60) / 16.0) ** 2 <= 1.0
    hu[lung] = -850.0
    vertebra = ((x - 60) / 9.0) ** 2 + ((y - 28) / 9.0) ** 2 <= 1.0
    hu[vertebra] = 900.0
    hu[((x - 60) / 6.0) ** 2 + ((y - 28) / 6.0) ** 2 <= 1.0] = 200.0  # marrow
    table = (y >= 5) & (y <= 8) & (np.abs(x - 60) < 55)  # an air gap below the body
    hu[table] = 250.0
    spots = {
        "hypo": ball(shape, (40, 60, 20), 4),
        "hyper": ball(shape, (55, 75, 20), 4),
        "nodule": ball(shape, (85, 60, 20), 3),
        "table": ball(shape, (30, 6, 20), 3) & table,
        "air": ball(shape, (5, 90, 20), 3),
        "marrow": ball(shape, (60, 28, 20), 4),
        "speck": ball(shape, (35, 45, 20), 0.5),
        "gas": ball(shape, (70, 80, 20), 3),  # a bowel gas bubble in soft tissue
    }
    hu[spots["gas"]] = -600.0
    hu[spots["hypo"]] = 15.0
    hu[spots["hyper"]] = 140.0
    hu[spots["nodule"]] = 30.0
    return hu, spots


def run(hu: np.ndarray, spots: dict[str, np.ndarray], **kwargs) -> dict:  # type: ignore[no-untyped-def]
    prob = np.full(hu.shape, 0.02, dtype=np.float32)
    for mask in spots.values():
        prob[mask] = 0.9
    affine = torch.diag(torch.tensor([*SPACING, 1.0], dtype=torch.float64))
    data = {
        "pred": MetaTensor(torch.from_numpy(prob)[None], affine=affine),
        "hu": MetaTensor(torch.from_numpy(hu)[None], affine=affine),
    }
    transform = LesionFindingsd(keys="pred", threshold=0.5, min_volume_mm3=10.0, **kwargs)
    return transform(data)


def as_loaded(volume: np.ndarray, affine: np.ndarray) -> MetaTensor:
    """The volume as MONAI's LoadImage delivers it from a NIfTI file (channel-less, RAS affine)."""
    from monai.transforms import LoadImage

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "scan.nii.gz"
        nib.save(nib.Nifti1Image(volume, affine), path)
        loaded: MetaTensor = LoadImage(image_only=True)(path)
    return loaded


def test_findings_are_typed_and_gated_by_tissue() -> None:
    hu, spots = scene()
    out = run(hu, spots)
    labels = out["pred"][0].numpy()
    assert set(np.unique(labels[spots["hypo"]])) == {HYPODENSE}
    assert set(np.unique(labels[spots["hyper"]])) == {HYPERDENSE}
    assert set(np.unique(labels[spots["nodule"]])) == {LUNG_NODULE}
    for name in ("table", "air", "marrow", "speck", "gas"):
        assert labels[spots[name]].max() == 0, f"{name} kept"
    assert len(out["findings"]) == 3


def test_each_dropped_candidate_is_recorded_with_why_and_where() -> None:
    hu, spots = scene()
    reasons = {}
    for record in run(hu, spots)["dropped"]:
        voxels = np.rint(np.asarray(record["points_mm"]) / np.asarray(SPACING)).astype(int)
        on = [name for name, mask in spots.items() if mask[tuple(voxels.T)].all()]
        assert len(on) == 1, record
        reasons[on[0]] = record["reason"]
    # The table and the air outside are no candidates at all: the body gates them first.
    assert reasons == {"marrow": "bone", "speck": "small", "gas": "gas"}


def test_dropped_voxels_are_placed_by_the_grid_s_affine_and_nothing_is_recorded_without_a_key() -> None:
    hu, spots = scene()
    prob = np.where(spots["marrow"] | spots["speck"], 0.9, 0.02).astype(np.float32)
    affine = np.array([[0.0, -1.5, 0.0, 40.0], [1.5, 0.0, 0.0, -20.0], [0.0, 0.0, 2.0, 7.0], [0.0, 0.0, 0.0, 1.0]])

    def data() -> dict:  # type: ignore[type-arg]
        tensor = torch.from_numpy(affine)
        return {
            "pred": MetaTensor(torch.from_numpy(prob)[None], affine=tensor),
            "hu": MetaTensor(torch.from_numpy(hu)[None], affine=tensor),
        }

    records = LesionFindingsd(keys="pred", threshold=0.5, min_volume_mm3=10.0)(data())["dropped"]
    inverse = np.linalg.inv(affine)
    for record in records:
        points = np.asarray(record["points_mm"])
        voxels = np.rint(points @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)
        name = "marrow" if record["reason"] == "bone" else "speck"
        assert spots[name][tuple(voxels.T)].all() and len(points) == min(64, int(spots[name].sum()))
        # Spread through the whole candidate, its last voxel too: not the first 64 of a stride.
        assert voxels[:, 0].max() == np.argwhere(spots[name])[:, 0].max()
    assert sorted(r["reason"] for r in records) == ["bone", "small"]
    assert "dropped" not in LesionFindingsd(keys="pred", threshold=0.5, dropped_key=None)(data())


def test_tubes_are_not_focal_lesions() -> None:
    # An unenhanced vein in the liver has a hypodense lesion's HU: its shape tells it apart.
    hu, _ = scene()
    vein = np.zeros(hu.shape, dtype=bool)
    vein[25:55, 35:38, 18:21] = True  # 45 x 4.5 x 4.5 mm
    lobulated = ball(hu.shape, (75, 40, 20), 3) | ball(hu.shape, (79, 40, 20), 3)  # 2:1, compact
    hu[vein | lobulated] = 15.0
    out = run(hu, {"vein": vein, "lobulated": lobulated})
    labels = out["pred"][0].numpy()
    assert labels[vein].max() == 0 and set(np.unique(labels[lobulated])) == {HYPODENSE}
    assert elongation(vein, SPACING) > 3.0 > elongation(lobulated, SPACING)
    assert run(hu, {"vein": vein}, rules={"max_elongation": 20.0})["pred"][0].numpy()[vein].max() == HYPODENSE


def test_confidence_is_painted_on_findings_and_the_rest_stays_below_threshold() -> None:
    hu, spots = scene()
    out = run(hu, spots, calibration={"a": 1.0, "b": 0.0, "c": -1.0})
    prob, labels = out["prob"][0].numpy(), out["pred"][0].numpy()
    expected = Calibration(c=-1.0).confidence(0.9, 1.0, 1.0)
    assert np.allclose(prob[labels > 0], expected, atol=1e-4)
    assert prob[labels == 0].max() < 0.5
    assert all(abs(f["confidence"] - round(expected, 4)) < 1e-4 for f in out["findings"])


def test_minimum_volume_is_the_profile_setting() -> None:
    hu, spots = scene()
    small = {"hypo": spots["hypo"]}
    voxel_mm3 = float(np.prod(SPACING))
    volume = spots["hypo"].sum() * voxel_mm3
    assert (
        len(
            run(
                hu,
                small,
            )["findings"]
        )
        == 1
    )
    assert (
        len(
            LesionFindingsd(keys="pred", threshold=0.5, min_volume_mm3=volume + 1).findings(
                np.where(spots["hypo"], 0.9, 0.0).astype(np.float32), hu, SPACING
            )[2]
        )
        == 0
    )


def test_identity_calibration_is_the_mean_probability() -> None:
    assert abs(Calibration.of(None).confidence(0.73, 500.0, 2.0) - 0.73) < 1e-9
    assert Calibration.of({"a": 1.0, "b": 0.5, "c": 0.0}) == Calibration(b=0.5)  # fits without d still load
    sized = Calibration(b=0.5)
    assert sized.confidence(0.73, 500.0, 1.0) > sized.confidence(0.73, 50.0, 1.0)
    shaped = Calibration(d=-1.0)
    assert shaped.confidence(0.73, 500.0, 1.2) > shaped.confidence(0.73, 500.0, 2.5)


def test_findings_below_the_confidence_floor_are_dropped_and_capped_below_threshold() -> None:
    hu, spots = scene()
    spots = {"hypo": spots["hypo"], "hyper": spots["hyper"]}
    lobe = ball(hu.shape, (40, 60, 20), 4) | ball(hu.shape, (40, 68, 20), 4)  # the hypodense one, elongated
    spots["hypo"] = lobe
    hu[lobe] = 15.0
    calibration = {"a": 1.0, "b": 0.0, "c": 0.0, "d": -1.0}  # longer: less likely a lesion
    confidences = sorted(f["confidence"] for f in run(hu, spots, calibration=calibration)["findings"])
    assert len(confidences) == 2 and confidences[0] < confidences[1]
    floor = (confidences[0] + confidences[1]) / 2
    out = run(hu, spots, calibration=calibration, min_confidence=floor)
    labels, prob = out["pred"][0].numpy(), out["prob"][0].numpy()
    assert [f["type"] for f in out["findings"]] == ["hyperdense lesion"]
    assert labels[lobe].max() == 0 and prob[lobe].max() < 0.5
    assert set(np.unique(labels[spots["hyper"]])) == {HYPERDENSE}


def test_the_crop_selects_what_is_above_the_level_or_else_everything() -> None:
    image = torch.full((1, 6, 5, 4), -1000.0)
    image[0, 2:4, 1:3, 1] = 40.0
    assert torch.equal(above_or_all(image, -350.0), image > -350.0)
    assert bool(above_or_all(torch.full((1, 3, 3, 3), -1000.0), -350.0).all())


def test_body_mask_keeps_lungs_and_drops_the_table() -> None:
    hu, _ = scene()
    body = coarse_body(hu, SPACING, -350.0, 4.0).full()
    assert body[85, 60, 20] and body[60, 55, 20]  # lung inside, soft tissue inside
    assert not body[30, 6, 20] and not body[5, 90, 20]  # table, air


def test_a_coarse_mask_reads_as_its_nearest_upsampling() -> None:
    """Boxes and points of a coarse mask are what the whole upsampled grid would hold there."""
    rng = np.random.default_rng(3)
    shape, factors = (47, 30, 25), (3, 2, 1)
    coarse = rng.random((16, 15, 25)) > 0.5
    whole = (
        torch.nn.functional.interpolate(
            torch.from_numpy(coarse.astype(np.uint8))[None, None].float(), scale_factor=factors, mode="nearest"
        )[0, 0, : shape[0], : shape[1], : shape[2]].numpy()
        > 0.5
    )
    mask = CoarseMask(coarse, factors, shape)
    assert np.array_equal(mask.full(), whole)
    box = (slice(5, 44), slice(0, 7), slice(20, 25))
    assert np.array_equal(mask[box], whole[box])
    points = np.nonzero(rng.random(shape) > 0.9)
    assert np.array_equal(mask.at(points), whole[points])


def test_finding_numbers_paint_into_labels_and_confidence() -> None:
    hu, spots = scene()
    numbered = run(hu, spots, index_key="finding_index")
    plain = run(hu, spots)
    assert numbered["finding_index"].dtype == torch.uint8 and "prob" not in numbered
    assert int(numbered["finding_index"].max()) == len(numbered["findings"]) == 3
    out = PaintFindingsd(keys="pred", index_key="finding_index", threshold=0.5)(numbered)
    assert out["pred"].dtype == torch.uint8 and "finding_index" not in out
    assert torch.equal(out["pred"], plain["pred"].to(torch.uint8))
    assert torch.allclose(out["prob"], plain["prob"])


def test_painting_thresholds_the_interpolated_probability_inside_the_grown_findings() -> None:
    # Along the last axis, 40 voxels (slabs of 16 and a partial one), a pattern of 6 repeated.
    probability = torch.tensor([0.2, 0.6, 0.9, 0.6, 0.4, 0.7]).repeat(7)[:40][None, None, None].repeat(1, 2, 1, 1)
    index = torch.tensor([0, 1, 1, 1, 2, 0], dtype=torch.uint8).repeat(7)[:40][None, None, None].repeat(1, 2, 1, 1)
    findings = [{"label": HYPODENSE, "confidence": 0.8}, {"label": LUNG_NODULE, "confidence": 0.7}]
    affine = torch.diag(torch.tensor([0.7, 0.7, 2.0, 1.0], dtype=torch.float64))
    data = {"pred": MetaTensor(probability, affine=affine), "finding_index": index, "findings": findings}
    out = PaintFindingsd(keys="pred", threshold=0.5)(data)
    below = float(np.nextafter(np.float32(0.5), np.float32(0.0)))
    assert out["pred"][0, 1, 0].tolist() == [0, HYPODENSE, HYPODENSE, HYPODENSE, 0, 0] * 6 + [
        0,
        HYPODENSE,
        HYPODENSE,
        HYPODENSE,
    ]
    expected = torch.tensor([0.2, 0.8, 0.8, 0.8, 0.4, below]).repeat(7)[:40]
    assert torch.allclose(out["prob"][0, 1, 0], expected)
    assert torch.equal(out["pred"].affine, affine) and torch.equal(out["prob"].affine, affine)


def test_more_than_255_findings_are_numbered_in_a_wider_type() -> None:
    shape = (60, 60, 12)
    prob = np.zeros(shape, dtype=np.float32)
    prob[1::3, 1::3, 2:4] = 0.9  # 400 separate 1x1x2 findings
    hu = np.full(shape, 60.0, dtype=np.float32)
    affine = torch.diag(torch.tensor([*SPACING, 1.0], dtype=torch.float64))
    data = {
        "pred": MetaTensor(torch.from_numpy(prob)[None], affine=affine),
        "hu": MetaTensor(torch.from_numpy(hu)[None], affine=affine),
    }
    numbered = LesionFindingsd(keys="pred", threshold=0.5, min_volume_mm3=1.0, body_voxel_mm=1.5, index_key="i")(data)
    assert len(numbered["findings"]) == 400 and numbered["i"].dtype == torch.int32
    out = PaintFindingsd(keys="pred", index_key="i", threshold=0.5)(numbered)
    assert out["pred"].dtype == torch.uint8 and int((out["pred"] > 0).sum()) == 800


def test_inversion_to_the_input_grid_matches_monai_invertd_for_any_axis_order() -> None:
    from monai.transforms import Compose, EnsureChannelFirstd, Invertd

    rng = np.random.default_rng(0)
    preprocessing = Compose(
        [
            EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=(2.5, 2.5, 2.5)),
        ]
    )
    for _ in range(4):
        perm, flips = rng.permutation(3), rng.choice([-1.0, 1.0], 3)
        affine = np.eye(4)
        affine[:3, :3] = 0.0
        for k in range(3):
            affine[perm[k], k] = flips[k] * (0.7, 0.8, 3.0)[k]
        affine[:3, 3] = rng.uniform(-50.0, 50.0, 3)
        volume = rng.random((40, 50, 37)).astype(np.float32)  # slabs of 16 and a partial one
        data = preprocessing({"image": as_loaded(volume, affine)})
        data["pred"] = data["image"].clone()
        expected = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=True)(dict(data))
        ours = InvertToInputd(keys="pred", orig_key="image")(dict(data))
        assert ours["pred"].shape == (1, 40, 50, 37)
        assert torch.equal(torch.as_tensor(ours["pred"]), torch.as_tensor(expected["pred"]))
        assert np.allclose(np.asarray(ours["pred"].affine), affine)
        # Zero but for a box (findings' numbers), gathered only where the input samples the box.
        sparse = torch.zeros_like(data["image"])
        sparse[0, 2:5, 3:5, 1:4] = torch.arange(1, 19, dtype=torch.float32).reshape(3, 2, 3)
        data["pred"] = sparse
        expected = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=True)(dict(data))
        ours = InvertToInputd(keys="pred", orig_key="image")(dict(data))
        assert torch.equal(torch.as_tensor(ours["pred"]), torch.as_tensor(expected["pred"]))
        data["pred"] = data["image"].clone()
        # Linear: the same as MONAI's bilinear resampling away from the borders.
        smooth = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False)(dict(data))
        ours = InvertToInputd(keys="pred", orig_key="image", linear_channels=[0])(dict(data))
        a, b = torch.as_tensor(ours["pred"])[0], torch.as_tensor(smooth["pred"])[0]
        inner = (slice(4, -4), slice(4, -4), slice(2, -2))
        assert torch.allclose(a[inner], b[inner], atol=1e-4)
        # Linear only where the input samples the findings' box: there as linear everywhere, and
        # elsewhere nearest; the numbers themselves still inverted nearest.
        data["numbers"] = sparse
        within = InvertToInputd(keys="pred", orig_key="image", linear_channels=[0], linear_within="numbers")
        boxed = torch.as_tensor(within(dict(data))["pred"])[0]
        nearest = torch.as_tensor(InvertToInputd(keys="pred", orig_key="image")(dict(data))["pred"])[0]
        numbers = torch.as_tensor(InvertToInputd(keys="numbers", orig_key="image")(dict(data))["numbers"])[0]
        near = numbers > 0
        assert near.any() and (~near).any()
        assert torch.equal(boxed[near], a[near])
        box = nonzero_box(near.numpy())
        outside = torch.ones_like(near)
        outside[box] = False
        assert torch.equal(boxed[outside], nearest[outside]) and not torch.equal(a[outside], nearest[outside])
        # Findings' numbers (integers): each finding's own box is linear, not the one box around
        # them all, so what lies between two findings far apart is nearest.
        apart = torch.zeros_like(data["image"], dtype=torch.uint8)
        apart[0, 1:3, 1:3, 1:3], apart[0, -3:-1, -3:-1, -3:-1] = 1, 2
        data["numbers"] = apart
        boxed = torch.as_tensor(within(dict(data))["pred"])[0]
        found = torch.as_tensor(InvertToInputd(keys="numbers", orig_key="image")(dict(data))["numbers"])[0] > 0
        assert torch.equal(boxed[found], a[found])
        between = torch.zeros_like(found)
        between[nonzero_box(found.numpy())] = True
        for number in (1, 2):
            own = torch.as_tensor(InvertToInputd(keys="numbers", orig_key="image")(dict(data))["numbers"])[0] == number
            between[nonzero_box(own.numpy())] = False
        assert between.any() and torch.equal(boxed[between], nearest[between])
        assert not torch.equal(a[between], nearest[between])


def test_a_probability_without_findings_is_inverted_nearest_everywhere() -> None:
    """No finding to interpolate around: every voxel of the (unzeroed) output is written, nearest."""
    from monai.transforms import Compose, EnsureChannelFirstd

    preprocessing = Compose(
        [EnsureChannelFirstd(keys="image", channel_dim="no_channel"), Spacingd(keys="image", pixdim=(2.0, 2.0, 2.0))]
    )
    volume = np.random.default_rng(1).random((30, 26, 20)).astype(np.float32) + 1.0
    data = preprocessing({"image": as_loaded(volume, np.diag([0.9, 1.1, 2.5, 1.0]))})
    data["pred"], data["numbers"] = data["image"].clone(), torch.zeros_like(data["image"], dtype=torch.uint8)
    within = InvertToInputd(keys="pred", orig_key="image", linear_channels=[0], linear_within="numbers")
    nearest = InvertToInputd(keys="pred", orig_key="image")
    got, expected = (torch.as_tensor(t(dict(data))["pred"]) for t in (within, nearest))
    assert bool((got >= 1.0).all()) and torch.equal(got, expected)


def test_a_finding_at_the_edge_of_a_cropped_grid_is_not_stretched_to_the_scan_border() -> None:
    """The model grid covers only the crop's box: input voxels far past it sample no finding."""
    from monai.transforms import Compose, CropForegroundd, EnsureChannelFirstd

    volume = np.full((60, 50, 20), -1000.0, dtype=np.float32)
    volume[20:40, 15:35, 5:15] = 40.0
    preprocessing = Compose(
        [
            EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
            CropForegroundd(keys="image", source_key="image", select_fn=lambda x: x > -350, allow_smaller=True),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=(1.0, 1.0, 1.0)),
        ]
    )
    data = preprocessing({"image": as_loaded(volume, np.eye(4))})
    numbers = torch.zeros_like(data["image"], dtype=torch.uint8)
    numbers[0, -2:, 5:8, 3:6] = 1  # touches the grid's last plane along the first axis
    data["numbers"] = numbers
    out = torch.as_tensor(InvertToInputd(keys="numbers", orig_key="image")(dict(data))["numbers"])[0]
    assert out.shape == (60, 50, 20) and out.any()
    assert not out[41:].any()  # one voxel of the grid's rim at most, never to the border


def test_oblique_inputs_fall_back_to_resampling() -> None:
    from monai.transforms import Compose, EnsureChannelFirstd, Invertd

    angle = np.deg2rad(20.0)
    affine = np.eye(4)
    affine[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    affine[:3, :3] = affine[:3, :3] @ np.diag([0.8, 0.8, 3.0])
    preprocessing = Compose(
        [
            EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=(1.5, 1.5, 1.5)),
        ]
    )
    volume = np.zeros((30, 30, 10), dtype=np.float32)
    volume[8:20, 10:22, 3:7] = 1.0
    data = preprocessing({"image": as_loaded(volume, affine)})
    data["pred"] = (data["image"] > 0.5).float()
    expected = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=True)(dict(data))
    ours = InvertToInputd(keys="pred", orig_key="image")(dict(data))
    assert ours["pred"].shape == (1, 30, 30, 10)
    agreement = (torch.as_tensor(ours["pred"]) == torch.as_tensor(expected["pred"])).float().mean()
    assert agreement > 0.98


def test_findings_grow_as_a_whole_grid_dilation_would() -> None:
    from scipy import ndimage

    from models.transforms import grow_findings

    rng = np.random.default_rng(3)
    labels = np.zeros((40, 30, 20), dtype=np.uint8)
    for _ in range(12):  # some touching each other, some at the grid's edge
        x, y, z = rng.integers(0, (40, 30, 20))
        labels[max(0, x - 2) : x + 2, max(0, y - 1) : y + 2, z : z + 3] = rng.integers(1, 4)
    assert np.array_equal(grow_findings(labels), ndimage.grey_dilation(labels, size=3))
