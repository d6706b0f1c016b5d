"""A library's prints silenced in one Prefect task thread must not silence anyone else, nor leave
``sys.stdout`` pointing at a dead buffer (seen: a nightly that printed nothing and exited 0)."""

from __future__ import annotations

import contextlib
import io
import sys
import threading
import warnings

import numpy as np
import pytest

from models.quiet import quiet


def _interleave(block) -> list[str]:
    """Thread A enters ``block``, thread B enters, A leaves, B leaves (the order that broke the
    nightly), each printing inside; the main thread prints while both are inside and after."""
    a_in, b_in, a_out, main_done = (threading.Event() for _ in range(4))
    said: list[str] = []

    def a():
        with block() as sink:
            print("A's library")
            a_in.set()
            b_in.wait(5)
            main_done.wait(5)
        said.append(("A", sink.getvalue()))
        a_out.set()

    def b():
        a_in.wait(5)
        with block() as sink:
            print("B's library")
            b_in.set()
            a_out.wait(5)
        said.append(("B", sink.getvalue()))

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    b_in.wait(5)
    print("main, meanwhile")
    main_done.set()
    for t in threads:
        t.join(5)
    print("main, afterwards")
    return dict(said)


def test_a_thread_in_a_quiet_block_silences_only_itself_and_leaves_stdout_working(capsys):
    original = sys.stdout
    sinks = _interleave(quiet)
    out = capsys.readouterr().out
    assert out.splitlines() == ["main, meanwhile", "main, afterwards"]
    assert sinks == {"A": "A's library\n", "B": "B's library\n"}
    print("later")  # still reaches the terminal once both blocks are done
    assert capsys.readouterr().out == "later\n"
    assert getattr(sys.stdout, "_target", sys.stdout) is original


def test_the_same_interleaving_with_redirect_stdout_loses_the_main_threads_lines(capsys):
    """The reference behaviour this module replaces: the test above would fail with it."""
    saved = sys.stdout
    try:
        _interleave(lambda: contextlib.redirect_stdout(io.StringIO()))
        leaked_to = sys.stdout
    finally:
        sys.stdout = saved
    out = capsys.readouterr().out
    assert "main, afterwards" not in out
    assert "main, meanwhile" not in out
    assert leaked_to is not saved


def test_stderr_goes_into_the_given_sink_and_nested_blocks_unwind():
    outer, inner = io.StringIO(), io.StringIO()
    with quiet("stderr", into=outer):
        print("one", file=sys.stderr)
        with quiet("stderr", into=inner):
            print("two", file=sys.stderr)
        print("three", file=sys.stderr)
    assert outer.getvalue() == "one\nthree\n"
    assert inner.getvalue() == "two\n"
    with pytest.raises(ValueError, match="stdout' or 'stderr"):
        with quiet("stdin"):
            pass


def test_coco_ap_in_task_threads_prints_nothing_and_the_caller_still_prints(capsys):
    """pycocotools' progress lines, evaluated on two threads at once, stay out of the output."""
    from tasks.metrics.instances import coco_ap

    square = np.zeros((16, 16), bool)
    square[4:10, 4:10] = True
    shifted = np.roll(square, 1, axis=1)
    results: list[dict] = []

    def evaluate():
        for _ in range(3):
            results.append(coco_ap([[square]], [[shifted]]))

    threads = [threading.Thread(target=evaluate) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    print("summary")
    out = capsys.readouterr().out
    assert out == "summary\n"
    # IoU of a 6x6 square and the same square one pixel over: 30 / 42 = 0.714: a hit at 0.5, a miss at 0.75
    assert len(results) == 6 and all(r["ap50"] == pytest.approx(1.0) and r["ap75"] == 0.0 for r in results)


def _non_georeferenced_geotiff(path):
    import tifffile

    tifffile.imwrite(path, np.full((8, 8), 7, np.uint8))  # a TIFF without geotags
    return path


def test_library_warnings_ignored_by_two_threads_in_turn_leave_other_warnings_shown(tmp_path, monkeypatch):
    """Surface metrics (MONAI warns on an empty mask) on one thread and a GeoTIFF without
    georeferencing (rasterio warns) on another, in the order A in, B in, A out, B out: neither
    library warning is shown, the reader's own warning is, and so is any later warning (under
    ``catch_warnings`` this order left a blanket "ignore" in place for the rest of the run)."""
    import monai.metrics
    import rasterio

    from tasks.ingest.readers import GeoTiffReader
    from tasks.metrics.surface import surface_scores

    path = _non_georeferenced_geotiff(tmp_path / "plain.tif")
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    real_hd, real_open = monai.metrics.compute_hausdorff_distance, rasterio.open

    def hd(*args, **kwargs):
        a_in.set()
        b_in.wait(10)
        return real_hd(*args, **kwargs)

    def open_(*args, **kwargs):
        b_in.set()
        a_done.wait(10)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(monai.metrics, "compute_hausdorff_distance", hd)
    monkeypatch.setattr(rasterio, "open", open_)
    reference = np.zeros((8, 8, 8), np.uint8)
    reference[2:5, 2:5, 2:5] = 1
    prediction = np.zeros_like(reference)  # class 1 missing: MONAI warns
    scores, readers = [], []

    def a():
        scores.append(surface_scores(reference, prediction, [1]))
        a_done.set()

    def b():
        a_in.wait(10)
        with GeoTiffReader(path) as r:
            readers.append(r.shape)

    with warnings.catch_warnings(record=True) as shown:
        threads = [threading.Thread(target=a), threading.Thread(target=b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        warnings.warn("a later warning of the run", UserWarning)
    texts = [str(w.message) for w in shown]
    assert scores and readers == [(1, 8, 8)]
    assert not any("is all 0" in t or "always_return_as_numpy" in t for t in texts), texts
    assert not any(issubclass(w.category, rasterio.errors.NotGeoreferencedWarning) for w in shown), texts
    assert any(t.endswith("GeoTIFF has no CRS; stored with crs: null") for t in texts), texts
    assert "a later warning of the run" in texts


def test_ignore_warnings_adds_one_filter_once():
    from models.quiet import ignore_warnings

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        before = len(warnings.filters)
        for _ in range(3):
            ignore_warnings(RuntimeWarning, r"tilewise test: ignored")
        assert len(warnings.filters) == before + 1
        warnings.warn("tilewise test: ignored here", RuntimeWarning)
        warnings.warn("tilewise test: not this one", RuntimeWarning)
        warnings.warn("tilewise test: ignored, but another category", UserWarning)
    assert [str(w.message) for w in shown] == ["tilewise test: not this one",
                                               "tilewise test: ignored, but another category"]
