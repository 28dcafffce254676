"""The bundles a service hosts: which are there, which are loaded, which one a job gets.

Every named bundle is checked at start (loaded once, so a broken one stops the service with
its reason); at most `max_loaded` stay loaded, the least recently used is unloaded first and
loaded again when a job asks for it.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from models.bundle import BundleSpec
from models.engine import InferenceEngine, Ran

log = logging.getLogger(__name__)


class ModelNotFound(LookupError):
    def __init__(self, name: str, known: Sequence[str]):
        super().__init__(f"no model named {name!r}; this service hosts {', '.join(known)}")
        self.name = name


@dataclass(frozen=True)
class ModelCard:
    """What /health, results and events say about a model."""

    name: str
    version: str
    task: str
    modality: str | None
    labels: dict[int, str]
    weights_sha256: str
    loaded: bool
    device: str
    precision: str
    runtime: str
    # each profile that runs a network of its own (fast_debug trained for its grid): what runs it
    profile_networks: dict[str, Ran] = field(default_factory=dict)

    def ran_by(self, profile: str) -> Ran:
        """What runs this profile's jobs: its own network where it has one, else the bundle's."""
        return self.profile_networks.get(profile) or Ran(self.runtime, self.precision, self.weights_sha256)


class ModelRegistry:
    def __init__(
        self,
        root: Path,
        names: Sequence[str],
        make_engine: Callable[[BundleSpec], InferenceEngine],
        max_loaded: int | None = None,
        routes: Mapping[str, str] | None = None,
    ):
        if not names:
            raise ValueError("no model named: MODEL_NAME is empty")
        self.names = list(dict.fromkeys(names))
        self.root = root
        self.routes = dict(routes or {})
        unknown = sorted(set(self.routes.values()) - set(self.names))
        if unknown:
            raise ValueError(f"ML_MODEL_ROUTES names models that MODEL_NAME does not load: {', '.join(unknown)}")
        self.max_loaded = max(1, max_loaded or len(self.names))
        self._make_engine = make_engine
        self._engines: dict[str, InferenceEngine] = {}
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def default(self) -> str:
        return self.names[0]

    @property
    def ready(self) -> bool:
        return bool(self._engines) and self.default in self._engines

    def load_all(self) -> None:
        """Blocking: check every bundle by loading it; keep the first `max_loaded` loaded."""
        for name in self.names:
            spec = BundleSpec.load(self.root / name, name)
            engine = self._make_engine(spec)
            engine.load()
            with self._lock:
                self._engines[name] = engine
                self._touch(name)
        with self._lock:
            for name in reversed(self.names):
                if len(self._loaded) <= self.max_loaded:
                    break
                self._unload(name)

    def resolve(self, requested: str | None, modality: str | None = None) -> str:
        """The model a job runs: the one it names, else the route for its modality, else the default."""
        if requested is not None:
            if requested not in self.names:
                raise ModelNotFound(requested, self.names)
            return requested
        if modality is not None and modality.upper() in self.routes:
            return self.routes[modality.upper()]
        return self.default

    def check(self, requested: str | None) -> None:
        if requested is not None and requested not in self.names:
            raise ModelNotFound(requested, self.names)

    def engine(self, name: str) -> InferenceEngine:
        """Blocking when the model must be loaded again: the engine of `name`, loaded."""
        with self._lock:
            if name not in self._engines:
                raise ModelNotFound(name, self.names)
            engine = self._engines[name]
            if not engine.loaded:
                while len(self._loaded) >= self.max_loaded:
                    self._unload(next(iter(self._loaded)))
                log.info("loading model %s again (least recently used was unloaded)", name)
                engine.load()
            self._touch(name)
            return engine

    def cards(self) -> list[ModelCard]:
        """Lock-free (the event loop calls it): a load in progress must not stall /health."""
        return [card(self._engines[name]) for name in list(self.names) if name in self._engines]

    def card(self, name: str) -> ModelCard:
        return card(self._engines[name])

    def _touch(self, name: str) -> None:
        self._loaded[name] = None
        self._loaded.move_to_end(name)

    def _unload(self, name: str) -> None:
        self._engines[name].unload()
        self._loaded.pop(name, None)
        # A service freezes what start-up made out of the collector's sight (gc.freeze): what
        # this model leaves in reference cycles must become collectable again.
        gc.unfreeze()
        log.info("unloaded model %s (ML_MAX_LOADED_MODELS=%d)", name, self.max_loaded)


def card(engine: InferenceEngine) -> ModelCard:
    spec = engine.spec
    return ModelCard(
        name=spec.name,
        version=spec.version,
        task=spec.task,
        modality=spec.modality,
        labels=spec.labels,
        weights_sha256=spec.weights.sha256,
        loaded=engine.loaded,
        device=str(engine.device),
        precision=engine.precision,
        runtime=engine.runtime,
        profile_networks=engine.own_networks(),
    )
