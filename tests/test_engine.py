"""The inference engine hosting MONAI bundles, on the CPU: the default bundle, bundles written by
the tests with known answers, bad bundles, and the registry of several bundles."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
import pytest
import torch

from consumer.settings import parse_routes
from models.bundle import BundleError, BundleSpec, label_names
from models.device import choose_device, choose_precision, cpu_flags, cpu_has_native_bf16, cpu_model
from models.engine import EngineOptions, InferenceEngine, InferenceFailed
from models.evaluate import DEFAULT_BUNDLE
from models.network import unwrap_state
from models.phantom import generate_phantom
from models.pipeline import Pipeline, scan_image
from models.registry import ModelNotFound, ModelRegistry, card
from models.runtime import RuntimeRequest, check_input, choose_runtime, cpu_signature
from schemas.jobs import Profile
from tests.bundle_factory import (
    break_forward,
    expected_labels,
    flipped_affine,
    inference_config,
    intensity_volume,
    intensity_weights,
    labels_first_postprocessing,
    write_intensity_bundle,
)


def make_engine(path: Path) -> InferenceEngine:
    engine = InferenceEngine(BundleSpec.load(path), EngineOptions(device="cpu", precision="fp32", threads=2))
    engine.load()
    return engine


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    return make_engine(DEFAULT_BUNDLE)


@pytest.fixture(scope="module")
def small_phantom():  # type: ignore[no-untyped-def]
    return generate_phantom(77, (96, 96, 40), (1.6, 1.6, 3.0), lesion_count=(2, 2), lesion_diameter_mm=(15.0, 25.0))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundles")
    write_intensity_bundle(root)
    return root


# The default bundle types its findings (models.transforms.LesionFindingsd).
DEFAULT_LABELS = {0: "background", 1: "hypodense lesion", 2: "hyperdense lesion", 3: "lung nodule"}


def test_default_bundle_is_a_standard_monai_bundle() -> None:
    spec = BundleSpec.load(DEFAULT_BUNDLE)
    assert spec.name == "medical_segmentation_v1" and spec.version == spec.metadata["version"]
    for config_id in ("network_def", "preprocessing", "inferer", "postprocessing", "network"):
        assert config_id in spec.config
    assert spec.labels == DEFAULT_LABELS
    assert spec.weights.state_dict == DEFAULT_BUNDLE / "models" / "model.pt"
    assert len(spec.weights.sha256) == 64
    assert (DEFAULT_BUNDLE / "models" / "model.pt").stat().st_size < 8 * 2**20


def test_device_and_precision_are_chosen_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device("auto").type == "cuda"
    assert choose_device("cpu").type == "cpu"
    assert choose_precision(torch.device("cpu"), "fp32") == "fp32"
    assert choose_precision(torch.device("cpu"), "auto") in ("fp32", "bf16")


def test_cpu_features_are_read_as_whole_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some EPYC\nflags\t\t: fpu avx2 avx512fx amx_tile\n")
    assert cpu_flags(cpuinfo) == ["avx2", "amx_tile"]  # avx512fx is not avx512f
    assert cpu_model(cpuinfo) == "Some EPYC" and not cpu_has_native_bf16(cpuinfo)
    cpuinfo.write_text("flags\t: avx2 avx512_bf16\n")
    assert cpu_has_native_bf16(cpuinfo)
    assert cpu_flags(tmp_path / "absent") == [] and not cpu_has_native_bf16(tmp_path / "absent")


def test_profiles_map_to_inferer_settings(engine: InferenceEngine) -> None:
    fast = engine.profile_run(Profile.FAST_DEBUG, 0.5)
    production = engine.profile_run(Profile.PRODUCTION, 0.5)
    research = engine.profile_run(Profile.RESEARCH, 0.5)
    assert fast.overrides["inferer#overlap"] == 0.0 and production.overrides["inferer#overlap"] == 0.25
    assert research.overrides["inferer#overlap"] == 0.5 and len(research.flips) == 4
    assert len(production.flips) == 1 and production.overrides["threshold"] == 0.5
    # The bundle's own profile overrides win over the service's defaults.
    assert fast.overrides["spacing"] == BundleSpec.load(DEFAULT_BUNDLE).profiles["fast_debug"]["spacing"]


def test_prediction_is_in_the_input_grid(engine: InferenceEngine, small_phantom) -> None:  # type: ignore[no-untyped-def]
    prediction = engine.predict(small_phantom.image, small_phantom.affine, Profile.FAST_DEBUG, 0.55)
    assert prediction.labels.shape == small_phantom.image.shape and prediction.labels.dtype == np.uint8
    assert prediction.probability is not None and prediction.probability.dtype == np.float32
    assert prediction.probability.min() >= 0.0 and prediction.probability.max() <= 1.0
    assert prediction.label_names == DEFAULT_LABELS
    assert set(np.unique(prediction.labels)) <= set(DEFAULT_LABELS)
    assert set(prediction.timings) == {"preprocess", "network", "postprocess"}


def test_prediction_follows_the_anatomy_not_the_array_layout(engine: InferenceEngine, small_phantom) -> None:  # type: ignore[no-untyped-def]
    """The same scan stored with flipped and swapped axes gives the same answer in patient space."""
    image, affine = small_phantom.image, small_phantom.affine
    base = engine.predict(image, affine, Profile.FAST_DEBUG, 0.55).probability
    stored = np.flip(np.swapaxes(image, 0, 1), axis=0).copy()
    permute = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = stored.shape[0] - 1
    other = engine.predict(stored, affine @ permute @ flip, Profile.FAST_DEBUG, 0.55).probability
    assert base is not None and other is not None
    back = np.swapaxes(np.flip(other, axis=0), 0, 1)
    assert np.abs(back - base).max() < 1e-3


def test_the_default_bundle_runs_on_the_body_not_on_the_air_around_it(engine: InferenceEngine, small_phantom) -> None:  # type: ignore[no-untyped-def]
    """Its preprocessing crops the scan to the box of what is above body_hu (with a margin): a
    wider field of view of air gives the network the same grid and the same findings, placed in
    the input's own grid."""
    scans = []
    for before, after in ((12, 12), (40, 70)):  # the first leaves room for the crop's margin
        image = np.pad(small_phantom.image, ((before, after), (before, after), (0, 0)), constant_values=-1000.0)
        affine = small_phantom.affine.copy()
        affine[:3, 3] -= affine[:3, :3] @ np.array([before, before, 0.0])
        scans.append((image, affine, before))
    pipeline = Pipeline.build(engine.spec.parser())
    grids = [pipeline.preprocess(scan_image(i, a, None), "scan.nii.gz")["image"].shape for i, a, _ in scans]
    assert grids[0] == grids[1]
    (near, near_affine, _), (wide, wide_affine, _) = scans
    base = engine.predict(near, near_affine, Profile.PRODUCTION, 0.55).labels
    other = engine.predict(wide, wide_affine, Profile.PRODUCTION, 0.55).labels
    assert other.shape == wide.shape and base.any()
    inner = (slice(28, 28 + near.shape[0]), slice(28, 28 + near.shape[1]))  # 40 - 12 voxels more air before
    assert np.array_equal(other[inner], base)
    other[inner] = 0
    assert not other.any()
    # Research's uncertainty goes back through MONAI's Invertd, which pads the crop with zeros.
    spreads = [engine.predict(i, a, Profile.RESEARCH, 0.55).uncertainty for i, a, _ in scans]
    assert spreads[0] is not None and spreads[1] is not None and spreads[0].max() > 0
    assert np.allclose(spreads[1][inner], spreads[0], atol=1e-6)
    spreads[1][inner] = 0
    assert not spreads[1].any()


