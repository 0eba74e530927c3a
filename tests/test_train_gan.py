"""GAN training pieces: VGG19 perceptual loss in torchvision layout, discriminators, adversarial losses, EMA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from srbatch.errors import ConfigError, WeightsError
from srbatch.train.gan import (
    EMA,
    VGG19_LAYERS,
    PerceptualLoss,
    SRGANDiscriminator,
    VGGFeatureExtractor,
    VGGStyleDiscriminator,
    bce_discriminator_loss,
    bce_generator_loss,
    build_discriminator,
    relativistic_discriminator_loss,
    relativistic_generator_loss,
    save_random_vgg19,
)

# torchvision vgg19().features: indices of the 16 convolutions and their output channels (from torchvision's cfg "E").
TV_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)
TV_CONV_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from threads; one avoids oversubscription when other suites share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("vgg")
    return {
        "pth": save_random_vgg19(str(folder / "vgg19.pth"), seed=0),
        "safetensors": save_random_vgg19(str(folder / "vgg19.safetensors"), seed=0),
    }


@pytest.fixture(scope="module")
def conv54(vgg_files) -> VGGFeatureExtractor:
    return VGGFeatureExtractor("conv5_4", weights=vgg_files["pth"])


def test_layer_names_follow_torchvision_indices():
    assert len(VGG19_LAYERS) == 37
    assert VGG19_LAYERS[:6] == ("conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1", "conv2_1")
    assert [i for i, n in enumerate(VGG19_LAYERS) if n.startswith("conv")] == list(TV_CONV_INDICES)
    assert VGG19_LAYERS.index("conv5_4") == 34 and VGG19_LAYERS.index("relu5_4") == 35 and VGG19_LAYERS[-1] == "pool5"


def test_extractor_state_dict_is_torchvision_layout(conv54):
    sd = conv54.state_dict()
    expected = {}
    in_ch = 3
    for idx, out_ch in zip(TV_CONV_INDICES, TV_CONV_CHANNELS, strict=True):
        expected[f"features.{idx}.weight"] = (out_ch, in_ch, 3, 3)
        expected[f"features.{idx}.bias"] = (out_ch,)
        in_ch = out_ch
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert len(conv54.features) == 35  # truncated right after conv5_4: no relu5_4, no pool5


def test_pth_and_safetensors_load_the_same_weights(vgg_files, conv54):
    from_st = VGGFeatureExtractor("conv5_4", weights=vgg_files["safetensors"])
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = conv54(x), from_st(x)
    assert a.shape == (2, 512, 1, 1)
    assert torch.equal(a, b)
    raw = torch.load(vgg_files["pth"], weights_only=True)
    assert torch.equal(conv54.features[34].bias, raw["features.34.bias"])
    assert raw["features.34.bias"].abs().sum() > 0  # real values were loaded, not a default init


def test_full_torchvision_dict_loads_ignoring_classifier_and_later_layers(tmp_path):
    g = torch.Generator().manual_seed(3)
    sd = {
        "features.0.weight": torch.randn(64, 3, 3, 3, generator=g),
        "features.0.bias": torch.randn(64, generator=g),
        "features.2.weight": torch.randn(64, 64, 3, 3, generator=g),
        "features.2.bias": torch.randn(64, generator=g),
        "features.5.weight": torch.randn(128, 64, 3, 3, generator=g),
        "features.5.bias": torch.randn(128, generator=g),
        "classifier.6.weight": torch.randn(10, 4, generator=g),
        "classifier.6.bias": torch.randn(10, generator=g),
    }
    path = tmp_path / "tv.pth"
    torch.save(sd, path)
    ext = VGGFeatureExtractor("relu1_2", weights=str(path))
    assert set(ext.state_dict()) == {"features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias"}
    assert torch.equal(ext.features[2].weight, sd["features.2.weight"])
    # A bare vgg19().features state dict ("0.weight", ...) is accepted too.
    path2 = tmp_path / "features_only.safetensors"
    save_file({k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")}, path2)
    ext2 = VGGFeatureExtractor("relu1_2", weights=str(path2))
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(ext(x), ext2(x))


def test_missing_weights_explain_how_to_get_them():
    with pytest.raises(ConfigError) as ei:
        VGGFeatureExtractor("conv5_4")
    msg = str(ei.value)
    assert "--vgg-weights" in msg and "torchvision" in msg and "vgg19" in msg and "psnr" in msg
    with pytest.raises(ConfigError, match="relu5_4"):
        VGGFeatureExtractor("relu5_5", weights="unused.pth")


def test_truncated_or_wrong_state_dict_is_a_weights_error(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {
        "features.0.weight": torch.randn(64, 3, 3, 3, generator=g),
        "features.0.bias": torch.randn(64, generator=g),
        "features.2.weight": torch.randn(64, 64, 3, 3, generator=g),
        "features.2.bias": torch.randn(64, generator=g),
    }
    path = tmp_path / "truncated.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as ei:
        VGGFeatureExtractor("conv2_1", weights=str(path))
    assert "truncated.pth" in str(ei.value) and "features.5.weight" in str(ei.value)
    assert "features.2.weight" not in str(ei.value)
    VGGFeatureExtractor("relu1_2", weights=str(path))  # the same file is enough for an earlier layer

    bad = dict(sd, **{"features.2.weight": torch.zeros(64, 32, 3, 3)})
    path_bad = tmp_path / "wrong_shape.safetensors"
    save_file(bad, path_bad)
    with pytest.raises(WeightsError, match=r"wrong_shape\.safetensors.*features\.2\.weight \(64, 32, 3, 3\)"):
        VGGFeatureExtractor("conv1_2", weights=str(path_bad))


def test_relu54_is_nonnegative_and_conv54_is_not(vgg_files, conv54):
    relu54 = VGGFeatureExtractor("relu5_4", weights=vgg_files["safetensors"])
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pre, post = conv54(x), relu54(x)
    assert (post >= 0).all() and (pre < 0).any() and (post > 0).any()
    assert torch.equal(post, pre.clamp(min=0))


def test_grey_input_is_repeated_and_input_norm_is_imagenet(vgg_files):
    normed = VGGFeatureExtractor("conv1_2", weights=vgg_files["pth"])
    raw = VGGFeatureExtractor("conv1_2", use_input_norm=False, weights=vgg_files["pth"])
    grey = torch.rand(2, 1, 8, 8)
    out = normed(grey)
    assert out.shape == (2, 64, 8, 8)
    assert torch.equal(out, normed(grey.repeat(1, 3, 1, 1)))
    rgb = torch.rand(2, 3, 8, 8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(normed(rgb), raw((rgb - mean) / std))
    assert not torch.allclose(normed(rgb), raw(rgb))
    with pytest.raises(ConfigError, match="got shape"):
        normed(torch.rand(1, 4, 8, 8))


def test_perceptual_loss_values_and_gradients(conv54):
    loss_fn = PerceptualLoss(conv54, criterion="mse", feature_scale=1 / 12.75)
    loss_fn.train()
    assert not conv54.training and all(not p.requires_grad for p in conv54.parameters())
    g = torch.Generator().manual_seed(2)
    hr = torch.rand(2, 3, 16, 16, generator=g)
    assert loss_fn(hr.clone(), hr).item() == 0.0
    sr = torch.rand(2, 3, 16, 16, generator=g, requires_grad=True)
    hr.requires_grad_(True)
    loss = loss_fn(sr, hr)
    with torch.no_grad():
        expected = F.mse_loss(conv54(sr) / 12.75, conv54(hr) / 12.75)
    torch.testing.assert_close(loss, expected)
    assert loss.item() > 0
    loss.backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    assert hr.grad is None
    assert all(p.grad is None for p in conv54.parameters())
    l1 = PerceptualLoss(conv54)(sr.detach(), hr.detach())
    with torch.no_grad():
        torch.testing.assert_close(l1, F.l1_loss(conv54(sr), conv54(hr)))
    with pytest.raises(ConfigError, match="criterion"):
        PerceptualLoss(conv54, criterion="l2")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "size", "cls"),
    [
        ("srgan", 16, SRGANDiscriminator),
        ("srgan", 24, SRGANDiscriminator),
        ("vgg", 32, VGGStyleDiscriminator),
        ("vgg", 64, VGGStyleDiscriminator),
    ],
)
def test_discriminator_output_and_size_check(kind, size, cls):
    d = build_discriminator(kind, in_channels=3, crop_size=size, num_feat=4)
    assert isinstance(d, cls)
    out = d(torch.rand(3, 3, size, size))
    assert out.shape == (3, 1) and torch.isfinite(out).all()
    with pytest.raises(ConfigError, match=rf"built for {size}x{size}.*got {size * 2}x{size * 2}.*crop"):
        d(torch.rand(2, 3, size * 2, size * 2))
    grey = build_discriminator(kind, in_channels=1, crop_size=size, num_feat=4)
    assert grey(torch.rand(2, 1, size, size)).shape == (2, 1)


def test_discriminator_config_errors():
    with pytest.raises(ConfigError, match="multiple of 32.*48"):
        VGGStyleDiscriminator(3, 8, 48)
    with pytest.raises(ConfigError, match="input_size"):
        SRGANDiscriminator(3, 8, 8)
    with pytest.raises(ConfigError, match="unknown discriminator kind"):
        build_discriminator("patch", in_channels=3, crop_size=64)  # type: ignore[arg-type]


def test_discriminator_layouts_match_the_papers():
    # SRGAN (Fig. 4): 96x96 crops -> 6x6x512 features entering Dense(1024).
    srgan = SRGANDiscriminator(3, 64, 96)
    assert srgan.dense1.in_features == 512 * 6 * 6 and srgan.dense1.out_features == 1024
    assert [b.conv.stride[0] for b in srgan.body] == [2, 1, 2, 1, 2, 1, 2]
    assert [b.conv.out_channels for b in srgan.body] == [64, 128, 128, 256, 256, 512, 512]
    seen = []
    small = SRGANDiscriminator(3, 4, 16)
    small.conv_first.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    x = torch.rand(2, 3, 16, 16)
    small(x)
    torch.testing.assert_close(seen[0], x * 2 - 1)  # [0, 1] images enter the network as [-1, 1]
    # BasicSR's VGGStyleDiscriminator keys: 128 -> 5 stages, 256 -> 6 stages, both ending at 4x4 x 8nf.
    v128, v256 = VGGStyleDiscriminator(3, 4, 128), VGGStyleDiscriminator(3, 4, 256)
    k128, k256 = set(v128.state_dict()), set(v256.state_dict())
    assert {"conv0_0.bias", "bn0_1.running_mean", "conv4_1.weight", "bn4_1.weight", "linear2.bias"} <= k128
    assert "conv0_1.bias" not in k128 and "conv5_0.weight" not in k128 and "conv5_1.weight" in k256
    assert v128.linear1.in_features == v256.linear1.in_features == 4 * 8 * 4 * 4
    assert v128.linear1.out_features == 100
    assert v256(torch.rand(1, 3, 256, 256)).shape == (1, 1)


@pytest.mark.parametrize(("kind", "size"), [("vgg", 32), ("srgan", 16)])
@pytest.mark.parametrize("loss_name", ["bce", "relativistic"])
def test_discriminators_learn_a_trivial_task(kind, size, loss_name):
    torch.manual_seed(0)
    d = build_discriminator(kind, in_channels=3, crop_size=size, num_feat=8)
    loss_fn = bce_discriminator_loss if loss_name == "bce" else relativistic_discriminator_loss
    g = torch.Generator().manual_seed(1)
    real = torch.rand(8, 3, 1, 1, generator=g).expand(-1, -1, size, size).contiguous()  # flat colours
    fake = torch.rand(8, 3, size, size, generator=g)  # noise
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = loss_fn(d(real), d(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.6
    assert losses[-1] < 0.5 * losses[0], losses


def test_bce_losses_match_torch_formulas():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(5, 1, generator=g), torch.randn(5, 1, generator=g)
    ones, zeros = torch.ones_like(real), torch.zeros_like(real)
    torch.testing.assert_close(bce_generator_loss(fake), F.binary_cross_entropy_with_logits(fake, ones))
    expected_d = (
        F.binary_cross_entropy(torch.sigmoid(real), ones) + F.binary_cross_entropy(torch.sigmoid(fake), zeros)
    ) / 2
    torch.testing.assert_close(bce_discriminator_loss(real, fake), expected_d)
    assert bce_generator_loss(torch.zeros(3, 1)).item() == pytest.approx(math.log(2))
    # Numerically stable on extreme logits (a naive log(sigmoid) would give inf).
    assert torch.isfinite(bce_generator_loss(torch.tensor([[-200.0]])))
    assert bce_generator_loss(torch.tensor([[-200.0]])).item() == pytest.approx(200.0)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_relativistic_losses_known_values():
    real, fake = torch.tensor([2.0]), torch.tensor([0.0])
    # D: BCE(2 - 0, 1) = softplus(-2); BCE(0 - 2, 0) = softplus(-2).
    assert relativistic_discriminator_loss(real, fake).item() == pytest.approx(_softplus(-2))
    # G: targets swapped: BCE(2, 0) = softplus(2); BCE(-2, 1) = softplus(2).
    assert relativistic_generator_loss(real, fake).item() == pytest.approx(_softplus(2))
    # Two samples: mean(real) = 2, mean(fake) = 1; real - 1 = [0, 2]; fake - 2 = [-2, 0].
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0])
    d = ((_softplus(0) + _softplus(-2)) / 2 + (_softplus(-2) + _softplus(0)) / 2) / 2
    gl = ((_softplus(0) + _softplus(2)) / 2 + (_softplus(2) + _softplus(0)) / 2) / 2
    assert relativistic_discriminator_loss(real, fake).item() == pytest.approx(d)
    assert relativistic_generator_loss(real, fake).item() == pytest.approx(gl)
    # The generator loss reaches the fake logits through both terms.
    fake = torch.tensor([0.0, 2.0], requires_grad=True)
    relativistic_generator_loss(real, fake).backward()
    assert fake.grad is not None and (fake.grad < 0).all()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2))


def test_ema_averages_parameters_and_copies_buffers():
    net = _net()
    ema = EMA(net, decay=0.5)
    assert not ema.module.training and all(not p.requires_grad for p in ema.module.parameters())
    old = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    net.train()
    net(torch.randn(4, 1, 5, 5))  # moves the batch-norm running statistics
    ema.update(net)
    sd = ema.state_dict()
    for name, p in net.named_parameters():
        torch.testing.assert_close(sd[name], (old[name] + p.detach()) / 2)
    for name, b in net.named_buffers():
        assert torch.equal(sd[name], b), name
    assert sd["1.num_batches_tracked"].item() == 1
    assert not torch.equal(sd["1.running_mean"], old["1.running_mean"])

    fresh = _net()
    ema.copy_to(fresh)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    other = EMA(_net(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(v, sd[k]) for k, v in other.state_dict().items())
    with pytest.raises(ConfigError, match="decay"):
        EMA(net, decay=1.5)


class _Wrapper(nn.Module):
    """Holds the model under ``.module``, as DistributedDataParallel does."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def test_ema_unwraps_ddp_style_wrappers():
    net = _net()
    wrapped = _Wrapper(net)
    ema = EMA(wrapped, decay=0.9)
    assert set(ema.state_dict()) == set(net.state_dict())  # bare keys, no "module." prefix
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update(wrapped)
    torch.testing.assert_close(ema.module[0].weight, before + 0.1)
    target = _Wrapper(_net())
    ema.copy_to(target)
    assert torch.equal(target.module[0].weight, ema.module[0].weight)


