"""Copies into C order (models.layout): the same values whatever the source's layout."""

from __future__ import annotations

import numpy as np
import pytest

from models import layout
from models.layout import c_order_copy


@pytest.mark.parametrize(
    "view",
    [
        lambda a: np.asfortranarray(a),  # as NIfTI stores a scan
        lambda a: a,  # C order already
        lambda a: np.ascontiguousarray(a.transpose(2, 0, 1)).transpose(1, 2, 0),  # a permuted view
        lambda a: a[::-1, :, ::2],  # negative and step strides: torch does not take them, numpy does
        lambda a: np.asfortranarray(a).astype(">i2"),  # big-endian
    ],
)
def test_a_copy_holds_the_values_in_c_order_for_every_source_layout(view, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(layout, "_SLAB_BYTES", 3 * 40 * 30 * 6)  # slabs of 3 planes: 41 is not a multiple
    source = view(np.random.default_rng(0).integers(-1024, 3071, (40, 41, 30)).astype(np.int16))
    copy = c_order_copy(source, np.float32)
    assert copy.flags.c_contiguous and copy.dtype == np.float32
    assert np.array_equal(copy, source.astype(np.float32))
    assert np.array_equal(c_order_copy(copy, np.float32), copy)