def test_a_scan_of_air_has_no_findings_and_no_error(engine: InferenceEngine) -> None:
    """Nothing above body_hu: the crop keeps the whole scan instead of emptying it."""
    air = np.random.default_rng(0).normal(-1000.0, 10.0, (40, 36, 12)).astype(np.float32)
    for profile in (Profile.PRODUCTION, Profile.FAST_DEBUG):
        prediction = engine.predict(air, flipped_affine(), profile, 0.55)
        assert prediction.labels.shape == air.shape and not prediction.labels.any() and not prediction.findings


def test_the_memory_order_of_a_scan_does_not_change_the_answer(engine: InferenceEngine, small_phantom) -> None:  # type: ignore[no-untyped-def]
    """The service hands the bundle a C-ordered copy of a Fortran-ordered scan (made faster than
    MONAI's own copy would be): the prediction is the same, bit for bit."""
    image, affine = small_phantom.image, small_phantom.affine
    fortran = engine.predict(np.asfortranarray(image), affine, Profile.FAST_DEBUG, 0.55)
    c_order = engine.predict(np.ascontiguousarray(image), affine, Profile.FAST_DEBUG, 0.55)
    assert fortran.probability is not None and c_order.probability is not None
    assert np.array_equal(fortran.labels, c_order.labels)
    assert np.array_equal(fortran.probability, c_order.probability)


def test_lesions_are_found(engine: InferenceEngine, small_phantom) -> None:  # type: ignore[no-untyped-def]
    from models.evaluate import dice

    prediction = engine.predict(small_phantom.image, small_phantom.affine, Profile.PRODUCTION, 0.55)
    labels = prediction.labels
    found = cc3d.connected_components(small_phantom.lesion_mask > 0) * (labels > 0)
    assert len(np.unique(found[found > 0])) == 2  # both lesions
    # The bundle's own record of each finding, as measured on the model grid, comes along.
    assert len(prediction.findings) == 2
    assert all({"confidence", "mean_probability", "volume_mm3", "elongation"} <= f.keys() for f in prediction.findings)
    # Outlines at 1.6 x 1.6 x 3 mm: 1.3.0 gave 0.70 here (1.2.0: 0.73; the README has the rest).
    assert dice(labels > 0, small_phantom.lesion_mask) > 0.65


def test_a_profile_runs_with_its_own_confidence_fit(tmp_path: Path, small_phantom) -> None:  # type: ignore[no-untyped-def]
    from models.confidence_fit import write_profile

    bundle = tmp_path / DEFAULT_BUNDLE.name
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    # An adult's trunk (225 mm across) runs fast_debug's own network; small_phantom (105 mm) its
    # setup for small patients, the bundle's network, which runs with the bundle's fit.
    adult = generate_phantom(77, (96, 96, 40), (3.2, 3.2, 3.0), lesion_count=(2, 2), lesion_diameter_mm=(15.0, 25.0))
    before = make_engine(bundle)
    assert before.predict(adult.image, adult.affine, Profile.FAST_DEBUG, 0.55).findings
    child = before.predict(small_phantom.image, small_phantom.affine, Profile.FAST_DEBUG, 0.55).findings
    assert child
    # A fit under which no finding reaches fast_debug's floor; production keeps the bundle's own.
    write_profile(bundle, "fast_debug", {"a": 1.0, "b": 0.0, "c": -50.0, "d": 0.0}, 0.5)
    engine = make_engine(bundle)
    fast = engine.predict(adult.image, adult.affine, Profile.FAST_DEBUG, 0.55)
    assert fast.findings == [] and not fast.labels.any()
    assert engine.predict(small_phantom.image, small_phantom.affine, Profile.FAST_DEBUG, 0.55).findings == child
    assert len(engine.predict(small_phantom.image, small_phantom.affine, Profile.PRODUCTION, 0.55).findings) == 2


def test_research_gives_an_uncertainty_map_and_progress(engine: InferenceEngine, small_phantom) -> None:  # type: ignore[no-untyped-def]
    shares: list[float] = []
    prediction = engine.predict(
        small_phantom.image, small_phantom.affine, Profile.RESEARCH, 0.55, progress=shares.append
    )
    assert prediction.uncertainty is not None and prediction.uncertainty.shape == small_phantom.image.shape
    assert prediction.uncertainty.min() >= 0.0 and prediction.uncertainty.max() > 0.0
    assert shares == sorted(shares) and shares[-1] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def one_pass_engine(tmp_path_factory: pytest.TempPathFactory) -> InferenceEngine:
    """The default bundle without production's test-time shifts: production as inference.json runs it."""
    bundle = tmp_path_factory.mktemp("one_pass") / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    profiles = json.loads((bundle / "configs" / "profiles.json").read_text())
    assert profiles["production"].pop("shifts")
    (bundle / "configs" / "profiles.json").write_text(json.dumps(profiles))
    return make_engine(bundle)


