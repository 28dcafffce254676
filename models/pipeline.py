"""One bundle's own pre-processing, inferer and post-processing, instantiated for one profile.

The bundle runs as MONAI runs it, with two differences the service needs: its leading
`LoadImaged` reads the scan the service has already read (through an in-memory reader, so every
option of that LoadImaged still applies, and the reader it names is never built), and writers in its post-processing are skipped (the
service writes the outputs).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.config import PathLike
from monai.data import NibabelReader, decollate_batch, list_data_collate
from monai.inferers import Inferer
from monai.transforms import AsDiscreted, Compose, LoadImaged
from monai.transforms.compose import execute_compose
from monai.utils import ensure_tuple

from models.bundle import first_line
from models.layout import c_order_copy

Data = dict[Hashable, Any]
_WRITER_NAMES = ("SaveImage", "SaveImaged", "SaveClassificationd", "SaveClassification", "WriteFileMapping")


class StageError(RuntimeError):
    """A bundle transform failed on a scan; `stage` names which (e.g. 'postprocessing 2 (Invertd)')."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"{stage} failed: {type(error).__name__}: {first_line(error)}")
        self.stage = stage


class InMemoryReader(NibabelReader):
    """A NibabelReader whose 'file' is an image already in memory: LoadImaged gives what it would
    give for a NIfTI of that scan (meta, affine in RAS, channel handling), without a disk round trip."""

    def __init__(self, image: nib.Nifti1Image, **kwargs: Any):
        super().__init__(**kwargs)
        self.image = image

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return True

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> nib.Nifti1Image:
        self.filenames = ensure_tuple(data)
        return self.image


@dataclass
class Pipeline:
    """The instantiated stages. Post-processing's `Invertd` refers to this very `preprocessing`
    (MONAI matches transforms by identity), so the three always come from one parser."""

    image_key: str
    loader: LoadImaged
    preprocessing: Compose
    inferer: Inferer
    postprocessing: list[tuple[str, Callable[[Data], Data]]]

    @classmethod
    def build(cls, parser: ConfigParser) -> Pipeline:
        """The stages of `parser`'s config (which this changes: see `drop_loader_reader`)."""
        drop_loader_reader(parser)
        preprocessing = _as_compose(parser.get_parsed_content("preprocessing"))
        inferer = parser.get_parsed_content("inferer")
        post = _as_compose(parser.get_parsed_content("postprocessing"))
        first = preprocessing.transforms[0] if preprocessing.transforms else None
        loader = first if isinstance(first, LoadImaged) else LoadImaged(keys="image")
        return cls(
            image_key=str(loader.keys[0]),
            loader=loader,
            preprocessing=preprocessing,
            inferer=inferer,
            postprocessing=_stages(post),
        )

    @property
    def label_step(self) -> int | None:
        """Index of the first post-processing step that makes `pred` a label map; None when the
        bundle leaves `pred` as probabilities."""
        return next((i for i, (_, t) in enumerate(self.postprocessing) if makes_labels(t, "pred")), None)

    def preprocess(self, image: nib.Nifti1Image, name: str) -> Data:
        """The bundle's preprocessing of the scan, as if LoadImaged had read it from `name`."""
        try:
            data = self.loader({self.image_key: name}, InMemoryReader(image))
        except Exception as error:
            raise StageError("preprocessing 0 (LoadImaged)", error) from error
        transforms = self.preprocessing.transforms
        start = 1 if transforms and transforms[0] is self.loader else 0
        for index in range(start, len(transforms)):
            try:
                data = execute_compose(
                    data,
                    transforms,
                    map_items=self.preprocessing.map_items,
                    unpack_items=self.preprocessing.unpack_items,
                    start=index,
                    end=index + 1,
                    lazy=self.preprocessing.lazy,
                    overrides=self.preprocessing.overrides,
                )
            except Exception as error:
                raise StageError(f"preprocessing {index} ({type(transforms[index]).__name__})", error) from error
        return dict(data)

    def batch(self, data: Data) -> Data:
        return dict(list_data_collate([data]))

    def infer(self, inputs: torch.Tensor, network: Callable[..., Any]) -> torch.Tensor:
        try:
            return self.inferer(inputs, network)  # type: ignore[no-any-return]
        except Exception as error:
            raise StageError(f"inferer ({type(self.inferer).__name__})", error) from error

    def postprocess(self, batch: Data, on_step: Callable[[Data], None] | None = None) -> Data:
        """Decollate the batch and run the post-processing; `on_step` sees the data after each step.

        The batch is consumed: emptied once decollated, so that what a step replaces (the
        network's output first) is freed then, not kept by the batch until the end."""
        data: Data = decollate_batch(batch)[0]
        batch.clear()
        for stage, transform in self.postprocessing:
            try:
                data = transform(data)
            except Exception as error:
                raise StageError(stage, error) from error
            if on_step is not None:
                on_step(data)
        return data


