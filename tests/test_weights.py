"""Safe checkpoint loading: refuse code, check hashes, unwrap containers, read any fsspec URI."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import save_file

from srbatch.errors import ChecksumMismatchError, UnknownArchitectureError, UnsafeCheckpointError, WeightsError
from srbatch.weights.checkpoint import canonicalize, load_checkpoint, save_checkpoint


class _Evil:
    """Pickling this object makes unpickling call os.system (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    for protocol in (2, 4):
        with open(path, "wb") as f:
            pickle.dump({"weight": _Evil(marker)}, f, protocol=protocol)
        with pytest.raises(UnsafeCheckpointError, match="arbitrary code") as ei:
            load_checkpoint(str(path))
        assert "evil.pth" in str(ei.value) and "Nothing from it was executed" in str(ei.value)
        assert not marker.exists()
    # Also through torch.save's zip format.
    path2 = tmp_path / "evil_zip.pth"
    torch.save({"w": torch.zeros(1), "x": _Evil(marker)}, path2)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(str(path2))
    assert not marker.exists()


def test_sha256_checked(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(2)}, path)
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_checkpoint(str(path), sha256=good).sha256 == good
    with pytest.raises(ChecksumMismatchError, match="expected 0000"):
        load_checkpoint(str(path), sha256="0000" + good[4:])


@pytest.mark.parametrize(
    "wrapped",
    [
        {"params_ema": {"conv.weight": torch.ones(1)}, "params": {"conv.weight": torch.zeros(1)}},
        {"state_dict": {"module.conv.weight": torch.ones(1)}, "epoch": 3},
        {"model": {"_orig_mod.conv.weight": torch.ones(1)}},
        {"netG": {"conv.weight": torch.ones(1)}, "optimizer": {"lr": 1}},
        {"module.conv.weight": torch.ones(1)},
    ],
)
def test_canonicalize_unwraps(wrapped):
    sd = canonicalize(wrapped)
    assert list(sd) == ["conv.weight"]
    assert torch.equal(sd["conv.weight"], torch.ones(1))  # params_ema preferred over params


def test_canonicalize_keeps_esrgan_model_prefix():
    sd = canonicalize({"model.0.weight": torch.ones(1), "model.1.sub.0.RDB1.conv1.0.weight": torch.ones(1)})
    assert "model.0.weight" in sd


def test_errors_name_the_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pth"))
    bad = tmp_path / "truncated.pth"
    buf = io.BytesIO()
    torch.save({"a": torch.ones(100)}, buf)
    bad.write_bytes(buf.getvalue()[:200])
    with pytest.raises(WeightsError, match="truncated.pth"):
        load_checkpoint(str(bad))
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 1}, empty)
    with pytest.raises(WeightsError, match="no tensors"):
        load_checkpoint(str(empty))


def test_self_describing_round_trip_over_memory_fs():
    sd = {"w": torch.arange(6.0).view(2, 3)}
    digest = save_checkpoint(sd, "memory://ckpt/m.safetensors", architecture="espcn", hparams={"scale": 2}, name="m")
    ck = load_checkpoint("memory://ckpt/m.safetensors", sha256=digest)
    assert ck.architecture == "espcn" and ck.hparams == {"scale": 2}
    assert torch.equal(ck.state_dict["w"], sd["w"])
    fsspec.filesystem("memory").rm("/ckpt", recursive=True)


def test_unknown_state_dict_is_a_clear_error(tmp_path):
    from srbatch import load_model

    path = tmp_path / "odd.safetensors"
    save_file({"totally.unknown.weight": torch.ones(3, 3)}, path)
    with pytest.raises(UnknownArchitectureError, match="totally.unknown.weight"):
        load_model(str(path))
