"""The size-and-site probe's own logic on small synthetic windows (no phantom, no trained network)."""

from __future__ import annotations

import numpy as np
import torch

from models.augment import ORGAN_SITE
from models.probe import WINDOW, Window, near_site, probe, table, with_lesion

SPACING = (1.25, 1.25, 1.25)


def _organ_window() -> Window:
    noise = torch.randn(WINDOW, WINDOW, WINDOW, generator=torch.Generator().manual_seed(0))
    image = torch.full((WINDOW, WINDOW, WINDOW), 60.0) + noise * 3.0  # never 20 HU off 60: 6.7 sigma
    return Window(image, np.array([40, 50, 44, ORGAN_SITE]))


def test_a_drawn_lesion_sits_at_the_site_with_about_its_diameter_and_leaves_the_window_as_it_was() -> None:
    window = _organ_window()
    before = window.image.clone()
    drawn = with_lesion(window, 10.0, SPACING, np.random.default_rng(0))
    assert drawn is not None
    image, mask = drawn
    assert torch.equal(window.image, before)  # the window itself is reused for every lesion
    centre = torch.argwhere(mask).float().mean(0).numpy()
    assert np.abs(centre - window.site[:3]).max() <= 2.0
    diameter = 2.0 * (3.0 * float(mask.sum()) * 1.25**3 / (4.0 * np.pi)) ** (1.0 / 3.0)
    assert 6.0 <= diameter <= 14.0
    assert not torch.equal(image, before)
    assert bool(near_site(window, SPACING)[mask].all())  # what is scanned for alarms covers the lesion


class _Thresholding(torch.nn.Module):
    """Fires where the HU departs from 60 by more than 20: a lesion detector that cannot miss."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - 60.0).abs() - 20.0) * 10.0


class _Blind(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, -10.0)


def test_every_model_sees_the_same_lesions_and_the_table_counts_what_reached_the_threshold() -> None:
    nets: dict[str, torch.nn.Module] = {"sees": _Thresholding(), "blind": _Blind()}
    found = probe(nets, [_organ_window(), _organ_window()], [8.0, 16.0], SPACING, seed=3)
    for diameter in (8.0, 16.0):
        assert len(found[("sees", "organ", diameter)]) == len(found[("blind", "organ", diameter)]) == 2
        assert min(found[("sees", "organ", diameter)]) > 0.99
        assert max(found[("blind", "organ", diameter)]) < 0.01
    assert max(found[("sees", "organ", 0.0)]) < 0.5  # no lesion, nothing near the site departs
    text = table(found, ["sees", "blind"], 0.55)
    assert "| organ | 16 mm | 2/2 (mean max p 1.00) | 0/2 (mean max p 0.00) |" in text
    assert "| organ | no lesion: alarm within 12 mm | 0/2" in text