def drop_loader_reader(parser: ConfigParser) -> None:
    """The leading LoadImaged reads the scan through InMemoryReader, never through the `reader`
    the bundle names (e.g. ITKReader, which needs `itk` just to be instantiated): that reader is
    set to None, so it is not built. Other LoadImaged options still apply."""
    config_id = _first_transform_id(parser)
    item = parser.get(config_id) if config_id else None
    if isinstance(item, dict) and str(item.get("_target_", "")).endswith("LoadImaged") and "reader" in item:
        parser[f"{config_id}#reader"] = None


# A config value that starts with a reference: "@preprocessing_transforms", "$@transforms + @extra".
_LEADING_REFERENCE = re.compile(r"^\$?\s*@([\w#]+)")


def _first_transform_id(parser: ConfigParser) -> str | None:
    """Config id of the first preprocessing transform, following a Compose's `transforms`, lists
    and leading references (the Model Zoo's `"transforms": "$@preprocessing_transforms + ..."`)."""
    config_id = "preprocessing"
    for _ in range(16):  # a chain of references, never a cycle
        item = parser.get(config_id)
        reference = _LEADING_REFERENCE.match(item) if isinstance(item, str) else None
        if reference:
            config_id = reference.group(1)
        elif isinstance(item, dict) and "transforms" in item and str(item.get("_target_", "")).endswith("Compose"):
            config_id = f"{config_id}#transforms"
        elif isinstance(item, list) and item:
            config_id = f"{config_id}#0"
        else:
            return config_id if isinstance(item, dict) else None
    return None


def _as_compose(item: Any) -> Compose:
    if isinstance(item, Compose):
        return item
    return Compose(list(item) if isinstance(item, list | tuple) else [item])


def _flatten(transforms: Sequence[Any]) -> list[Any]:
    flat: list[Any] = []
    for transform in transforms:
        flat.extend(_flatten(transform.transforms) if isinstance(transform, Compose) else [transform])
    return flat


def makes_labels(transform: object, key: str) -> bool:
    """Whether `transform` is an AsDiscreted that turns `key` into labels (argmax, a threshold, rounding)."""
    if not isinstance(transform, AsDiscreted) or key not in transform.keys:
        return False
    index = list(transform.keys).index(key)
    threshold = transform.threshold[index]
    has_threshold = threshold is not None and threshold is not False  # False: MONAI's old "no threshold"
    return bool(transform.argmax[index]) or has_threshold or transform.rounding[index] is not None


def is_writer(transform: object) -> bool:
    return type(transform).__name__ in _WRITER_NAMES


def _stages(post: Compose) -> list[tuple[str, Callable[[Data], Data]]]:
    return [
        (f"postprocessing {index} ({type(transform).__name__})", transform)
        for index, transform in enumerate(_flatten(post.transforms))
        if not is_writer(transform)
    ]


def scan_image(volume: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None) -> nib.Nifti1Image:
    """The scan as the NIfTI image a bundle's LoadImaged would have read."""
    image = nib.Nifti1Image(c_ordered(volume), affine, header)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    return image


def c_ordered(volume: np.ndarray) -> np.ndarray:
    """The same values in C order (a DICOM series' transposed view; the NIfTI reader gives C order
    already). MONAI's loader makes that copy itself, with numpy, on one core: 1.2-1.7 s for
    512 x 512 x 300 float32 on 2 cores, where models.layout's takes a fraction of it."""
    return volume if volume.flags.c_contiguous else c_order_copy(volume, volume.dtype)
