"""TensorFlow frozen graphs (.pb) of ESPCN / FSRCNN against OpenCV's dnn_superres, the reference that runs them.

The oracle is ``cv2.dnn_superres.DnnSuperResImpl`` (opencv-contrib-python-headless 4.10.0.84, test extra): its
``upsample`` of every Set5 LR image, for every graph, against srbatch's engine output written as a PNG and read back.
"""

from __future__ import annotations

import dataclasses
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
    worst, differing, total, worst_rgb, rgb_sum = 0, 0, 0, 0, 0
    for lr in lrs:
        img = decode_image(lr.read_bytes(), name=str(lr))
        out = decode_image(encode_image(up.upscale_image(img), format="PNG")).pixels
        ref = opencv_sr(rel, lr)
        assert out.shape == ref.shape == (img.pixels.shape[0] * s, img.pixels.shape[1] * s, 3)
        d = np.abs(_cv_y(out) - _cv_y(ref))
        worst, differing, total = max(worst, int(d.max())), differing + int((d > 0).sum()), total + d.size
        drgb = np.abs(out.astype(np.int16) - ref.astype(np.int16))  # the chroma path shows in RGB, not in Y
        worst_rgb, rgb_sum = max(worst_rgb, int(drgb.max())), rgb_sum + int(drgb.sum())
    print(f"{rel}: largest Y difference vs OpenCV {worst} grey level(s), {differing / total:.4%} of pixels differ; "
          f"RGB: largest {worst_rgb}, mean {rgb_sum / (3 * total):.5f}")
    assert worst <= 1
    assert differing / total < 0.01  # off-by-one only where a value sits on a rounding edge
    # RGB: chroma that lands on a rounding tie after the bilinear resize rounds either way (OpenCV's float resize is
    # not reproduced bit for bit), so a few per cent of values differ by one level (x2, x4: 1/4 and 1/8 weights).
    assert worst_rgb <= 2 and rgb_sum / (3 * total) < 0.05


# One graph per scale and family in the default suite; the other six (same code path) run with the slow tests.
_EVAL_FAST = {
    "tf_espcn_fannymonori/ESPCN_x2.pb", "tf_fsrcnn_saafke/FSRCNN_x3.pb", "tf_fsrcnn_saafke/FSRCNN-small_x4.pb"
}


@pytest.mark.refs
@pytest.mark.parametrize("rel", [m if m in _EVAL_FAST else pytest.param(m, marks=pytest.mark.slow) for m in MODELS])
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
    g = _graph(
        [("Placeholder", "input", []), ("Conv3D", "body/conv3d", ["input"]), ("Erf", "gelu/erf", ["body/conv3d"])]
    )
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


# ---------------------------------------------------------------- ops the shipped graphs do not exercise
def _const(g, name: str, arr: np.ndarray) -> None:
    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2  # noqa: F401

    n = g.node.add()
    n.op, n.name = "Const", name
    t = n.attr["value"].tensor
    t.dtype = 1 if arr.dtype == np.float32 else 3
    for d in arr.shape:
        t.tensor_shape.dim.add().size = d
    t.tensor_content = arr.astype("<f4" if arr.dtype == np.float32 else "<i4").tobytes()


def _op(g, op: str, name: str, inputs: list[str], **attrs) -> None:
    n = g.node.add()
    n.op, n.name = op, name
    n.input.extend(inputs)
    for k, v in attrs.items():
        if isinstance(v, list):
            n.attr[k].list.i.extend(v)
        elif isinstance(v, str):
            n.attr[k].s = v.encode()
        elif isinstance(v, float):
            n.attr[k].f = v
        else:
            n.attr[k].i = v


