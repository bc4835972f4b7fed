"""Synthetic calibration images (pink noise) for image models without BN statistics."""

from __future__ import annotations

import numpy as np
import pytest


def test_pink_noise_images_are_deterministic_in_range_and_spatially_correlated():
    from qonnx.data.synthetic import pink_noise_images

    a = pink_noise_images([1, 3, 32, 32], 4, (-1.0, 1.0), seed=3)
    b = pink_noise_images([1, 3, 32, 32], 4, (-1.0, 1.0), seed=3)
    assert a.shape == (4, 3, 32, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert a.min() >= -1.0 and a.max() <= 1.0 and a.std() > 0.1
    # Neighbouring pixels are alike and the colour channels move together, as in photographs.
    neighbour = np.corrcoef(a[..., :-1].ravel(), a[..., 1:].ravel())[0, 1]
    channels = np.corrcoef(a[:, 0].ravel(), a[:, 1].ravel())[0, 1]
    assert neighbour > 0.8 and channels > 0.5
    nhwc = pink_noise_images([1, 32, 32, 3], 2, (0.0, 255.0), seed=3)
    assert nhwc.shape == (2, 32, 32, 3) and nhwc.min() >= 0.0 and nhwc.max() <= 255.0


@pytest.mark.parametrize("shape", [[1, 4, 8, 8], [1, 3, None, 8], [1, 16], [1, 3, 4, 4]])
def test_pink_noise_refuses_inputs_that_are_not_images(shape):
    from qonnx.data.synthetic import image_layout, pink_noise_images

    assert image_layout(shape) is None
    with pytest.raises(ValueError, match="synthetic images"):
        pink_noise_images(shape, 1, (-1.0, 1.0))