@pytest.mark.parametrize("slab", [False, True])
def test_engine_runs_the_bundle_as_monai_does(  # type: ignore[no-untyped-def]
    tmp_path: Path, one_pass_engine: InferenceEngine, small_phantom, slab: bool
) -> None:
    """MONAI's own bundle runner and the service give the same mask for the default bundle's
    inference.json: one pass of production. Test-time passes (research's flips, production's
    shifts in profiles.json) are the service's, as profiles are, and are left out here. A slab
    of 20 slices (60 mm: fewer voxels than the window along the body) is padded by the
    window's own rule (the edge planes repeated), in both."""
    from monai.bundle import run

    image = small_phantom.image
    if slab:
        middle = int(np.argmax(small_phantom.lesion_mask.sum(axis=(0, 1))))
        start = min(max(0, middle - 10), image.shape[2] - 20)
        image = np.ascontiguousarray(image[:, :, start : start + 20])

    (tmp_path / "data").mkdir()
    nib.save(nib.Nifti1Image(image, small_phantom.affine), tmp_path / "data" / "scan.nii.gz")
    # A bundle is code: MONAI says so when it parses one, and the service trusts only MODEL_PATH.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(
            config_file=str(DEFAULT_BUNDLE / "configs" / "inference.json"),
            meta_file=str(DEFAULT_BUNDLE / "configs" / "metadata.json"),
            bundle_root=str(DEFAULT_BUNDLE),
            dataset_dir=str(tmp_path / "data"),
            output_dir=str(tmp_path / "out"),
            device="$torch.device('cpu')",
            logging_file=False,
        )
    assert any("from a source you trust" in str(w.message) for w in caught)
    monai_mask = np.asarray(nib.load(tmp_path / "out" / "scan_seg.nii.gz").dataobj).reshape(image.shape)
    ours = one_pass_engine.predict(image, small_phantom.affine, Profile.PRODUCTION, 0.55).labels
    assert monai_mask.sum() > 0
    assert np.array_equal(ours, monai_mask.astype(np.uint8))


def test_a_model_zoo_bundle_gives_its_known_answer(bundles: Path) -> None:
    engine = make_engine(bundles / "intensity_labels")
    volume = intensity_volume()
    prediction = engine.predict(volume, flipped_affine(), Profile.PRODUCTION, 0.5)
    assert prediction.label_names == {0: "background", 1: "soft", 2: "dense"}
    assert prediction.findings == []  # a Model Zoo bundle keeps no record of findings
    assert np.array_equal(prediction.labels, expected_labels(volume))
    assert prediction.probability is not None
    assert float(prediction.probability[expected_labels(volume) == 2].min()) > 0.9


def test_a_label_map_that_invertd_interpolated_is_rounded_not_thresholded(tmp_path: Path) -> None:
    """prostate_mri_anatomy: AsDiscreted(argmax) on the model grid, then Invertd with bilinear
    interpolation back to the scan: `pred` holds floats between labels, not a probability."""
    volume = intensity_volume()
    predictions = {}
    for nearest in (True, False):
        config = inference_config(spacing=3.0)  # not the scan's 2 mm: Invertd really interpolates
        config["postprocessing"] = labels_first_postprocessing(nearest_interp=nearest)
        engine = make_engine(write_intensity_bundle(tmp_path, f"labels_first_{nearest}", config=config))
        predictions[nearest] = engine.predict(volume, flipped_affine(), Profile.FAST_DEBUG, 0.5)
    interpolated, nearest_labels = predictions[False], predictions[True]
    assert set(np.unique(interpolated.labels).tolist()) == {0, 1, 2}
    assert float(np.mean(interpolated.labels == nearest_labels.labels)) > 0.95
    assert interpolated.probability is None  # the only float `pred` on the scan's grid was labels


@pytest.mark.parametrize("layout", ["inline", "by reference"])
def test_the_readers_a_bundle_names_are_never_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """swin_unetr_btcv_segmentation and others: LoadImaged names ITKReader, which needs `itk` just
    to be built; the service reads the scan itself, so a machine without `itk` runs them."""
    from monai.data import ITKReader
    from monai.utils import OptionalImportError

    def without_itk(self: object, *args: object, **kwargs: object) -> None:
        raise OptionalImportError("required package `itk` is not installed")

    monkeypatch.setattr(ITKReader, "__init__", without_itk)
    config = inference_config()
    config["preprocessing"]["transforms"][0]["reader"] = "ITKReader"
    if layout == "by reference":  # spleen_deepedit_annotation's layout
        config["preprocessing_transforms"] = config["preprocessing"]["transforms"]
        config["preprocessing"]["transforms"] = "$@preprocessing_transforms + []"
    engine = make_engine(write_intensity_bundle(tmp_path, "itk_reader", config=config))
    volume = intensity_volume()
    labels = engine.predict(volume, flipped_affine(), Profile.FAST_DEBUG, 0.5).labels
    assert np.array_equal(labels, expected_labels(volume))


def test_each_bundle_keeps_its_own_scripts_package(tmp_path: Path) -> None:
    """Two bundles whose code packages are both called `scripts`, with different networks."""
    first = make_engine(write_intensity_bundle(tmp_path, "first"))
    second_path = write_intensity_bundle(tmp_path, "second")
    network_code = second_path / "scripts" / "network.py"
    network_code.write_text(network_code.read_text().replace("return self.conv(x)", "return -self.conv(x)"))
    second = make_engine(second_path)
    volume = intensity_volume()
    a = first.predict(volume, flipped_affine(), Profile.FAST_DEBUG, 0.5).labels
    b = second.predict(volume, flipped_affine(), Profile.FAST_DEBUG, 0.5).labels
    first.unload()
    first.load()  # instantiated again: must find its own scripts, not the second bundle's
    again = first.predict(volume, flipped_affine(), Profile.FAST_DEBUG, 0.5).labels
    assert np.array_equal(a, expected_labels(volume)) and np.array_equal(again, a)
    assert not np.array_equal(b, a)


def test_a_transform_failing_on_a_scan_names_the_bundle_and_stage(bundles: Path) -> None:
    engine = make_engine(bundles / "intensity_labels")
    with pytest.raises(InferenceFailed, match=r"bundle intensity_labels: preprocessing 2 \(FailOnThin\) failed"):
        engine.predict(np.zeros((20, 20, 2), np.float32), flipped_affine(), Profile.FAST_DEBUG, 0.5)


def _broken(tmp_path: Path, case: str) -> Path:
    if case == "missing metadata":
        path = write_intensity_bundle(tmp_path, "broken")
        (path / "configs" / "metadata.json").unlink()
    elif case == "weights that do not fit":
        weights = intensity_weights()
        weights["conv.weight"] = torch.zeros(2, 1, 1, 1, 1)
        path = write_intensity_bundle(tmp_path, "broken", weights=weights)
    elif case == "unknown target":
        config = inference_config()
        config["postprocessing"]["transforms"][0]["_target_"] = "NoSuchTransformd"
        path = write_intensity_bundle(tmp_path, "broken", config=config)
    elif case == "config that does not parse":
        path = write_intensity_bundle(tmp_path, "broken")
        (path / "configs" / "inference.json").write_text('{"network_def": ')
    else:
        path = write_intensity_bundle(tmp_path, "broken")
        (path / "models" / "model.pt").unlink()
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing metadata", r"lacks configs/metadata\.json"),
        ("weights that do not fit", r"the weights do not fit network_def"),
        ("unknown target", r"NoSuchTransformd"),
        ("config that does not parse", r"configs/inference\.json does not parse"),
        ("missing weights", r"network_def cannot be built|lacks its weights|weights"),
    ],
)
def test_bad_bundles_fail_at_load_with_one_line(tmp_path: Path, case: str, message: str) -> None:
    path = _broken(tmp_path, case)
    with pytest.raises(BundleError, match=message) as caught:
        make_engine(path)
    text = str(caught.value)
    assert text.startswith("bundle broken: ") and "\n" not in text


