"""plan_pyramid and downsample_mean against values worked out by hand.

Every expected array below was computed on paper from the definition (mean of each block of
``factors`` over the trailing axes; a short trailing block is the mean of the pixels it has;
integers rounded half up; NaN propagates; bool is the majority with ties going to True), not by
running the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from tasks.ingest.pyramid import PyramidPlan, downsample_mean, plan_pyramid

NAN = np.nan
INF = np.inf


# --------------------------------------------------------------------------------------------
# plan_pyramid
# --------------------------------------------------------------------------------------------


def test_plan_isotropic_mri_sample_grid():
    # BraTS pat0003 as stored: (Z, Y, X) = (32, 161, 146), 1 mm isotropic, catalog chunks 32x64x64.
    # 161 -> 81 -> 41 and 146 -> 73 -> 37 (ceil halving); 16 > 32? no, but 81 > 64, so level 2 is
    # made; at level 2 every halved axis (8, 41, 37) fits its chunk: stop.
    plan = plan_pyramid((32, 161, 146), (1.0, 1.0, 1.0), (32, 64, 64))
    assert isinstance(plan, PyramidPlan)
    assert plan.shapes == [(32, 161, 146), (16, 81, 73), (8, 41, 37)]
    assert plan.factors == [(2, 2, 2), (2, 2, 2)]
    assert plan.spacings == [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (4.0, 4.0, 4.0)]
    assert plan.levels == 3
    assert plan.slab_multiple() == 4  # 2 * 2 along Z


def test_plan_without_spacing_treats_axes_as_isotropic():
    assert plan_pyramid((32, 161, 146), None, (32, 64, 64)).shapes == [(32, 161, 146), (16, 81, 73), (8, 41, 37)]


def test_plan_anisotropic_em_keeps_every_section():
    # ISBI: 50 nm sections, 4 nm pixels. Z is 12.5x coarser than Y/X, so it is never halved until
    # Y/X reach 32 nm (50 <= 2 * 32) -- and by then every halved axis fits in its chunk.
    plan = plan_pyramid((8, 512, 512), (50.0, 4.0, 4.0), (8, 64, 64))
    assert plan.shapes == [(8, 512, 512), (8, 256, 256), (8, 128, 128), (8, 64, 64)]
    assert plan.factors == [(1, 2, 2)] * 3
    assert plan.spacings == [(50.0, 4.0, 4.0), (50.0, 8.0, 8.0), (50.0, 16.0, 16.0), (50.0, 32.0, 32.0)]
    assert plan.slab_multiple() == 1


def test_plan_anisotropic_axis_joins_once_within_factor_two():
    # Z 40, Y/X 10: level 1 halves Y/X only (40 > 2*10); at 20 nm, 40 <= 2*20 so Z joins in.
    plan = plan_pyramid((64, 512, 512), (40.0, 10.0, 10.0), (16, 32, 32))
    assert plan.shapes == [(64, 512, 512), (64, 256, 256), (32, 128, 128), (16, 64, 64), (8, 32, 32)]
    assert plan.factors == [(1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert plan.spacings[-1] == (320.0, 160.0, 160.0)
    assert plan.slab_multiple() == 8  # 1 * 2 * 2 * 2


def test_plan_2d_odd_sizes_ceil_halving():
    # SpaceNet chip 406 x 438 with 128 x 128 chunks: 203 x 219, then 102 x 110 (fits) -> stop.
    plan = plan_pyramid((406, 438), (0.5, 0.5), (128, 128))
    assert plan.shapes == [(406, 438), (203, 219), (102, 110)]
    assert plan.factors == [(2, 2), (2, 2)]
    assert plan.spacings == [(0.5, 0.5), (1.0, 1.0), (2.0, 2.0)]
    assert plan.slab_multiple() == 4


def test_plan_single_section_never_halves_that_axis():
    plan = plan_pyramid((1, 20, 20), (1.0, 1.0, 1.0), (1, 8, 8))
    assert plan.shapes == [(1, 20, 20), (1, 10, 10), (1, 5, 5)]
    assert plan.factors == [(1, 2, 2), (1, 2, 2)]
    assert plan.slab_multiple() == 1


def test_plan_axis_reaching_one_stops_being_halved():
    # (3, 100), chunks (1, 10): 3 -> 2 -> 1, then only X is halved: 100 -> 50 -> 25 -> 13 -> 7 (fits).
    plan = plan_pyramid((3, 100), None, (1, 10))
    assert plan.shapes == [(3, 100), (2, 50), (1, 25), (1, 13), (1, 7)]
    assert plan.factors == [(2, 2), (2, 2), (1, 2), (1, 2)]
    assert plan.slab_multiple() == 4


def test_plan_scan_that_fits_one_chunk_has_one_level():
    plan = plan_pyramid((10, 12), None, (16, 16))
    assert plan.shapes == [(10, 12)]
    assert plan.factors == []
    assert plan.spacings == [(1.0, 1.0)]
    assert plan.levels == 1
    assert plan.slab_multiple() == 1


def test_plan_all_axes_one_pixel():
    assert plan_pyramid((1, 1, 1), None, (1, 1, 1)).shapes == [(1, 1, 1)]


@pytest.mark.parametrize(
    "max_levels, expected",
    [
        (6, [(1024, 1024), (512, 512), (256, 256), (128, 128), (64, 64), (32, 32)]),
        (2, [(1024, 1024), (512, 512)]),
        (1, [(1024, 1024)]),
    ],
)
def test_plan_max_levels(max_levels, expected):
    plan = plan_pyramid((1024, 1024), None, (1, 1), max_levels=max_levels)
    assert plan.shapes == expected
    assert len(plan.factors) == len(expected) - 1
    assert plan.slab_multiple() == 2 ** (len(expected) - 1)


def test_nested_order_hand_worked():
    """(8, 16) in chunks of 2: levels (4, 8), (2, 4), (1, 2). A level-2 chunk covers 8 x 8 pixels
    of level 0, a level-1 chunk 4 x 4; windows of 4 rows x 2 columns go through the left level-2
    chunk (its four level-1 chunks in row order) before the right one."""
    plan = plan_pyramid((8, 16), None, (2, 2))
    assert plan.shapes == [(8, 16), (4, 8), (2, 4), (1, 2)]
    windows = sorted(((r, c) for r in (0, 4) for c in range(0, 16, 2)), key=lambda w: plan.nested_order((2, 2))(*w))
    assert windows == [(0, 0), (0, 2), (0, 4), (0, 6), (4, 0), (4, 2), (4, 4), (4, 6),
                       (0, 8), (0, 10), (0, 12), (0, 14), (4, 8), (4, 10), (4, 12), (4, 14)]


def _most_unfinished(plan: PyramidPlan, chunks: tuple[int, int], windows: list[tuple[int, int, int, int]]) -> list[int]:
    """Per level 1.., the most chunks begun and not yet whole while ``windows`` (row start, stop,
    column start, stop of level 0) are taken in the given order: pixels counted per chunk."""
    most = []
    for level in range(1, plan.levels):
        scale = [int(np.prod([f[a] for f in plan.factors[:level]])) for a in (0, 1)]
        shape = plan.shapes[level]
        size = [min(c, n) for c, n in zip(chunks, shape)]
        filled: dict[tuple[int, int], int] = {}
        worst = 0
        for r0, r1, c0, c1 in windows:
            rows = (r0 // scale[0], -(-r1 // scale[0]))
            cols = (c0 // scale[1], -(-c1 // scale[1]))
            for i in range(rows[0] // size[0], -(-rows[1] // size[0])):
                for j in range(cols[0] // size[1], -(-cols[1] // size[1])):
                    a = min(rows[1], (i + 1) * size[0], shape[0]) - max(rows[0], i * size[0])
                    b = min(cols[1], (j + 1) * size[1], shape[1]) - max(cols[0], j * size[1])
                    filled[(i, j)] = filled.get((i, j), 0) + a * b
                    whole = ((min((i + 1) * size[0], shape[0]) - i * size[0])
                             * (min((j + 1) * size[1], shape[1]) - j * size[1]))
                    assert filled[(i, j)] <= whole
                    if filled[(i, j)] == whole:
                        del filled[(i, j)]
                        filled[(i, j, "done")] = 0
            worst = max(worst, sum(1 for k in filled if len(k) == 2))
        most.append(worst)
    return most


@pytest.mark.parametrize("shape, chunks, width", [((11776, 11776), (512, 512), 512), ((3000, 7000), (256, 256), 1024),
                                                   ((1500, 40000), (512, 512), 1024)])
def test_nested_order_leaves_one_unfinished_chunk_per_level(shape, chunks, width):
    """Windows two chunk rows high and 2**j chunks wide, as ingest takes a raster: in row order
    levels 2.. hold a row of unfinished chunks; in ``nested_order`` every level holds at most one,
    whatever the scene's width."""
    plan = plan_pyramid(shape, None, chunks)
    step = 2 * chunks[0]
    windows = [(r, min(r + step, shape[0]), c, min(c + width, shape[1]))
               for r in range(0, shape[0], step) for c in range(0, shape[1], width)]
    by_rows = _most_unfinished(plan, chunks, windows)
    key = plan.nested_order(chunks)
    nested = _most_unfinished(plan, chunks, sorted(windows, key=lambda w: key(w[0], w[2])))
    assert max(by_rows[1:]) > 1  # the row order held more: the check can fail
    assert max(nested) <= 1, (nested, by_rows)


