"""ONNX export (srbatch.export): every registered architecture (tiny hyper-parameters, random weights) exported once,
then run by onnxruntime on real Set5 crops at two sizes (odd, H != W, batch 1 and 2) through the same file and
compared with the PyTorch module (the independent path); the descriptor round-trips through the metadata; the CLI
writes a file onnxruntime runs; bad input gets a clear error; an exported file runs through the engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from srbatch import build_model
from srbatch.errors import ConfigError
from srbatch.export import DEFAULT_OPSET, META_PREFIX, export_model
from srbatch.inference.colorspace import to_model_space
from srbatch.models.registry import ARCHITECTURES

TOL = 1e-4
"""|onnxruntime - PyTorch| allowed on real crops (float32 reordering measures 1e-7..3e-6 here; outputs in [0, 1])."""

# Tiny hyper-parameters so that every export takes a second or two; an architecture missing here is exported with
# its defaults at scale 2, so a new registry entry is covered (slowly) without touching this file.
TINY: dict[str, dict[str, Any]] = {
    "bicubic": {}, "nearest": {}, "srcnn": {"n1": 8, "n2": 4}, "fsrcnn": {"d": 8, "s": 4, "m": 1},
    "espcn": {"n1": 8, "n2": 4, "channels": 1}, "vdsr": {"num_layers": 3, "num_features": 8},
    "edsr": {"n_resblocks": 1, "n_feats": 8}, "mdsr": {"n_resblocks": 1, "n_feats": 8},
    "srresnet": {"num_feat": 8, "num_block": 1}, "rrdbnet": {"num_feat": 8, "num_block": 1, "num_grow_ch": 4},
    "imdn": {"nf": 16, "num_modules": 1}, "wdsr": {"n_resblocks": 1, "n_feats": 8, "block_feats": 16},
    "dbpn": {"feat": 8, "base_filter": 8, "num_stages": 2},
    "srfbn": {"num_features": 8, "num_steps": 2, "num_groups": 2},
    "vae": {"scale": 1, "num_feat": 4, "levels": 2, "num_block": 1, "latent_channels": 3},
}  # fmt: skip
UNEXPORTABLE = {"bicubic": "SymInt"}
"""Architectures torch.onnx cannot export with dynamic sizes, with the reason the error must carry: bicubic's MATLAB
polyphase plan is built in Python from the input size."""


def _crop(refs, shape: tuple[int, ...], color_space: str, seed: int) -> torch.Tensor:
    """A real image: ``shape`` crops of Set5 HR images in the model's colour space (float32 in [0, 1])."""
    n, c, h, w = shape
    names = sorted((refs / "sets/Set5/image_SRF_2").glob("*_HR.png"))
    out = []
    for i in range(n):
        rgb = np.asarray(Image.open(names[(seed + i) % len(names)]).convert("RGB"), dtype=np.float32) / 255.0
        y0, x0 = 37 * (i + 1), 41 * (i + 2)
        t = torch.from_numpy(rgb[y0 : y0 + h, x0 : x0 + w]).permute(2, 0, 1)[None]
        if color_space == "L":
            t = t.mean(1, keepdim=True)
        out.append(to_model_space(t, color_space)[:, :c])
    return torch.cat(out)