def test_a_network_that_cannot_run_fails_the_load_with_one_line(tmp_path: Path) -> None:
    """What fails only when the network runs (an import in its forward, a shape it cannot take)
    fails the load, as a BundleError of one clean line, and leaves the model unloaded."""
    path = write_intensity_bundle(tmp_path, "broken")
    break_forward(path, 'raise RuntimeError("\\x1b[31mexpected a 4-D input\\x1b[0m\\n  at layer conv")')
    engine = InferenceEngine(BundleSpec.load(path), EngineOptions(device="cpu", precision="fp32", threads=2))
    with pytest.raises(BundleError, match=r"does not run on a \(2, 1, 32, 32, 32\) input") as caught:
        engine.load()
    text = str(caught.value)
    assert text.startswith("bundle broken: ") and "\n" not in text and "\x1b" not in text
    assert text.endswith("RuntimeError: expected a 4-D input")
    assert not engine.loaded


@pytest.mark.parametrize("spatial_shape", [["8*n", "8*n", "8*n"], None])
def test_a_whole_volume_inferer_gets_its_trial_run_from_the_metadata(
    tmp_path: Path, spatial_shape: list[int | str] | None
) -> None:
    """A SimpleInferer has no window: the trial input is the metadata's spatial_shape ("8*n" at the
    smallest n giving 16 voxels a side); without one, the load says why nothing was tried."""
    config = inference_config()
    config["inferer"] = {"_target_": "SimpleInferer"}
    working = make_engine(write_intensity_bundle(tmp_path, "whole", config=config, spatial_shape=spatial_shape))
    broken = write_intensity_bundle(tmp_path, "broken", config=config, spatial_shape=spatial_shape)
    break_forward(broken, "import a_package_this_machine_lacks")
    if spatial_shape is None:
        assert working.load_report()["trial"].startswith("none: SimpleInferer has no fixed window")
        assert make_engine(broken).loaded  # nothing to try it with: the first job finds out
        return
    assert working.load_report()["trial"] == "ran (1, 1, 16, 16, 16)"
    with pytest.raises(BundleError, match=r"\(1, 1, 16, 16, 16\) input: ModuleNotFoundError"):
        make_engine(broken)


@pytest.mark.parametrize(
    ("amp", "requested"),
    [
        ({"amp": False}, "fp32"),
        ({"amp": "$False"}, "fp32"),
        ({"amp": "false"}, "fp32"),
        ({"evaluator": {"_target_": "SupervisedEvaluator", "amp": "$False"}}, "fp32"),
        ({"use_amp": "$1 == 2", "evaluator": {"_target_": "SupervisedEvaluator", "amp": "@use_amp"}}, "fp32"),
        ({"amp": "$True", "evaluator": {"_target_": "SupervisedEvaluator", "amp": False}}, "auto"),
        ({}, "auto"),
    ],
)
def test_a_bundle_that_says_no_amp_runs_in_fp32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, amp: dict[str, object], requested: str
) -> None:
    """The Model Zoo's `amp`, top level or its evaluator's, as MONAI resolves it (the evaluator
    itself is never built: it would need ignite)."""
    from models import engine as engine_module

    monkeypatch.setattr(engine_module, "choose_precision", lambda device, precision: precision)
    path = write_intensity_bundle(tmp_path, "amp", config={**inference_config(), **amp})
    engine = InferenceEngine(BundleSpec.load(path), EngineOptions(device="cpu", precision="auto"))
    assert engine.precision == requested


def test_checkpoints_are_unwrapped() -> None:
    state = {"conv.weight": torch.zeros(1)}
    assert unwrap_state({"model": state, "epoch": 3}, "model") == state
    assert unwrap_state({"state_dict": state}, None) == state
    assert unwrap_state({"module.conv.weight": torch.zeros(1)}, None) == state
    assert unwrap_state(state, "model") == state


def test_label_names_from_label_def_or_channel_def() -> None:
    def meta(pred: dict[str, object]) -> dict[str, object]:
        return {"network_data_format": {"outputs": {"pred": pred}}}

    assert label_names(meta({"num_channels": 1, "channel_def": {"0": "spleen"}})) == {0: "background", 1: "spleen"}
    assert label_names(meta({"num_channels": 2, "channel_def": {"0": "background", "1": "spleen"}})) == {
        0: "background",
        1: "spleen",
    }
    assert label_names(meta({"num_channels": 1, "label_def": {"1": "brain"}})) == {0: "background", 1: "brain"}


def test_registry_routes_and_bounds_loaded_models(tmp_path: Path) -> None:
    write_intensity_bundle(tmp_path, "ct_model", modality="CT")
    write_intensity_bundle(tmp_path, "mr_model", modality="MR")
    registry = ModelRegistry(
        tmp_path,
        ["ct_model", "mr_model"],
        lambda spec: InferenceEngine(spec, EngineOptions("cpu", "fp32", 2)),
        max_loaded=1,
        routes=parse_routes("mr:mr_model"),
    )
    registry.load_all()
    assert [card.loaded for card in registry.cards()] == [True, False]
    assert registry.resolve(None, "MR") == "mr_model" and registry.resolve(None, "CT") == "ct_model"
    assert registry.resolve(None, None) == "ct_model"
    with pytest.raises(ModelNotFound, match="no model named 'nope'"):
        registry.resolve("nope")
    registry.engine("mr_model")
    assert [card.loaded for card in registry.cards()] == [False, True]
    assert registry.engine("ct_model").loaded and not registry.card("mr_model").loaded


