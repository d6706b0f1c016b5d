"""Streaming readers for the three source formats.

Each reader opens its own files (use it as a context manager) and exposes one scan as a
channel-first array in OME-NGFF axis order: (C, Z, Y, X) for volumes, (C, Y, X) for rasters.
``read_slab(start, stop)`` returns the half-open range [start, stop) of the first spatial axis
(Z, or Y for rasters) with every channel, so a caller can stream a scan of any length through a
bounded buffer. Nothing here knows about Zarr.

NIfTI voxel order is (i, j, k) with i fastest; we store it as (Z, Y, X) = (k, j, i), and keep the
affine in the attributes so export can undo the transposition exactly.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.quiet import ignore_warnings
from tasks.errors import ScanError

if TYPE_CHECKING:
    from tasks.ingest.remote import RemoteScan

SLICE_SUFFIXES = (".png", ".tif", ".tiff")
GDAL_CACHE_MB = 64  # rasterio.Env passes an int GDAL_CACHEMAX to GDALSetCacheMax: bytes, not MB
NIFTI_UNITS = {"mm": "millimeter", "micron": "micrometer", "meter": "meter"}


def natural_key(name: str) -> list:
    """Sort key that orders '2.png' before '10.png' (slice index order, not lexical)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def json_number(value: float | None) -> float | str | None:
    """A float for JSON attributes: NaN and infinities as the strings Zarr uses for fill values."""
    if value is None:
        return None
    value = float(value)
    if np.isnan(value):
        return "NaN"
    if np.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


class ScanReader(ABC):
    """One scan, channel-first, streamed slab by slab along the first spatial axis."""

    axes: str  # "czyx" or "cyx"
    shape: tuple[int, ...]
    dtype: np.dtype
    spacing: tuple[float, ...] | None = None  # physical size of a pixel, spatial axes in array order
    unit: str | None = None  # OME-NGFF unit name of spacing, e.g. "millimeter"
    path: str  # what error messages name

    def __init__(self) -> None:
        self.warnings: list[str] = []

    #: True where ``read_window`` reads only its window from the source; False where it reads the
    #: slab and cuts the window out (ingest then reads each slab once and cuts its windows itself).
    windowed: bool = False

    @abstractmethod
    def read_slab(self, start: int, stop: int) -> np.ndarray:
        """Array of shape (C, stop - start, *rest) for [start, stop) of the first spatial axis."""

    def read_window(self, start: int, stop: int, lo: int, hi: int) -> np.ndarray:
        """(C, stop - start, hi - lo, *rest): [start, stop) of the first spatial axis and [lo, hi)
        of the second (Y of a volume, X of a raster), every channel."""
        return self.read_slab(start, stop)[:, :, lo:hi]

    @abstractmethod
    def attributes(self) -> dict[str, Any]:
        """JSON-able spatial metadata of the source (affine, CRS, units, ...)."""

    def close(self) -> None:  # pragma: no cover - overridden where something is open
        pass

    def __enter__(self) -> "ScanReader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        warnings.warn(f"{self.path}: {message}", stacklevel=3)

    def _check_shape(self) -> None:
        if any(n == 0 for n in self.shape):
            raise ScanError(self.path, f"has a zero-length axis (shape {self.shape}, axes {self.axes.upper()})")


