"""A MONAI bundle on disk in the Model Zoo layout, read and checked before anything runs.

    <bundle>/configs/metadata.json          name, version, network_data_format (label names)
    <bundle>/configs/inference.json|yaml    network_def, preprocessing, inferer, postprocessing
    <bundle>/configs/profiles.json          optional: per-profile config overrides, a profile's
                                            own weights ({"fast_debug": {"weights": "models/x.pt"}}),
                                            and its setup for small patients ("small_patients")
    <bundle>/models/model.pt | model.ts     weights (state dict or TorchScript)
    <bundle>/scripts/                       optional: the bundle's own code

Every problem found here is a `BundleError` whose message names the bundle and what is wrong,
so a service refuses to start with one line instead of serving a half-loaded model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from models.windows import FIT_WINDOWS, WindowFit
from schemas.jobs import Profile

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
REQUIRED_IDS = ("preprocessing", "inferer", "postprocessing")
_CHECKPOINT_LOADER = "CheckpointLoader"
# A profile's entry naming weights of its own (a network trained for its grid), relative to the
# bundle root: a state dict for its network_def (the bundle's, or the profile's own override).
PROFILE_WEIGHTS = "weights"
OWN_NETWORK_PROFILES = (Profile.FAST_DEBUG.value,)
# A profile's entry may hold a second entry, run instead for patients whose body is narrower than
# `below_mm` (its effective diameter, models.patient_size; the body is what lies above `body_above`
# in the scan's own units): a network trained on a coarse grid for adults may lose a child's
# organs and lesions, where a finer grid costs little because the body is small. The inner entry
# is a profile entry of its own (config ids, "weights", "tta") over the bundle's config: it takes
# nothing from the outer one. It is kept under profiles["<profile>@small"].
SMALL_PATIENTS = "small_patients"
SMALL_SETUP = "@small"
# Keys of configs/profiles.json that the engine reads itself instead of passing to the config.
# `shifts`: test-time passes over the scan moved by these voxels of the model grid (models.passes).
SHIFTS = "shifts"
ENGINE_KEYS = frozenset({"tta", PROFILE_WEIGHTS, SMALL_PATIENTS, FIT_WINDOWS, SHIFTS})
_SIZE_KEYS = ("below_mm", "body_above")


@dataclass(frozen=True)
class SizeRule:
    """Which setup of a profile a scan runs: `setup` below `below_mm`, the profile's own above."""

    below_mm: float
    body_above: float
    setup: str


def profile_of(setup: str) -> str:
    """The profile a setup belongs to ("fast_debug@small" -> "fast_debug")."""
    return setup.removesuffix(SMALL_SETUP)


class BundleError(RuntimeError):
    """A bundle that cannot run: a missing file, a config that does not parse, weights that do not fit."""

    def __init__(self, bundle: str, message: str):
        super().__init__(f"bundle {bundle}: {message}")
        self.bundle = bundle
        self.message = message


@dataclass(frozen=True)
class Weights:
    """Where the weights are and how they load."""

    state_dict: Path | None  # loaded into network_def; None when network_def brings its own (TorchScript)
    torchscript: Path | None  # models/model.ts, used as the network when the config has no network_def
    load_key: str | None  # the key of a checkpoint saved as {key: state_dict}
    sha256: str  # of the weights file, or of all files under models/ when there are several


