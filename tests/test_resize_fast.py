"""The fast MATLAB bicubic (``banded_weights``, ``resize_axis``, ``imresize_fast``) against the float64 dense
``imresize``/``resize_weights``, whose MATLAB figures test_metrics pins; the ``bicubic`` model fast and exact; and
``evaluate`` keeping the exact (float64) bicubic.

Tolerances: float32 on [0, 1] data rounds at about 6e-8; a sum of 4-16 taps at a few times that. 1e-5 leaves room
for any summation order and is still far below a wrong tap, weight or border (those move values by 1e-2 or more).
"""

from __future__ import annotations

import glob

import numpy as np
import pytest
import torch

from srbatch.errors import ConfigError
from srbatch.metrics.resize import (
    _polyphase_plan,
    banded_weights,
    imresize,
    imresize_fast,
    resize_axis,
    resize_weights,
)
from srbatch.models.archs.bicubic import Bicubic
from srbatch.models.loader import build_model, load_model

TOL32 = 1e-5


def _dense(idx: torch.Tensor, w: torch.Tensor, in_len: int) -> torch.Tensor:
    rows = torch.arange(idx.shape[0])[:, None].expand_as(idx)
    return torch.zeros(idx.shape[0], in_len, dtype=torch.float64).index_put_((rows, idx), w, accumulate=True)