class NiftiReader(ScanReader):
    """NIfTI-1/2 (.nii, .nii.gz), 3D or 4D; several files of one grid become channels.

    Data are read through ``img.dataobj`` slab by slab along k with plain file reads (no memory
    map), and a .nii.gz is decompressed once, front to back (the file handle is kept open so
    successive slabs continue where the last one stopped). NIfTI's Fortran order makes a k-slab
    one contiguous run of the file, and its (i, j, k) array is already C-ordered as (k, j, i).

    A plain (uncompressed) .nii is also read in bands (``read_window``: a range of j for a range
    of k, one contiguous run of ``ni * (hi - lo)`` voxels per k), so ingest never holds a slab; a
    compressed file is only read front to back, a slab at a time.
    """

    def __init__(self, paths: list[Path]):
        super().__init__()
        import nibabel as nib

        self.paths = [Path(p) for p in paths]
        self.path = str(self.paths[0]) if len(self.paths) == 1 else str(self.paths[0].parent)
        self._images = []
        for p in self.paths:
            try:
                # mmap=False: a memory map would count every page read so far in our RSS
                img = nib.load(str(p), keep_file_open=True, mmap=False)
            except Exception as exc:  # nibabel raises many types for bad files
                raise ScanError(p, f"not a readable NIfTI file ({_describe(exc)})") from None
            if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
                raise ScanError(p, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
            if any(n == 0 for n in img.shape):
                raise ScanError(p, f"has a zero-length axis (shape {img.shape})")
            if len(img.shape) == 5 and img.shape[3] == 1:  # (i, j, k, 1, c) vector images are rare
                raise ScanError(p, f"5D NIfTI (shape {img.shape}) is not supported")
            if len(img.shape) not in (3, 4):
                raise ScanError(p, f"expected a 3D or 4D volume, got shape {img.shape}")
            self._images.append(img)
        first = self._images[0]
        for p, img in zip(self.paths[1:], self._images[1:]):
            if img.shape[:3] != first.shape[:3]:
                raise ScanError(p, f"grid {img.shape[:3]} differs from {self.paths[0].name} {first.shape[:3]}")
            if not np.allclose(img.affine, first.affine, atol=1e-4):
                raise ScanError(p, f"affine differs from {self.paths[0].name}; channels must share one grid")
        self._channels_per_file = [img.shape[3] if len(img.shape) == 4 else 1 for img in self._images]
        # only where a band is cheap to seek to (a gzip stream would be decompressed again per band)
        self.windowed = all(p.suffix.lower() == ".nii" for p in self.paths)
        i, j, k = first.shape[:3]
        self.axes = "czyx"
        self.shape = (sum(self._channels_per_file), k, j, i)
        # The scaled dtype (scl_slope/inter applied) is only known by reading: one voxel is enough.
        self._direct: list[tuple[Any, int, np.dtype] | None] = [None] * len(self._images)
        dtypes = [self._read_file(n, 0, 1)[:, :1, :1, :1].dtype for n in range(len(self._images))]
        self.dtype = np.result_type(*dtypes)
        if self.windowed:
            self._direct = [self._direct_layout(p, img, dt) for p, img, dt in zip(self.paths, self._images, dtypes)]
        zooms = first.header.get_zooms()[:3]
        self.spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
        self.unit = NIFTI_UNITS.get(first.header.get_xyzt_units()[0])

    def _direct_layout(self, path: Path, img, dtype: np.dtype) -> tuple[Any, int, np.dtype] | None:
        """(open file, byte offset of the voxels, dtype) of a plain .nii whose voxels are
        stored as read: native byte order and no scaling. Its bands are then read straight into
        the window with ``os.preadv``, one run of the file per slice: nibabel's slicing costs ~13x
        the CPU (a fresh buffer per read, 262k page faults per GiB)."""
        raw = np.dtype(img.header.get_data_dtype())
        slope, inter = img.header.get_slope_inter()
        if (raw != dtype or not raw.isnative or raw.kind not in "biuf" or slope not in (None, 1.0)
                or inter not in (None, 0.0)):
            return None
        if getattr(img.dataobj, "order", "F") != "F":
            return None
        try:
            f = open(path, "rb")  # kept open, as nibabel keeps its own
        except OSError:
            return None
        return f, int(img.dataobj.offset), raw

    def _read_direct(self, index: int, start: int, stop: int, lo: int, hi: int | None) -> np.ndarray:
        """Slices [start, stop) x rows [lo, hi) of file ``index`` as (C, Z, Y, X), read in place."""
        f, offset, dtype = self._direct[index]
        shape = self._images[index].shape
        ni, nj, nk = shape[:3]
        nt = shape[3] if len(shape) == 4 else 1
        hi = nj if hi is None else hi
        out = np.empty((nt, stop - start, hi - lo, ni), dtype)
        run = (hi - lo) * ni * dtype.itemsize
        for t in range(nt):
            for kk, k in enumerate(range(start, stop)):
                at = offset + ((t * nk + k) * nj + lo) * ni * dtype.itemsize
                if os.preadv(f.fileno(), [memoryview(out[t, kk]).cast("B")], at) != run:
                    raise ScanError(self.paths[index], f"cannot read slices {start}-{stop - 1} (the file ends "
                                                       f"before byte {at + run}: truncated?)")
        return out

    def close(self) -> None:
        for direct in self._direct:
            if direct is not None:
                direct[0].close()
        self._direct = [None] * len(self._images)

    def _read_file(self, index: int, start: int, stop: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        if self._direct[index] is not None:
            return self._read_direct(index, start, stop, lo, hi)
        img = self._images[index]
        j = slice(None) if (lo, hi) == (0, None) else slice(lo, hi)
        try:
            if len(img.shape) == 3:
                block = np.asarray(img.dataobj[:, j, start:stop])[np.newaxis]  # (1, i, j, k)
            else:
                block = np.moveaxis(np.asarray(img.dataobj[:, j, start:stop, :]), 3, 0)  # (t, i, j, k)
        except Exception as exc:  # EOFError / zlib.error / OSError for truncated files
            raise ScanError(self.paths[index], f"cannot read slices {start}-{stop - 1} ({_describe(exc)})") from None
        return block.transpose(0, 3, 2, 1)  # (c, k, j, i) = (C, Z, Y, X)

    def read_slab(self, start: int, stop: int) -> np.ndarray:
        return self._read(start, stop, 0, None)

    def read_window(self, start: int, stop: int, lo: int, hi: int) -> np.ndarray:
        if lo == 0 and hi >= self.shape[2]:
            return self._read(start, stop, 0, None)
        return self._read(start, stop, lo, hi)

    def _read(self, start: int, stop: int, lo: int, hi: int | None) -> np.ndarray:
        parts = [self._read_file(n, start, stop, lo, hi) for n in range(len(self._images))]
        if len(parts) == 1:
            return np.ascontiguousarray(parts[0], dtype=self.dtype)
        out = np.empty((self.shape[0], *parts[0].shape[1:]), dtype=self.dtype)
        c = 0
        for part in parts:
            out[c : c + part.shape[0]] = part
            c += part.shape[0]
        return out

    def attributes(self) -> dict[str, Any]:
        import nibabel as nib

        first = self._images[0]
        header = first.header
        sform, sform_code = header.get_sform(coded=True)
        qform, qform_code = header.get_qform(coded=True)
        space, time = header.get_xyzt_units()
        return {
            "format": "nifti",
            "array_axes_from_nifti": "array[c, z, y, x] = nifti[i=x, j=y, k=z, t=c]",
            "affine": first.affine.tolist(),
            "sform": None if sform is None else sform.tolist(),
            "sform_code": int(sform_code),
            "qform": None if qform is None else qform.tolist(),
            "qform_code": int(qform_code),
            "zooms": [float(z) for z in header.get_zooms()],
            "xyzt_units": [space, time],
            "axcodes": list(nib.aff2axcodes(first.affine)),
            "nifti_shape": [int(n) for n in first.shape],
            "channels_per_file": self._channels_per_file,
            "descrip": header["descrip"].item().decode("latin-1", "replace").strip("\x00 "),
        }

    def close(self) -> None:
        for img in self._images:
            img.uncache()
            opener = getattr(img.dataobj, "_opener", None)
            if opener is not None:
                opener.close_if_mine()
        self._images = []


class TiffStackReader(ScanReader):
    """A TIFF file: a multi-page stack (Z, Y, X[, S]) or one 2D page (Y, X[, S]).

    Read through tifffile's Zarr view of the file, so a slab touches only its own pages (or
    strips / tiles of a single large page). Windows (``read_window``) are read on their own where
    that costs nothing extra: bands of rows of uncompressed contiguous pages straight from the file,
    and tiles of a tiled single page; otherwise a page is decoded whole, so ingest reads the slab.
    """

    def __init__(self, path: Path):
        super().__init__()
        import tifffile
        import zarr

        self.path = str(path)
        try:
            self._tif = tifffile.TiffFile(str(path))
            series = self._tif.series[0]
            series_axes = series.axes
            self._array = zarr.open_array(series.aszarr(), mode="r")
        except Exception as exc:
            raise ScanError(path, f"not a readable TIFF file ({_describe(exc)})") from None
        self._samples_last = series_axes.endswith("S")
        spatial = series_axes[:-1] if self._samples_last else series_axes
        if not spatial.endswith("YX") or len(spatial) > 3:
            raise ScanError(path, f"unsupported TIFF axes '{series_axes}'; expected YX, ZYX or either with samples")
        channels = series.shape[-1] if self._samples_last else 1
        spatial_shape = tuple(series.shape[: len(spatial)])
        self.axes = "czyx" if len(spatial) == 3 else "cyx"
        self.shape = (channels, *spatial_shape)
        self.dtype = np.dtype(series.dtype)
        self._series_axes = series_axes
        self._page_shape = tuple(series.shape[1:]) if len(spatial) == 3 else ()
        self._check_shape()
        self._row_bytes = int(np.prod(series.shape[len(spatial) - 1:])) * self.dtype.itemsize  # one row, samples
        self._fd: int | None = None
        if len(spatial) == 3:
            self._pages = series.pages
            self.windowed = len(self._pages) == spatial_shape[0] and self._raw_rows(0) is not None
        else:
            self.windowed = bool(series.pages[0].is_tiled)

    def _raw_rows(self, z: int) -> int | None:
        """File offset of page z's first row where its rows can be read as stored (uncompressed,
        contiguous, native byte order, no predictor, samples interleaved), else None."""
        try:
            page = self._pages[z]
            key = getattr(page, "keyframe", None) or page
            offsets, counts = page.dataoffsets, page.databytecounts
            native = self.dtype.itemsize == 1 or self._tif.byteorder == ("<" if sys.byteorder == "little" else ">")
            if (key.compression != 1 or key.predictor != 1 or key.fillorder != 1 or key.is_tiled or not native
                    or tuple(key.shape[:2]) != tuple(self._page_shape[:2])
                    or (self._samples_last and key.planarconfig != 1)
                    or any(o + c != n for o, c, n in zip(offsets, counts, offsets[1:]))
                    or sum(counts) < self._row_bytes * self._page_shape[0]):
                return None
            return int(offsets[0])
        except Exception:  # a page tifffile cannot describe: the general path decodes it
            return None

    def _read_rows(self, z: int, lo: int, hi: int, out: np.ndarray) -> bool:
        """Rows [lo, hi) of page z into ``out`` straight from the file; False where the page needs
        decoding."""
        offset = self._raw_rows(z)
        if offset is None:
            return False
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        view = memoryview(out.reshape(-1).view(np.uint8))
        position, done = offset + lo * self._row_bytes, 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], position + done)
            if n <= 0:
                raise EOFError(f"page {z} is truncated")
            done += n
        return True

    def read_window(self, start: int, stop: int, lo: int, hi: int) -> np.ndarray:
        if not self.windowed:
            return super().read_window(start, stop, lo, hi)
        try:
            if self.axes == "czyx":
                block = np.empty((stop - start, hi - lo, *self._page_shape[1:]), dtype=self.dtype)
                for i, z in enumerate(range(start, stop)):
                    if not self._read_rows(z, lo, hi, block[i]):
                        block[i] = self._tif.asarray(key=z, series=0).reshape(self._page_shape)[lo:hi]
            else:
                block = np.asarray(self._array[start:stop, lo:hi])
        except Exception as exc:
            raise ScanError(self.path, f"cannot read rows/pages {start}-{stop - 1} ({_describe(exc)})") from None
        return np.moveaxis(block, -1, 0) if self._samples_last else block[np.newaxis]

    def read_slab(self, start: int, stop: int) -> np.ndarray:
        try:
            if self.axes == "czyx":  # whole pages: tifffile reads them straight into one array
                block = self._tif.asarray(key=range(start, stop), series=0).reshape(
                    (stop - start, *self._page_shape))
            else:  # one large page: only the strips / tiles of these rows, through the Zarr view
                block = np.asarray(self._array[start:stop])
        except Exception as exc:
            raise ScanError(self.path, f"cannot read rows/pages {start}-{stop - 1} ({_describe(exc)})") from None
        return np.moveaxis(block, -1, 0) if self._samples_last else block[np.newaxis]

    def attributes(self) -> dict[str, Any]:
        page = self._tif.pages[0]
        attrs: dict[str, Any] = {"format": "tiff", "tiff_axes": self._series_axes}
        res = page.tags.get("XResolution")
        unit = page.tags.get("ResolutionUnit")
        if res is not None and unit is not None and int(unit.value) in (2, 3):
            num, den = res.value
            if num:
                per_unit = {2: 25400.0, 3: 10000.0}[int(unit.value)]  # micrometres per inch / per cm
                attrs["pixel_size_micrometer_from_tags"] = per_unit * den / num
        return attrs

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        self._tif.close()


