"""Building a bundle's network with its weights, and keeping each bundle's own code to itself.

Model Zoo bundles all call their code package `scripts`: two bundles in one process would
share (and break) one `sys.modules["scripts"]`. `bundle_imports` gives every bundle its own set
of imported modules: the modules a bundle imported from its folder are stashed when it is done
and put back only while that bundle is being instantiated again.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from monai.bundle import ConfigParser

from models.bundle import BundleError, BundleSpec, Weights, first_line

_IMPORTS = threading.RLock()
_STASHED: dict[Path, dict[str, ModuleType]] = {}


def _from_folder(module: ModuleType, folder: str) -> bool:
    file = getattr(module, "__file__", None)
    if isinstance(file, str):
        return file.startswith(folder + "/")
    # A namespace package (a `scripts/` without __init__.py) has no __file__, only __path__;
    # some extension modules have a __path__ that is not even iterable.
    try:
        entries = list(getattr(module, "__path__", None) or [])
    except TypeError:
        return False
    return any(str(entry).startswith(folder + "/") for entry in entries)


@contextlib.contextmanager
def bundle_imports(path: Path) -> Iterator[None]:
    """While inside, `import scripts...` resolves to this bundle's own package."""
    folder = str(path.resolve())
    with _IMPORTS:
        sys.modules.update(_STASHED.pop(path, {}))
        sys.path.insert(0, folder)
        importlib.invalidate_caches()
        try:
            yield
        finally:
            sys.path.remove(folder)
            own = {name: m for name, m in list(sys.modules.items()) if m is not None and _from_folder(m, folder)}
            for name in own:
                del sys.modules[name]
            _STASHED[path] = own


def build_network(
    spec: BundleSpec, parser: ConfigParser, device: torch.device, weights: Weights | None = None
) -> torch.nn.Module:
    """The network of `network_def` with the bundle's weights (or `weights`, a profile's own), in
    eval mode on `device`."""
    weights = weights or spec.weights
    if weights.torchscript is not None:
        network = _load_torchscript(spec, weights.torchscript)
    else:
        try:
            network = parser.get_parsed_content("network_def")
        except Exception as error:
            raise BundleError(spec.name, f"network_def cannot be built: {first_line(error)}") from error
        if not isinstance(network, torch.nn.Module):
            raise BundleError(spec.name, f"network_def is a {type(network).__name__}, not a torch module")
        if weights.state_dict is not None:
            _load_state(spec, network, weights.state_dict, weights.load_key)
    return network.to(device).eval()


def _load_torchscript(spec: BundleSpec, path: Path) -> torch.nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    except (RuntimeError, ValueError) as error:
        raise BundleError(spec.name, f"{path.name} is not a loadable TorchScript file: {first_line(error)}") from error


def _load_state(spec: BundleSpec, network: torch.nn.Module, path: Path, key: str | None) -> None:
    try:
        # Weights only: a checkpoint that needs arbitrary unpickling is refused, never executed.
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise BundleError(spec.name, f"{path.name} is not a loadable state dict: {first_line(error)}") from error
    state = unwrap_state(raw, key)
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise BundleError(spec.name, f"the weights do not fit network_def: {first_line(error)}") from error


def unwrap_state(raw: Any, key: str | None) -> dict[str, Any]:
    """A state dict from what checkpoints hold: {key: state}, {"state_dict": state}, or the state itself.

    Weights saved from a DataParallel model carry a `module.` prefix on every name; it is dropped.
    """
    state = raw
    for candidate in (key, "state_dict", "model"):
        if candidate and isinstance(state, dict) and isinstance(state.get(candidate), dict):
            state = state[candidate]
            break
    if not isinstance(state, dict):
        raise TypeError(f"a checkpoint of type {type(raw).__name__} holds no state dict")
    if state and all(str(name).startswith("module.") for name in state):
        state = {str(name)[len("module.") :]: value for name, value in state.items()}
    return state
