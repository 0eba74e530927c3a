"""The one mapping between image pixels (grey or RGB) and a model's colour space (``RGB``, ``Y``, ``YCbCr``, ``L``).

Every function works on float tensors ``(N, C, H, W)`` with values in ``[0, 1]``; ``C`` is 1 (grey) or 3 (RGB) on the
image side. The YCbCr used is MATLAB's ``rgb2ycbcr`` (ITU-R BT.601, studio swing: Y in [16, 235] / 255), the
convention of the super-resolution literature (see :mod:`srbatch.metrics.color`).

============  ==================================  ==============================================================
model space   grey image (C = 1)                  RGB image (C = 3)
============  ==================================  ==============================================================
``RGB``       replicated to 3 channels; back:     unchanged
              BT.601 luma (:data:`GREY_WEIGHTS`)
``YCbCr``     replicated, then ``rgb2ycbcr``;     ``rgb2ycbcr``; back: ``ycbcr2rgb``
              back: ``ycbcr2rgb``, then luma
``Y``         the grey plane is the model's Y     Y of ``rgb2ycbcr``; back: the model's Y with the source's CbCr
                                                  resized by MATLAB bicubic to its size, then ``ycbcr2rgb``
``L``         unchanged                           each channel run as its own grey image
``Y-OpenCV``  the grey plane is the model's Y     Y of OpenCV's full-range YCrCb; back: the model's Y with the
                                                  source's CrCb resized bilinearly, then OpenCV's YCrCb -> RGB
============  ==================================  ==============================================================

``Y-OpenCV`` is the convention of OpenCV's ``dnn_superres`` (``DnnSuperResImpl::upsample`` for ESPCN, FSRCNN and
LapSRN, opencv_contrib ``modules/dnn_superres/src/dnn_superres.cpp``), reproduced step by step: 8-bit
``cvtColor(BGR2YCrCb)`` (``Y = 0.299 R + 0.587 G + 0.114 B``, ``Cr = (R - Y) 0.713 + 128``, ``Cb = (B - Y) 0.564 +
128``, full range, in OpenCV's 14-bit fixed point), divided by 255; only Y goes through the network; Cr and Cb are
upscaled with ``cv::resize`` at its default ``INTER_LINEAR`` (bilinear, half-pixel centres, edges replicated:
``F.interpolate(mode="bilinear", align_corners=False)``; not bicubic), merged with the network's Y, rounded to 8 bits
and converted back with OpenCV's 8-bit ``YCrCb2BGR`` (``R = Y + 1.403 (Cr - 128)``, ``G = Y - 0.714 (Cr - 128) -
0.344 (Cb - 128)``, ``B = Y + 1.773 (Cb - 128)``). Colour images therefore go in and come out on the 8-bit grid, as
in OpenCV (16-bit colour input is reduced to 8-bit levels); grey images are the model's Y, unquantised.

The inference engine (:class:`srbatch.inference.Upscaler`), the training loop and the benchmark all use these
functions, so what a model is trained on, measured on and run on is the same.
"""

from __future__ import annotations

import torch

from srbatch.errors import ConfigError
from srbatch.metrics.color import rgb2ycbcr, ycbcr2rgb
from srbatch.metrics.resize import imresize

__all__ = [
    "COLOR_SPACES",
    "GREY_WEIGHTS",
    "data_channels",
    "from_model_space",
    "model_channels",
    "rgb_to_grey",
    "to_model_space",
]

COLOR_SPACES: tuple[str, ...] = ("RGB", "Y", "YCbCr", "L", "Y-OpenCV")