class SliceFolderReader(ScanReader):
    """A folder of 2D slices (PNG or TIFF), one per Z, in natural sort order."""

    # PIL mode -> (dtype, channels)
    _PIL_MODES = {
        "L": (np.uint8, 1), "I;16": (np.uint16, 1), "I;16B": (np.uint16, 1), "I": (np.int32, 1),
        "F": (np.float32, 1), "RGB": (np.uint8, 3), "RGBA": (np.uint8, 4), "1": (np.bool_, 1),
    }

    def __init__(self, folder: Path):
        super().__init__()
        self.path = str(folder)
        self.files = sorted(
            (p for p in Path(folder).iterdir() if p.suffix.lower() in SLICE_SUFFIXES and not p.name.startswith(".")),
            key=lambda p: natural_key(p.name),
        )
        if not self.files:
            raise ScanError(folder, "folder holds no image slices (*.png, *.tif, *.tiff)")
        first_shape = None
        for f in self.files:
            shape, dtype = self._probe(f)
            if first_shape is None:
                first_shape, first_dtype, first_file = shape, dtype, f
            elif (shape, dtype) != (first_shape, first_dtype):
                raise ScanError(
                    f, f"slice has shape {shape} {dtype} but {first_file.name} has {first_shape} {first_dtype}; "
                    "all slices of a stack must match"
                )
        (height, width, channels) = first_shape
        self.axes = "czyx"
        self.shape = (channels, len(self.files), height, width)
        self.dtype = np.dtype(first_dtype)
        self._check_shape()

    @classmethod
    def _probe(cls, file: Path) -> tuple[tuple[int, int, int], np.dtype]:
        """(height, width, channels) and dtype from the header only."""
        try:
            if file.suffix.lower() == ".png":
                from PIL import Image

                with Image.open(file) as im:
                    if im.mode not in cls._PIL_MODES:
                        raise ScanError(file, f"unsupported PNG mode '{im.mode}'")
                    dtype, channels = cls._PIL_MODES[im.mode]
                    return (im.height, im.width, channels), np.dtype(dtype)
            import tifffile

            with tifffile.TiffFile(str(file)) as tif:
                series = tif.series[0]
                shape = series.shape
                if len(shape) == 2:
                    return (shape[0], shape[1], 1), np.dtype(series.dtype)
                if len(shape) == 3 and series.axes.endswith("S"):
                    return (shape[0], shape[1], shape[2]), np.dtype(series.dtype)
                raise ScanError(file, f"slice must be 2D, got axes '{series.axes}' shape {shape}")
        except ScanError:
            raise
        except Exception as exc:
            raise ScanError(file, f"not a readable image slice ({_describe(exc)})") from None

    def _read_one(self, file: Path) -> np.ndarray:
        try:
            if file.suffix.lower() == ".png":
                from PIL import Image

                with Image.open(file) as im:
                    im.load()
                    arr = np.asarray(im)
            else:
                import tifffile

                arr = tifffile.imread(str(file))
        except Exception as exc:
            raise ScanError(file, f"cannot read slice ({_describe(exc)})") from None
        if arr.shape[:2] != self.shape[2:]:
            raise ScanError(file, f"slice has shape {arr.shape[:2]}, expected {self.shape[2:]}")
        return arr.reshape(arr.shape[0], arr.shape[1], -1)

    def read_slab(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((self.shape[0], stop - start) + self.shape[2:], dtype=self.dtype)
        for z, file in enumerate(self.files[start:stop]):
            out[:, z] = np.moveaxis(self._read_one(file), -1, 0)
        return out

    def attributes(self) -> dict[str, Any]:
        return {"format": "slices", "slice_files": [f.name for f in self.files]}


class GeoTiffReader(ScanReader):
    """GeoTIFF / COG through rasterio windowed reads: every band, any dtype, nodata kept.

    A tiled file is read in windows of whole tiles (``read_window``). GDAL keeps decoded blocks in
    its cache (up to ``GDAL_CACHE_MB``, resident, invisible to Python); once a read has covered
    whole blocks no later read needs them, so the reader drops them from the cache.
    """

    def __init__(self, path: Path):
        super().__init__()
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning

        self.path = str(path)
        # GDAL caches decoded blocks up to 5% of RAM by default: a streamed scene would fill it.
        self._env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB << 20)
        self._env.__enter__()
        # rasterio's own warning for a file without georeferencing: this reader says it itself
        # (_warn below), once per file. Not under catch_warnings: see models.quiet.
        ignore_warnings(NotGeoreferencedWarning)
        try:
            self._src = rasterio.open(str(path))
        except Exception as exc:
            self._env.__exit__(None, None, None)
            raise ScanError(path, f"not a readable GeoTIFF ({_describe(exc)})") from None
        src = self._src
        self.axes = "cyx"
        self.shape = (src.count, src.height, src.width)
        self.dtype = np.result_type(*[np.dtype(d) for d in src.dtypes])
        try:
            self._check_shape()
        except ScanError:
            self.close()
            raise
        self.spacing = (abs(src.transform.e), abs(src.transform.a))
        self._block = tuple(src.block_shapes[0]) if src.block_shapes else (1, src.width)  # (rows, cols)
        self.windowed = self._block[1] < src.width  # tiled: a window of whole tiles decodes only them
        self.unit = None
        if src.crs is None:
            self._warn("GeoTIFF has no CRS; stored with crs: null")
        elif src.crs.is_projected:
            units = (src.crs.linear_units or "").lower()
            self.unit = "meter" if units in ("metre", "meter", "m") else None

    def read_slab(self, start: int, stop: int) -> np.ndarray:
        return self._read(start, stop, 0, self.shape[2])

    def read_window(self, start: int, stop: int, lo: int, hi: int) -> np.ndarray:
        return self._read(start, stop, lo, min(hi, self.shape[2]))

    def _whole_blocks(self, start: int, stop: int, lo: int, hi: int) -> bool:
        (bh, bw), (height, width) = self._block, self.shape[1:]
        return (start % bh == 0 and (stop % bh == 0 or stop == height)
                and lo % bw == 0 and (hi % bw == 0 or hi == width))

    def _read(self, start: int, stop: int, lo: int, hi: int) -> np.ndarray:
        import rasterio
        from rasterio.windows import Window

        try:
            # GDAL options are per thread, and ingest reads ahead in another thread than the one that
            # opened the file: without the cap there, GDAL's block cache sizes itself (process-wide,
            # on first use) to 5% of RAM.
            with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB << 20):
                block = self._src.read(window=Window(lo, start, hi - lo, stop - start), out_dtype=self.dtype)
                if self._whole_blocks(start, stop, lo, hi):
                    # No later read needs these blocks: lowering the cap flushes the cache (GDAL
                    # frees blocks down to it), and leaving this Env restores the cap above.
                    with rasterio.Env(GDAL_CACHEMAX=0):
                        pass
                return block
        except Exception as exc:
            raise ScanError(self.path, f"cannot read rows {start}-{stop - 1} ({_describe(exc)})") from None

    def attributes(self, band_names: list[str] | None = None) -> dict[str, Any]:
        src = self._src
        descriptions = [d or None for d in src.descriptions]
        return {
            "format": "geotiff",
            "crs_wkt": src.crs.to_wkt() if src.crs is not None else None,
            "crs_epsg": src.crs.to_epsg() if src.crs is not None else None,
            "transform": list(src.transform)[:6],  # affine a, b, c, d, e, f (rasterio order)
            "transform_gdal": list(src.transform.to_gdal()),
            "bounds": list(src.bounds),
            "nodata": [json_number(v) for v in src.nodatavals],
            "band_dtypes": list(src.dtypes),
            "band_names": descriptions,
            "colorinterp": [c.name for c in src.colorinterp],
            "units": list(src.units),
        }

    def close(self) -> None:
        self._src.close()
        self._env.__exit__(None, None, None)


