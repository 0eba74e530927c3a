"""Registry-driven: every registered architecture and variant, as registered, builds, runs on CPU, is recognised by
its own `detect` alone and round-trips through a self-describing safetensors file and `load_model`; every
architecture module follows the one template and imports nothing from the registry."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

from srbatch import build_model, load_model, save_model
from srbatch.models.arch_api import layout_diff, same_layout
from srbatch.models.loader import detect_architecture
from srbatch.models.registry import ARCHITECTURES, architectures, variants

NAMES = sorted(set(architectures()) | set(variants()))


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_model(name, tmp_path):
    torch.manual_seed(0)
    desc = build_model(name, scale=2)
    assert desc.scale == 2
    n = 12
    x = torch.rand(1, desc.in_channels, n, n)
    if desc.input_upsampled:
        x = torch.rand(1, desc.in_channels, n * 2, n * 2)
    with torch.inference_mode():
        y = desc.module(x)
    assert y.shape == (1, desc.out_channels, n * 2, n * 2) and torch.isfinite(y).all()
    if not architectures()[desc.architecture].needs_weights:
        return
    # without srbatch metadata, the bare state dict is recognised by its own architecture and by no other one
    assert [a for a, _ in detect_architecture(desc.module.state_dict())] == [desc.architecture]
    path = str(tmp_path / f"{name}.safetensors")
    save_model(desc, path)
    back = load_model(path, scale=2)
    assert back.architecture == desc.architecture and back.hparams == desc.hparams
    with torch.inference_mode():
        assert torch.equal(back.module(x), y)


def test_architecture_modules_never_import_the_registry():
    """Types flow one way: a fresh interpreter importing every architecture module has not loaded the registry."""
    mods = sorted({a.build.__module__ for a in ARCHITECTURES})
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "assert 'srbatch.models.registry' not in sys.modules, 'an architecture module imports the registry'\n"
        "import srbatch.models.registry\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_every_architecture_module_follows_the_template(arch):
    """``ARCH.build`` is the module's ``nn.Module`` class with keyword-only arguments; ``ARCH.detect``/``info`` are
    the module's functions; each variant has a keyword-only builder named after it that builds what the registry
    builds for that name (same state-dict layout, on the meta device)."""
    mod = sys.modules[arch.build.__module__]
    assert mod.ARCH is arch and arch.detect is mod.detect and arch.info is mod.info
    assert isinstance(arch.build, type) and issubclass(arch.build, torch.nn.Module)
    params = list(inspect.signature(arch.build).parameters.values())
    assert params and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params), arch.name
    assert "scale" in inspect.signature(arch.build).parameters
    assert dict(arch.variants) == dict(getattr(mod, "VARIANTS", {}))
    for vname, vargs in arch.variants.items():
        builder = getattr(mod, vname.replace("-", "_"))
        sig = inspect.signature(builder)
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in sig.parameters.values()), vname
        with torch.device("meta"):
            got = builder(scale=4)
            want = arch.build(**{**vargs, "scale": 4})
        assert type(got) is arch.build and same_layout(want, got.state_dict()), vname


def test_layout_diff_names_what_differs():
    """The one layout check: missing and unexpected keys, wrong shapes and non-tensors; BN counters optional."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    sd = dict(net.state_dict())
    assert not layout_diff(net, sd) and same_layout(net, sd)
    del sd["1.num_batches_tracked"]
    assert same_layout(net, sd)  # checkpoints from before PyTorch 0.4.1
    diff = layout_diff(net, {**sd, "0.weight": torch.zeros(4, 3, 5, 5), "extra": torch.zeros(1), "1.bias": "x"})
    assert diff.wrong_shape == (("0.weight", (4, 3, 5, 5), (4, 3, 3, 3)), ("1.bias", None, (4,)))
    assert diff.unexpected == ("extra",) and diff.missing == () and not same_layout(net, {**sd, "extra": sd["0.bias"]})
    del sd["0.bias"]
    assert layout_diff(net, sd).missing == ("0.bias",) and not same_layout(net, sd)
