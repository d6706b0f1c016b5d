"""EM metrics (tasks/metrics/isbi.py, tasks/metrics/warping.py) against hand-worked cases,
scikit-image, an independent simple-point characterisation (Yokoi's connectivity number) and the
bundled ISBI 2012 sample."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from tasks.metrics.isbi import (
    DEFAULT_THRESHOLDS,
    IsbiStackScores,
    foreground_restricted_scores,
    isbi_slice_scores,
    pixel_error,
    reference_cells,
    thinned_proposal,
)
from tasks.metrics.warping import is_simple_point, simple_point_table, warp_reference, warping_error

TOL = 1e-12

# Reference: three cells of 4 pixels (two rows), separated by membrane columns 2 and 5.
T = np.array([[1, 1, 0, 2, 2, 0, 3, 3],
              [1, 1, 0, 2, 2, 0, 3, 3]])


def _h(*fractions: float) -> float:
    """Entropy -sum f ln f (nats) of the given fractions."""
    return -sum(f * math.log(f) for f in fractions)


# ---------------------------------------------------------------------------------------------
# V_rand / V_info on labelings, worked by hand (n = 12 reference-cell pixels)

def test_identical_labelings_score_one():
    s = foreground_restricted_scores(T, T)
    for key in ("v_rand", "v_rand_split", "v_rand_merge", "v_info", "v_info_split", "v_info_merge"):
        assert s[key] == pytest.approx(1.0, abs=TOL), key


def test_merge_of_two_cells_by_hand():
    # Proposal segment 1 covers reference cells 1 and 2 (and the membrane column 2, excluded).
    S = np.array([[1, 1, 1, 1, 1, 0, 2, 2],
                  [1, 1, 1, 1, 1, 0, 2, 2]])
    s = foreground_restricted_scores(T, S)
    # c = {(1,1): 4, (2,1): 4, (3,2): 4}; sum c^2 = 48, sum a^2 = 3 * 16 = 48, sum b^2 = 64 + 16 = 80
    assert s["v_rand"] == pytest.approx(2 * 48 / (48 + 80), abs=TOL)  # 0.75
    assert s["v_rand_split"] == pytest.approx(48 / 48, abs=TOL)
    assert s["v_rand_merge"] == pytest.approx(48 / 80, abs=TOL)
    h_t = _h(1 / 3, 1 / 3, 1 / 3)
    h_s = _h(8 / 12, 4 / 12)
    h_st = _h(4 / 12, 4 / 12, 4 / 12)
    info = h_s + h_t - h_st  # = H(S): the proposal is a coarsening of the reference
    assert s["v_info"] == pytest.approx(2 * info / (h_s + h_t), abs=TOL)
    assert s["v_info_split"] == pytest.approx(info / h_s, abs=TOL)  # 1
    assert s["v_info_merge"] == pytest.approx(info / h_t, abs=TOL)


def test_split_of_one_cell_by_hand():
    # Reference cell 2 split into two 2-pixel segments (columns 3 and 4).
    S = np.array([[1, 1, 0, 2, 3, 0, 4, 4],
                  [1, 1, 0, 2, 3, 0, 4, 4]])
    s = foreground_restricted_scores(T, S)
    # sum c^2 = 16 + 4 + 4 + 16 = 40, sum a^2 = 48, sum b^2 = 40
    assert s["v_rand"] == pytest.approx(2 * 40 / (48 + 40), abs=TOL)  # 10/11
    assert s["v_rand_split"] == pytest.approx(40 / 48, abs=TOL)
    assert s["v_rand_merge"] == pytest.approx(1.0, abs=TOL)
    h_t = _h(1 / 3, 1 / 3, 1 / 3)
    h_s = _h(4 / 12, 2 / 12, 2 / 12, 4 / 12)
    info = h_t  # the proposal refines the reference: H(S,T) = H(S)
    assert s["v_info"] == pytest.approx(2 * info / (h_s + h_t), abs=TOL)
    assert s["v_info_split"] == pytest.approx(info / h_s, abs=TOL)
    assert s["v_info_merge"] == pytest.approx(1.0, abs=TOL)


def test_boundary_pixels_of_the_proposal_are_singletons():
    # Proposal lines (label 0) inside reference cells 1 and 2: two singletons, not one shared segment.
    S = np.array([[1, 0, 0, 2, 0, 0, 3, 3],
                  [1, 1, 0, 2, 2, 0, 3, 3]])
    s = foreground_restricted_scores(T, S)
    n0 = 2
    sum_c2 = 9 + 9 + 16 + n0  # each singleton pairs only with itself
    sum_a2 = 48
    sum_b2 = 9 + 9 + 16 + n0
    assert s["v_rand"] == pytest.approx(2 * sum_c2 / (sum_a2 + sum_b2), abs=TOL)  # 6/7
    assert s["v_rand_merge"] == pytest.approx(1.0, abs=TOL)  # a shared segment would merge cells 1 and 2
    assert s["v_rand_split"] == pytest.approx(sum_c2 / sum_a2, abs=TOL)
    n = 12
    h_t = _h(1 / 3, 1 / 3, 1 / 3)
    h_s = _h(3 / n, 3 / n, 4 / n) + n0 * (1 / n) * math.log(n)  # singletons: -(1/n) ln(1/n) each
    assert s["v_info"] == pytest.approx(2 * h_t / (h_s + h_t), abs=TOL)
    assert s["v_info_merge"] == pytest.approx(1.0, abs=TOL)


def test_no_reference_cell_is_nan_and_one_segment_follows_fiji():
    s = foreground_restricted_scores(np.zeros((3, 3), int), np.ones((3, 3), int))
    assert all(math.isnan(v) for v in s.values())
    # Fiji: H(proposal) = 0 gives V_info 0 even though V_rand is 1 (one cell, one segment).
    one = np.ones((3, 3), int)
    s = foreground_restricted_scores(one, one)
    assert s["v_rand"] == 1.0 and s["v_info"] == 0.0


# ---------------------------------------------------------------------------------------------
# From probabilities: thresholding, thinning, skimage beside

def test_thinning_turns_a_thick_proposal_border_into_the_reference_line():
    ref = np.zeros((5, 9), bool)
    ref[:, 4] = True
    p = np.zeros((5, 9))
    p[:, 3:6] = 0.9  # three pixels wide
    labels = thinned_proposal(p, 0.5)
    assert (labels[:, 4] == 0).all() and (labels[:, :4] > 0).all() and (labels[:, 5:] > 0).all()
    s = isbi_slice_scores(p, ref, thresholds=(0.5,))[0.5]
    assert s["v_rand"] == pytest.approx(1.0, abs=TOL) and s["v_info"] == pytest.approx(1.0, abs=TOL)


def _fiji_watershed_literal(image: np.ndarray) -> np.ndarray:
    """Line-by-line transcription of Fiji's ``WatershedTransform2D.apply`` (4-connectivity) on a
    grey image (Y, X): the test oracle for ``thinned_proposal``'s membrane-only reimplementation."""
    from collections import deque

    mask, wshed, init, inqueue = -2, 0, -1, -3
    height, width = image.shape
    lab = [[init] * height for _ in range(width)]  # Fiji's tabLabels[x][y]
    records = sorted(((float(image[y, x]), x, y) for x in range(width) for y in range(height)),
                     key=lambda r: r[0])  # stable: ties keep the x-major scan order
    nbrs = lambda x, y: ((x - 1, y), (x, y - 1), (x + 1, y), (x, y + 1))  # noqa: E731
    inside = lambda u, v: 0 <= u < width and 0 <= v < height  # noqa: E731
    current, flag, fifo = 0, False, deque()
    h_max = float(image.max())
    index, h, i1, i2, size = 0, float(image.min()), 0, 0, len(records)
    while index < size and h <= h_max:
        h = records[index][0]
        for k in range(i1, size):
            value, x, y = records[k]
            if value != h:
                i1 = k
                break
            lab[x][y] = mask
            for u, v in nbrs(x, y):
                if inside(u, v) and lab[u][v] >= wshed:
                    fifo.append((x, y))
                    lab[x][y] = inqueue
                    break
        while fifo:
            x, y = fifo.popleft()
            for u, v in nbrs(x, y):
                if not inside(u, v):
                    continue
                if lab[u][v] > 0:
                    if lab[x][y] == inqueue or (lab[x][y] == wshed and flag):
                        lab[x][y] = lab[u][v]
                    elif lab[x][y] > 0 and lab[x][y] != lab[u][v]:
                        lab[x][y] = wshed
                        flag = False
                elif lab[u][v] == wshed:
                    if lab[x][y] == inqueue:
                        lab[x][y] = wshed
                        flag = True
                elif lab[u][v] == mask:
                    lab[u][v] = inqueue
                    fifo.append((u, v))
        k = i2
        while k < size:
            value, x, y = records[k]
            if value != h:
                i2 = k
                break
            if lab[x][y] == mask:
                current += 1
                fifo.append((x, y))
                lab[x][y] = current
                while fifo:
                    for u, v in nbrs(*fifo.popleft()):
                        if inside(u, v) and lab[u][v] == mask:
                            fifo.append((u, v))
                            lab[u][v] = current
            k += 1
            index += 1
    out = np.array(lab).T
    out[out == init] = 0
    return out


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