def test_registry_refuses_routes_to_models_it_does_not_load(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ML_MODEL_ROUTES"):
        ModelRegistry(tmp_path, ["a"], lambda spec: InferenceEngine(spec), routes={"MR": "b"})
    with pytest.raises(ValueError, match="MODALITY:model_name"):
        parse_routes("MR")


def test_bundle_without_any_weights_is_refused(tmp_path: Path) -> None:
    shutil.copytree(DEFAULT_BUNDLE / "configs", tmp_path / "configs")
    with pytest.raises(BundleError, match=r"model\.pt"):
        BundleSpec.load(tmp_path)
    assert json.loads((tmp_path / "configs" / "metadata.json").read_text())["name"] == "medical_segmentation_v1"


def test_phantom_refuses_a_field_of_view_too_small_for_an_abdomen() -> None:
    with pytest.raises(ValueError, match="field of view"):
        generate_phantom(7, (96, 80, 24), (0.9, 0.9, 2.5))


class _BranchesOnTheInput(torch.nn.Module):
    """Data-dependent control flow: a traced export keeps the branch of its example input only."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, kernel_size=1)
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if float(x.mean()) > self.threshold else -self.conv(x)


def _runtime_request(tmp_path: Path, requested: str, network: torch.nn.Module) -> RuntimeRequest:
    digest = hashlib.sha256(type(network).__name__.encode()).hexdigest()
    return RuntimeRequest(requested, torch.device("cpu"), "fp32", 2, tmp_path, digest, (1, 32, 32, 32))


def _key(network: torch.nn.Module) -> str:
    return f"{_runtime_request(Path(), 'auto', network).network_key[:16]}-1x32x32x32"


def _ov_version() -> str:
    import openvino

    return str(openvino.__version__).split("-")[0]


def test_an_exported_runtime_must_agree_with_torch_and_is_cached(tmp_path: Path, engine: InferenceEngine) -> None:
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1))
    choice = choose_runtime(network, _runtime_request(tmp_path, "openvino", network))
    assert choice.name == "openvino" and choice.agreement is not None and choice.agreement >= 0.999
    x = torch.rand(3, 1, 32, 32, 32)  # any number of windows a call
    with torch.inference_mode():
        assert torch.allclose(choice.predictor(x), network(x), atol=1e-5)
    # The export's name keeps the whole runtime version and the CPU's key.
    assert [p.name for p in tmp_path.glob("*.xml")] == [
        f"{_key(network)}-openvino-{_ov_version()}-{cpu_signature()}-f32.xml"
    ]
    # The second load reads the export from the cache instead of converting again.
    import openvino

    original = openvino.convert_model
    openvino.convert_model = lambda *a, **k: (_ for _ in ()).throw(AssertionError("converted again"))
    try:
        again = choose_runtime(network, _runtime_request(tmp_path, "openvino", network))
    finally:
        openvino.convert_model = original
    assert again.name == "openvino"
    # ... with the weights it converted: fp32, not the fp16 that `save_model` writes by default.
    with torch.inference_mode():
        assert torch.allclose(again.predictor(x), network(x), atol=1e-5)


def test_a_network_that_does_not_export_right_falls_back_to_torch(tmp_path: Path) -> None:
    # The export traces one input, the agreement check runs another: between their means the
    # branch taken differs, so the export disagrees with torch everywhere.
    means = [float(check_input((1, 32, 32, 32), seed).mean()) for seed in (0, 1)]
    network = _BranchesOnTheInput(sum(means) / 2)
    for requested in ("openvino", "onnxruntime", "auto"):
        choice = choose_runtime(network, _runtime_request(tmp_path / requested, requested, network))
        assert choice.name == "torch", requested


def test_engine_with_auto_runtime_gives_the_known_answer(bundles: Path, tmp_path: Path) -> None:
    options = EngineOptions(device="cpu", precision="fp32", threads=2, runtime="auto", export_cache=tmp_path)
    engine = InferenceEngine(BundleSpec.load(bundles / "intensity_labels"), options)
    engine.load()
    assert engine.runtime in ("torch", "openvino", "onnxruntime")
    volume = intensity_volume()
    # Between predictions the runtime gives its buffers back (OpenVINO's release_memory); the
    # next prediction allocates them again and gives the same answer.
    for _ in range(2):
        assert np.array_equal(
            engine.predict(volume, flipped_affine(), Profile.PRODUCTION, 0.5).labels, expected_labels(volume)
        )


def test_an_openvino_network_runs_again_after_giving_its_buffers_back(tmp_path: Path) -> None:
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 1, 1))
    choice = choose_runtime(network, _runtime_request(tmp_path, "openvino", network))
    assert choice.name == "openvino"
    x = torch.rand(2, 1, 32, 32, 32)
    before = choice.predictor(x)
    choice.release()
    assert torch.equal(choice.predictor(x), before)


def _before_the_move(engine: InferenceEngine, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The service's own pipeline before the bundle moved to the standard layout (production):
    reorient to RAS, resample over the same extent to 1.25 mm, window, sliding window, sigmoid,
    and back by the exact inverse of each step."""
    import nibabel.orientations as orientations
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    source = orientations.io_orientation(affine)
    to_ras = orientations.ornt_transform(source, orientations.axcodes2ornt(("R", "A", "S")))
    ras = np.ascontiguousarray(orientations.apply_orientation(image, to_ras), dtype=np.float32)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[np.argsort([int(t) for t, _ in to_ras])]
    size = tuple(max(1, round(n * s / 1.25)) for n, s in zip(ras.shape, spacing, strict=True))
    x = F.interpolate(torch.from_numpy(ras)[None, None], size=size, mode="trilinear", align_corners=False)
    x = ((x + 100.0) / 300.0).clamp(0.0, 1.0)
    network = engine.choice.predictor if engine.choice else None
    assert network is not None
    with torch.inference_mode():
        logits = sliding_window_inference(x, (96, 96, 96), 4, network, overlap=0.25, mode="gaussian")
        back = F.interpolate(torch.sigmoid(logits.float()), size=ras.shape, mode="trilinear", align_corners=False)
    inverse = orientations.ornt_transform(orientations.axcodes2ornt(("R", "A", "S")), source)
    return orientations.apply_orientation(back[0, 0].numpy(), inverse) >= 0.55


def test_the_move_to_the_standard_layout_keeps_the_masks() -> None:
    """The bundle's MONAI transforms reproduce the hand-written pipeline they replaced (with the
    weights of that time): the same lesions, masks that differ only at their borders."""
    from models.evaluate import dice

    engine = make_engine(Path(__file__).parent / "data" / "medical_segmentation_v1.0")
    phantom = generate_phantom(
        11, (192, 192, 64), (0.9, 0.9, 2.5), lesion_count=(2, 3), lesion_diameter_mm=(10.0, 30.0)
    )
    before = _before_the_move(engine, phantom.image, phantom.affine)
    after = engine.predict(phantom.image, phantom.affine, Profile.PRODUCTION, 0.55).labels > 0
    assert before.sum() > 0 and dice(after, before) >= 0.95
    assert abs(int(after.sum()) - int(before.sum())) <= 0.03 * before.sum()


def test_bundles_whose_scripts_have_no_init_stay_apart(tmp_path: Path) -> None:
    """A `scripts/` folder without __init__.py is a namespace package: it must not leak either."""
    volume = intensity_volume()
    first_path = write_intensity_bundle(tmp_path, "first")
    (first_path / "scripts" / "__init__.py").unlink()
    first = make_engine(first_path)
    second_path = write_intensity_bundle(tmp_path, "second")
    code = second_path / "scripts" / "network.py"
    code.write_text(code.read_text().replace("return self.conv(x)", "return -self.conv(x)"))
    second = make_engine(second_path)
    assert np.array_equal(
        first.predict(volume, flipped_affine(), Profile.FAST_DEBUG, 0.5).labels, expected_labels(volume)
    )
    assert not np.array_equal(
        second.predict(volume, flipped_affine(), Profile.FAST_DEBUG, 0.5).labels, expected_labels(volume)
    )


def test_site_overrides_for_every_parser(tmp_path: Path) -> None:
    """configs/profiles.json "all": applied to the network and weights too (a site's fix of a bundle
    without editing it), unlike the per-profile overrides."""
    path = write_intensity_bundle(tmp_path, "overridden")
    (path / "configs" / "profiles.json").write_text(
        json.dumps(
            {
                "all": {
                    "network_def#_target_": "torch.nn.Conv3d",
                    "network_def#in_channels": 1,
                    "network_def#out_channels": 3,
                    "network_def#kernel_size": 1,
                }
            }
        )
    )
    weights = {"weight": intensity_weights()["conv.weight"], "bias": intensity_weights()["conv.bias"]}
    torch.save(weights, path / "models" / "model.pt")
    engine = make_engine(path)
    volume = intensity_volume()
    assert "all" not in engine.spec.profiles
    assert np.array_equal(
        engine.predict(volume, flipped_affine(), Profile.FAST_DEBUG, 0.5).labels, expected_labels(volume)
    )


def test_errors_read_as_one_clean_line() -> None:
    from models.bundle import first_line

    wrapped = RuntimeError("Failed to evaluate ConfigExpression:\n$torch.load(@path)\nmore")
    wrapped.__cause__ = ValueError(
        "\x1b[1mWeights only load failed.\x1b[0m This file...\nWeightsUnpickler error: Unsupported global: numpy. Please use x"
    )
    text = first_line(wrapped)
    assert "\x1b" not in text and "\n" not in text
    assert text.startswith("Failed to evaluate ConfigExpression: $torch.load(@path)")
    assert "WeightsUnpickler error: Unsupported global: numpy" in text


def test_the_speed_is_measured_once_and_the_agreement_at_every_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models import runtime

    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1))
    first = choose_runtime(network, _runtime_request(tmp_path, "openvino", network))
    assert first.name == "openvino" and first.speedup is not None
    assert len(list(tmp_path.glob("*.speed-fp32-2t-torch*.json"))) == 1
    # The next load does not time torch again: the speed comes from beside the export.
    monkeypatch.setattr(runtime, "_timed", lambda *a: (_ for _ in ()).throw(AssertionError("timed again")))
    again = choose_runtime(network, _runtime_request(tmp_path, "openvino", network))
    assert again.name == "openvino" and again.speedup == pytest.approx(first.speedup)
    # But the agreement is checked again, and decides.
    monkeypatch.setattr(runtime, "_agreement", lambda *a: 0.5)
    assert choose_runtime(network, _runtime_request(tmp_path, "openvino", network)).name == "torch"