def test_gan_stage_steps_of_the_loop_make_the_generator_learn(tmp_path):
    """The training loop's own step (``srbatch.train.loop._Training.train_step``, what each Ray Train worker runs; here
    in one process without Ray) in the GAN stage (SRGAN recipe and discriminator with the pixel term on and the VGG
    term off, to stay cheap; a random tiny SRResNet as --init) on one image: 25 steps must raise the generator's PSNR
    on fixed crops of it by >= 3 dB (about +7.7 dB), measured with plain torch. A generator optimiser that never steps fails this;
    the discriminator must step too (its weights move)."""
    import numpy as np

    from srbatch.local import sample_images_dir
    from srbatch.models.loader import build_model
    from srbatch.train.config import TrainConfig
    from srbatch.train.data import CropSampler, read_image
    from srbatch.train.loop import _Training, _Worker, build_generator
    from srbatch.weights.checkpoint import save_checkpoint

    torch.manual_seed(0)
    init = build_model("srresnet", scale=2, num_block=1, num_feat=16)
    save_checkpoint(init.module.state_dict(), str(tmp_path / "init.safetensors"), architecture=init.architecture,
                    hparams=init.hparams, name=init.name)  # fmt: skip
    cfg = TrainConfig(data="x/", output="y/", stage="gan", gan="srgan", init=str(tmp_path / "init.safetensors"),
                      pixel_weight=1.0, perceptual_weight=0.0, scale=2, crop_size=32,
                      batch_size=4, lr=1e-3, steps=25, ema=0)  # fmt: skip
    desc = build_generator(cfg, 3, None)
    w = _Worker(cfg=cfg, plan={}, rank=0, world=1, device=torch.device("cpu"), so={}, desc=desc, channels=3)
    run = _Training(w)
    image = np.ascontiguousarray(read_image(f"{sample_images_dir()}/astronaut.png", {}).pixels[32:96, 32:96])
    sampler = CropSampler([image], scale=2, crop_size=32, degradation=cfg.degradation_config(), seed=0)
    lr_fixed, hr_fixed = CropSampler([image], scale=2, crop_size=32, degradation=cfg.degradation_config(),
                                     seed=1).sample(8)  # fmt: skip

    def psnr() -> float:
        with torch.no_grad():
            mse = F.mse_loss(run.gen(lr_fixed).clamp(0, 1), hr_fixed).item()
        return 10 * math.log10(1 / mse)

    d_before = [p.detach().clone() for p in run.gan.d_raw.parameters()]
    before = psnr()
    while run.step < cfg.steps:
        parts = run.train_step(sampler)
    after = psnr()
    print(f"GAN stage, 25 steps: PSNR on fixed crops {before:.2f} -> {after:.2f} dB; last parts {parts}")
    assert after >= before + 3.0, (before, after)
    assert any(not torch.equal(a, b) for a, b in zip(d_before, run.gan.d_raw.parameters()))