# --------------------------------------------------------------------------------------------
# downsample_mean
# --------------------------------------------------------------------------------------------


def _same(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same dtype, shape and values (NaN equal to NaN, exact otherwise)."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_array_equal(actual, expected)


def test_float_1d_odd_length():
    out = downsample_mean(np.array([1, 2, 3, 4, 5], dtype=np.float32), (2,))
    _same(out, np.array([1.5, 3.5, 5.0], dtype=np.float32))


def test_float64_stays_float64():
    out = downsample_mean(np.array([0.25, 0.5, 1.0, 3.0], dtype=np.float64), (2,))
    _same(out, np.array([0.375, 2.0], dtype=np.float64))


def test_uint8_2d_odd_both_axes_with_channel_axis_left_alone():
    block = np.array(
        [
            [[1, 2, 3], [4, 5, 6], [7, 8, 9]],
            [[10, 20, 30], [40, 50, 60], [70, 80, 90]],
        ],
        dtype=np.uint8,
    )  # (C=2, Y=3, X=3)
    out = downsample_mean(block, (2, 2))
    # channel 0: (1+2+4+5)/4 = 3; (3+6)/2 = 4.5 -> 5; (7+8)/2 = 7.5 -> 8; 9
    # channel 1: (10+20+40+50)/4 = 30; (30+60)/2 = 45; (70+80)/2 = 75; 90
    _same(out, np.array([[[3, 5], [8, 9]], [[30, 45], [75, 90]]], dtype=np.uint8))


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0, 0, 0, 1], 0),  # 0.25 -> 0
        ([0, 0, 1, 1], 1),  # 0.5 -> 1 (half up)
        ([0, 1, 1, 1], 1),  # 0.75 -> 1
        ([1, 1, 1, 2], 1),  # 1.25 -> 1
        ([1, 2, 2, 2], 2),  # 1.75 -> 2
        ([1, 1, 2, 2], 2),  # 1.5 -> 2
        ([255, 255, 255, 254], 255),  # 254.75 -> 255, no uint8 overflow on the way
        ([255, 255, 255, 255], 255),
    ],
)
def test_uint8_2x2_rounding_half_up(values, expected):
    out = downsample_mean(np.array(values, dtype=np.uint8).reshape(2, 2), (2, 2))
    _same(out, np.array([[expected]], dtype=np.uint8))


