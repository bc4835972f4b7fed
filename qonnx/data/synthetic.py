"""Synthetic calibration images for data-free quantization of models without BatchNorm statistics.

Natural images have an amplitude spectrum close to 1/f (power 1/f^2) and strongly correlated colour
channels; here each image's amplitude falls as 1/f^a with a drawn in [1, 2].
Noise with those two properties drives a vision model's activations through ranges much closer to
real data than the independent-pixel Gaussian assumption of qonnx/analyses/moments.py, which overestimates
early layers and underestimates deep ones several-fold when no folded BatchNorm pins them down.
Nothing here looks at real data: only the input range the user declares.
"""

from __future__ import annotations

import numpy as np

# Shared (luminance-like) and per-channel parts of each colour channel, before normalization.
_SHARED_WEIGHT, _OWN_WEIGHT = 0.8, 0.4


def image_layout(shape) -> tuple[int, int, int, int] | None:
    """(channel axis, channels, height, width) of an image-like input shape [N,C,H,W] or [N,H,W,C], else None."""
    if shape is None or len(shape) != 4:
        return None
    dims = list(shape)
    for axis, (h_axis, w_axis) in ((1, (2, 3)), (3, (1, 2))):
        c, h, w = dims[axis], dims[h_axis], dims[w_axis]
        if c in (1, 3) and all(isinstance(d, int) and d >= 8 for d in (h, w)):
            return axis, c, h, w
    return None


def _spectral_noise(rng: np.random.Generator, h: int, w: int, amplitude: np.ndarray) -> np.ndarray:
    coeffs = rng.normal(size=amplitude.shape) + 1j * rng.normal(size=amplitude.shape)
    field = np.fft.irfft2(coeffs * amplitude, s=(h, w))
    return field / max(float(field.std()), 1e-12)


def pink_noise_images(shape, count: int, value_range: tuple[float, float], seed: int = 0) -> np.ndarray:
    """`count` images of the input `shape` ([N,C,H,W] or [N,H,W,C]) with values in `value_range`.

    Each image: amplitude spectrum 1/f^a (a drawn in [1, 2]), channels mixing one shared field with their
    own, then a random contrast and brightness within the declared range (float32, deterministic in `seed`).
    """
    layout = image_layout(shape)
    if layout is None:
        raise ValueError(f"synthetic images need an input of shape [N,C,H,W] or [N,H,W,C] with C in (1, 3) and "
                         f"known height and width, got {list(shape) if shape is not None else None}")
    axis, channels, h, w = layout
    low, high = float(value_range[0]), float(value_range[1])
    centre, half = (low + high) / 2, (high - low) / 2
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    freq = np.sqrt(fx * fx + fy * fy)
    freq[0, 0] = 1.0 / max(h, w)  # the DC term: as strong as the lowest real frequency
    images = np.empty((count, channels, h, w), np.float32)
    for i in range(count):
        amplitude = freq ** -rng.uniform(1.0, 2.0)
        shared = _spectral_noise(rng, h, w, amplitude)
        image = np.stack([_SHARED_WEIGHT * shared + _OWN_WEIGHT * _spectral_noise(rng, h, w, amplitude)
                          for _ in range(channels)])
        image = (image - image.mean()) / max(float(image.std()), 1e-12)
        contrast = rng.uniform(0.3, 0.6) * half
        brightness = centre + rng.uniform(-0.3, 0.3) * half
        images[i] = np.clip(image * contrast + brightness, low, high)
    return images if axis == 1 else images.transpose(0, 2, 3, 1).copy()