def test_thinning_reproduces_fijis_watershed():
    rng = np.random.default_rng(3)
    for trial in range(4):
        p = ndimage.gaussian_filter(rng.uniform(size=(37, 53)), 1.0 + trial % 2)
        p = (p - p.min()) / (p.max() - p.min())
        for t in (0.3, 0.5, 0.7):
            ours = thinned_proposal(p, t)
            fiji = _fiji_watershed_literal(np.where(p >= t, 255.0, 0.0))
            assert ((ours == 0) == (fiji == 0)).all() and _same_partition(ours, fiji), (trial, t)
    assert (thinned_proposal(np.ones((4, 5)), 0.5) == 1).all()  # no cell: one segment, as Fiji


def test_thresholds_are_membrane_probabilities():
    ref = np.zeros((4, 9), bool)
    ref[:, 4] = True
    p = np.zeros((4, 9))
    p[:, 4] = 0.3  # a faint membrane: a boundary from threshold 0.3 down, a merge above
    s = isbi_slice_scores(p, ref, thresholds=(0.3, 0.4))
    assert s[0.3]["v_rand"] == pytest.approx(1.0, abs=TOL)
    assert s[0.4]["v_rand"] == pytest.approx(2 * 32 / (32 + 64), abs=TOL)  # two 16-px cells merged