def _ort_run(path: str, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    return sess.run(None, {"input": x.numpy()})[0]


def _build(name: str) -> Any:
    torch.manual_seed(0)
    hp = {"scale": 2, **TINY.get(name, {})}
    return build_model(name, **hp)


@pytest.mark.refs
@pytest.mark.parametrize("arch", [a.name for a in ARCHITECTURES])
def test_every_architecture_exports_and_matches_torch_on_real_crops(arch, refs, tmp_path, record_property):
    import onnx

    desc = _build(arch)
    path = str(tmp_path / f"{arch}.onnx")
    if arch in UNEXPORTABLE:
        with pytest.raises(ConfigError, match=f"{arch} .*cannot export.*{UNEXPORTABLE[arch]}"):
            export_model(desc, path)
        assert not os.path.exists(path)
        return
    res = export_model(desc, path)
    assert res.opset == DEFAULT_OPSET and res.max_abs_diff <= 1e-3
    m = max(desc.info.size_multiple, 1)
    diffs = []
    for i, (n, h, w) in enumerate([(1, 27, 19), (2, 16, 34)]):  # odd, H != W, not multiples of 8; batch 2
        h, w = m * -(-h // m), m * -(-w // m)
        frames = 2 * desc.info.temporal_radius + 1  # a temporal model takes its window packed on channels
        x = torch.cat([_crop(refs, (n, desc.in_channels, h, w), desc.color_space, seed=i + k) for k in range(frames)], 1)
        with torch.inference_mode():
            ref = desc.module(x).numpy()
        got = _ort_run(path, x)
        s = 1 if desc.input_upsampled else desc.scale
        assert got.shape == ref.shape == (n, desc.out_channels, h * s, w * s)
        diffs.append(float(np.abs(got - ref).max()))
    record_property("max_abs_diff", max(diffs))
    print(f"{arch}: onnxruntime vs torch max abs diff {max(diffs):.2e} on Set5 crops {diffs}")
    assert max(diffs) <= TOL, diffs
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert meta[META_PREFIX + "architecture"] == arch
    assert int(meta[META_PREFIX + "scale"]) == desc.scale and int(meta[META_PREFIX + "opset"]) == DEFAULT_OPSET
    assert meta[META_PREFIX + "color_space"] == desc.color_space
    assert json.loads(meta[META_PREFIX + "input_upsampled"]) == desc.input_upsampled
    assert int(meta[META_PREFIX + "size_multiple"]) == desc.info.size_multiple
    assert int(meta[META_PREFIX + "halo"]) == desc.info.receptive_halo
    assert json.loads(meta[META_PREFIX + "hparams"]) == json.loads(json.dumps(desc.hparams, default=list))


def test_spandrel_model_exports(tmp_path):
    """A spandrel checkpoint (Compact) through the same path, checked on a size the export never saw."""
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact

    from srbatch import load_model

    torch.manual_seed(0)
    ckpt = tmp_path / "compact.safetensors"
    save_file({k: v.contiguous() for k, v in Compact(num_feat=8, num_conv=2, upscale=2).state_dict().items()}, ckpt)
    res = export_model(str(ckpt), str(tmp_path / "compact.onnx"))
    assert res.architecture == "spandrel:Compact" and res.max_abs_diff <= TOL
    x = torch.rand(1, 3, 11, 21)
    with torch.inference_mode():
        ref = load_model(str(ckpt)).module(x).numpy()
    assert np.abs(_ort_run(str(tmp_path / "compact.onnx"), x) - ref).max() <= TOL


@pytest.mark.slow
def test_spandrel_swinir_is_refused(tmp_path):
    """SwinIR computes its attention mask and padding from the sample size in Python: refused, nothing written."""
    from safetensors.torch import save_file
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(0)
    swin = SwinIR(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, upscale=2,
                  upsampler="pixelshuffledirect")  # fmt: skip
    ckpt = tmp_path / "swinir.safetensors"
    save_file({k: v.contiguous() for k, v in swin.state_dict().items()}, ckpt)
    out = tmp_path / "swinir.onnx"
    with pytest.raises(ConfigError, match="spandrel:SwinIR .*(cannot export|does not reproduce PyTorch)"):
        export_model(str(ckpt), str(out))
    assert not out.exists()


def test_verification_catches_a_graph_that_baked_in_its_sample_size(tmp_path):
    """The check export_model runs before writing: a graph traced by the TorchScript exporter (which records
    bicubic's Python size arithmetic as constants) gives a wrong output shape at another size, and is caught."""
    import warnings

    from srbatch.export import verify_onnx

    desc = build_model("bicubic", scale=2)
    sample = torch.rand(1, 3, 20, 28)
    path = tmp_path / "traced.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(desc.module, (sample,), str(path), dynamo=False, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}})  # fmt: skip
    checks = verify_onnx(path.read_bytes(), desc.module, [sample, torch.rand(1, 3, 20, 28), torch.rand(2, 3, 13, 17)])
    assert checks[2] == ((2, 3, 13, 17), float("inf"))  # another size: wrong shape, caught


def test_bad_input_gets_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown export format 'tflite'; supported: onnx"):
        export_model("nearest", str(tmp_path / "m.onnx"), format="tflite", scale=2)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write .*a_file is not a writable folder"):
        export_model("nearest", str(blocker / "m.onnx"), scale=2)
    with pytest.raises(ConfigError, match="is a folder"):
        export_model("nearest", str(tmp_path), scale=2)
    with pytest.raises(ConfigError, match="opset between 7 and 25"):
        export_model("nearest", str(tmp_path / "m.onnx"), scale=2, opset=3)
    with pytest.raises(ConfigError, match="invalid arguments for architecture 'espcn'"):
        export_model("espcn", str(tmp_path / "m.onnx"), scale=2, model_args={"no_such": 1})
    assert not (tmp_path / "m.onnx").exists()


def test_foreign_onnx_file_is_refused_by_load_model(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from srbatch import load_model
    from srbatch.errors import WeightsError

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, "h", "w"])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 3, "h", "w"])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "g", [x], [y])
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(WeightsError, match="without srbatch metadata .*srbatch.scale missing.*srbatch export"):
        load_model(str(path))
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(WeightsError, match="junk.onnx: not a readable ONNX file"):
        load_model(str(tmp_path / "junk.onnx"))


