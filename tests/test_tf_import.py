"""TensorFlow frozen graphs (.pb) of ESPCN / FSRCNN against OpenCV's dnn_superres, the reference that runs them.

The oracle is ``cv2.dnn_superres.DnnSuperResImpl`` (opencv-contrib-python-headless 4.10.0.84, test extra): its
``upsample`` of every Set5 LR image, for every graph, against srbatch's engine output written as a PNG and read back.
"""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from srbatch import load_model
from srbatch.errors import ConfigError, WeightsError
from srbatch.inference import Upscaler
from srbatch.io.images import decode_image, encode_image
from srbatch.metrics.quality import measure

cv2 = pytest.importorskip("cv2")

MODELS = [
    *(f"tf_espcn_fannymonori/ESPCN_x{s}.pb" for s in (2, 3, 4)),
    *(f"tf_fsrcnn_saafke/FSRCNN{v}_x{s}.pb" for v in ("", "-small") for s in (2, 3, 4)),
]


def _scale(rel: str) -> int:
    return int(rel[-4])


def _lr_paths(refs: Path, s: int) -> list[Path]:
    return sorted((refs / "sets" / "Set5" / f"image_SRF_{s}").glob("*_LR.png"))


def _cv_y(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2YCrCb)[..., 0].astype(np.int16)


@pytest.fixture(scope="module")
def opencv_sr(refs):
    """OpenCV's RGB output for (model, LR image), computed once per module."""
    cache: dict[tuple[str, str], np.ndarray] = {}

    def get(rel: str, lr: Path) -> np.ndarray:
        key = (rel, lr.name)
        if key not in cache:
            sr = cv2.dnn_superres.DnnSuperResImpl_create()
            sr.readModel(str(refs / "weights" / rel))
            sr.setModel("espcn" if "ESPCN" in rel else "fsrcnn", _scale(rel))
            bgr = cv2.imread(str(lr), cv2.IMREAD_COLOR)
            cache[key] = np.ascontiguousarray(sr.upsample(bgr)[..., ::-1])
        return cache[key]

    return get


@pytest.mark.refs
@pytest.mark.parametrize("rel", MODELS)
def test_engine_output_matches_opencv(refs, opencv_sr, rel):
    s = _scale(rel)
    desc = load_model(str(refs / "weights" / rel))
    assert desc.scale == s and desc.color_space == "Y-OpenCV" and desc.in_channels == desc.out_channels == 1
    up = Upscaler(desc, device="cpu")
    lrs = _lr_paths(refs, s)
    assert len(lrs) == 5
    worst, differing, total = 0, 0, 0
    for lr in lrs:
        img = decode_image(lr.read_bytes(), name=str(lr))
        out = decode_image(encode_image(up.upscale_image(img), format="PNG")).pixels
        ref = opencv_sr(rel, lr)
        assert out.shape == ref.shape == (img.pixels.shape[0] * s, img.pixels.shape[1] * s, 3)
        d = np.abs(_cv_y(out) - _cv_y(ref))
        worst, differing, total = max(worst, int(d.max())), differing + int((d > 0).sum()), total + d.size
    print(f"{rel}: largest Y difference vs OpenCV {worst} grey level(s), {differing / total:.4%} of pixels differ")
    assert worst <= 1
    assert differing / total < 0.01  # off-by-one only where a value sits on a rounding edge


@pytest.mark.refs
@pytest.mark.parametrize("rel", MODELS)
def test_evaluate_psnr_matches_opencv_images(refs, opencv_sr, rel):
    from srbatch.cli import main

    s = _scale(rel)
    folder = refs / "sets" / "Set5" / f"image_SRF_{s}"
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["evaluate", "--model", str(refs / "weights" / rel), "--scale", str(s), "--device", "cpu",
                   "--hr", str(folder / "*_HR.png"), "--lr", str(folder / "*_LR.png"), "--json"])  # fmt: skip
    assert rc == 0
    got = json.loads(buf.getvalue().strip().splitlines()[-1])
    ours = {r["image"]: r["psnr_y"] for r in got["images"]}
    theirs = {}
    for lr in _lr_paths(refs, s):
        hr = decode_image(lr.with_name(lr.name.replace("_LR", "_HR")).read_bytes()).pixels
        theirs[lr.stem.replace("_LR", "")] = measure(opencv_sr(rel, lr), hr, crop_border=s).psnr_y
    assert set(ours) == set(theirs) and got["n_images"] == 5
    mean_cv = float(np.mean(list(theirs.values())))
    print(f"{rel}: PSNR_Y srbatch {got['psnr_y']:.4f} dB, OpenCV {mean_cv:.4f} dB")
    assert abs(got["psnr_y"] - mean_cv) <= 0.02
    for k in ours:
        assert abs(ours[k] - theirs[k]) <= 0.02, k