def test_skimage_scores_equal_skimage_and_a_hand_adapted_rand_error():
    from skimage.metrics import adapted_rand_error, variation_of_information

    ref = T == 0
    p = np.zeros(T.shape)
    p[:, 5] = 1.0  # the proposal keeps only the right membrane: cells 1 and 2 merge
    s = isbi_slice_scores(p, ref, thresholds=(0.5,))[0.5]
    truth, proposal = reference_cells(ref), thinned_proposal(p, 0.5)
    are, precision, recall = adapted_rand_error(truth, proposal)
    vi = variation_of_information(truth, proposal, ignore_labels=(0,))
    assert s["adapted_rand_error"] == are and s["adapted_rand_recall"] == recall
    assert s["adapted_rand_precision"] == precision
    assert s["variation_of_information"] == pytest.approx(vi.sum(), abs=TOL)
    # By hand, pairs of distinct pixels: sum c^2 - n = 48 - 12, sizes: reference 48 - 12, proposal 80 - 12.
    assert s["adapted_rand_error"] == pytest.approx(1 - 36 / (0.5 * 36 + 0.5 * 68), abs=TOL)  # 4/13
    assert s["v_rand"] == pytest.approx(0.75, abs=TOL)  # Fiji's N^2 form on the same labelings
    # VI (bits): H(T|S) = H(T) - I = ln 3 - H(S); H(S|T) = 0
    h_s = _h(8 / 12, 4 / 12)
    assert s["vi_merge"] == pytest.approx((math.log(3) - h_s) / math.log(2), abs=TOL)
    assert s["vi_split"] == pytest.approx(0.0, abs=TOL)


def test_pixel_error_by_hand():
    ref = np.zeros((4, 4), bool)
    ref[:, 1] = True
    p = np.zeros((4, 4))
    p[:, 1] = 0.9
    p[0, 1] = 0.5   # membrane (p >= 0.5): right
    p[1, 1] = 0.49  # cell: wrong
    p[2, 3] = 0.7   # membrane on a cell: wrong
    assert pixel_error(p, ref) == pytest.approx(2 / 16, abs=TOL)
    assert pixel_error(ref.astype(float), ref) == 0.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="shape"):
        isbi_slice_scores(np.zeros((4, 4)), np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="NaN"):
        pixel_error(np.full((2, 2), np.nan), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="bool"):
        pixel_error(np.zeros((2, 2)), np.zeros((2, 2), np.uint8))


# ---------------------------------------------------------------------------------------------
# Simple points and the warping error

def _yokoi_simple(code: int) -> bool:
    """Independent test: Yokoi's 4-connectivity number of the cell pixels equals 1.

    Yokoi, Toriwaki, Fukumura (1975): N4 = sum_{k in 1,3,5,7} x_k - x_k x_{k+1} x_{k+2}, with the
    8 neighbours x_1..x_8 counter-clockwise from the east (x_9 = x_1); a pixel is simple for
    (4, 8) connectivity iff N4 = 1.
    """
    bit = lambda r, c: (code >> (3 * r + c)) & 1  # noqa: E731
    x = [bit(1, 2), bit(0, 2), bit(0, 1), bit(0, 0), bit(1, 0), bit(2, 0), bit(2, 1), bit(2, 2)]
    x = x + x[:1]
    return sum(x[k] - x[k] * x[k + 1] * x[k + 2] for k in (0, 2, 4, 6)) == 1


