"""The EM watershed's seed threshold and median, tuned on a version's validation sections
(tasks/instances/tuning.py): a drawn case where the default merges cells that a lower threshold
keeps apart, and the catalog's own values winning over the tuned ones."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.metrics import adapted_rand_error
from skimage.segmentation import find_boundaries

from tasks.instances.tuning import DEFAULT, full_segmentation, tune_watershed, watershed_values


def weak_membranes(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Voronoi cells whose membranes are faint (a membrane probability of ~0.27 between some
    cells): seeds below the default threshold 0.3 leak across them and merge the cells."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:160, :160]
    centres = rng.uniform(0, 160, size=(25, 2))
    truth = np.argmin((yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2, axis=-1) + 1
    boundary = find_boundaries(truth, mode="thick")
    faint = rng.random(26) < 0.5  # half the cells have faint walls
    level = np.where(faint[truth], 0.27, 0.9)
    membrane = np.where(boundary, level, 0.05) + rng.normal(0, 0.005, truth.shape)
    return ndimage.gaussian_filter(membrane, 0.7).astype(np.float32), ~boundary


def test_tuning_finds_a_threshold_that_keeps_faintly_separated_cells_apart():
    sections = [weak_membranes(s) for s in range(3)]
    membranes, interiors = [m for m, _ in sections], [i for _, i in sections]
    tuning = tune_watershed(membranes, interiors, min_size=10)
    assert tuning.seed_threshold < 0.27  # seeds must stop at the faint walls
    # its error, recomputed here with scikit-image, is the mean it reports and beats the default's
    truths = [ndimage.label(i, structure=[[0, 1, 0], [1, 1, 1], [0, 1, 0]])[0] for i in interiors]
    def mean_error(t, m):
        return np.mean([adapted_rand_error(tr, full_segmentation(me, t, m, 10))[0]
                        for me, tr in zip(membranes, truths)])
    assert tuning.adapted_rand_error == np.float64(mean_error(tuning.seed_threshold, tuning.median))
    assert tuning.default_error == mean_error(DEFAULT["seed_threshold"], DEFAULT["median"])
    assert tuning.adapted_rand_error < tuning.default_error - 0.05
    assert len(tuning.grid) > 1 and min(g["adapted_rand_error"] for g in tuning.grid) == tuning.adapted_rand_error


def test_the_catalogs_values_win_over_the_tuned_ones_and_files_have_none(monkeypatch):
    from tasks.instances import tuning

    monkeypatch.setattr(tuning, "tuned_settings", lambda uri: {"seed_threshold": 0.15, "median": 5})
    monkeypatch.setattr(tuning, "_TUNED", {})
    assert watershed_values(None, None, "models:/em/3") == (0.15, 5)
    assert watershed_values(0.4, None, "models:/em/3") == (0.4, 5)
    assert watershed_values(0.4, 0, "models:/em/3") == (0.4, 0)
    assert watershed_values(None, None, "file:sha256:abc") == (DEFAULT["seed_threshold"], DEFAULT["median"])
