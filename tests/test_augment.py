"""Fresh lesions drawn into training patches (models.augment) and how draw_batch uses them."""

from __future__ import annotations

import numpy as np
import torch

from models.augment import LUNG_SITE, ORGAN_SITE, Insertion, insert_lesions, sites_in_patch
from models.geometry import ModelGrid
from models.phantoms.anatomy import FAT, LIVER, LUNG
from models.train import Sample, draw_batch, lesion_sites, lesion_weights, number_lesions


def _organ_patch(shape: tuple[int, int, int] = (40, 40, 40)) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(0)
    image = torch.from_numpy((60.0 + rng.normal(0.0, 10.0, shape)).astype(np.float32))
    sites = np.concatenate([np.argwhere(np.ones(shape, dtype=bool)), np.zeros((int(np.prod(shape)), 1), int)], axis=1)
    return image, sites


def test_drawn_lesions_are_numbered_apart_labelled_where_they_show_and_change_nothing_else() -> None:
    image, sites = _organ_patch()
    before = image.clone()
    numbers = torch.zeros(image.shape, dtype=torch.long)
    numbers[:6, :6, :6] = 7  # a lesion of the phantom's own
    drawn = insert_lesions(image, numbers, sites, (1.0, 1.0, 1.0), np.random.default_rng(3), Insertion(1.0, (3, 3)))
    assert len(drawn) == 3
    assert [n for n, _ in drawn] == [8, 9, 10]  # above every number in the patch
    assert (numbers[:6, :6, :6] == 7).all()
    for number, voxels in drawn:
        where = numbers == number
        assert int(where.sum()) == voxels > 0
        contrast = float((image[where] - before[where]).mean())
        assert abs(contrast) >= 10.0  # the training family's contrasts are 15-100 HU
    changed = (image != before).numpy()
    near = torch.nn.functional.max_pool3d((numbers > 7).float()[None, None], 9, 1, 4)[0, 0].numpy() > 0
    assert not (changed & ~near).any()


def test_lung_sites_get_nodules_at_nodule_densities() -> None:
    image = torch.full((30, 30, 30), -850.0)
    sites = np.concatenate([np.argwhere(np.ones(image.shape, dtype=bool)), np.full((27000, 1), LUNG_SITE)], axis=1)
    numbers = torch.zeros(image.shape, dtype=torch.long)
    drawn = insert_lesions(image, numbers, sites, (1.0, 1.0, 1.0), np.random.default_rng(1), Insertion(1.0, (2, 2)))
    assert drawn
    for number, _ in drawn:
        assert float(image[numbers == number].max()) > -650.0  # solid or ground glass, never lung


def test_sites_are_taken_into_patch_coordinates() -> None:
    sites = np.array([[5, 5, 5, ORGAN_SITE], [20, 21, 22, LUNG_SITE], [40, 0, 0, ORGAN_SITE]])
    local = sites_in_patch(sites, np.array([10, 10, 10]), 16)
    assert local.tolist() == [[10, 11, 12, LUNG_SITE]]


def test_a_batch_with_drawn_lesions_weighs_them_by_size_and_leaves_the_pool_as_it_was() -> None:
    label = np.zeros((32, 32, 32), dtype=np.uint8)
    label[2:6, 2:6, 2:6] = 1
    numbers, lesions, weights = number_lesions(label, 1.0, "volume")
    image, sites = _organ_patch((32, 32, 32))
    sample = Sample(image.clone(), torch.from_numpy(numbers), lesions, np.zeros((0, 3)), np.zeros((0, 3)), weights)
    sample.spacing_mm, sample.sites, sample.size_weighting = (1.0, 1.0, 1.0), sites, "volume"
    batch = draw_batch([sample], 6, 32, np.random.default_rng(0), (0.0, 0.0, 0.0, 1.0), Insertion(1.0))
    assert torch.equal(sample.image, image) and sample.label.max() == 1  # crops were copies
    assert int(batch.numbers.max()) > 1
    for patch in range(6):
        found = batch.numbers[patch]
        for number in torch.unique(found[found > 1]).tolist():
            voxels = int((found == number).sum())
            expected = lesion_weights(np.array([voxels]), 1.0, "volume")[0]
            assert torch.allclose(batch.sizes[patch][found == number], torch.tensor(expected, dtype=torch.float32))
    assert torch.equal(batch.labels, (batch.numbers > 0).float())


def test_organ_sites_leave_out_the_organs_edge_in_partial_volume_with_lung_fat_or_gas() -> None:
    tissue = np.zeros((20, 20, 20), dtype=np.uint8)
    tissue[2:18, 2:18, 2:10] = LUNG
    tissue[2:18, 2:18, 10:18] = LIVER
    hu = np.full(tissue.shape, -1000.0, dtype=np.float32)
    hu[tissue == LUNG] = -850.0
    hu[tissue == LIVER] = 60.0
    hu[:, :, 10] = -450.0  # the liver's top slice, blurred into the lung above it
    hu[:, :, 11] = -200.0
    grid = ModelGrid.for_input(tissue.shape, np.eye(4), (1.0, 1.0, 1.0))
    sites = lesion_sites(grid, tissue, hu, np.zeros(tissue.shape, np.uint8), np.random.default_rng(0))
    organ = sites[sites[:, 3] == ORGAN_SITE]
    assert len(organ) and organ[:, 2].min() >= 12
    assert (sites[sites[:, 3] == LUNG_SITE][:, 2] < 10).all()


def test_a_vessel_in_lung_is_a_lung_site_and_fat_is_no_site() -> None:
    # By HU alone a vessel in lung looked like an organ: its lesion took lung as its organ and was
    # drawn as faint lung, labelled a lesion that nothing could see.
    tissue = np.zeros((20, 20, 20), dtype=np.uint8)
    tissue[2:18, 2:18, 2:10] = LUNG
    tissue[2:18, 2:18, 10:16] = LIVER
    tissue[2:18, 2:18, 16:19] = FAT
    hu = np.full(tissue.shape, -1000.0, dtype=np.float32)
    hu[tissue == LUNG] = -850.0
    hu[8:12, 8:12, 2:10] = 150.0  # an enhanced vessel, drawn as lung tissue
    hu[tissue == LIVER] = 60.0
    hu[tissue == FAT] = -20.0  # fat as dense as some organs, after blur and noise
    grid = ModelGrid.for_input(tissue.shape, np.eye(4), (1.0, 1.0, 1.0))
    sites = lesion_sites(grid, tissue, hu, np.zeros(tissue.shape, np.uint8), np.random.default_rng(0))
    drawn = tissue[tuple(sites[:, :3].T)]
    assert set(drawn[sites[:, 3] == ORGAN_SITE]) == {LIVER}
    assert set(drawn[sites[:, 3] == LUNG_SITE]) == {LUNG}
    assert any(hu[tuple(site[:3])] == 150.0 for site in sites[sites[:, 3] == LUNG_SITE])
