"""The fully connected CRF of Krähenbühl & Koltun (NIPS 2011), as DeepLab v1/v2 refine their
probabilities: a Gaussian smoothness kernel over position and an appearance (bilateral) kernel
over position and intensity, Potts compatibility, mean-field iterations.

The inference is ``pydensecrf2`` (Krähenbühl's permutohedral-lattice C++ code, maintained fork;
the ``crf`` extra): the filtering is linear in the pixels, so a 512 x 512 tile with five
iterations takes ~0.4 s on one core. This module runs it on one in-memory block (2D or 3D, any
number of channels); :mod:`tasks.refine.regions` walks a whole prediction region by region.

Intensities are in the units of the model's normalisation (z-scores of the training patches), so
one ``appearance_intensity`` fits EM, MRI and satellite bands alike; distances are in pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


class CrfUnavailable(RuntimeError):
    """pydensecrf2 is not installed (pip install 'tilewise[crf]')."""


def require_crf() -> None:
    """:class:`CrfUnavailable` unless pydensecrf2 imports: callers check before inference, so a
    missing extra is said before hours of tiles rather than after them."""
    try:
        import pydensecrf.densecrf  # noqa: F401
        import pydensecrf.utils  # noqa: F401
    except ImportError:
        raise CrfUnavailable("the dense CRF needs pydensecrf2: pip install 'tilewise[crf]'") from None


@dataclass(frozen=True)
class CrfParams:
    iterations: int = 5
    smoothness_sigma: float = 3.0  # pixels
    smoothness_weight: float = 3.0
    appearance_sigma: float = 40.0  # pixels
    appearance_intensity: float = 0.5  # normalised intensity units
    appearance_weight: float = 5.0

    def record(self) -> dict:
        return asdict(self)

    @property
    def halo(self) -> int:
        """Pixels of context around a region: two appearance sigmas (the kernel is ~e^-2 there),
        at least the smoothness kernel's reach."""
        return int(np.ceil(max(2 * self.appearance_sigma, 3 * self.smoothness_sigma)))


def dense_crf(probabilities: np.ndarray, image: np.ndarray, params: CrfParams = CrfParams()) -> np.ndarray:
    """Refined probabilities (K, *spatial) float32 of ``probabilities`` (K, *spatial), summing to 1
    over K, given the normalised ``image`` (C, *spatial). K == 1 is a foreground probability (the
    background is 1 - p); its refined foreground probability comes back as (1, *spatial)."""
    require_crf()
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import create_pairwise_bilateral, create_pairwise_gaussian

    single = probabilities.shape[0] == 1
    probs = np.concatenate([1 - probabilities, probabilities]) if single else probabilities
    probs = np.asarray(probs, np.float32)
    k, spatial = probs.shape[0], probs.shape[1:]
    if image.shape[1:] != spatial:
        raise ValueError(f"image {image.shape[1:]} and probabilities {spatial} differ in shape")
    n = int(np.prod(spatial))
    crf = dcrf.DenseCRF(n, k)
    unary = -np.log(np.clip(probs.reshape(k, n), 1e-6, 1.0))
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    ndim = len(spatial)
    crf.addPairwiseEnergy(create_pairwise_gaussian(sdims=(params.smoothness_sigma,) * ndim, shape=spatial),
                          compat=params.smoothness_weight)
    # channel-last image for the bilateral features; intensities scaled by the kernel's width
    img = np.moveaxis(np.asarray(image, np.float32), 0, -1)
    crf.addPairwiseEnergy(create_pairwise_bilateral(sdims=(params.appearance_sigma,) * ndim,
                                                    schan=(params.appearance_intensity,) * img.shape[-1],
                                                    img=img, chdim=ndim),
                          compat=params.appearance_weight)
    q = np.asarray(crf.inference(params.iterations), np.float32).reshape(k, *spatial)
    return q[1:] if single else q