def _np_conv_same(x: np.ndarray, w: np.ndarray, s: int) -> np.ndarray:
    """TensorFlow Conv2D, NHWC, SAME, stride s, float64 loops (pad_before = total // 2)."""
    n, h, wd, _ = x.shape
    k = w.shape[0]
    oh, ow = -(-h // s), -(-wd // s)
    th, tw = max((oh - 1) * s + k - h, 0), max((ow - 1) * s + k - wd, 0)
    xp = np.zeros((n, h + th, wd + tw, x.shape[3]))
    xp[:, th // 2 : th // 2 + h, tw // 2 : tw // 2 + wd] = x
    out = np.zeros((n, oh, ow, w.shape[3]))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, i * s : i * s + k, j * s : j * s + k, :]
            out[:, i, j] = np.einsum("nhwc,hwco->no", patch, w)
    return out


def _np_depth_to_space(x: np.ndarray, b: int) -> np.ndarray:
    n, h, w, c = x.shape
    co = c // (b * b)
    out = np.zeros((n, h * b, w * b, co))
    for i in range(h * b):
        for j in range(w * b):
            base = ((i % b) * b + (j % b)) * co
            out[:, i, j] = x[:, i // b, j // b, base : base + co]
    return out


def _np_deconv_same(x: np.ndarray, w: np.ndarray, s: int) -> np.ndarray:
    """TensorFlow conv2d_transpose (filter [k, k, out, in]), SAME, output in * s: scatter, then crop."""
    n, h, wd, _ = x.shape
    k = w.shape[0]
    full = np.zeros((n, (h - 1) * s + k, (wd - 1) * s + k, w.shape[2]))
    for i in range(h):
        for j in range(wd):
            full[:, i * s : i * s + k, j * s : j * s + k] += np.einsum("nc,hwoc->nhwo", x[:, i, j], w)
    t = max(k - s, 0) // 2
    return full[:, t : t + h * s, t : t + wd * s]


def test_generic_ops_match_float64_references():
    from tensorboard.compat.proto import graph_pb2

    from srbatch.models.tf_import import TFGraphModule
    from srbatch.weights.tfgraph import parse_tf_graph

    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(4, 4, 3, 8)).astype(np.float32) * 0.3  # even kernel, stride 2: asymmetric SAME padding
    b1 = rng.normal(size=(8,)).astype(np.float32)
    f2 = rng.normal(size=(3, 3, 3, 2)).astype(np.float32) * 0.3  # conv2d_transpose filter [k, k, out=3, in=2]
    g = graph_pb2.GraphDef()
    _op(g, "Placeholder", "x", [])
    _const(g, "f1", f1)
    _const(g, "b1", b1)
    _const(g, "f2", f2)
    _const(g, "sizes", np.array([1, 1, 1, 3], np.int32))  # TensorFlow's fixed output shape: not used
    _op(g, "Conv2D", "c1", ["x", "f1"], strides=[1, 2, 2, 1], padding="SAME", data_format="NHWC")
    _op(g, "BiasAdd", "bias", ["c1", "b1"], data_format="NHWC")
    _op(g, "LeakyRelu", "act", ["bias"], alpha=0.1)
    _op(g, "DepthToSpace", "d2s", ["act"], block_size=2, data_format="NHWC")
    _op(g, "Conv2DBackpropInput", "up", ["sizes", "f2", "d2s"], strides=[1, 2, 2, 1], padding="SAME")
    _op(g, "Identity", "out", ["up"])
    module = TFGraphModule(parse_tf_graph(g.SerializeToString()), output_nchw=False)
    x = rng.random((2, 9, 7, 3))
    ref = _np_conv_same(x, f1.astype(np.float64), 2) + b1
    ref = np.where(ref > 0, ref, 0.1 * ref)
    ref = _np_deconv_same(_np_depth_to_space(ref, 2), f2.astype(np.float64), 2)
    with torch.no_grad():
        out = module(torch.from_numpy(x).float().permute(0, 3, 1, 2)).permute(0, 2, 3, 1).double().numpy()
    assert out.shape == ref.shape == (2, 20, 16, 3)
    np.testing.assert_allclose(out, ref, atol=1e-4)


@pytest.mark.refs
def test_save_model_writes_a_reloadable_checkpoint(refs, tmp_path):
    from srbatch import save_model

    src = load_model(str(refs / "weights" / "tf_fsrcnn_saafke/FSRCNN-small_x4.pb"))
    with torch.no_grad():
        src.module.consts["b5"].add_(0.25)  # a "fine-tuned" weight must survive the round trip
    out = tmp_path / "fsrcnn_small_x4.safetensors"
    save_model(src, str(out))
    back = load_model(str(out))
    assert back.architecture == "tfgraph" and back.scale == 4 and back.color_space == "Y-OpenCV"
    x = torch.rand(1, 1, 10, 7)
    with torch.no_grad():
        torch.testing.assert_close(back.module(x), src.module(x), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="--scale 4"):
        load_model(str(out), scale=2)


@pytest.mark.refs
def test_graph_cut_at_a_node_boundary_is_refused(refs, tmp_path):
    """A file truncated between two nodes still parses; the missing node is named."""
    from tensorboard.compat.proto import graph_pb2

    g = graph_pb2.GraphDef()
    g.ParseFromString((refs / "weights" / "tf_espcn_fannymonori/ESPCN_x4.pb").read_bytes())
    kept = [n for n in g.node if n.name != "f2"]
    del g.node[:]
    g.node.extend(kept)
    p = tmp_path / "ESPCN_x4_cut.pb"
    p.write_bytes(g.SerializeToString())
    with pytest.raises(WeightsError, match=r"ESPCN_x4_cut\.pb: node 'conv2' \(Conv2D\) reads 'f2'.*truncated"):
        load_model(str(p))


@pytest.mark.refs
def test_tiles_and_memory_regions_give_the_untiled_pixels(refs, monkeypatch):
    """The halo covers the convolutions and the chroma's bilinear resize: tiled and banded output equal untiled."""
    from srbatch.inference import TilingConfig

    desc = load_model(str(refs / "weights" / "tf_fsrcnn_saafke/FSRCNN-small_x2.pb"))
    lr = _lr_paths(refs, 2)[2]
    small = decode_image(lr.read_bytes())
    img = dataclasses.replace(small, pixels=np.ascontiguousarray(np.tile(small.pixels, (2, 2, 1))))
    whole = Upscaler(desc, device="cpu").upscale_image(img).pixels
    tiled = Upscaler(desc, device="cpu", tiling=TilingConfig(tile=64)).upscale_image(img).pixels
    monkeypatch.setattr("srbatch.inference.upscaler.PROBE_PIXELS", 64 * 64)  # plan regions for this small image
    up = Upscaler(desc, device="cpu", max_memory="32MiB")
    banded = up.upscale_image(img).pixels
    assert up.last_plan is not None and up.last_plan.tiled
    for got in (tiled, banded):
        d = np.abs(got.astype(int) - whole.astype(int))
        assert d.max() <= 1 and (d > 0).mean() < 1e-4  # float summation order only


@pytest.mark.slow
@pytest.mark.refs
def test_upscale_job_runs_a_pb_from_s3(ray_cluster, s3_bucket, refs, opencv_sr):
    """`srbatch upscale --model s3://.../ESPCN_x3.pb`: the Ray job reads the graph from object storage; every output
    matches OpenCV on Y."""
    import s3fs

    from srbatch.upscale import UpscaleConfig, read_manifest, run_job

    rel = "tf_espcn_fannymonori/ESPCN_x3.pb"
    fs = s3fs.S3FileSystem()
    fs.pipe_file(f"{s3_bucket}/models/ESPCN_x3.pb", (refs / "weights" / rel).read_bytes())
    lrs = _lr_paths(refs, 3)
    for lr in lrs:
        fs.pipe_file(f"{s3_bucket}/in/{lr.name}", lr.read_bytes())
    res = run_job(UpscaleConfig(input=f"s3://{s3_bucket}/in/", output=f"s3://{s3_bucket}/out/", progress=False,
                                model=f"s3://{s3_bucket}/models/ESPCN_x3.pb", scale=3))  # fmt: skip
    assert (res.ok, res.failed) == (5, 0)
    rows = read_manifest(f"s3://{s3_bucket}/out/").to_pandas()
    assert set(rows.architecture) == {"tfgraph"}
    fs.invalidate_cache()
    for lr in lrs:
        out = decode_image(fs.cat_file(f"{s3_bucket}/out/{lr.name}")).pixels
        assert np.abs(_cv_y(out) - _cv_y(opencv_sr(rel, lr))).max() <= 1, lr.name