def test_signed_integers_round_half_up_towards_plus_infinity():
    # means: -2.5 -> -2, -1.5 -> -1, -0.5 -> 0, 0.5 -> 1, -3.25 -> -3 (nearest), -3.75 -> -4
    out = downsample_mean(np.array([-3, -2, -1, -2, -1, 0, 0, 1], dtype=np.int16), (2,))
    _same(out, np.array([-2, -1, 0, 1], dtype=np.int16))
    out = downsample_mean(np.array([-3, -3, -3, -4, -4, -4, -4, -3], dtype=np.int16), (4,))
    _same(out, np.array([-3, -4], dtype=np.int16))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32])
@pytest.mark.parametrize("shape, factors", [
    ((1, 7, 33, 65), (1, 2, 2)),  # an EM stack: sections halved, odd edges
    ((2, 5, 9, 4), (2, 2, 2)),  # a volume, two channels
    ((3, 11), (2,)),
    ((1, 6, 8), (1, 1)),  # nothing halved
])
def test_integer_means_equal_each_block_worked_out_in_python_ints(dtype, shape, factors):
    """Every block's mean, rounded half up, from Python integers block by block (a short trailing
    block averages the pixels it has)."""
    info = np.iinfo(dtype)
    x = np.random.default_rng(7).integers(info.min, info.max, shape, endpoint=True).astype(dtype)
    out = downsample_mean(x, factors)
    lead = x.ndim - len(factors)
    want = np.empty(out.shape, dtype=dtype)
    for index in np.ndindex(*out.shape):
        box = index[:lead] + tuple(slice(i * f, (i + 1) * f) for i, f in zip(index[lead:], factors))
        values = [int(v) for v in x[box].ravel()]
        total, count = sum(values), len(values)
        want[index] = (2 * total + count) // (2 * count)  # floor(mean + 1/2)
    _same(out, want)