def _cases() -> list[tuple[int, int, float, bool]]:
    cases = []
    for n in (1, 2, 3, 4, 5, 7, 16, 33):
        for s in (2, 3, 4):
            cases.append((n, n * s, float(s), True))  # integer upscales
        cases += [(n, -(-n * 3) // 2, 1.5, True), (n, -(-n * 17) // 10, 1.7, False)]  # non-integer upscales
        for s in (2, 3, 4):  # downscales, antialiased or not, lengths divisible by the factor or not
            for aa in (True, False):
                cases.append((n, -(-n // s), 1 / s, aa))
        cases += [(n, max(1, -(-n * 6) // 10), 0.6, True), (n, n, 1.0, True)]
    cases += [(10, 7, 0.7, True), (9, 20, 20 / 9, True)]  # output-shape driven scales
    return cases


@pytest.mark.parametrize(("in_len", "out_len", "scale", "antialias"), _cases())
def test_banded_weights_are_the_matlab_matrix(in_len: int, out_len: int, scale: float, antialias: bool) -> None:
    idx, w = banded_weights(in_len, out_len, scale, antialias)
    assert idx.dtype == torch.int64 and w.dtype == torch.float64 and idx.shape == w.shape
    assert idx.shape[0] == out_len and int(idx.min()) >= 0 and int(idx.max()) < in_len
    k = idx.shape[1]
    assert k <= (4 if scale >= 1 or not antialias else 4 / scale + 2)  # zero taps of MATLAB's window dropped
    torch.testing.assert_close(_dense(idx, w, in_len), resize_weights(in_len, out_len, scale, antialias),
                               rtol=0, atol=1e-15)  # fmt: skip
    # out[i] = sum_k w[i, k] * in[idx[i, k]] is the matrix product
    x = torch.rand(in_len, dtype=torch.float64, generator=torch.Generator().manual_seed(in_len))
    torch.testing.assert_close((w * x[idx]).sum(1), resize_weights(in_len, out_len, scale, antialias) @ x,
                               rtol=0, atol=1e-14)  # fmt: skip


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("shape", "scale", "kw", "polyphase"),
    [
        ((3, 37, 29), 2, {}, True),
        ((3, 37, 29), 3, {}, True),
        ((2, 3, 21, 18), 4, {}, True),  # (N, C, H, W)
        ((23, 31), 4, {}, True),  # (H, W)
        ((1, 1), 4, {}, True),
        ((2, 1), 3, {}, True),
        ((3, 2), 2, {}, True),
        ((3, 40, 36), 0.5, {}, True),  # antialiased integer downscales: strided polyphase
        ((48, 36), 1 / 3, {}, True),
        ((2, 3, 48, 44), 0.25, {}, True),
        ((3, 40, 36), 0.5, {"antialias": False}, True),
        ((3, 41, 37), 0.5, {}, False),  # not divisible: the gather path
        ((3, 37, 29), 1.5, {}, False),
        ((3, 37, 29), 1.7, {}, False),
        ((3, 37, 29), 0.6, {}, False),
        ((3, 37, 29), (2, 0.5), {}, None),  # columns first (MATLAB order), one axis of each kind
        ((3, 37, 29), None, {"output_shape": (50, 20)}, False),
        ((3, 37, 29), 4, {"output_shape": (148, 100)}, None),
        ((1, 3), 0.5, {}, False),
        ((6, 9), 1 / 3, {}, True),
    ],
)
def test_imresize_fast_equals_imresize(shape, scale, kw, polyphase) -> None:
    x = _rand(*shape, seed=len(shape) + shape[-1])
    ref = imresize(x.double(), scale, **kw)
    got = imresize_fast(x, scale, **kw)
    assert got.dtype == torch.float32 and got.shape == ref.shape and got.is_contiguous()
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=TOL32)
    got64 = imresize_fast(x.double(), scale, **kw)  # float64 in, float64 computed: the same function to 1e-13
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, ref, rtol=0, atol=1e-13)
    if polyphase is not None:  # the path these sizes are meant to exercise is the one taken
        h, w = shape[-2:]
        s = kw["output_shape"][0] / h if scale is None else float(scale)
        assert (_polyphase_plan(h, ref.shape[-2], s, kw.get("antialias", True)) is not None) == polyphase


def test_imresize_fast_on_real_data_and_other_dtypes(refs) -> None:
    """A Set5 image (real edges, saturated areas): within 1e-5 of float64 at x4 up and x1/3 down; float16 and integer
    inputs are computed in float32 (float16 result within its own rounding); a strided (channels-last) input works."""
    from PIL import Image

    path = sorted(glob.glob(str(refs / "sets/Set5/image_SRF_3/*_HR.png")))[0]
    img = torch.from_numpy(np.array(Image.open(path).convert("RGB"))[:96, :120]).permute(2, 0, 1)  # channels-last
    x = img.float() / 255
    for scale in (4, 1 / 3):
        torch.testing.assert_close(imresize_fast(x, scale).double(), imresize(x.double(), scale), rtol=0, atol=TOL32)
    half = imresize_fast(x.half(), 2)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), imresize(x.half().double(), 2), rtol=0, atol=2e-3)
    ints = imresize_fast(img, 2)
    assert ints.dtype == torch.float32
    torch.testing.assert_close(ints.double(), imresize(img, 2), rtol=1e-6, atol=1e-4)  # 0..255 values


@pytest.mark.parametrize("axis", [-2, -1])
@pytest.mark.parametrize(("in_len", "out_len", "scale"), [(30, 120, 4.0), (48, 16, 1 / 3), (29, 50, 50 / 29)])
def test_resize_axis_on_a_region_equals_the_full_resize(axis: int, in_len: int, out_len: int, scale: float) -> None:
    """Output positions a..b from the crop of the input their taps need (offset = the crop's first position) are
    the same positions of the dense float64 resize of the whole axis; near a border (mirrored taps) too."""
    shape = (2, in_len, 7) if axis == -2 else (2, 7, in_len)
    x = _rand(*shape, seed=in_len).double()
    mat = resize_weights(in_len, out_len, scale)
    full = mat @ x if axis == -2 else x @ mat.T
    idx, w = banded_weights(in_len, out_len, scale)
    for a, b in ((0, 5), (out_len // 3, out_len // 2), (out_len - 4, out_len)):
        lo, hi = int(idx[a:b].min()), int(idx[a:b].max())
        crop = x.narrow(axis, lo, hi - lo + 1)
        got = resize_axis(crop, axis, idx[a:b], w[a:b], offset=lo)
        torch.testing.assert_close(got, full.narrow(axis, a, b - a), rtol=0, atol=1e-14)
        got32 = resize_axis(crop.float(), axis, idx[a:b], w[a:b], offset=lo)
        assert got32.dtype == torch.float32
        torch.testing.assert_close(got32.double(), full.narrow(axis, a, b - a), rtol=0, atol=TOL32)
        if hi - lo >= 1:  # a crop one position short of the taps is refused, naming what is needed
            with pytest.raises(ConfigError, match="need input positions"):
                resize_axis(crop.narrow(axis, 1, hi - lo), axis, idx[a:b], w[a:b], offset=lo + 1)
    assert resize_axis(x, axis, idx[:0], w[:0]).shape == full.narrow(axis, 0, 0).shape  # an empty region
    with pytest.raises(ConfigError):
        resize_axis(x, 0, idx, w)


def test_bicubic_model_fast_and_exact() -> None:
    x = _rand(1, 3, 19, 23, seed=5)
    fast, exact = Bicubic(scale=4), Bicubic(scale=4, exact=True)
    assert not fast.exact and exact.exact
    y_fast, y_exact = fast(x), exact(x)
    assert y_fast.dtype == y_exact.dtype == torch.float32 and y_fast.shape == (1, 3, 76, 92)
    assert torch.equal(y_exact, imresize(x, 4).float())  # exact: the float64 imresize, cast
    torch.testing.assert_close(y_fast.double(), imresize(x.double(), 4), rtol=0, atol=TOL32)
    # the hyper-parameter flows through the registry: build_model, load_model (fast by default), info
    desc = build_model("bicubic", scale=4, exact=True)
    assert desc.module.exact and desc.hparams == {"scale": 4, "exact": True} and desc.scale == 4
    assert not load_model("bicubic", scale=2).module.exact
    with pytest.raises(ConfigError, match="exact"):
        build_model("bicubic", scale=2, exact="yes")


@pytest.mark.refs
def test_evaluate_keeps_the_exact_bicubic(refs) -> None:
    """``evaluate('bicubic')`` measures the float64 bicubic: its per-image PSNRs are those of the exact model through
    the same Upscaler, and (the check can fail) the fast model's differ on Set5 x2 (a few values round the other way:
    up to 6e-5 dB)."""
    from srbatch.evaluate import evaluate, reference_pair, upscale_and_measure
    from srbatch.inference import TilingConfig, Upscaler
    from srbatch.io.images import decode_image

    folder = refs / "sets/Set5/image_SRF_2"
    res = evaluate("bicubic", scale=2, hr=str(folder), lr=str(folder), device="cpu")
    got = {r.image: r.psnr_y for r in res.rows}
    want = {}
    for exact in (True, False):
        up = Upscaler(build_model("bicubic", scale=2, exact=exact), device="cpu", tiling=TilingConfig(tile=0))
        for hr_path in sorted(folder.glob("*_HR.png")):
            hr = decode_image(hr_path.read_bytes())
            lr = decode_image(hr_path.with_name(hr_path.name.replace("_HR", "_LR")).read_bytes())
            lr_img, hr_px = reference_pair(hr, lr, 2, name=hr_path.name)
            m, _, _ = upscale_and_measure(up, lr_img, hr_px, border=2, precision="uint8")
            want[exact, hr_path.name] = m.psnr_y
    exact_vals = [want[True, k] for k in sorted(n for e, n in want if e)]
    fast_vals = [want[False, k] for k in sorted(n for e, n in want if not e)]
    assert [got[k] for k in sorted(got)] == pytest.approx(exact_vals, abs=1e-12, rel=0)
    assert max(abs(a - b) for a, b in zip(exact_vals, fast_vals)) > 1e-6
    assert res.psnr_y == pytest.approx(33.64, abs=0.01)  # the published figure (refs/EXPECTED.md)


def test_imresize_fast_returns_a_new_tensor() -> None:
    """Callers quantise the result in place: it never aliases the input, even where an axis keeps its size."""
    x = _rand(3, 8, 9)
    for scale in ((1.0, 1.0), (2.0, 1.0), (1.0, 0.5)):
        y = imresize_fast(x, scale)
        y.add_(1)
        assert torch.equal(x, _rand(3, 8, 9)), scale


@pytest.mark.parametrize("chunk", [1, 37, 500])
def test_chunked_paths_equal_the_whole(monkeypatch, chunk: int) -> None:
    """The polyphase and gather paths work chunk by chunk (``_CHUNK`` output elements); with chunks far smaller than
    the image (down to one row), every chunk boundary and the last, partial chunk give the whole resize."""
    from srbatch.metrics import resize

    monkeypatch.setattr(resize, "_CHUNK", chunk)
    x = _rand(2, 23, 19, seed=chunk)
    for scale in (3, 0.5, 1.7, (2, 0.6)):
        xs = x if scale != 0.5 else x[:, :22, :18]
        torch.testing.assert_close(imresize_fast(xs, scale).double(), imresize(xs.double(), scale), rtol=0, atol=TOL32)


def test_benchmark_bicubic_runs_and_rounds_like_matlab(capsys) -> None:
    """``jobs/benchmark.py bicubic`` (speed part, a small image): exit 0, both times and their ratio; the uint8 image
    it times is MATLAB's ``imresize`` of the uint8 input (``imresize_uint8``, float64) within one level, and the
    float64 path with its rounding is exactly ``imresize_uint8``."""
    import json

    from srbatch.benchmark import bicubic as bench
    from srbatch.metrics.resize import imresize_uint8

    assert bench.main(["--size", "60x40", "--repeat", "1", "--skip-accuracy", "--json"]) == 0
    out = capsys.readouterr().out
    r = json.loads(out.strip().splitlines()[-1])["speed"]
    assert r["output"] == "240x160" and r["pillow_s"] > 0 and r["fast_s"] > 0 and r["torch_threads"] >= 1
    assert r["ratio"] == pytest.approx(r["fast_s"] / r["pillow_s"]) and "ratio srbatch / Pillow" in out
    img, _ = bench.make_image((45, 31), None)  # the synthetic image (no reference data)
    want = imresize_uint8(img, 3).astype(int)
    got = bench._fast_uint8(build_model("bicubic", scale=3).module, img)
    assert got.shape == (93, 135, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want).max() <= 1 and (got != want).mean() < 1e-3
    assert np.array_equal(bench._exact_uint8(img, 3), want)