@dataclass(frozen=True)
class BundleSpec:
    name: str
    path: Path
    metadata: dict[str, Any]
    config_file: Path
    config: dict[str, Any]  # the inference config as read, before any parsing
    weights: Weights
    labels: dict[int, str]
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    profile_weights: dict[str, Weights] = field(default_factory=dict)  # setups with a network of their own
    size_rules: dict[str, SizeRule] = field(default_factory=dict)  # profile -> its setup for small patients
    window_fits: dict[str, WindowFit] = field(default_factory=dict)  # setups whose windows fit each scan
    shifts: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)  # setups' test-time shifts

    @classmethod
    def load(cls, path: Path, name: str | None = None) -> BundleSpec:
        name = name or path.name
        if not path.is_dir():
            raise BundleError(name, f"no bundle folder at {path}")
        metadata = _read_json(name, path / "configs" / "metadata.json")
        config_file = _config_file(name, path)
        profiles = _read_profiles(name, path / "configs" / "profiles.json")
        # A site's overrides for every parser (network_def and the weights' path included), e.g. to
        # load a DiNTS architecture file on the CPU: configs/profiles.json {"all": {"<config id>": value}}.
        config = _with_overrides(_read_config(name, config_file), profiles.pop("all", {}))
        size_rules = _small_patient_setups(name, profiles)
        parser = _parser(path, metadata, config)
        _check_ids(name, parser)
        _check_inputs(name, metadata)
        if "version" not in metadata:
            raise BundleError(name, "configs/metadata.json has no 'version'")
        return cls(
            name=name,
            path=path,
            metadata=metadata,
            config_file=config_file,
            config=config,
            weights=_find_weights(name, path, parser),
            labels=label_names(metadata),
            profiles=profiles,
            profile_weights=_profile_weights(name, path, profiles),
            size_rules=size_rules,
            window_fits=_window_fits(name, profiles),
            shifts={setup: _shifts(name, setup, entry[SHIFTS]) for setup, entry in profiles.items() if SHIFTS in entry},
        )

    @property
    def setups(self) -> list[str]:
        """Every way this bundle runs a scan: each profile, and each profile's small-patient setup."""
        return [p.value for p in Profile] + [rule.setup for rule in self.size_rules.values()]

    @property
    def version(self) -> str:
        return str(self.metadata["version"])

    @property
    def task(self) -> str:
        return str(self.metadata.get("task", ""))

    @property
    def modality(self) -> str | None:
        image = self.metadata.get("network_data_format", {}).get("inputs", {}).get("image", {})
        modality = image.get("modality")
        return str(modality) if modality else None

    def parser(self, overrides: Mapping[str, Any] | None = None) -> ConfigParser:
        """A fresh parser of the inference config with `bundle_root` set and `overrides` applied."""
        parser = _parser(self.path, self.metadata, self.config)
        parser.update(dict(overrides or {}))
        return parser

    def has_id(self, config_id: str) -> bool:
        return config_id in self.config

    def weights_of(self, profile: str | None = None) -> Weights:
        """The weights a profile runs: its own, else the bundle's."""
        return self.profile_weights.get(profile or "", self.weights)

    def network_key(self, profile: str | None = None) -> str:
        """What an exported network depends on: the weights and the network's definition (its
        `@` references replaced by their values), so an edited network_def is exported afresh.
        A profile with weights of its own has a network of its own, defined under its overrides."""
        own = profile in self.profile_weights
        parser = self.parser(self.config_overrides(profile) if own else None)
        definition = _resolved(parser, parser.get("network_def")) if "network_def" in parser else None
        digest = hashlib.sha256(self.weights_of(profile).sha256.encode())
        digest.update(json.dumps(definition, sort_keys=True, default=str).encode())
        return digest.hexdigest()

    def config_overrides(self, profile: str | None) -> dict[str, Any]:
        """The profile's entries in profiles.json that are config ids (not its weights or `tta`)."""
        return {k: v for k, v in self.profiles.get(profile or "", {}).items() if k not in ENGINE_KEYS}


def _profile_weights(name: str, path: Path, profiles: dict[str, dict[str, Any]]) -> dict[str, Weights]:
    own: dict[str, Weights] = {}
    for profile, overrides in profiles.items():
        if PROFILE_WEIGHTS not in overrides:
            continue
        if profile_of(profile) not in OWN_NETWORK_PROFILES:
            raise BundleError(
                name,
                f"configs/profiles.json: '{profile}' names weights, but only {', '.join(OWN_NETWORK_PROFILES)} may "
                "run a network of its own (production's is the bundle's, and research refines production's)",
            )
        file = path / str(overrides[PROFILE_WEIGHTS])
        if not file.is_file():
            raise BundleError(
                name, f"configs/profiles.json: {profile} names weights {_relative(file, path)}, not a file"
            )
        own[profile] = Weights(file, None, None, sha256_file(file))
    return own


def _small_patient_setups(name: str, profiles: dict[str, dict[str, Any]]) -> dict[str, SizeRule]:
    """Each profile's `small_patients` entry taken out as a setup of its own ("<profile>@small")."""
    rules: dict[str, SizeRule] = {}
    for profile in list(profiles):
        inner = profiles[profile].get(SMALL_PATIENTS)
        if inner is None:
            continue
        where = f"configs/profiles.json: {profile}'s {SMALL_PATIENTS}"
        if profile not in {p.value for p in Profile}:
            raise BundleError(name, f"{where}: '{profile}' is not a profile ({', '.join(p.value for p in Profile)})")
        if not isinstance(inner, dict) or not all(_is_number(inner.get(key)) for key in _SIZE_KEYS):
            raise BundleError(name, f"{where} must be an object with numbers {' and '.join(_SIZE_KEYS)}")
        if float(inner["below_mm"]) <= 0:
            raise BundleError(name, f"{where}: below_mm must be above 0 mm, not {inner['below_mm']}")
        setup = profile + SMALL_SETUP
        profiles[profile] = {k: v for k, v in profiles[profile].items() if k != SMALL_PATIENTS}
        profiles[setup] = {k: v for k, v in inner.items() if k not in _SIZE_KEYS}
        rules[profile] = SizeRule(float(inner["below_mm"]), float(inner["body_above"]), setup)
    return rules