def test_the_load_says_how_the_model_runs(engine: InferenceEngine) -> None:
    report = engine.load_report()
    assert report["model"] == "medical_segmentation_v1"
    assert report["runtime"] == "torch" and report["precision"] == "fp32"
    assert report["seconds"] > 0


def test_an_edited_network_definition_is_exported_afresh(tmp_path: Path) -> None:
    """The export cache is keyed by the weights and the network's definition with its references
    resolved: bundle 1.1 kept 1.0's weights but moved the CT window into the network."""
    copy = tmp_path / "medical_segmentation_v1"
    shutil.copytree(DEFAULT_BUNDLE, copy)
    key = BundleSpec.load(DEFAULT_BUNDLE).network_key()
    assert BundleSpec.load(copy).network_key() == key
    config_file = copy / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    config["windows"] = [[-150.0, 250.0]]  # reached only through network_def's "@windows"
    config_file.write_text(json.dumps(config))
    assert BundleSpec.load(copy).network_key() != key


def _with_own_fast_debug(root: Path, weights: dict[str, torch.Tensor]) -> Path:
    path = write_intensity_bundle(root, "own_fast_debug")
    torch.save(weights, path / "models" / "fast.pt")
    (path / "configs" / "profiles.json").write_text(json.dumps({"fast_debug": {"weights": "models/fast.pt"}}))
    return path


def test_a_profile_runs_the_network_of_its_own_weights(tmp_path: Path) -> None:
    """fast_debug names weights of its own (a network trained for its coarse grid): it runs them,
    every other profile the bundle's, and the prediction says which weights ran."""
    swapped = {name: -value for name, value in intensity_weights().items()}
    engine = make_engine(_with_own_fast_debug(tmp_path, swapped))
    volume = intensity_volume()
    production = engine.predict(volume, flipped_affine(), Profile.PRODUCTION, 0.5)
    fast = engine.predict(volume, flipped_affine(), Profile.FAST_DEBUG, 0.5)
    assert np.array_equal(production.labels, expected_labels(volume))
    assert not np.array_equal(fast.labels, expected_labels(volume))
    assert production.ran is not None and fast.ran is not None
    assert production.ran.weights_sha256 == engine.spec.weights.sha256
    assert fast.ran.weights_sha256 == engine.spec.profile_weights["fast_debug"].sha256 != production.ran.weights_sha256
    research = engine.predict(volume, flipped_affine(), Profile.RESEARCH, 0.5)
    assert research.ran == production.ran  # research refines production's network
    # /health's card and the load's report name it and what runs it.
    assert card(engine).profile_networks == {"fast_debug": fast.ran}
    report = engine.load_report()
    assert report["profiles"]["fast_debug"]["weights_sha256"] == fast.ran.weights_sha256
    assert report["profiles"]["fast_debug"]["trial"].startswith("ran ")
    # Its own export: the cache key covers its weights.
    assert engine.spec.network_key("fast_debug") != engine.spec.network_key()
    assert engine.spec.network_key("production") == engine.spec.network_key()


def _body(diameter_mm: float, spacing: float = 2.0, shape: tuple[int, int, int] = (48, 44, 12)) -> np.ndarray:
    """A disc of 200 (the intensity bundle's label 1) `diameter_mm` across in every slice, in 20."""
    x, y = (np.arange(n) * spacing - n * spacing / 2 for n in shape[:2])
    disc = x[:, None] ** 2 + y[None, :] ** 2 <= (diameter_mm / 2) ** 2
    return np.where(disc[..., None], 200.0, 20.0).astype(np.float32) * np.ones(shape, np.float32)