def test_simple_point_table_matches_yokoi_on_all_512_neighbourhoods():
    table = simple_point_table()
    assert table.shape == (512,)
    assert [bool(v) for v in table] == [_yokoi_simple(code) for code in range(512)]


def test_simple_point_cases():
    # True = cell, False = membrane; the centre's own value does not matter.
    merges_two_cells = [[0, 0, 0], [1, 0, 1], [0, 0, 0]]
    end_of_a_line = [[1, 1, 1], [0, 0, 1], [1, 1, 1]]  # membrane line ending at the centre
    hole_making = [[1, 1, 1], [1, 1, 1], [1, 1, 1]]   # membrane pixel inside a cell
    deletes_a_cell = [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    diagonal_cells = [[1, 0, 0], [0, 0, 0], [0, 0, 1]]  # corners are not 4-adjacent to the centre
    edge_of_a_cell = [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    assert not is_simple_point(np.array(merges_two_cells))
    assert is_simple_point(np.array(end_of_a_line))
    assert not is_simple_point(np.array(hole_making))
    assert not is_simple_point(np.array(deletes_a_cell))
    assert not is_simple_point(np.array(diagonal_cells))
    assert is_simple_point(np.array(edge_of_a_cell))


def _line_image(column: int, shape=(10, 12)) -> np.ndarray:
    ref = np.zeros(shape, bool)
    ref[:, column] = True
    return ref


def test_warping_error_zero_for_a_one_pixel_shift_and_positive_for_a_split():
    ref = _line_image(5)
    shifted = _line_image(6).astype(float)
    assert pixel_error(shifted, ref) == pytest.approx(20 / 120, abs=TOL)
    assert warping_error(shifted, ref) == 0.0
    assert warping_error(ref.astype(float), ref) == 0.0
    split = ref.astype(float)
    split[4, :] = 1.0  # a horizontal membrane cuts both cells in two
    assert warping_error(split, ref) > 0.0
    merged = np.zeros(ref.shape)  # the membrane is missing: two cells become one
    assert warping_error(merged, ref) > 0.0


def test_warping_keeps_the_reference_topology(isbi_section):
    ref, _ = isbi_section
    rng = np.random.default_rng(1)
    p = np.clip(ndimage.gaussian_filter(ref.astype(float), 1.5) + rng.normal(0, 0.2, ref.shape), 0, 1)
    warped = warp_reference(~ref, p < 0.5, np.abs(0.5 - p))
    cross, square = ndimage.generate_binary_structure(2, 1), ndimage.generate_binary_structure(2, 2)
    # cells 4-connected, membrane 8-connected (with the outside as membrane: pad it)
    count = lambda cells: (ndimage.label(cells, cross)[1],  # noqa: E731
                           ndimage.label(np.pad(~cells, 1, constant_values=True), square)[1])
    assert count(warped) == count(~ref)
    assert (warped != (p < 0.5)).mean() == warping_error(p, ref) < pixel_error(p, ref)


def _warp_literal(ref_cells: np.ndarray, prop_cells: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Fiji's ``simplePointWarp2d`` loop as written: full passes, every mismatch re-tested."""
    src = np.pad(ref_cells, 1).astype(bool)
    tgt = np.pad(prop_cells, 1).astype(bool)
    key = np.pad(priority.astype(np.float32), 1)
    diff_before = -1
    while True:
        diff = int((src != tgt).sum())
        if diff in (0, diff_before):
            return src[1:-1, 1:-1]
        diff_before = diff
        xs, ys = np.nonzero((src != tgt).T)
        for k in np.argsort(-key[ys, xs], kind="stable"):
            y, x = ys[k], xs[k]
            if is_simple_point(src[y - 1:y + 2, x - 1:x + 2]):
                src[y, x] = not src[y, x]


def test_warping_equals_fijis_full_passes(isbi_section):
    ref, _ = isbi_section
    ref = ref[100:164, 200:264]
    rng = np.random.default_rng(4)
    p = np.clip(ndimage.gaussian_filter(ref.astype(float), 1.0) + rng.normal(0, 0.25, ref.shape), 0, 1)
    priority = np.abs(0.5 - p)
    assert (warp_reference(~ref, p < 0.5, priority) == _warp_literal(~ref, p < 0.5, priority)).all()


# ---------------------------------------------------------------------------------------------
# Streaming and the real ISBI 2012 sample

@pytest.fixture(scope="module")
def isbi_labels(samples):
    from PIL import Image

    paths = sorted((samples / "em" / "isbi2012_train" / "label").glob("*.png"), key=lambda q: int(q.stem))
    assert len(paths) == 8
    return [np.asarray(Image.open(q)) == 0 for q in paths]  # 0 = membrane in the ISBI PNGs


@pytest.fixture(scope="module")
def isbi_section(isbi_labels):
    return isbi_labels[0], None


def test_streaming_equals_the_mean_of_sections():
    rng = np.random.default_rng(0)
    refs = [_line_image(c, (12, 14)) for c in (3, 6, 9)]
    refs[1][5, :] = True
    probs = [np.clip(r * 0.8 + rng.uniform(0, 0.45, r.shape), 0, 1) for r in refs]
    thresholds = (0.3, 0.5, 0.7)
    stack = IsbiStackScores(thresholds=thresholds)
    for p, r in zip(probs, refs):
        stack.update(p, r)
    out = stack.result()
    singles = [isbi_slice_scores(p, r, thresholds) for p, r in zip(probs, refs)]
    for t in thresholds:
        for key in singles[0][t]:
            assert out["per_threshold"][t][key] == pytest.approx(np.mean([s[t][key] for s in singles]), abs=TOL)
    best = max(thresholds, key=lambda t: out["per_threshold"][t]["v_rand"])
    assert out["v_rand"] == out["per_threshold"][best]["v_rand"] and out["v_rand_threshold"] == best
    assert out["pixel_error"] == pytest.approx(np.mean([pixel_error(p, r) for p, r in zip(probs, refs)]), abs=TOL)
    assert out["warping_error"] == pytest.approx(np.mean([warping_error(p, r) for p, r in zip(probs, refs)]), abs=TOL)
    assert out["sections"] == out["sections_scored"] == 3


def test_isbi_sample_against_itself_scores_one(isbi_labels):
    stack = IsbiStackScores()
    for ref in isbi_labels:
        stack.update(ref.astype(np.float32), ref)
    out = stack.result()
    assert out["sections"] == 8
    assert out["v_rand"] == pytest.approx(1.0, abs=TOL) and out["v_info"] == pytest.approx(1.0, abs=TOL)
    assert out["pixel_error"] == 0.0 and out["warping_error"] == 0.0
    assert out["adapted_rand_error"] == pytest.approx(0.0, abs=TOL)
    assert out["variation_of_information"] == pytest.approx(0.0, abs=1e-9)
    assert set(out["per_threshold"]) == set(DEFAULT_THRESHOLDS)


def test_isbi_sample_with_an_erased_membrane_is_a_pure_merge(isbi_labels):
    ref = isbi_labels[1]
    cells = reference_cells(ref)
    sizes = np.bincount(cells.ravel())
    sizes[0] = 0
    a = int(np.argmax(sizes))
    near_a = ndimage.binary_dilation(cells == a, iterations=8)
    b = int(np.bincount(cells[near_a & (cells > 0) & (cells != a)]).argmax())
    gap = ref & near_a & ndimage.binary_dilation(cells == b, iterations=8)
    p = ref.astype(np.float32)
    p[gap] = 0.0  # the membrane between cells a and b is gone
    s = isbi_slice_scores(p, ref, thresholds=(0.5,))[0.5]
    assert s["v_rand_split"] == pytest.approx(1.0, abs=TOL)  # no reference cell is divided
    assert s["v_rand_merge"] < 1.0 and s["v_rand"] < 1.0 and s["v_info_merge"] < 1.0
    assert warping_error(p, ref) > 0.0  # a merge is a topological error


def test_isbi_sample_against_a_noisy_proposal(isbi_labels):
    rng = np.random.default_rng(2)
    stack = IsbiStackScores()
    for ref in isbi_labels[:2]:
        p = np.clip(ndimage.gaussian_filter(ref.astype(float), 1.5) + rng.normal(0, 0.15, ref.shape), 0, 1)
        stack.update(p, ref)
    out = stack.result()
    assert 0.5 < out["v_rand"] < 1.0 and 0.5 < out["v_info"] < 1.0
    assert 0.0 < out["v_rand_threshold"] < 1.0
    assert 0.0 < out["warping_error"] < out["pixel_error"]
    assert 0.0 < out["adapted_rand_error"] < 0.5