def open_reader(sources: list[Path], kind: str) -> ScanReader:
    """Open the reader ``kind`` (nifti | tiff | slices | geotiff) over one scan's sources."""
    for s in sources:
        if not Path(s).exists():
            raise ScanError(s, "does not exist")
    if kind == "nifti":
        for s in sources:
            if Path(s).is_dir():
                raise ScanError(s, "is a folder; a NIfTI scan is one file per channel")
        return NiftiReader(sources)
    if len(sources) != 1:
        raise ScanError(sources[0], f"the {kind} reader takes one source, got {len(sources)}")
    source = Path(sources[0])
    if kind == "slices":
        if not source.is_dir():
            raise ScanError(source, "is not a folder of slices")
        return SliceFolderReader(source)
    if source.is_dir():
        raise ScanError(source, f"is a folder; the {kind} reader takes a file")
    if kind == "tiff":
        return TiffStackReader(source)
    if kind == "geotiff":
        return GeoTiffReader(source)
    raise ValueError(f"unknown reader kind {kind!r}")


def default_reader_kind(modality: str, sources: list[Path]) -> str:
    """The reader a modality uses for these sources."""
    if modality == "mri":
        return "nifti"
    if modality == "satellite":
        return "geotiff"
    return "slices" if len(sources) == 1 and Path(sources[0]).is_dir() else "tiff"