def _window_fits(name: str, profiles: dict[str, dict[str, Any]]) -> dict[str, WindowFit]:
    fits: dict[str, WindowFit] = {}
    for setup, entry in profiles.items():
        if FIT_WINDOWS in entry:
            try:
                fits[setup] = WindowFit.parse(entry[FIT_WINDOWS])
            except (TypeError, ValueError) as error:
                raise BundleError(name, f"configs/profiles.json: {setup}: {error}") from error
    return fits


def _shifts(name: str, setup: str, value: Any) -> tuple[tuple[int, ...], ...]:
    """A setup's test-time shifts: voxels before each of the three axes, none all zero (the scan
    as it is always runs first)."""
    shifts: list[Any] = value if isinstance(value, list) else [None]
    if not shifts or not all(
        isinstance(s, list)
        and len(s) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 64 for v in s)
        and any(s)
        for s in shifts
    ):
        raise BundleError(
            name,
            f"configs/profiles.json: {setup}: {SHIFTS} must be a list of [x, y, z] voxel shifts (0-64, not all 0), "
            f"not {value!r}",
        )
    return tuple(tuple(s) for s in shifts)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _resolved(parser: ConfigParser, value: Any, depth: int = 0) -> Any:
    if isinstance(value, str) and value.startswith("@") and depth < 8:
        return _resolved(parser, parser.get(value[1:]), depth + 1)
    if isinstance(value, dict):
        return {k: _resolved(parser, v, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolved(parser, v, depth) for v in value]
    return value


def _read_json(name: str, path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BundleError(name, f"lacks {path.parent.name}/{path.name}")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(name, f"{path.parent.name}/{path.name} does not parse: {error}") from error
    if not isinstance(content, dict):
        raise BundleError(name, f"{path.parent.name}/{path.name} is not a JSON object")
    return content


def _config_file(name: str, path: Path) -> Path:
    for candidate in CONFIG_NAMES:
        if (path / "configs" / candidate).is_file():
            return path / "configs" / candidate
    raise BundleError(name, f"lacks configs/{' or configs/'.join(CONFIG_NAMES)}")


def _read_profiles(name: str, path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    profiles = _read_json(name, path)
    for profile, overrides in profiles.items():
        if not isinstance(overrides, dict):
            raise BundleError(name, f"configs/profiles.json: '{profile}' must map config ids to values")
        if SMALL_SETUP[0] in profile:
            raise BundleError(
                name,
                f"configs/profiles.json: '{profile}': '{SMALL_SETUP[0]}' names a profile's setup; a setup for small "
                f"patients goes inside the profile's entry, under '{SMALL_PATIENTS}'",
            )
    return profiles


def _read_config(name: str, config_file: Path) -> dict[str, Any]:
    try:
        content = ConfigParser.load_config_file(str(config_file))
    except Exception as error:
        raise BundleError(name, f"configs/{config_file.name} does not parse: {first_line(error)}") from error
    if not isinstance(content, dict):
        raise BundleError(name, f"configs/{config_file.name} is not a mapping of config ids")
    return content


def _with_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    if not overrides:
        return config
    parser = ConfigParser()
    parser.read_config(copy.deepcopy(config))
    parser.update(overrides)
    return dict(parser.get())


def _parser(path: Path, metadata: dict[str, Any], config: dict[str, Any]) -> ConfigParser:
    """A parser of its own: parsing rewrites the config in place, so each gets a deep copy."""
    parser = ConfigParser()
    parser.read_meta(copy.deepcopy(metadata))
    parser.read_config(copy.deepcopy(config))
    parser["bundle_root"] = str(path)
    return parser


def _check_ids(name: str, parser: ConfigParser) -> None:
    missing = [config_id for config_id in REQUIRED_IDS if config_id not in parser]
    if missing:
        raise BundleError(name, f"the inference config has no {', '.join(missing)}")


def _check_inputs(name: str, metadata: dict[str, Any]) -> None:
    inputs = metadata.get("network_data_format", {}).get("inputs", {})
    image = inputs.get("image", {})
    channels = int(image.get("num_channels", 1) or 1)
    if channels != 1:
        raise BundleError(
            name, f"the network takes {channels} input channels (several images); the service gives one scan a job"
        )


def label_names(metadata: dict[str, Any]) -> dict[int, str]:
    """Label value -> name: `label_def` when the bundle has one, else `channel_def` of the output.

    A single-channel output (a sigmoid map) is one foreground label, value 1.
    """
    pred = metadata.get("network_data_format", {}).get("outputs", {}).get("pred", {})
    label_def = pred.get("label_def")
    if isinstance(label_def, dict) and label_def:
        names = {int(k): str(v) for k, v in label_def.items()}
    else:
        channels = {int(k): str(v) for k, v in (pred.get("channel_def") or {}).items()}
        if int(pred.get("num_channels", len(channels) or 1)) == 1:
            names = {1: channels.get(0, "foreground")}
        else:
            names = channels or {1: "foreground"}
    names.setdefault(0, "background")
    return dict(sorted(names.items()))


def _find_weights(name: str, path: Path, parser: ConfigParser) -> Weights:
    load_path, key = _checkpoint_loader(name, parser)
    torchscript = path / "models" / "model.ts"
    if load_path is None and (path / "models" / "model.pt").is_file():
        load_path = path / "models" / "model.pt"
    if load_path is not None:
        if not load_path.is_file():
            raise BundleError(name, f"lacks its weights {_relative(load_path, path)}")
        return Weights(load_path, None, key, sha256_file(load_path))
    if "network_def" not in parser:
        if not torchscript.is_file():
            raise BundleError(name, "has no network_def and no models/model.ts")
        return Weights(None, torchscript, None, sha256_file(torchscript))
    # network_def builds the network and loads its weights itself (e.g. torch.jit.load).
    files = sorted(p for p in (path / "models").glob("*") if p.is_file()) if (path / "models").is_dir() else []
    if not files:
        raise BundleError(name, "lacks its weights: no models/model.pt, models/model.ts or other file under models/")
    return Weights(None, None, None, _sha256_files(files))


def _checkpoint_loader(name: str, parser: ConfigParser) -> tuple[Path | None, str | None]:
    """The file and key of a MONAI CheckpointLoader, top-level or among the handlers."""
    for config_id in _checkpoint_loader_ids(parser):
        try:
            load_path = parser.get_parsed_content(f"{config_id}#load_path")
        except Exception as error:
            raise BundleError(name, f"cannot evaluate {config_id}#load_path: {first_line(error)}") from error
        load_dict = parser.get(f"{config_id}#load_dict") or {}
        key = next(iter(load_dict)) if isinstance(load_dict, dict) and len(load_dict) == 1 else None
        return Path(str(load_path)), key
    return None, None


def _checkpoint_loader_ids(parser: ConfigParser) -> list[str]:
    """Config ids of CheckpointLoader items, wherever they sit (top level, handler lists, evaluators)."""
    found: list[str] = []

    def walk(item: Any, config_id: str) -> None:
        if isinstance(item, dict):
            if str(item.get("_target_", "")).endswith(_CHECKPOINT_LOADER):
                found.append(config_id)
                return
            children: Any = item.items()
        elif isinstance(item, list):
            children = enumerate(item)
        else:
            return
        for key, child in children:
            walk(child, f"{config_id}#{key}" if config_id else str(key))

    walk(parser.get() or {}, "")
    return found


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_files(files: list[Path]) -> str:
    if len(files) == 1:
        return sha256_file(files[0])
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def first_line(error: BaseException) -> str:
    """One line for a report: the error's first line, and its root cause when MONAI wrapped one."""
    root = error
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    lines = [_line(error)] if root is error else [_line(error), f"{type(root).__name__}: {_line(root)}"]
    return " <- ".join(lines)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _line(error: BaseException) -> str:
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    head = lines[0]
    if head.endswith(":") and len(lines) > 1:  # MONAI: "Failed to evaluate ConfigExpression:\n<the expression>"
        head = f"{head} {lines[1][:160]}"
    reason = next((line for line in lines[1:] if line.startswith("WeightsUnpickler error:")), None)
    if reason:  # torch's weights-only refusal says why on a later line
        head = f"{head.split('.')[0]}: {reason.split('. Please use')[0]}"
    return head


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