def test_a_profile_runs_its_setup_for_small_patients_below_the_size_it_names(tmp_path: Path) -> None:
    """fast_debug with a network of its own and a setup for small patients: a body narrower than
    below_mm runs that setup (the bundle's network, its own overrides, nothing of fast_debug's),
    a wider one fast_debug's own network; the prediction says which weights ran."""
    swapped = {name: -value for name, value in intensity_weights().items()}
    path = _with_own_fast_debug(tmp_path, swapped)
    small = {"below_mm": 60, "body_above": 100.0, "min_volume_mm3": 7.0}
    profiles = {"fast_debug": {"weights": "models/fast.pt", "min_volume_mm3": 3.0, "small_patients": small}}
    (path / "configs" / "profiles.json").write_text(json.dumps(profiles))
    engine = make_engine(path)
    assert engine.spec.setups == ["fast_debug", "production", "research", "fast_debug@small"]
    own, bundle = engine.spec.profile_weights["fast_debug"].sha256, engine.spec.weights.sha256
    for diameter, ran, min_volume in ((40.0, bundle, 7.0), (52.0, bundle, 7.0), (68.0, own, 3.0), (90.0, own, 3.0)):
        volume = _body(diameter)
        fast = engine.predict(volume, flipped_affine(), Profile.FAST_DEBUG, 0.5)
        assert (fast.ran.weights_sha256, fast.min_volume_mm3) == (ran, min_volume), diameter
        assert np.array_equal(fast.labels, expected_labels(volume)) == (ran == bundle)
    # Other profiles have no rule: production runs the bundle's network whatever the size.
    assert engine.predict(_body(90.0), flipped_affine(), Profile.PRODUCTION, 0.5).ran.weights_sha256 == bundle
    assert card(engine).profile_networks == {"fast_debug": engine.own_networks()["fast_debug"]}
    # No body in the rule's units at all (an MR under a CT rule, a scan of air) is no small patient.
    air = np.full((48, 44, 12), 20.0, np.float32)
    assert engine.setup_for(Profile.FAST_DEBUG, air, flipped_affine()) == "fast_debug"
    # A setup the caller chose (the job runner, once the scan is read) runs as asked, and only
    # a setup of the profile it names.
    chosen = engine.predict(_body(90.0), flipped_affine(), Profile.FAST_DEBUG, 0.5, setup="fast_debug@small")
    assert chosen.ran.weights_sha256 == bundle
    for wrong in ("production", "fast_debug@large"):
        with pytest.raises(InferenceFailed, match=f"{wrong} is not a setup of fast_debug"):
            engine.predict(_body(90.0), flipped_affine(), Profile.FAST_DEBUG, 0.5, setup=wrong)


def test_a_setup_for_small_patients_may_run_weights_of_its_own(tmp_path: Path) -> None:
    """Both setups with networks of their own: each is built, checked and named by its weights,
    and the result cache tells a job by both."""
    from consumer.jobs.cache import _own

    swapped = {name: -value for name, value in intensity_weights().items()}
    path = _with_own_fast_debug(tmp_path, swapped)
    torch.save(intensity_weights(), path / "models" / "small.pt")
    small = {"below_mm": 60, "body_above": 100.0, "weights": "models/small.pt"}
    profiles = {"fast_debug": {"weights": "models/fast.pt", "small_patients": small}}
    (path / "configs" / "profiles.json").write_text(json.dumps(profiles))
    engine = make_engine(path)
    assert set(engine.own_networks()) == {"fast_debug", "fast_debug@small"}
    child = engine.predict(_body(40.0), flipped_affine(), Profile.FAST_DEBUG, 0.5)
    assert child.ran.weights_sha256 == engine.spec.profile_weights["fast_debug@small"].sha256
    assert np.array_equal(child.labels, expected_labels(_body(40.0)))  # its weights: the bundle's values
    key = _own(engine.own_networks(), Profile.FAST_DEBUG)
    assert key.count("+fast_debug") == 2 and _own(engine.own_networks(), Profile.PRODUCTION) == ""
    # Named at the top level, a setup is refused: it belongs inside its profile's entry.
    (path / "configs" / "profiles.json").write_text(json.dumps({"fast_debug@small": {"weights": "models/small.pt"}}))
    with pytest.raises(BundleError, match="goes inside the profile's entry, under 'small_patients'"):
        BundleSpec.load(path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"below_mm": 150}, "must be an object with numbers below_mm and body_above"),
        ({"below_mm": "150", "body_above": -350}, "must be an object with numbers below_mm and body_above"),
        ({"below_mm": -1, "body_above": -350}, "below_mm must be above 0 mm"),
        ([150, -350], "must be an object with numbers below_mm and body_above"),
    ],
)
def test_a_setup_for_small_patients_that_does_not_say_its_size_is_refused(
    tmp_path: Path, entry: object, message: str
) -> None:
    path = write_intensity_bundle(tmp_path, "broken")
    (path / "configs" / "profiles.json").write_text(json.dumps({"fast_debug": {"small_patients": entry}}))
    with pytest.raises(
        BundleError, match=f"bundle broken: configs/profiles.json: fast_debug's small_patients.*{message}"
    ):
        BundleSpec.load(path)
    # A config id the setup overrides is checked where every profile's is: its pipeline at load.
    below = {"below_mm": 150, "body_above": -350, "inferer": {"_target_": "NoSuchInferer"}}
    (path / "configs" / "profiles.json").write_text(json.dumps({"fast_debug": {"small_patients": below}}))
    with pytest.raises(BundleError, match=r"bundle broken: fast_debug@small: .*NoSuchInferer"):
        make_engine(path)


def test_a_profile_naming_missing_weights_or_no_profile_fails_at_load(tmp_path: Path) -> None:
    path = _with_own_fast_debug(tmp_path, {"conv.weight": torch.zeros(2, 1, 1, 1, 1)})
    with pytest.raises(BundleError, match="fast_debug's own network: the weights do not fit network_def"):
        make_engine(path)
    (path / "models" / "fast.pt").unlink()
    with pytest.raises(BundleError, match=r"fast_debug names weights models/fast\.pt, not a file"):
        BundleSpec.load(path)
    for name in ("fast-debug", "research"):
        (path / "configs" / "profiles.json").write_text(json.dumps({name: {"weights": "models/model.pt"}}))
        with pytest.raises(BundleError, match=f"'{name}' names weights, but only fast_debug may"):
            BundleSpec.load(path)


