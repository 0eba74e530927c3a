"""The temporal architecture (EFVSR, frames t-r .. t+r) and the engine's ``upscale_frames``: shapes, a float64
functional re-computation of the forward, detection, tiles == whole window, neighbours actually used (and ignored by
image models), image models through ``upscale_frames`` == ``upscale_array`` of the centre frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from srbatch import build_model, load_model, save_model
from srbatch.errors import ConfigError
from srbatch.inference import Upscaler
from srbatch.inference.tiling import TilingConfig
from srbatch.io.images import from_float
from srbatch.models.archs import efvsr
from srbatch.models.loader import detect_architecture


def _model(**kw):
    torch.manual_seed(0)
    m = efvsr.EFVSR(**{"scale": 2, "channels": 3, "radius": 1, "n_feats": 8, "n_blocks": 2, **kw}).eval()
    with torch.no_grad():  # a tail of normal size, so every path carries weight in the comparisons
        m.tail.weight.normal_(0, 0.1)
        m.tail.bias.normal_(0, 0.05)
    return m


def _reference(sd: dict[str, torch.Tensor], x: torch.Tensor, *, scale: int, radius: int, n_blocks: int) -> torch.Tensor:
    """The forward written from the module docs with torch functional ops, in float64, from the state dict."""
    w = {k: v.double() for k, v in sd.items()}
    x = x.double()
    n, t, c, h, wd = x.shape
    f = F.relu(F.conv2d(x.reshape(n, t * c, h, wd), w["head.weight"], w["head.bias"], padding=1))
    for i in range(n_blocks):
        r = F.relu(F.conv2d(f, w[f"blocks.{i}.conv1.weight"], w[f"blocks.{i}.conv1.bias"], padding=1))
        f = f + F.conv2d(r, w[f"blocks.{i}.conv2.weight"], w[f"blocks.{i}.conv2.bias"], padding=1)
    res = F.pixel_shuffle(F.conv2d(f, w["tail.weight"], w["tail.bias"], padding=1), scale)
    up = F.interpolate(x[:, radius], scale_factor=scale, mode="bilinear", align_corners=False)
    return up + res


@pytest.mark.parametrize(("channels", "radius", "scale"), [(3, 1, 2), (1, 2, 3), (3, 0, 4)])
def test_forward_shapes_and_float64_recomputation(channels, radius, scale):
    m = _model(channels=channels, radius=radius, scale=scale)
    t = 2 * radius + 1
    x = torch.rand(2, t, channels, 10, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = m(x)
        packed = m(x.flatten(1, 2))
    assert y.shape == (2, channels, 10 * scale, 12 * scale)
    assert torch.equal(packed, y)
    ref = _reference(m.state_dict(), x, scale=scale, radius=radius, n_blocks=2)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-5)
    # a single frame is the window of that frame repeated
    with torch.no_grad():
        single = m(x[:, radius])
    ref1 = _reference(m.state_dict(), x[:, radius : radius + 1].repeat(1, t, 1, 1, 1), scale=scale, radius=radius,
                      n_blocks=2)  # fmt: skip
    torch.testing.assert_close(single.double(), ref1, rtol=0, atol=2e-5)
    with pytest.raises(ConfigError, match="expects"):
        m(torch.rand(1, t + 1, channels, 8, 8))


def test_info_detect_and_round_trip(tmp_path):
    info = efvsr.info({"scale": 4, "radius": 2, "n_blocks": 3})
    assert info.temporal_radius == 2 and info.receptive_halo == 2 + 6 + 1
    assert build_model("espcn", scale=2).info.temporal_radius == 0
    # (C=1, r=1) and (C=3, r=0) both have 3 head inputs: the tail (C * s^2) tells them apart
    for hp in ({"channels": 1, "radius": 1}, {"channels": 3, "radius": 0}, {"channels": 3, "radius": 2}):
        m = efvsr.EFVSR(scale=2, n_feats=8, n_blocks=1, **hp)
        claims = detect_architecture(m.state_dict())
        assert [a for a, _ in claims] == ["efvsr"]
        assert claims[0][1].hparams == {"scale": 2, "n_feats": 8, "n_blocks": 1, **hp}
    desc = build_model("efvsr-r1", scale=2)
    save_model(desc, str(tmp_path / "m.safetensors"))
    back = load_model(str(tmp_path / "m.safetensors"))
    assert back.info.temporal_radius == 1 and back.hparams == desc.hparams


def _frames(n: int, h: int = 20, w: int = 24, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def _desc(module):
    from srbatch.models.descriptor import ModelDescriptor

    return ModelDescriptor(module=module, architecture="efvsr", info=efvsr.info({"scale": module.scale,
                           "channels": module.channels, "radius": module.radius, "n_blocks": len(module.blocks)}),
                           hparams={}, name="t")  # fmt: skip


def test_upscale_frames_equals_the_module_on_the_window_and_tiles_match():
    m = _model()
    win = _frames(3, 40, 44)
    whole = Upscaler(_desc(m), device="cpu", tiling=TilingConfig(tile=0)).upscale_frames(win)
    # independent path: the module called directly on the (1, T, C, H, W) window, clamped and rounded half up
    x = torch.from_numpy(np.stack(win).astype(np.float32) / 255).permute(0, 3, 1, 2)[None]
    with torch.no_grad():
        direct = from_float(m(x)[0].permute(1, 2, 0).numpy(), np.uint8)
    assert whole.dtype == np.uint8 and whole.shape == (80, 88, 3)
    assert np.abs(whole.astype(int) - direct).max() <= 1 and (whole != direct).mean() < 1e-3
    tiled_up = Upscaler(_desc(m), device="cpu", tiling=TilingConfig(tile=12, batch_size=3))
    tiled = tiled_up.upscale_frames(win)
    assert tiled_up.stats["tiles"] >= 9
    assert np.abs(tiled.astype(int) - whole).max() <= 1 and (tiled != whole).mean() < 1e-3
    # float frames: float output, tiles equal to float rounding
    wf = [f.astype(np.float32) / 255 for f in win]
    a = Upscaler(_desc(m), device="cpu", tiling=TilingConfig(tile=0)).upscale_frames(wf)
    b = Upscaler(_desc(m), device="cpu", tiling=TilingConfig(tile=12)).upscale_frames(wf)
    assert a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_the_temporal_model_uses_its_neighbours_an_image_model_does_not():
    win = _frames(3, seed=1)
    other = _frames(1, seed=9)[0]
    temporal = Upscaler(_desc(_model()), device="cpu")
    base = temporal.upscale_frames(win)
    assert not np.array_equal(temporal.upscale_frames([other, win[1], win[2]]), base)
    assert not np.array_equal(temporal.upscale_frames([win[0], win[1], other]), base)
    per_frame = Upscaler(_desc(_model(radius=0)), device="cpu")
    image = Upscaler(build_model("espcn", scale=2), device="cpu")
    for up in (per_frame, image):
        b = up.upscale_frames(win)
        assert np.array_equal(up.upscale_frames([other, win[1], win[2]]), b)
        assert not np.array_equal(up.upscale_frames([win[0], other, win[2]]), b)
        assert np.array_equal(up.upscale_frames([win[1]]), b)  # a window of one frame: the same


def test_image_model_through_upscale_frames_is_upscale_array_of_the_centre():
    win = _frames(3, seed=2)
    desc = build_model("espcn", scale=2)  # YCbCr model: the colour path is exercised
    up = Upscaler(desc, device="cpu")
    got = up.upscale_frames(win)
    want = from_float(up.upscale_array(win[1]), np.uint8)
    assert np.array_equal(got, want)


def test_bad_windows_are_refused():
    up = Upscaler(_desc(_model()), device="cpu")
    win = _frames(3)
    with pytest.raises(ConfigError, match="odd number"):
        up.upscale_frames(win[:2])
    with pytest.raises(ConfigError, match="takes 3 frames"):
        up.upscale_frames(_frames(5))
    with pytest.raises(ConfigError, match="must match"):
        up.upscale_frames([win[0], win[1][:10], win[2]])


def test_video_path_with_a_temporal_model_matches_windows_computed_here(tmp_path):
    """srbatch.video's local driver (segments with overlap = radius, FFV1 bgr0: lossless) calling upscale_frames
    gives, frame for frame, the upscale of the window t-1, t, t+1 built here with edge frames repeated."""
    from fractions import Fraction

    from srbatch.train.clips import read_clip
    from srbatch.video import encode_segment, upscale_video_local

    frames = _frames(7, 16, 20, seed=4)
    src, dst = str(tmp_path / "in.mkv"), str(tmp_path / "out.mkv")
    encode_segment(((t, f) for t, f in enumerate(frames)), src, fps=Fraction(25), time_base=Fraction(1, 25),
                   codec="ffv1", pix_fmt="bgr0", options={"g": "3"})  # fmt: skip
    up = Upscaler(_desc(_model()), device="cpu")
    upscale_video_local(src, dst, up.upscale_frames, radius=1, segment_frames=3, codec="ffv1", pix_fmt="bgr0")
    got = read_clip(dst)
    n = len(frames)
    want = [up.upscale_frames([frames[max(t - 1, 0)], frames[t], frames[min(t + 1, n - 1)]]) for t in range(n)]
    assert got.shape == (7, 32, 40, 3)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
