"""The inference engine: one MONAI bundle loaded on one device, run on scans.

`load` builds the network with its weights (and the network of each profile that has weights of
its own, e.g. a fast_debug trained for its coarse grid) and instantiates the bundle's pipeline
for every setup (each profile, and a profile's setup for small patients), so a broken bundle fails
at start. `predict` is blocking and CPU/GPU bound: callers run
it in a worker thread; one prediction runs at a time (a lock), because two would only fight over
the same cores or GPU memory.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.bundle.scripts import _get_fake_spatial_shape  # MONAI's reading of "16*n" shapes
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Invertd
from monai.utils import ensure_tuple_rep

from models import memory, resample
from models.bundle import BundleError, BundleSpec, Weights, first_line, profile_of
from models.device import choose_device, choose_precision
from models.labels import is_discrete, to_label_maps
from models.network import build_network, bundle_imports
from models.passes import FLIPS, NO_SHIFT, NetworkOutput, ProgressFn, Shift, run_passes
from models.patient_size import effective_diameter_mm
from models.pipeline import Data, Pipeline, StageError, scan_image
from models.runtime import RuntimeChoice, RuntimeRequest, choose_runtime
from models.windows import can_fit
from schemas.jobs import Profile

log = logging.getLogger(__name__)

# What each profile asks of a sliding-window inferer, before the bundle's own profile overrides.
PROFILE_INFERER: dict[Profile, dict[str, Any]] = {
    Profile.FAST_DEBUG: {"overlap": 0.0, "mode": "constant"},
    Profile.PRODUCTION: {"overlap": 0.25, "mode": "gaussian"},
    Profile.RESEARCH: {"overlap": 0.5, "mode": "gaussian"},
}
TTA_PROFILES = frozenset({Profile.RESEARCH})
_PIPELINE_CACHE = 8
SPATIAL_DIMS = 3  # scans are volumes: an inferer's single roi number is one for each axis
# A whole-volume input larger than this is not tried at load (it is the first job's to run).
_TRIAL_MAX_VOXELS = 160**3
_TRIAL_MIN_SIDE = 16


class InferenceFailed(RuntimeError):
    """A bundle failed on one scan; the message names the bundle and the stage."""


@dataclass(frozen=True)
class Ran:
    """Which network ran a prediction, and how (a profile may have weights of its own)."""

    runtime: str
    precision: str
    weights_sha256: str


@dataclass(frozen=True)
class Runner:
    """A network ready to run: the runtime chosen for it and what the load ran it on."""

    choice: RuntimeChoice
    weights: Weights
    trial: str

    @property
    def ran(self) -> Ran:
        return Ran(self.choice.name, self.choice.precision, self.weights.sha256)


@dataclass(frozen=True)
class Prediction:
    labels: np.ndarray  # uint8/uint16 label map on the input grid
    probability: np.ndarray | None  # float32: of each voxel's label (foreground for background voxels)
    uncertainty: np.ndarray | None  # float32 variance across test-time flips (and shifts with them): research
    label_names: dict[int, str]
    min_volume_mm3: float
    ran: Ran  # which network ran it: a profile may have one of its own
    timings: dict[str, float] = field(default_factory=dict)
    # The bundle's own record of each finding, when its post-processing leaves one under
    # `findings` (the default bundle: model-grid volume, elongation, mean probability, lesion
    # score and what it was made of, confidence).
    findings: list[dict[str, Any]] = field(default_factory=list)
    # What it judged and did not keep, where it records that under `dropped` (the default bundle:
    # why, volume and a few voxels in RAS mm): for validation, not for a job's result.
    dropped: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ProfileRun:
    """How one profile runs one bundle: config overrides, test-time flips and shifts."""

    overrides: dict[str, Any]
    flips: tuple[tuple[int, ...], ...]
    shifts: tuple[tuple[int, ...], ...] = (NO_SHIFT,)  # the scan as it is first

    def moved_by(self, move: Shift | None) -> ProfileRun:
        """Every pass with the scan `move` voxels further against the windows (evaluation: how an
        answer depends on where the patient lies against the network's stride grid)."""
        if move is None or tuple(move) == NO_SHIFT:
            return self
        shifts = tuple(tuple(int(s) + int(m) for s, m in zip(shift, move, strict=True)) for shift in self.shifts)
        return replace(self, shifts=shifts)


@dataclass(frozen=True)
class EngineOptions:
    """How engines run on this machine (ML_DEVICE, ML_PRECISION, ML_TORCH_THREADS, ML_RUNTIME)."""

    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    runtime: str = "torch"
    export_cache: Path = field(default_factory=lambda: Path.home() / ".cache" / "ml-service" / "exports")


class InferenceEngine:
    def __init__(self, spec: BundleSpec, options: EngineOptions | None = None):
        self.spec = spec
        self.options = options or EngineOptions()
        self.device = choose_device(self.options.device)
        # A bundle that says `"amp": false` (the Model Zoo's key) was validated in fp32 only.
        requested = "fp32" if bundle_amp(spec) is False and self.options.precision == "auto" else self.options.precision
        self._precision = choose_precision(self.device, requested)
        self._lock = threading.Lock()
        self._runners: dict[str, Runner] = {}  # by setup; setups without weights of their own share one
        self._pipelines: OrderedDict[tuple[str, float | None], Pipeline] = OrderedDict()
        self.load_seconds = 0.0

    @property
    def choice(self) -> RuntimeChoice | None:
        """The bundle's own network's runtime (production's; a profile's own network has its own)."""
        runner = self._runners.get(Profile.PRODUCTION)
        return runner.choice if runner else None

    @property
    def runtime(self) -> str:
        return self.choice.name if self.choice else "torch"

    @property
    def precision(self) -> str:
        return self.choice.precision if self.choice else self._precision

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def loaded(self) -> bool:
        return bool(self._runners)

    def load(self) -> None:
        """Blocking: build the network on the device and every profile's pipeline."""
        started = time.perf_counter()
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        resample.install()  # MONAI's Spacing/Invertd resampling in slabs: same numbers, far less memory
        memory.keep_large_blocks_mapped()  # a job's volumes go back to the system when it ends
        with bundle_imports(self.spec.path):
            networks = self._build_networks()
        with self._lock:
            try:
                for setup in self.spec.setups:
                    self._pipeline(setup, None)
                self._runners = self._ready(networks)
                self._release_runtimes()  # the trial runs' buffers
            except BaseException:
                self._unload()  # half-loaded is not loaded: the registry loads it again, or /health says so
                raise
        self.load_seconds = time.perf_counter() - started
        log.info(
            "model %s %s loaded on %s (%s, %s) in %.2f s",
            self.spec.name,
            self.spec.version,
            self.device,
            self.runtime,
            self.precision,
            self.load_seconds,
            extra={"model_loaded": self.load_report()},
        )

    def own_networks(self) -> dict[str, Ran]:
        """Each setup with a network of its own, and what runs it (until loaded: the bundle's
        runtime and precision, as for the bundle's own network)."""
        return {
            name: self._runners[name].ran if self._runners else Ran(self.runtime, self.precision, w.sha256)
            for name, w in self.spec.profile_weights.items()
        }

    def load_report(self) -> dict[str, Any]:
        """How the model runs here, for the load log line (and the benchmark that reads it)."""
        report = {"model": self.spec.name, **_runner_report(self._runners.get(Profile.PRODUCTION))}
        report["seconds"] = round(self.load_seconds, 3)
        own = {name: _runner_report(r) for name, r in self._runners.items() if name in self.spec.profile_weights}
        if own:
            report["profiles"] = own
        return report

    def _build_networks(self) -> dict[str | None, torch.nn.Module]:
        """The bundle's network (under None) and each profile's own, built from its overrides."""
        networks: dict[str | None, torch.nn.Module] = {
            None: build_network(self.spec, self.spec.parser(self._base_overrides()), self.device)
        }
        for name, weights in self.spec.profile_weights.items():
            parser = self.spec.parser(self.profile_run(name, None).overrides)
            try:
                networks[name] = build_network(self.spec, parser, self.device, weights)
            except BundleError as error:
                raise BundleError(self.spec.name, f"{name}'s own network: {error.message}") from error
        return networks

    def _ready(self, networks: dict[str | None, torch.nn.Module]) -> dict[str, Runner]:
        """A runtime chosen, and a trial run, for each network and window a setup runs: an
        export takes one window shape, so a setup whose window differs from production's gets an
        export of its own even on the bundle's network. Where a setup sharing it fits its windows
        to the scan, the export takes windows of any size and serves them all (OpenVINO answers
        bit for bit as with a fixed shape, f32 and bf16: one export and check fewer at load)."""
        production = Profile.PRODUCTION.value
        setups = (production, *(s for s in self.spec.setups if s != production))
        keys = {s: (s if s in networks else None, self._window(s)) for s in setups}
        fitting = [s for s in setups if self._fits_windows(s)]
        ready: dict[tuple[str | None, tuple[int, ...] | None], Runner] = {}
        for setup in setups:
            if keys[setup] not in ready:
                own, fitted = keys[setup][0], next((s for s in fitting if keys[s] == keys[setup]), None)
                choice = choose_runtime(networks[own], self._runtime_request(setup, own, fitted))
                ready[keys[setup]] = Runner(choice, self.spec.weights_of(own), self._trial_run(choice, setup))
        return {setup: ready[keys[setup]] for setup in setups}

    def _window(self, setup: str) -> tuple[int, ...] | None:
        """(channels, *roi) of one window of the setup's inferer; None without a fixed window."""
        inferer = self._pipeline(setup, None).inferer
        if not isinstance(inferer, SlidingWindowInferer):
            return None
        roi = ensure_tuple_rep(inferer.roi_size, SPATIAL_DIMS)  # one number: every axis of the scan
        return (1, *(int(r) for r in roi)) if all(int(r) > 0 for r in roi) else None

    def _fits_windows(self, setup: str) -> bool:
        """Whether the setup's windows are fitted to each scan (its export then takes any size)."""
        if setup not in self.spec.window_fits:
            return False
        inferer = self._pipeline(setup, None).inferer
        where = f"configs/profiles.json: {setup}: fit_windows"
        if not isinstance(inferer, SlidingWindowInferer):
            raise BundleError(self.spec.name, f"{where} needs a sliding window, not {type(inferer).__name__}")
        if not can_fit(inferer):
            raise BundleError(
                self.spec.name,
                f"{where} needs a sliding window without overlap and a window of fixed sides, not overlap "
                f"{inferer.overlap} and roi_size {inferer.roi_size}",
            )
        fit, own = self.spec.window_fits[setup], ensure_tuple_rep(inferer.roi_size, SPATIAL_DIMS)
        if fit.max_voxels < (least := fit.least_voxels(own)):
            raise BundleError(
                self.spec.name,
                f"{where}: max_voxels {fit.max_voxels} holds no window of the bundle's own ({least} voxels)",
            )
        return True

    def _trial_run(self, choice: RuntimeChoice, setup: str) -> str:
        """One input through the chosen runtime, so that a network that cannot run (an import in its
        forward, a shape it cannot take) fails the load with one line instead of every job; and
        the first call with a batch shape pays for kernel selection and buffers (OpenVINO: ~0.5 s
        here), which is not the first job's to pay. Returns what it ran, or why it ran nothing."""
        shape, reason = self._trial_shape(setup)
        if shape is None:
            log.info("model %s: no trial run at load: %s; the first job runs the network first", self.name, reason)
            return f"none: {reason}"
        try:
            with torch.inference_mode():
                choice.predictor(torch.zeros(shape, device=self.device))
        except Exception as error:
            own = f"{setup}'s own network" if setup in self.spec.profile_weights else "the network"
            raise BundleError(
                self.spec.name, f"{own} does not run on a {shape} input: {type(error).__name__}: {first_line(error)}"
            ) from error
        return f"ran {shape}"

    def _trial_shape(self, setup: str) -> tuple[tuple[int, ...] | None, str]:
        """A full batch of windows of a sliding-window inferer; else the input the metadata says the
        network takes; else None, and why."""
        inferer = self._pipeline(setup, None).inferer
        window = self._window(setup)
        if window is not None and isinstance(inferer, SlidingWindowInferer):
            return (max(1, int(inferer.sw_batch_size)), *window), ""
        shape, reason = _metadata_input(self.spec.metadata)
        return shape, f"{type(inferer).__name__} has no fixed window, and {reason}" if shape is None else ""

    def _runtime_request(self, setup: str, own: str | None, fitted: str | None) -> RuntimeRequest:
        """For the setup's network and window; of any window size where `fitted` (a setup sharing
        them) fits its windows."""
        return RuntimeRequest(
            requested=self.options.runtime,
            device=self.device,
            precision=self._precision,
            threads=torch.get_num_threads(),
            cache_dir=self.options.export_cache,
            network_key=self.spec.network_key(own),
            input_shape=self._window(setup),
            any_size=fitted is not None,
            other_shape=None if fitted is None else self._other_window(fitted),
        )

    def _other_window(self, setup: str) -> tuple[int, ...] | None:
        """A window of other sides than the bundle's, unequal and small (a check at a size like the
        bundle's took 0.7-1.1 s of a load here), for a setup that fits its windows."""
        window, fit = self._window(setup), self.spec.window_fits.get(setup)
        if window is None or fit is None:
            return None
        return (window[0], *(fit.multiple * (2 + k) for k in range(len(window) - 1)))

    def _release_runtimes(self) -> None:
        """Between predictions only the weights stay: each runtime's working buffers and the
        scan-sized blocks of the job go back to the system."""
        for runner in {id(r): r for r in self._runners.values()}.values():
            runner.choice.release()
        memory.release()

    def unload(self) -> None:
        with self._lock:
            self._unload()

    def _unload(self) -> None:
        self._runners = {}
        self._pipelines.clear()

    def profile_run(self, setup: str, threshold: float | None) -> ProfileRun:
        """How a setup runs: a profile (a `Profile` is its name), or its setup for small patients."""
        profile = Profile(profile_of(setup))
        overrides = self._base_overrides()
        if str(self.spec.parser().get("inferer#_target_", "")).endswith("SlidingWindowInferer"):
            overrides.update({f"inferer#{k}": v for k, v in PROFILE_INFERER[profile].items()})
        overrides.update(self.spec.config_overrides(setup))
        if threshold is not None and self._uses_threshold:
            overrides["threshold"] = threshold
        tta = bool(self.spec.profiles.get(setup, {}).get("tta", profile in TTA_PROFILES))
        return ProfileRun(overrides, FLIPS if tta else ((),), (NO_SHIFT, *self.spec.shifts.get(setup, ())))

    @property
    def _uses_threshold(self) -> bool:
        return self.spec.has_id("threshold")

    def _base_overrides(self) -> dict[str, Any]:
        return {"device": self.device}

    def _pipeline(self, setup: str, threshold: float | None) -> Pipeline:
        key = (str(setup), threshold if self._uses_threshold else None)
        pipeline = self._pipelines.get(key)
        if pipeline is None:
            parser = self.spec.parser(self.profile_run(setup, threshold).overrides)
            with bundle_imports(self.spec.path):
                try:
                    pipeline = Pipeline.build(parser)
                except Exception as error:
                    raise BundleError(self.spec.name, f"{setup}: {first_line(error)}") from error
            self._pipelines[key] = pipeline
            while len(self._pipelines) > _PIPELINE_CACHE:
                self._pipelines.popitem(last=False)
        self._pipelines.move_to_end(key)
        return pipeline

    def min_volume_mm3(self, setup: str) -> float:
        parser = self.spec.parser(self.profile_run(setup, None).overrides)
        return float(parser.get("min_volume_mm3", 0.0) or 0.0)

    def predict(
        self,
        volume: np.ndarray,
        affine: np.ndarray,
        profile: Profile,
        threshold: float,
        header: nib.Nifti1Header | None = None,
        progress: ProgressFn | None = None,
        setup: str | None = None,
        move: Shift | None = None,
    ) -> Prediction:
        """Labels (and probabilities) for a 3-D volume in any orientation and spacing; in `setup`
        where the caller chose it already (`setup_for`), else in the one the profile picks; with
        the scan moved `move` voxels against the windows where given (`ProfileRun.moved_by`)."""
        if not self._runners:
            raise RuntimeError(f"model {self.spec.name} is not loaded")
        timings: dict[str, float] = {}
        with self._lock, torch.inference_mode():
            try:
                setup = self._checked_setup(profile, setup) if setup else self.setup_for(profile, volume, affine)
                return self._predict(volume, affine, header, setup, threshold, progress, timings, move)
            except StageError as error:
                raise InferenceFailed(f"bundle {self.spec.name}: {error}") from error
            finally:
                self._release_runtimes()

    def _predict(
        self,
        volume: np.ndarray,
        affine: np.ndarray,
        header: nib.Nifti1Header | None,
        setup: str,
        threshold: float,
        progress: ProgressFn | None,
        timings: dict[str, float],
        move: Shift | None = None,
    ) -> Prediction:
        runner, pipeline = self._runners[setup], self._pipeline(setup, threshold)
        run = self.profile_run(setup, threshold).moved_by(move)
        with _timer(timings, "preprocess"):
            batch = pipeline.batch(pipeline.preprocess(scan_image(volume, affine, header), "scan.nii.gz"))
            inputs = batch[pipeline.image_key].to(self.device)
        with _timer(timings, "network"):
            fit = self.spec.window_fits.get(setup)
            output = run_passes(pipeline, runner.choice.predictor, inputs, run.flips, progress, run.shifts, fit)
            _add_output(batch, output)
            del inputs  # on a GPU, its copy there
        with _timer(timings, "postprocess"):
            data, watched = self._postprocess(pipeline, batch, volume.shape)
            pred = data["pred"]
            maps = to_label_maps(
                pred, data.get("prob", watched.probability), threshold, watched.discrete(pred), watched.labelled
            )
            uncertainty = _inverted_uncertainty(pipeline, data)
        if maps.labels.shape != volume.shape:
            raise StageError(
                "postprocessing",
                ValueError(f"pred has shape {maps.labels.shape}, not the input's {volume.shape} (no Invertd?)"),
            )
        return Prediction(
            labels=maps.labels,
            probability=maps.probability,
            uncertainty=uncertainty,
            label_names=self.spec.labels,
            min_volume_mm3=self.min_volume_mm3(setup),
            timings=timings,
            findings=_records(data.get("findings")),
            dropped=_records(data.get("dropped")),
            ran=runner.ran,
        )

    def _checked_setup(self, profile: Profile, setup: str) -> str:
        if profile_of(setup) != profile.value or setup not in self._runners:
            raise InferenceFailed(f"bundle {self.spec.name}: {setup} is not a setup of {profile.value}")
        return setup

    def setup_for(self, profile: Profile, volume: np.ndarray, affine: np.ndarray) -> str:
        """The profile's own setup, or its setup for small patients where the body is narrower
        than its rule says (a few tens of milliseconds on a coarse copy of the scan). A scan with
        no body at all in the rule's units (an MR under a CT rule, a phantom of air) is not a
        small patient: it runs the profile's own setup."""
        rule = self.spec.size_rules.get(profile.value)
        if rule is None:
            return profile.value
        diameter = effective_diameter_mm(volume, affine, rule.body_above)
        setup = rule.setup if 0.0 < diameter < rule.below_mm else profile.value
        log.info(
            "%s: the body is %.0f mm across (effective diameter), %s %.0f mm: %s runs",
            profile.value,
            diameter,
            "below" if setup == rule.setup else "not below",
            rule.below_mm,
            setup,
            extra={"patient_diameter_mm": round(diameter, 1), "setup": setup},
        )
        return setup

    def _postprocess(self, pipeline: Pipeline, batch: Data, shape: tuple[int, ...]) -> tuple[Data, Watched]:
        """Run the bundle's post-processing (it consumes the batch), watching what it leaves in
        `pred` after each step."""
        watched = Watched(shape, pipeline.label_step)
        data = pipeline.postprocess(batch, watched.step)
        return data, watched


class Watched:
    """The last float `pred` on the input grid that was not a label map (the probability map),
    and whether the final `pred` is a label map, so that it is not checked again. (Checked after
    every step, even when a step returned the same tensor: it may have changed it in place.)

    From the step that makes `pred` labels (`label_step`, an AsDiscreted) on, a float `pred` is
    an interpolated label map (e.g. prostate_mri_anatomy: argmax, then Invertd with
    `nearest_interp: false`), never a probability: it is not taken as one."""

    def __init__(self, shape: tuple[int, ...], label_step: int | None = None):
        self.shape = shape
        self.label_step = label_step
        self.probability: torch.Tensor | None = None
        self._steps = 0
        self._last: tuple[torch.Tensor, bool] | None = None

    @property
    def labelled(self) -> bool:
        """Whether the post-processing has made `pred` a label map by now."""
        return self.label_step is not None and self._steps > self.label_step

    def step(self, data: Data) -> None:
        self._steps += 1
        pred = data.get("pred")
        if not isinstance(pred, torch.Tensor) or tuple(pred.shape[1:]) != self.shape:
            return
        discrete = is_discrete(pred)
        self._last = (pred, discrete)
        if not discrete and not self.labelled:
            self.probability = pred

    def discrete(self, pred: torch.Tensor) -> bool | None:
        """Whether `pred` is a label map, if it is the one seen last; None when not seen."""
        return self._last[1] if self._last is not None and self._last[0] is pred else None


def bundle_amp(spec: BundleSpec) -> bool | None:
    """The bundle's `amp`: top level, else its evaluator's, resolved as MONAI would ("@amp",
    "$True"; a "false" string too); None when it says nothing that is a yes or no."""
    parser = spec.parser()
    for config_id in ("amp", "evaluator#amp"):
        if config_id not in parser:
            continue
        try:
            with bundle_imports(spec.path):  # the config's `imports` may name the bundle's own code
                value = parser.get_parsed_content(config_id)
        except Exception as error:  # noqa: BLE001 - a precision hint: the model still runs without it
            log.warning(
                "bundle %s: %s does not evaluate (%s); precision as configured", spec.name, config_id, first_line(error)
            )
            return None
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        if isinstance(value, bool):
            return value
    return None


def _runner_report(runner: Runner | None) -> dict[str, Any]:
    choice = runner.choice if runner else None
    return {
        "runtime": choice.name if choice else "torch",
        "precision": choice.precision if choice else None,
        "agreement": choice.agreement if choice else None,
        "speedup": choice.speedup if choice else None,
        "reason": choice.reason if choice else "",
        "trial": runner.trial if runner else "",
        "weights_sha256": runner.weights.sha256 if runner else None,
    }


def _metadata_input(metadata: dict[str, Any]) -> tuple[tuple[int, ...] | None, str]:
    """(1, 1, *spatial_shape) of the metadata's image input, with "16*n"-style sides at the smallest
    n that makes every side at least 16 voxels (n = 1 would give networks that downsample a few
    times a side of 1); else None and why."""
    image = metadata.get("network_data_format", {}).get("inputs", {}).get("image", {})
    spatial = image.get("spatial_shape") if isinstance(image, dict) else None
    if not isinstance(spatial, list) or len(spatial) < 2 or "*" in spatial:
        return None, "the metadata gives no spatial_shape of the image"
    try:
        shapes = (_get_fake_spatial_shape(spatial, p=n, n=n) for n in range(1, 65))
        shape = next(s for s in shapes if min(s) >= _TRIAL_MIN_SIDE)
    except (ValueError, TypeError, StopIteration) as error:
        return None, f"the metadata's spatial_shape {spatial} is not one ({first_line(error)})"
    if math.prod(shape) > _TRIAL_MAX_VOXELS:
        return None, f"the metadata's spatial_shape {shape} is too large to try at load"
    return (1, 1, *(int(side) for side in shape)), ""


def _records(findings: Any) -> list[dict[str, Any]]:
    """The bundle's per-finding (or per-dropped-candidate) records; nothing when it leaves
    something else under that key."""
    if not isinstance(findings, list) or not all(isinstance(f, dict) for f in findings):
        return []
    return findings


def _add_output(batch: Data, output: NetworkOutput) -> None:
    """The network's output into the batch, as the only reference to it: the post-processing
    drops the batch once decollated, so the logits are freed after the first step replaces them
    (155 MB on a 512 x 512 x 300 CT at 1.25 mm)."""
    batch["pred"] = output.logits
    if output.uncertainty is not None:
        batch["uncertainty"] = _like(output.logits, output.uncertainty)


def _like(reference: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`values` with the meta of `reference` (affine, batch), so MONAI's Invertd can invert it."""
    if isinstance(reference, MetaTensor):
        out = reference[:, :1].clone()
        out.copy_(values)
        return out
    return values


def _inverted_uncertainty(pipeline: Pipeline, data: Data) -> np.ndarray | None:
    if "uncertainty" not in data:
        return None
    try:
        inverted = Invertd(
            keys="uncertainty", transform=pipeline.preprocessing, orig_keys=pipeline.image_key, nearest_interp=False
        )(data)["uncertainty"]
    except Exception as error:  # noqa: BLE001 - an uncertainty map is extra; the job goes on without it
        log.warning("no uncertainty map: %s", first_line(error))
        return None
    plain = inverted.as_tensor() if isinstance(inverted, MetaTensor) else inverted
    return np.asarray(plain[0].float().cpu().numpy(), dtype=np.float32)


@contextlib.contextmanager
def _timer(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - started, 4)
