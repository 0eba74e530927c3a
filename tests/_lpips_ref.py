"""The reference LPIPS (the ``lpips`` package, richzhang/PerceptualSimilarity, BSD-2) built without any download, and
srbatch's weights file made from the very same tensors through ``python -m srbatch.metrics.lpips make``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


@contextlib.contextmanager
def no_downloads(torch_home: Path) -> Iterator[None]:
    """TORCH_HOME pointed at an empty folder and torch.hub's download functions replaced by ones that fail; on exit,
    the folder must still be empty (nothing was fetched, not even into the hub cache)."""
    import torch.hub

    def refuse(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError(f"a download was attempted: {a[:1]}")

    torch_home.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get("TORCH_HOME"), torch.hub.download_url_to_file, torch.hub.load_state_dict_from_url
    os.environ["TORCH_HOME"] = str(torch_home)
    torch.hub.download_url_to_file = refuse
    torch.hub.load_state_dict_from_url = refuse
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = saved[0]
        torch.hub.download_url_to_file, torch.hub.load_state_dict_from_url = saved[1], saved[2]
    left = [str(p) for p in torch_home.rglob("*")]
    assert not left, f"files appeared under TORCH_HOME: {left}"


def reference(net: str, tmp: Path, seed: int = 0):  # noqa: ANN201
    """The reference package's LPIPS v0.1 with a random trunk (``pnet_rand=True``: torchvision's network with
    ``pretrained=False``) and the linear heads its wheel ships (``pretrained=True``), built with downloads blocked."""
    import lpips

    torch.manual_seed(seed)
    with no_downloads(tmp / "torch_home"):
        ref = lpips.LPIPS(pretrained=True, net=net, version="0.1", pnet_rand=True, verbose=False)
    return ref.eval()


def heads_file(net: str) -> Path:
    """The v0.1 linear heads the ``lpips`` wheel ships."""
    import lpips

    return Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"


def write_weights(ref, net: str, tmp: Path) -> Path:  # noqa: ANN001
    """srbatch's weights file made from ``ref``'s trunk (saved here as torchvision's checkpoint is laid out:
    ``features.N.*`` plus classifier keys the maker must ignore) and the wheel's heads file, by the make command."""
    from srbatch.metrics.lpips import main

    sd = {}
    for k, v in ref.net.state_dict().items():  # slice1.0.weight -> features.0.weight (the slices keep the indices)
        sd["features." + k.split(".", 1)[1]] = v.clone()
    sd["classifier.1.weight"] = torch.zeros(4, 4)
    backbone = tmp / f"{net}-backbone.pth"
    torch.save(sd, backbone)
    out = tmp / f"lpips-{net}.safetensors"
    rc = main(["make", "--net", net, "--backbone", str(backbone), "--heads", str(heads_file(net)), "-o", str(out)])
    assert rc == 0 and out.exists()
    return out


def ref_distance(ref, a: np.ndarray, b: np.ndarray) -> float:  # noqa: ANN001
    """The reference package's distance of two uint8 images (HWC or HW; grey replicated to RGB), converted by its own
    ``im2tensor`` (x / 127.5 - 1)."""
    import lpips

    def rgb(x: np.ndarray) -> np.ndarray:
        x = x if x.ndim == 3 else x[..., None]
        return np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x

    with torch.no_grad():
        return float(ref(lpips.im2tensor(rgb(a)), lpips.im2tensor(rgb(b))).item())