def test_a_profile_with_a_window_of_its_own_runs_an_export_of_its_own(tmp_path: Path) -> None:
    """An export takes one window shape: fast_debug with another roi than production's, on the
    bundle's network, gets its own export (it used to meet production's 32^3 one and fail)."""
    path = write_intensity_bundle(tmp_path, "own_window")
    (path / "configs" / "profiles.json").write_text(json.dumps({"fast_debug": {"inferer#roi_size": [16, 16, 16]}}))
    options = EngineOptions(device="cpu", precision="fp32", threads=2, runtime="openvino", export_cache=tmp_path / "x")
    engine = InferenceEngine(BundleSpec.load(path), options)
    engine.load()
    volume = intensity_volume()
    for profile in (Profile.FAST_DEBUG, Profile.PRODUCTION):
        prediction = engine.predict(volume, flipped_affine(), profile, 0.5)
        assert np.array_equal(prediction.labels, expected_labels(volume))
        assert prediction.ran is not None and prediction.ran.runtime == "openvino"
    shapes = sorted(p.name.split("-")[1] for p in (tmp_path / "x").glob("*.xml"))
    assert shapes == ["1x16x16x16", "1x32x32x32"]


def test_fast_debug_may_fit_its_windows_to_the_scan(tmp_path: Path) -> None:
    """A setup naming fit_windows runs, per scan, the window that covers it with the fewest
    voxels (fewer network calls here), through an export that takes any window, with the same
    answer; a setup whose windows overlap cannot name it."""
    path = write_intensity_bundle(tmp_path, "fitted")
    fit = {"multiple": 8, "max_voxels": 40 * 40 * 24}
    (path / "configs" / "profiles.json").write_text(json.dumps({"fast_debug": {"fit_windows": fit}}))
    options = EngineOptions(device="cpu", precision="fp32", threads=2, runtime="openvino", export_cache=tmp_path)
    engine = InferenceEngine(BundleSpec.load(path), options)
    engine.load()
    volume = intensity_volume()  # 40 x 36 x 24 at 2 mm, the bundle's grid
    calls = {profile: 0 for profile in (Profile.FAST_DEBUG, Profile.PRODUCTION)}
    for profile in calls:

        def count(share: float, profile: Profile = profile) -> None:
            calls[profile] += 1

        prediction = engine.predict(volume, flipped_affine(), profile, 0.5, progress=count)
        assert np.array_equal(prediction.labels, expected_labels(volume)), profile
        assert prediction.ran.runtime == "openvino"
    # One window of 40 x 40 x 24 (one call), where the bundle's 32^3 window takes 2 x 2 x 1 (2 calls).
    assert calls == {Profile.FAST_DEBUG: 1, Profile.PRODUCTION: 2}
    # One export of the network serves both: it takes any size, as fast_debug fits its windows.
    assert len(list(tmp_path.glob("*-openvino-*.xml"))) == len(list(tmp_path.glob("*-any-openvino-*.xml"))) == 1
    assert engine._runners["production"] is engine._runners["fast_debug"]
    (path / "configs" / "profiles.json").write_text(json.dumps({"production": {"fit_windows": fit}}))
    with pytest.raises(BundleError, match="production: fit_windows needs a sliding window without overlap"):
        make_engine(path)
    small = {"multiple": 8, "max_voxels": 16**3}
    (path / "configs" / "profiles.json").write_text(json.dumps({"fast_debug": {"fit_windows": small}}))
    with pytest.raises(BundleError, match="fast_debug: fit_windows: max_voxels 4096 holds no window of the bundle's"):
        make_engine(path)


@pytest.mark.parametrize("requested", ["openvino", "onnxruntime"])
def test_an_export_for_fitted_windows_takes_any_window(tmp_path: Path, requested: str) -> None:
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1))
    request = replace(_runtime_request(tmp_path, requested, network), any_size=True)
    choice = choose_runtime(network, request)
    assert choice.name == requested
    for shape in ((1, 1, 48, 24, 16), (2, 1, 16, 40, 32)):
        x = torch.rand(*shape)
        with torch.inference_mode():
            assert torch.allclose(choice.predictor(x), network(x), atol=1e-5), shape


def test_a_setup_may_average_passes_over_the_scan_shifted(tmp_path: Path) -> None:
    """`shifts` adds passes over the scan moved by that many voxels (its first voxels left out): the
    output is put back where it belongs (a one-voxel slip would move every label), the passes are counted in
    the progress; their spread is an uncertainty only with test-time flips (shifts alone: none)."""
    path = write_intensity_bundle(tmp_path, "shifted")
    profiles = {"production": {"shifts": [[3, 2, 1], [0, 5, 0]]}, "fast_debug": {"tta": True, "shifts": [[1, 1, 1]]}}
    (path / "configs" / "profiles.json").write_text(json.dumps(profiles))
    engine = make_engine(path)
    assert engine.profile_run("production", None).shifts == ((0, 0, 0), (3, 2, 1), (0, 5, 0))
    volume = intensity_volume()
    shares: list[float] = []
    production = engine.predict(volume, flipped_affine(), Profile.PRODUCTION, 0.5, progress=shares.append)
    assert np.array_equal(production.labels, expected_labels(volume))
    assert len(shares) > 3 and shares[-1] == pytest.approx(1.0) and shares == sorted(shares)
    assert production.uncertainty is None
    fast = engine.predict(volume, flipped_affine(), Profile.FAST_DEBUG, 0.5)  # 4 flips x 2 shifts
    assert np.array_equal(fast.labels, expected_labels(volume)) and fast.uncertainty is not None
    assert engine.predict(volume, flipped_affine(), Profile.RESEARCH, 0.5).ran == production.ran
    # Moved for an evaluation (models.evaluate --moves): the labels put back where they were.
    inside = np.full_like(volume, 20.0)
    inside[6:-6, 6:-6, 6:-6] = volume[6:-6, 6:-6, 6:-6]  # the planes a move leaves out hold nothing
    moved = engine.predict(inside, flipped_affine(), Profile.PRODUCTION, 0.5, move=(5, 0, 2))
    assert np.array_equal(moved.labels, expected_labels(inside)) and moved.labels.any()


@pytest.mark.parametrize("shifts", [[[0, 0, 0]], [[1, 2]], [[-1, 0, 0]], [[1.5, 0, 0]], [[65, 0, 0]], [], "4"])
def test_shifts_that_are_not_voxel_moves_fail_the_load(tmp_path: Path, shifts: object) -> None:
    path = write_intensity_bundle(tmp_path, "broken")
    (path / "configs" / "profiles.json").write_text(json.dumps({"production": {"shifts": shifts}}))
    with pytest.raises(BundleError, match=r"production: shifts must be a list of \[x, y, z\] voxel shifts"):
        BundleSpec.load(path)