@pytest.mark.refs
def test_grey_image_matches_opencv(refs):
    """A grey (1-channel) image: OpenCV runs the plane itself as Y and returns the network's Y in 8 bits."""
    rel = "tf_fsrcnn_saafke/FSRCNN_x3.pb"
    lr = _lr_paths(refs, 3)[1]
    grey = cv2.imread(str(lr), cv2.IMREAD_GRAYSCALE)
    sr = cv2.dnn_superres.DnnSuperResImpl_create()
    sr.readModel(str(refs / "weights" / rel))
    sr.setModel("fsrcnn", 3)
    ref = sr.upsample(grey)
    up = Upscaler(load_model(str(refs / "weights" / rel)), device="cpu")
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(grey).save(buf, format="PNG")
    out = up.upscale_image(decode_image(buf.getvalue())).pixels
    assert out.shape[:2] == ref.shape
    assert np.abs(out[..., 0].astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.refs
def test_graph_runner_matches_opencv_network(refs):
    """The module alone (Y in, Y out, float) against OpenCV's dnn forward of the same graph, per graph."""
    cv2.dnn_superres.DnnSuperResImpl_create()  # registers OpenCV's DepthToSpace layer
    lr = _lr_paths(refs, 4)[0]
    y = cv2.cvtColor(cv2.imread(str(lr)), cv2.COLOR_BGR2YCrCb)[..., 0].astype(np.float32) / 255
    for rel in MODELS:
        net = cv2.dnn.readNetFromTensorflow(str(refs / "weights" / rel))
        net.setInput(cv2.dnn.blobFromImage(y))
        ref = net.forward()
        with torch.no_grad():
            out = load_model(str(refs / "weights" / rel)).module(torch.from_numpy(y)[None, None]).numpy()
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() * 255 < 0.01, rel


@pytest.mark.refs
def test_scale_comes_from_the_graph(refs):
    path = str(refs / "weights" / "tf_espcn_fannymonori/ESPCN_x2.pb")
    assert load_model(path, scale=2).scale == 2
    with pytest.raises(ConfigError, match=r"x2 model but scale 3.*--scale 2"):
        load_model(path, scale=3)


@pytest.mark.refs
def test_reads_fsspec_uris(refs):
    import fsspec

    data = (refs / "weights" / "tf_fsrcnn_saafke/FSRCNN-small_x3.pb").read_bytes()
    with fsspec.open("memory://tfpb/FSRCNN-small_x3.pb", "wb") as f:
        f.write(data)
    desc = load_model("memory://tfpb/FSRCNN-small_x3.pb")
    local = load_model(str(refs / "weights" / "tf_fsrcnn_saafke/FSRCNN-small_x3.pb"))
    assert desc.scale == 3 and desc.sha256 == local.sha256
    x = torch.rand(1, 1, 9, 11)
    with torch.no_grad():
        assert torch.equal(desc.module(x), local.module(x))


def _graph(ops: list[tuple[str, str, list[str]]]):
    from tensorboard.compat.proto import graph_pb2

    g = graph_pb2.GraphDef()
    for op, name, inputs in ops:
        n = g.node.add()
        n.op, n.name = op, name
        n.input.extend(inputs)
    return g


def test_unknown_ops_are_named(tmp_path):
    g = _graph([("Placeholder", "input", []), ("Conv3D", "body/conv3d", ["input"]), ("Erf", "gelu/erf", ["body/conv3d"])])
    p = tmp_path / "odd.pb"
    p.write_bytes(g.SerializeToString())
    with pytest.raises(ConfigError) as ei:
        load_model(str(p))
    msg = str(ei.value)
    assert "odd.pb" in msg and "Conv3D (node 'body/conv3d')" in msg and "Erf (node 'gelu/erf')" in msg
    assert "Conv2D" in msg and "DepthToSpace" in msg  # says what is supported


@pytest.mark.refs
@pytest.mark.parametrize("cut", [0.5, 0.97])
def test_truncated_graph_is_refused_naming_the_file(refs, tmp_path, cut):
    data = (refs / "weights" / "tf_espcn_fannymonori/ESPCN_x4.pb").read_bytes()
    p = tmp_path / "ESPCN_x4_truncated.pb"
    p.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(WeightsError, match=re.escape(str(p))):
        load_model(str(p))


def test_not_a_graph_is_refused_naming_the_file(tmp_path):
    p = tmp_path / "photo.pb"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(WeightsError, match="photo.pb"):
        load_model(str(p))