GREY_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights (as Pillow's ``convert("L")``) used to turn an RGB model's output back into grey.
They sum to 1, so a neutral grey output (R = G = B) maps to exactly itself."""

_Y_SPACES = ("Y", "Y-OpenCV")
# OpenCV's 8-bit YCrCb <-> RGB fixed-point coefficients (imgproc color_yuv: the float ones times 2^14, rounded).
_CV_Y = (4899.0, 9617.0, 1868.0)  # 0.299, 0.587, 0.114
_CV_CR, _CV_CB = 11682.0, 9241.0  # 0.713, 0.564
_CV_R_CR, _CV_G_CR, _CV_G_CB, _CV_B_CB = 22987.0, -11698.0, -5636.0, 29049.0  # 1.403, -0.714, -0.344, 1.773


def model_channels(color_space: str) -> int:
    """Channels a model of ``color_space`` takes and returns: 3 for ``RGB`` and ``YCbCr``, 1 for ``Y``, ``Y-OpenCV``
    and ``L``."""
    _check(color_space)
    return 3 if color_space in ("RGB", "YCbCr") else 1


def data_channels(color_space: str, in_channels: int, image_channels: int) -> int:
    """Channels images are converted to (1 grey, 3 RGB) before :func:`to_model_space`, when training a model.

    The model's own input channels, except for ``Y`` models, which keep the images' channels (``image_channels``):
    their input is the luma of colour images and the plane of grey ones (``Y-OpenCV`` likewise).
    """
    _check(color_space)
    return image_channels if color_space in _Y_SPACES else in_channels


def to_model_space(x: torch.Tensor, color_space: str) -> torch.Tensor:
    """Grey or RGB ``(N, 1|3, H, W)`` in ``[0, 1]`` -> what a model of ``color_space`` takes (see the module table).

    Returns ``(N, model_channels(color_space), H, W)``, except for an ``L`` model on RGB: ``(3N, 1, H, W)`` (image
    ``n``'s channel ``k`` at ``3n + k``), undone by :func:`from_model_space`.
    """
    c = _image_channels(x)
    _check(color_space)
    if color_space == "L":
        return x if c == 1 else x.reshape(-1, 1, *x.shape[-2:])
    if color_space == "Y":
        return x if c == 1 else rgb2ycbcr(x)[:, :1]
    if color_space == "Y-OpenCV":
        return x if c == 1 else _cv_luma8(x).div_(255.0).to(x.dtype)
    rgb = x if c == 3 else x.expand(-1, 3, -1, -1)
    return rgb if color_space == "RGB" else rgb2ycbcr(rgb)


def from_model_space(y: torch.Tensor, color_space: str, source: torch.Tensor | None = None) -> torch.Tensor:
    """A model's output in ``color_space`` -> grey or RGB (the inverse of :func:`to_model_space`; not clamped).

    ``source`` is the image-side tensor the model input was made from (before :func:`to_model_space`): the result has
    its channel count, and a ``Y`` model on RGB takes its chroma from it (resized with MATLAB bicubic to ``y``'s
    size; ``Y-OpenCV``: OpenCV's CrCb resized bilinearly). Without ``source`` (e.g. a loss on the model's output),
    ``YCbCr`` becomes RGB and every other space is returned unchanged (a ``Y`` output stays luma).
    """
    _check(color_space)
    if source is None:
        return ycbcr2rgb(y) if color_space == "YCbCr" else y
    c = _image_channels(source)
    if color_space == "L":
        return y if c == 1 else y.reshape(source.shape[0], c, *y.shape[-2:])
    if color_space == "Y":
        if c == 1:
            return y
        cbcr = imresize(rgb2ycbcr(source.to(y.device, y.dtype))[:, 1:], output_shape=tuple(y.shape[-2:]))
        return ycbcr2rgb(torch.cat([y, cbcr.to(y.dtype)], 1))
    if color_space == "Y-OpenCV":
        return y if c == 1 else _cv_compose(y, source.to(y.device, y.dtype))
    rgb = ycbcr2rgb(y) if color_space == "YCbCr" else y
    return rgb if c == 3 else rgb_to_grey(rgb)


def rgb_to_grey(rgb: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` RGB -> ``(N, 1, H, W)`` BT.601 luma with :data:`GREY_WEIGHTS` (no studio-swing offset)."""
    w = torch.tensor(GREY_WEIGHTS, dtype=rgb.dtype, device=rgb.device)
    return torch.einsum("c,nchw->nhw", w, rgb)[:, None]


def _cv_luma8(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> OpenCV's 8-bit Y (0..255, float32), ``CV_DESCALE(R*4899 + G*9617 + B*1868, 14)``."""
    q = rgb.to(torch.float32).mul(255.0).round_().clamp_(0, 255)
    acc = q[:, 0:1] * _CV_Y[0] + q[:, 1:2] * _CV_Y[1] + q[:, 2:3] * _CV_Y[2]
    return _descale(acc)


def _descale(acc: torch.Tensor) -> torch.Tensor:
    # OpenCV's CV_DESCALE(x, 14) = (x + 2^13) >> 14 (an arithmetic shift: floor). Exact in float32 (|x| < 2^24).
    return acc.add_(8192.0).div_(16384.0).floor_()


def _cv_compose(y: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Model Y ``(N, 1, sH, sW)`` + RGB ``source`` ``(N, 3, H, W)`` -> RGB on the 8-bit grid, as OpenCV's
    ``reconstruct_YCrCb``: source YCrCb in 8-bit integers, CrCb / 255 resized bilinearly, merged with the model's Y,
    rounded to 8 bits (half to even, saturated) and converted back in 8-bit integers."""
    import torch.nn.functional as F

    q = source.to(torch.float32).mul(255.0).round_().clamp_(0, 255)
    y8 = _cv_luma8(source)
    cr = _descale((q[:, 0:1] - y8) * _CV_CR + 128.0 * 16384)
    cb = _descale((q[:, 2:3] - y8) * _CV_CB + 128.0 * 16384)
    crcb = F.interpolate(torch.cat([cr, cb], 1).div_(255.0), size=tuple(y.shape[-2:]), mode="bilinear",
                         align_corners=False)  # fmt: skip
    ycc = torch.cat([y.to(torch.float32), crcb], 1).mul_(255.0).round_().clamp_(0, 255)
    yy, cr, cb = ycc[:, 0:1], ycc[:, 1:2] - 128.0, ycc[:, 2:3] - 128.0
    r = yy + _descale(cr * _CV_R_CR)
    g = yy + _descale(cb * _CV_G_CB + cr * _CV_G_CR)
    b = yy + _descale(cb * _CV_B_CB)
    return torch.cat([r, g, b], 1).clamp_(0, 255).div_(255.0).to(y.dtype)


def _check(color_space: str) -> None:
    if color_space not in COLOR_SPACES:
        raise ConfigError(f"colour space: expected one of {', '.join(COLOR_SPACES)}; got {color_space!r}")


def _image_channels(x: torch.Tensor) -> int:
    if x.ndim != 4 or int(x.shape[1]) not in (1, 3):
        raise ConfigError(f"expected grey or RGB images (N, 1|3, H, W); got shape {tuple(x.shape)}")
    return int(x.shape[1])
