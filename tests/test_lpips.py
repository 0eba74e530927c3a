"""LPIPS v0.1 against the reference ``lpips`` package (0.1.4): both built from the SAME random trunk weights and the
heads its wheel ships, srbatch's through its own weights file and make command; nothing downloaded (see _lpips_ref)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from _lpips_ref import ref_distance, reference, write_weights
from srbatch.errors import ConfigError
from srbatch.metrics.lpips import load_lpips, lpips_distance

pytest.importorskip("lpips")


class Foreign:
    """A class a state dict must not hold: ``torch.load(weights_only=True)`` refuses to unpickle it."""


@pytest.fixture(scope="module")
def set5_pairs(refs):
    """Real pairs from Set5 x4 (crops of the bird, 128x128, and of the baby, 96x128; small, so that VGG on a shared
    2-core machine stays quick): HR vs the LR upscaled with PIL's bicubic, vs a noisy copy (sigma 8 and 30), vs
    itself."""
    folder = refs / "sets" / "Set5" / "image_SRF_4"
    out = {}
    rng = np.random.default_rng(7)
    for name, box in (("img_002_SRF_4", (64, 64, 192, 192)), ("img_001_SRF_4", (200, 180, 296, 308))):
        hr_im = Image.open(folder / f"{name}_HR.png").convert("RGB")
        lr_im = Image.open(folder / f"{name}_LR.png").convert("RGB")
        up = lr_im.resize(hr_im.size, Image.Resampling.BICUBIC)
        hr_im, up = hr_im.crop(box), up.crop(box)
        hr = np.asarray(hr_im)
        noise = rng.standard_normal(hr.shape)
        out[name] = {
            "hr": hr,
            "bicubic": np.asarray(up),
            "noisy8": np.clip(np.rint(hr + 8 * noise), 0, 255).astype(np.uint8),
            "noisy30": np.clip(np.rint(hr + 30 * noise), 0, 255).astype(np.uint8),
            "self": hr.copy(),
        }
    return out


@pytest.mark.refs
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_matches_reference_package(net, set5_pairs, tmp_path):
    ref = reference(net, tmp_path)
    mine = load_lpips(str(write_weights(ref, net, tmp_path)))
    assert mine.net == net
    for name, imgs in set5_pairs.items():
        hr = imgs["hr"]
        got = {k: lpips_distance(mine, v, hr) for k, v in imgs.items() if k != "hr"}
        want = {k: ref_distance(ref, v, hr) for k, v in imgs.items() if k != "hr"}
        print(net, name, {k: f"{got[k]:.6f}/{want[k]:.6f}" for k in got})
        for k in got:
            assert got[k] == pytest.approx(want[k], abs=1e-5), (net, name, k)
        assert got["self"] == 0.0
        assert got["noisy30"] > got["noisy8"] > 0  # stronger distortion, larger distance
        assert got["bicubic"] > 0.001


@pytest.mark.refs
def test_grey_and_border_as_documented(set5_pairs, tmp_path):
    """Grey images are replicated to RGB; ``crop_border`` shaves that many pixels off each side first."""
    ref = reference("alex", tmp_path)
    mine = load_lpips(str(write_weights(ref, "alex", tmp_path)))
    imgs = set5_pairs["img_002_SRF_4"]
    g_hr, g_sr = imgs["hr"][..., 1], imgs["bicubic"][..., 1]  # one channel as a grey image
    assert lpips_distance(mine, g_sr[..., None], g_hr[..., None]) == pytest.approx(ref_distance(ref, g_sr, g_hr),
                                                                                  abs=1e-5)  # fmt: skip
    b = 4
    crop = (slice(b, -b), slice(b, -b))
    got = lpips_distance(mine, imgs["bicubic"], imgs["hr"], crop_border=b)
    assert got == pytest.approx(ref_distance(ref, imgs["bicubic"][crop], imgs["hr"][crop]), abs=1e-5)
    assert abs(got - lpips_distance(mine, imgs["bicubic"], imgs["hr"])) > 1e-5  # the border does change it


def test_reads_fsspec_uris_and_refuses_bad_files(tmp_path):
    """Any fsspec URI is read (memory:// here); a missing, foreign, incomplete or negative-head file is a ConfigError
    that names the file and the make command; unsafe pickles are refused by the maker."""
    import fsspec
    from safetensors.torch import load_file, save_file

    ref = reference("alex", tmp_path)
    good = write_weights(ref, "alex", tmp_path)
    with fsspec.open("memory://lpips/w.safetensors", "wb") as f:
        f.write(good.read_bytes())
    m = load_lpips("memory://lpips/w.safetensors")
    x = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    y = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    assert lpips_distance(m, x, y) == pytest.approx(ref_distance(ref, x, y), abs=1e-5)

    def refused(path, *words):
        with pytest.raises(ConfigError) as e:
            load_lpips(str(path))
        msg = str(e.value)
        assert str(path) in msg and "python -m srbatch.metrics.lpips make" in msg and "lpips" in msg, msg
        for w in words:
            assert w in msg, (w, msg)

    refused(tmp_path / "missing.safetensors", "cannot be read")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    refused(tmp_path / "junk.safetensors", "not a safetensors file")
    tensors = load_file(good)
    save_file(tensors, tmp_path / "nometa.safetensors")
    refused(tmp_path / "nometa.safetensors", "not an srbatch LPIPS file")
    meta = {"format": "srbatch-lpips", "net": "alex", "version": "0.1"}
    save_file({k: v for k, v in tensors.items() if k != "heads.4.weight"}, tmp_path / "nohead.safetensors", meta)
    refused(tmp_path / "nohead.safetensors", "heads.4.weight")
    save_file(tensors, tmp_path / "asvgg.safetensors", {**meta, "net": "vgg"})
    refused(tmp_path / "asvgg.safetensors")
    save_file({**tensors, "heads.0.weight": -tensors["heads.0.weight"] - 0.1}, tmp_path / "neg.safetensors", meta)
    refused(tmp_path / "neg.safetensors", "negative")

    torch.save({"features.0.weight": Foreign()}, tmp_path / "evil.pth")
    from srbatch.metrics.lpips import main

    evil = str(tmp_path / "evil.pth")
    made = tmp_path / "x.safetensors"
    assert main(["make", "--net", "alex", "--backbone", evil, "--heads", evil, "-o", str(made)]) == 2
    assert not (tmp_path / "x.safetensors").exists()
