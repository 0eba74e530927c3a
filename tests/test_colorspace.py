"""The colour-space mapping (srbatch.inference.colorspace) against references from outside srbatch: scikit-image's
``rgb2ycbcr``/``ycbcr2rgb`` (MATLAB's BT.601 studio-swing formula), the MATLAB constants written out, and Pillow's
``convert("L")``; plus round trips and the per-channel layout of grey models on colour images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import rgb2ycbcr as sk_rgb2ycbcr
from skimage.color import ycbcr2rgb as sk_ycbcr2rgb

from srbatch.errors import ConfigError
from srbatch.inference.colorspace import (
    data_channels,
    from_model_space,
    model_channels,
    to_model_space,
)


def _rgb(n: int = 2, h: int = 9, w: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, h, w), generator=g, dtype=torch.float64)


def _hwc(x: torch.Tensor, i: int = 0) -> np.ndarray:
    return x[i].permute(1, 2, 0).numpy()


def test_ycbcr_matches_scikit_image_and_the_matlab_constants() -> None:
    x = _rgb()
    ycc = to_model_space(x, "YCbCr")
    assert ycc.shape == x.shape
    for i in range(x.shape[0]):  # skimage returns 0..255 (Y in [16, 235]); ours is that / 255
        np.testing.assert_allclose(_hwc(ycc, i) * 255.0, sk_rgb2ycbcr(_hwc(x, i)), atol=1e-9)
    # the MATLAB rgb2ycbcr formula written out, for pure colours: white, black, red
    pure = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)[None, :, None, :]
    got = to_model_space(pure, "YCbCr")[0, :, 0, :].T * 255.0
    want = [[235.0, 128.0, 128.0], [16.0, 128.0, 128.0], [16.0 + 65.481, 128.0 - 37.797, 128.0 + 112.0]]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-9)


def test_y_model_takes_the_luma_of_colour_and_the_plane_of_grey() -> None:
    x = _rgb()
    y = to_model_space(x, "Y")
    assert y.shape == (2, 1, 9, 7)
    np.testing.assert_allclose(y[1, 0].numpy() * 255.0, sk_rgb2ycbcr(_hwc(x, 1))[..., 0], atol=1e-9)
    grey = x[:, :1]
    assert torch.equal(to_model_space(grey, "Y"), grey)  # a grey plane is fed as Y as it is
    assert torch.equal(from_model_space(grey, "Y", source=grey), grey)


def test_ycbcr_and_rgb_round_trips_and_skimage_inverse() -> None:
    x = _rgb()
    ycc = to_model_space(x, "YCbCr")
    torch.testing.assert_close(from_model_space(ycc, "YCbCr", source=x), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(from_model_space(ycc, "YCbCr"), x, atol=1e-12, rtol=0)  # no source: RGB
    np.testing.assert_allclose(_hwc(from_model_space(ycc, "YCbCr")), sk_ycbcr2rgb(_hwc(ycc) * 255.0), atol=1e-9)
    assert torch.equal(to_model_space(x, "RGB"), x) and torch.equal(from_model_space(x, "RGB", source=x), x)


def test_y_model_output_keeps_the_source_chroma() -> None:
    """A uniformly coloured image has constant chroma, which any resize keeps: a Y model's x2 output (here the luma
    repeated, nearest neighbour) must come back as skimage's ycbcr2rgb of (that luma, the source's Cb, Cr)."""
    colour = torch.tensor([0.8, 0.3, 0.1], dtype=torch.float64)
    x = colour[None, :, None, None].expand(1, 3, 6, 5).clone()
    luma = to_model_space(x, "Y")
    luma_up = luma.repeat_interleave(2, -2).repeat_interleave(2, -1)
    luma_up[:, :, 3:7, 2:6] += 0.05  # the "model" added detail to the luma
    out = from_model_space(luma_up, "Y", source=x)
    assert out.shape == (1, 3, 12, 10)
    cb, cr = sk_rgb2ycbcr(colour.numpy()[None, None])[0, 0, 1:]
    ref_ycc = np.stack([luma_up[0, 0].numpy() * 255.0, np.full((12, 10), cb), np.full((12, 10), cr)], -1)
    np.testing.assert_allclose(_hwc(out), sk_ycbcr2rgb(ref_ycc), atol=1e-9)
    assert torch.equal(from_model_space(luma_up, "Y"), luma_up)  # no source: the luma as it is


def test_grey_images_on_colour_models_and_back_match_pillow_luma() -> None:
    grey = _rgb(n=1)[:, :1]
    rgb = to_model_space(grey, "RGB")
    assert rgb.shape == (1, 3, 9, 7) and all(torch.equal(rgb[:, k], grey[:, 0]) for k in range(3))
    torch.testing.assert_close(from_model_space(rgb, "RGB", source=grey), grey, atol=1e-12, rtol=0)
    ycc = to_model_space(grey, "YCbCr")
    np.testing.assert_allclose(_hwc(ycc) * 255.0, sk_rgb2ycbcr(np.repeat(_hwc(grey), 3, -1)), atol=1e-9)
    torch.testing.assert_close(from_model_space(ycc, "YCbCr", source=grey), grey, atol=1e-12, rtol=0)
    # an RGB model's colour output on a grey image: Pillow's "L" (ITU-R 601-2 luma) within one 8-bit level
    u8 = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = torch.from_numpy(u8).permute(2, 0, 1)[None].double() / 255.0
    ours = from_model_space(out, "RGB", source=torch.zeros(1, 1, 16, 16, dtype=torch.float64))
    assert ours.shape == (1, 1, 16, 16)
    pil = np.asarray(Image.fromarray(u8, "RGB").convert("L"), dtype=np.float64)
    ours_u8 = np.floor(ours[0, 0].numpy() * 255.0 + 0.5)
    assert np.abs(ours_u8 - pil).max() <= 1.0


def test_grey_models_run_each_channel_of_several_colour_images() -> None:
    x = _rgb(n=2)
    planes = to_model_space(x, "L")
    assert planes.shape == (6, 1, 9, 7)
    for n in range(2):
        for k in range(3):
            assert torch.equal(planes[3 * n + k, 0], x[n, k])
    up = planes.repeat_interleave(2, -1)  # a "model" that doubles the width
    back = from_model_space(up, "L", source=x)
    assert torch.equal(back, x.repeat_interleave(2, -1))
    grey = x[:, 1:2]
    assert torch.equal(to_model_space(grey, "L"), grey) and torch.equal(from_model_space(grey, "L", source=grey), grey)


def test_channel_counts_and_errors() -> None:
    assert [model_channels(cs) for cs in ("RGB", "YCbCr", "Y", "L")] == [3, 3, 1, 1]
    assert data_channels("Y", 1, 3) == 3 and data_channels("Y", 1, 1) == 1
    assert data_channels("RGB", 3, 1) == 3 and data_channels("L", 1, 3) == 1 and data_channels("YCbCr", 3, 1) == 3
    with pytest.raises(ConfigError, match="colour space"):
        to_model_space(_rgb(), "HSV")
    with pytest.raises(ConfigError, match="grey or RGB"):
        to_model_space(torch.zeros(1, 4, 2, 2), "RGB")