@pytest.mark.parametrize("block_bytes", [1, 700, 1 << 20])  # one output row at a time, a few, all
@pytest.mark.parametrize("shape, factors", [
    ((1, 9, 33, 65), (2, 2, 2)),  # a volume, odd edges: short trailing blocks on every axis
    ((2, 7, 33, 65), (1, 2, 2)),  # an EM-like stack, two channels
    ((1, 31, 45), (2, 2)),
])
def test_float_means_sum_each_block_in_offset_order_in_float64(monkeypatch, shape, factors, block_bytes):
    """Each float32 block summed in float64 one pixel after another in offset order (first axis's
    offset slowest), from 0.0, divided by its count and rounded once: the bytes written before the
    sums were taken a few rows at a time. Values over 60 orders of magnitude, so the float64 sums
    themselves differ with the order of the additions (halving one axis at a time changes 149 of
    2805 in the first case, though none survives the rounding to float32): they are compared too."""
    from tasks.ingest import pyramid

    monkeypatch.setattr(pyramid, "HALVING_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-30, 30, shape)).astype(np.float32)
    out = downsample_mean(x, factors)
    lead = x.ndim - len(factors)
    want = np.empty(out.shape, dtype=np.float32)
    sums = np.empty(out.shape, dtype=np.float64)
    for index in np.ndindex(*out.shape):
        total, count = np.float64(0.0), 0
        for offsets in np.ndindex(*factors):
            pixel = index[:lead] + tuple(i * f + o for i, f, o in zip(index[lead:], factors, offsets))
            if all(p < n for p, n in zip(pixel[lead:], x.shape[lead:])):
                total = total + np.float64(x[pixel])
                count += 1
        sums[index], want[index] = total, np.float32(total / count)
    _same(pyramid._halving_sum(x, factors, np.float64), sums)
    _same(out, want)


def test_int32_extremes_do_not_overflow():
    big = np.iinfo(np.int32).max
    small = np.iinfo(np.int32).min
    out = downsample_mean(np.array([big, big, small, small, big, small], dtype=np.int32), (2,))
    # (min + max) / 2 = -0.5 -> 0 (half up)
    _same(out, np.array([big, small, 0], dtype=np.int32))


@pytest.mark.parametrize(
    "dtype, values, expected",
    [
        # uint64 pixels above 2**63 (legal in GDAL UInt64 rasters): mean of 2**63 and 2**63 + 2.
        (np.uint64, [2**63, 2**63 + 2], [2**63 + 1]),
        (np.uint64, [2**64 - 1, 2**64 - 1], [2**64 - 1]),
        # int64 values whose block sum leaves int64: four times 2**62.
        (np.int64, [2**62, 2**62, 2**62, 2**62], [2**62]),
    ],
)
def test_64bit_integers_keep_their_mean(dtype, values, expected):
    out = downsample_mean(np.array(values, dtype=dtype), (len(values) // len(expected),))
    _same(out, np.array(expected, dtype=dtype))


def test_3d_factors_1_2_2_odd_sizes():
    # (C=1, Z=2, Y=3, X=3): Z is kept, Y/X halved with a short trailing edge.
    z0 = [[0, 10, 20], [30, 40, 50], [60, 70, 80]]
    z1 = [[1, 1, 1], [1, 1, 1], [2, 4, 7]]
    block = np.array([[z0, z1]], dtype=np.uint16)
    out = downsample_mean(block, (1, 2, 2))
    # z0: (0+10+30+40)/4=20, (20+50)/2=35, (60+70)/2=65, 80
    # z1: 1, 1, (2+4)/2=3, 7
    _same(out, np.array([[[[20, 35], [65, 80]], [[1, 1], [3, 7]]]], dtype=np.uint16))


def test_3d_factors_2_2_2_with_odd_z():
    # (Z=3, Y=2, X=2) float: the first Z pair is averaged over 8 voxels, the last section over 4.
    block = np.array(
        [[[1, 2], [3, 4]], [[5, 6], [7, 8]], [[100, 200], [300, 400]]], dtype=np.float32
    )
    out = downsample_mean(block, (2, 2, 2))
    _same(out, np.array([[[4.5]], [[250.0]]], dtype=np.float32))


def test_nan_propagates_only_to_its_own_block():
    block = np.array([[NAN, 1, 4, 5], [2, 3, 6, 7]], dtype=np.float32)  # (Y=2, X=4)
    out = downsample_mean(block, (2, 2))
    assert out.dtype == np.float32 and out.shape == (1, 2)
    assert np.isnan(out[0, 0])
    assert out[0, 1] == 5.5


def test_nan_in_short_trailing_block():
    out = downsample_mean(np.array([1, 2, 3, NAN], dtype=np.float64), (3,))
    assert out.shape == (2,)
    assert out[0] == 2.0
    assert np.isnan(out[1])


@pytest.mark.parametrize(
    "values, expected",
    [
        ([INF, 1.0], INF),
        ([-INF, 1.0], -INF),
        ([INF, -INF], NAN),
        ([INF, INF], INF),
    ],
)
def test_infinities(values, expected):
    out = downsample_mean(np.array(values, dtype=np.float32), (2,))
    np.testing.assert_array_equal(out, np.array([expected], dtype=np.float32))


def test_bool_majority_ties_true():
    block = np.array(
        [
            [True, False, False, False, True],
            [False, False, True, True, False],
        ]
    )  # (Y=2, X=5): blocks (2x2), (2x2), (2x1)
    out = downsample_mean(block, (2, 2))
    # 1/4 -> False, 2/4 -> True (tie goes up), 1/2 -> True
    _same(out, np.array([[False, True, True]]))
    _same(downsample_mean(np.array([False, False, True]), (2,)), np.array([False, True]))
    _same(downsample_mean(np.array([True, True, True, False]), (4,)), np.array([True]))
    _same(downsample_mean(np.array([True, False, False, False]), (4,)), np.array([False]))


def test_factors_of_one_are_identity():
    block = np.arange(24, dtype=np.int16).reshape(2, 3, 4) - 7
    _same(downsample_mean(block, (1, 1)), block)


def test_short_trailing_block_wider_than_one_pixel_uses_its_own_pixels():
    # The docstring: "An odd trailing edge is averaged over the pixels it has". With a factor of 3
    # over 5 pixels the trailing block holds pixels 4 and 5: its mean is 4.5 (padding by
    # replicating 5 would give (4 + 5 + 5) / 3 = 4.67 instead).
    _same(downsample_mean(np.array([1, 2, 3, 4, 5], dtype=np.float64), (3,)), np.array([2.0, 4.5]))
    _same(downsample_mean(np.array([1, 2, 3, 4, 8], dtype=np.uint8), (3,)), np.array([2, 6], dtype=np.uint8))


def test_slabwise_equals_whole():
    # Streaming writes a level slab by slab: with slab boundaries on even rows the slabs' means,
    # stacked, are the whole array's means.
    rng = np.random.default_rng(7)
    block = rng.integers(0, 1000, size=(2, 10, 7, 5)).astype(np.uint16)
    whole = downsample_mean(block, (2, 2, 2))
    parts = [downsample_mean(block[:, a:b], (2, 2, 2)) for a, b in ((0, 4), (4, 8), (8, 10))]
    _same(np.concatenate(parts, axis=1), whole)
    # And against an explicit loop over output voxels.
    expected = np.empty((2, 5, 4, 3), dtype=np.uint16)
    for c in range(2):
        for z in range(5):
            for y in range(4):
                for x in range(3):
                    cell = block[c, 2 * z : 2 * z + 2, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2].astype(np.int64)
                    s, n = int(cell.sum()), cell.size
                    expected[c, z, y, x] = (2 * s + n) // (2 * n)  # floor(s / n + 1/2)
    _same(whole, expected)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_a_block_of_the_dtypes_extreme_keeps_its_value(dtype):
    # The GDAL/ESRI nodata of float32 rasters is -3.4028235e38 (the most negative float32): the mean
    # of a block of it is that value (a float32 sum of two of them would overflow to -inf).
    low, high = np.finfo(dtype).min, np.finfo(dtype).max
    block = np.array([[low, low, high, high], [low, low, high, high]], dtype=dtype)  # (Y=2, X=4)
    _same(downsample_mean(block, (2, 2)), np.array([[low, high]], dtype=dtype))
    cube = np.full((1, 2, 2, 2), low, dtype=dtype)
    _same(downsample_mean(cube, (2, 2, 2)), np.full((1, 1, 1, 1), low, dtype=dtype))
    # any factor (the general path): three of them
    _same(downsample_mean(np.full(3, high, dtype=dtype), (3,)), np.array([high], dtype=dtype))


def test_float32_mean_is_rounded_once():
    # (1 + 2**-24 + 2**-24 + 0) / 4 = 0.25 + 2**-25, a float32 (0.25's spacing is 2**-25). Summed in
    # float32 one after the other, each 1 + 2**-24 rounds back to 1 (a tie, to even) and gives 0.25.
    tiny = np.float32(2.0**-24)
    block = np.array([[1.0, tiny], [tiny, 0.0]], dtype=np.float32)
    _same(downsample_mean(block, (2, 2)), np.array([[0.25 + 2.0**-25]], dtype=np.float32))