def test_cli_writes_a_file_onnxruntime_runs(tmp_path, refs, capsys):
    out = tmp_path / "sub" / "fsrcnn.onnx"
    cmd = [sys.executable, "-m", "srbatch", "export", "--model", "fsrcnn", "--scale", "3", "--model-args",
           "{d: 8, s: 4, m: 1}", "--format", "onnx", "-o", str(out), "--opset", "17", "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rep = json.loads(done.stdout)
    assert rep["opset"] == 17 and rep["architecture"] == "fsrcnn" and "ConvTranspose" in rep["ops"]
    import onnx

    proto = onnx.load(str(out))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    x = _crop(refs, (1, 3, 15, 22), "RGB", seed=3)
    y = _ort_run(str(out), x)
    assert y.shape == (1, 3, 45, 66) and np.isfinite(y).all() and 0.05 < y.std()
    from srbatch.cli import main  # the bad case in-process (no second interpreter start)

    argv = ["export", "--model", "nearest", "--scale", "2", "--format", "tflite", "-o", str(tmp_path / "b.onnx")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "srbatch export: error: --format: unknown export format 'tflite'" in err and "Traceback" not in err


@pytest.mark.refs
def test_exported_file_runs_through_the_engine_like_the_torch_model(tmp_path, refs):
    """``load_model('m.onnx')`` describes the model from the metadata (a Y model: the engine converts RGB to Y and
    back) and the engine's output, tiled and untiled, equals the PyTorch model's."""
    from srbatch import TilingConfig, Upscaler, load_model

    torch.manual_seed(0)
    desc = build_model("espcn", scale=3, n1=8, n2=4, channels=1)
    path = str(tmp_path / "espcn_y.onnx")
    export_model(desc, path)
    onx = load_model(path, scale=3)
    assert onx.architecture == "onnx:espcn" and onx.color_space == "Y" and onx.scale == 3
    assert onx.info.receptive_halo == desc.info.receptive_halo and onx.hparams == desc.hparams
    rgb = np.asarray(Image.open(sorted((refs / "sets/Set5/image_SRF_3").glob("*_LR.png"))[1]).convert("RGB"))
    rgb = np.ascontiguousarray(rgb[:37, :29])
    for tile in (0, 16):
        a = Upscaler(onx, tiling=TilingConfig(tile=tile)).upscale_array(rgb)
        b = Upscaler(desc, tiling=TilingConfig(tile=tile)).upscale_array(rgb)
        assert a.shape == b.shape == (111, 87, 3)
        assert a.dtype == b.dtype == np.float32 and 0.01 < b.std()
        assert np.abs(a - b).max() <= TOL
    with pytest.raises(ConfigError, match="x3 model but scale 2"):
        load_model(path, scale=2)


def test_temporal_model_exports_its_window_and_runs_through_upscale_frames(tmp_path, refs):
    """A temporal model (efvsr-r1: frames t-1, t, t+1) is exported with its window packed on channels, not as a
    single frame: the ONNX model loads with temporal_radius 1, and the engine's ``upscale_frames`` through
    onnxruntime equals it through PyTorch on a window of three different real frames, and differs from the centre
    frame repeated (the neighbours reach the graph)."""
    from srbatch import TilingConfig, Upscaler, load_model

    desc = _build("efvsr-r1")
    path = str(tmp_path / "efvsr.onnx")
    export_model(desc, path)
    onx = load_model(path, scale=2)
    assert onx.info.temporal_radius == desc.info.temporal_radius == 1
    names = sorted((refs / "sets/Set5/image_SRF_2").glob("*_LR.png"))
    rgb = np.asarray(Image.open(names[1]).convert("RGB"))
    window = [np.ascontiguousarray(rgb[y : y + 30, x : x + 26]) for y, x in ((10, 12), (11, 13), (12, 15))]
    a = Upscaler(onx, tiling=TilingConfig(tile=0)).upscale_frames(window)
    b = Upscaler(desc, tiling=TilingConfig(tile=0)).upscale_frames(window)
    assert a.shape == b.shape == (60, 52, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    alone = Upscaler(onx, tiling=TilingConfig(tile=0)).upscale_frames([window[1]] * 3)
    assert np.abs(alone.astype(int) - a.astype(int)).max() > 2


def test_export_to_s3_and_load_back(s3_bucket):
    """-o s3://... (fsspec); the object loads back through load_model with its sha256 and runs like the module."""
    from srbatch import load_model
    from srbatch.errors import ChecksumMismatchError

    torch.manual_seed(0)
    desc = build_model("fsrcnn", scale=2, d=8, s=4, m=1)
    uri = f"s3://{s3_bucket}/exports/fsrcnn.onnx"
    res = export_model(desc, uri)
    back = load_model(uri, sha256=res.sha256)
    assert back.architecture == "onnx:fsrcnn" and back.sha256 == res.sha256 and back.scale == 2
    x = torch.rand(1, 3, 9, 14)
    with torch.inference_mode():
        assert (back.module(x) - desc.module(x)).abs().max() <= TOL
    with pytest.raises(ChecksumMismatchError):
        load_model(uri, sha256="0" * 64)
    with pytest.raises(ConfigError, match="already an ONNX file"):
        export_model(uri, f"s3://{s3_bucket}/exports/again.onnx")