def guess_modality(source: Path, remote: RemoteScan | None = None) -> str:
    """Modality from the source alone (CLI without --modality): NIfTI → mri, folder → em,
    TIFF with GeoTIFF keys → satellite, other TIFF → em.

    A remote scan (``remote``, its first source URL as ``source``) is told from its listing: a
    prefix is a folder; only a TIFF object's header is read (a ranged read, not the object).
    """
    if remote is not None:
        return _guess_remote_modality(str(source), remote)
    source = Path(source)
    name = source.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "mri"
    if source.is_dir():
        return "em"
    if name.endswith((".tif", ".tiff")):
        try:
            import tifffile

            with tifffile.TiffFile(str(source)) as tif:
                return "satellite" if tif.pages[0].tags.get("GeoKeyDirectoryTag") is not None else "em"
        except Exception:
            return "em"  # the reader will name the problem
    raise ScanError(source, "cannot tell the modality from the name; pass --modality mri|em|satellite")


def _guess_remote_modality(source: str, remote: RemoteScan) -> str:
    for obj in remote.objects:
        if obj.size is None:
            raise ScanError(obj.url, "does not exist")
    name = source.rstrip("/").rpartition("/")[2].lower()
    if name.endswith((".nii", ".nii.gz")):
        return "mri"
    if [o.url for o in remote.objects] != [remote.url]:  # a prefix: a folder of slices
        return "em"
    if name.endswith((".tif", ".tiff")):
        try:
            import fsspec
            import tifffile

            fs, path = fsspec.core.url_to_fs(remote.url)
            with fs.open(path, "rb", block_size=1 << 16) as f, tifffile.TiffFile(f) as tif:
                return "satellite" if tif.pages[0].tags.get("GeoKeyDirectoryTag") is not None else "em"
        except Exception:
            return "em"  # the reader will name the problem
    raise ScanError(source, "cannot tell the modality from the name; pass --modality mri|em|satellite")
