"""The single-process inference engine: a :class:`ModelDescriptor` in, upscaled tensors, arrays and images out.

:class:`Upscaler` owns the colour handling (RGB / Y / YCbCr / L models on grey, RGB and RGBA images), bicubic
pre-upsampling, size-multiple padding, tiling with exact context (see :mod:`srbatch.inference.tiling`), out-of-memory
splitting, half precision with an fp32 fallback, x8 self-ensemble and arbitrary output scales.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from srbatch.errors import ConfigError, InferenceError
from srbatch.inference.colorspace import GREY_WEIGHTS, from_model_space, model_channels, to_model_space
from srbatch.inference.memory import available_memory, bound_heap, format_bytes, measure_peak, parse_bytes
from srbatch.inference.regions import RegionPlan, plan_regions
from srbatch.inference.tiling import TilingConfig, ceil_to, run_tiled
from srbatch.io.images import DecodedImage
from srbatch.metrics.resize import imresize
from srbatch.models.descriptor import ModelDescriptor

__all__ = ["GREY_WEIGHTS", "RegionPlan", "RegionReader", "Upscaler", "image_reader"]

RegionReader = Callable[[int, int, int, int], np.ndarray]
"""``read(y0, y1, x0, x1)`` -> the input pixels ``[y0:y1, x0:x1]`` as ``(h, w, C)`` uint8/uint16, alpha last."""

PROBE_PIXELS = 1024 * 1024
"""Images of at most this many input pixels are run whole without measuring the model (small enough for any budget
the engine accepts); larger ones are planned from a measured estimate."""
_PROBE_SIDES = (96, 192)
_AUTO_SHARE = 0.5  # auto budget: this share of the memory available when the image is planned

logger = logging.getLogger("srbatch.inference")

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip
_HALF = (torch.float16, torch.bfloat16)
_BLACK = 1e-6
_PINNED_MAX = 256 * 1024**2
"""Host<->device copies of at most this many bytes go through one pinned host buffer with a non-blocking copy (CUDA
only); larger ones (huge regions) are copied as before, so no gigabyte of page-locked memory is ever asked for."""
_TORCH_INT = {np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.uint16}


class _TileOOM(Exception):
    """Internal: a forward pass ran out of memory (wraps the original error)."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} was asked for but CUDA is not available; use device='auto' or 'cpu'")
    return dev


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, *_HALF):
            raise ConfigError(f"dtype: expected float32, float16 or bfloat16; got {dtype}")
        return dtype
    try:
        return _DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"dtype: expected one of {', '.join(_DTYPE_NAMES)}; got {dtype!r}") from None


def _round_half_up(v: float) -> int:
    return int(math.floor(v + 0.5))


class Upscaler:
    """Run a super-resolution model on tensors, arrays or decoded images.

    Args:
        descriptor: the model (see :func:`srbatch.models.loader.build_model`).
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda:1"``, or a ``torch.device``.
        dtype: compute dtype of the network: ``"float32"``, ``"float16"`` or ``"bfloat16"``. Half precision falls
            back to float32 (with a warning) when the model does not list it in ``info.dtypes``, and float16 falls
            back on CPU (slow and patchy there); bfloat16 is allowed on CPU. Accumulation is always float32.
        tiling: how to tile (:class:`TilingConfig`); None uses its defaults.
        self_ensemble: average the 8 flips/rotations of the input (EDSR+ style); 8x the compute.
        outscale: final output scale; when the result differs from ``scale x`` input size, the model output is
            resized with MATLAB bicubic ``imresize`` to ``round(H * outscale) x round(W * outscale)`` (half up).
        max_memory: bytes (or a size such as ``"4GiB"``) one image may use beyond the process's baseline: its
            held input and output arrays and the working set of its regions. None: ``memory_share`` (default half)
            of the memory available (``MemAvailable``, capped by the cgroup) when the image is planned. On CUDA the network's working set is
            also fitted into 80% of the device's free memory. See :meth:`plan`.
        memory_share: the share of the available memory the auto budget uses (``max_memory=None``).
        device_batch: most whole images per forward pass in :meth:`upscale_images` (fewer when the memory plan says
            that many do not fit).
        channels_last: keep the network and its inputs in ``torch.channels_last`` (NHWC), which cuDNN's tensor-core
            convolutions prefer. On CPU images already reach the network NHWC-strided (decoded ``(H, W, C)`` arrays,
            permuted), so this changes nothing for them; for contiguous ``upscale_tensor`` inputs it measured 1.93 s
            instead of 2.62 s per EDSR-baseline x4 256x256 forward on 2 cores.
        cudnn_benchmark: set ``torch.backends.cudnn.benchmark`` (a process-wide switch: cuDNN times its algorithms
            for each new input shape and keeps the fastest). None: on for CUDA, left as it is on CPU.
        compile: run the network through ``torch.compile``; the first forward (the compilation) is timed in
            ``stats['compile_s']`` and logged. New input shapes may recompile. The float32 fallback network of half
            precision stays eager.

    With float32 the descriptor's module is moved to ``device`` in place; with half precision a converted copy is
    used and the descriptor's module is left as it is (it is the source of the lazy fp32 fallback copy).

    ``stats`` counts ``images`` (upscale_tensor items), ``tiles`` (windows run), ``batches`` (forward passes),
    ``oom_splits``, ``fp32_fallbacks`` (half-precision batches redone in float32), ``regions`` (regions of
    :meth:`upscale_image` / :meth:`iter_bands` / :meth:`upscale_images`) and ``probes`` (memory measurements of the
    model); ``compile_s`` (a float) is the seconds of the first compiled forward (0.0 without ``compile``).
    """

    def __init__(
        self,
        descriptor: ModelDescriptor,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "float32",
        tiling: TilingConfig | None = None,
        self_ensemble: bool = False,
        outscale: float | None = None,
        max_memory: int | str | None = None,
        memory_share: float = _AUTO_SHARE,
        device_batch: int = 8,
        channels_last: bool = False,
        cudnn_benchmark: bool | None = None,
        compile: bool = False,  # noqa: A002 - the name users know from torch.compile
    ) -> None:
        if outscale is not None and not (isinstance(outscale, (int, float)) and outscale > 0):
            raise ConfigError(f"outscale: expected a positive number or None; got {outscale!r}")
        self.descriptor = descriptor
        self.info = descriptor.info
        self.tiling = tiling if tiling is not None else TilingConfig()
        self.self_ensemble = bool(self_ensemble)
        self.outscale = float(outscale) if outscale is not None else None
        self.max_memory = parse_bytes(max_memory)
        if not 0 < memory_share <= 1:
            raise ConfigError(f"memory_share: expected a fraction in (0, 1]; got {memory_share!r}")
        self.memory_share = float(memory_share)
        if isinstance(device_batch, bool) or not isinstance(device_batch, int) or device_batch < 1:
            raise ConfigError(f"device_batch: expected a positive integer (images per forward); got {device_batch!r}")
        self.device_batch = device_batch
        self.last_plan: RegionPlan | None = None
        """The plan of the last image run by :meth:`upscale_image` or :meth:`iter_bands`."""
        self._estimates: dict[tuple[int, bool, int], tuple[float, float]] = {}
        self._device = _resolve_device(device)
        want = _resolve_dtype(dtype)
        self._dtype = want
        if want == torch.float16 and self._device.type == "cpu":
            logger.warning("float16 is not used on CPU (slow, incomplete kernels); running float32 instead")
            self._dtype = torch.float32
        elif want in _HALF and want not in self.info.dtypes:
            logger.warning("model %s does not support %s; running float32 instead", descriptor.name or "?", want)
            self._dtype = torch.float32
        if self._dtype == torch.float32:
            self.module = descriptor.module.to(self._device, torch.float32).eval()
        else:
            self.module = copy.deepcopy(descriptor.module).to(self._device, self._dtype).eval()
        self._module_fp32: torch.nn.Module | None = self.module if self._dtype == torch.float32 else None
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        if cudnn_benchmark is not None or self._device.type == "cuda":
            torch.backends.cudnn.benchmark = True if cudnn_benchmark is None else bool(cudnn_benchmark)
        self.compiled = bool(compile)
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._compile_pending = False
        if self.compiled:
            self._compiled = torch.compile(self.module)
            self._compile_pending = True
        self._tile_cap: int | None = None  # lowered after an out-of-memory split, kept for later images
        self._batch_cap: int | None = None
        self.stats: dict[str, float] = {
            "images": 0, "tiles": 0, "batches": 0, "oom_splits": 0, "fp32_fallbacks": 0, "regions": 0, "probes": 0,
            "compile_s": 0.0,
        }  # fmt: skip
        logger.info(
            "upscaler: model %s (%s, x%d, %s) on %s as %s%s%s%s",
            descriptor.name or descriptor.architecture, descriptor.architecture, self.info.scale,
            self.info.color_space, self._device, str(self._dtype).removeprefix("torch."),
            ", self-ensemble x8" if self.self_ensemble else "", ", channels_last" if self.channels_last else "",
            ", torch.compile" if self.compiled else "",
        )  # fmt: skip

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        """The device the network runs on."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The network's compute dtype (after any fallback to float32)."""
        return self._dtype

    @property
    def scale(self) -> float:
        """Output size / input size: ``outscale`` when given, else the model's scale."""
        return self.outscale if self.outscale is not None else float(self.info.scale)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` of the output for an input of ``height x width``."""
        if self.outscale is None:
            return height * int(self.info.scale), width * int(self.info.scale)
        return max(_round_half_up(height * self.outscale), 1), max(_round_half_up(width * self.outscale), 1)

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def upscale_tensor(self, x: torch.Tensor, *, model_scale: bool = False) -> torch.Tensor:
        """Upscale ``(N, C, H, W)`` (or ``(C, H, W)``) floats in ``[0, 1]`` in the model's own channel space.

        ``C`` must equal the model's ``in_channels`` (no colour conversion happens here). Returns float32
        ``(N, out_channels, H', W')`` on ``x``'s device, not clamped. ``model_scale=True`` skips the final
        ``outscale`` resize (the output is at the model's own scale).
        """
        return self._upscale_tensor(x, model_scale=model_scale)

    @torch.no_grad()
    def _upscale_tensor(
        self, x: torch.Tensor, *, model_scale: bool = False, batch: int | None = None, frames: int = 1
    ) -> torch.Tensor:
        """:meth:`upscale_tensor`, with ``batch`` items per forward pass (None: ``tiling.batch_size``); ``frames`` > 1:
        ``x`` is a temporal model's window packed on the channel axis (``frames * in_channels`` channels)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim not in (3, 4):
            raise ConfigError(
                f"upscale_tensor expects a float tensor (N, C, H, W) or (C, H, W) in [0, 1]; got "
                f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}"
            )
        squeeze = x.ndim == 3
        if squeeze:
            x = x[None]
        if x.shape[1] != self.info.in_channels * frames:
            raise ConfigError(
                f"upscale_tensor: model {self.descriptor.name or self.descriptor.architecture} takes "
                f"{self.info.in_channels} channels ({self.info.color_space}); got {x.shape[1]}; "
                "use upscale_array/upscale_image for colour conversion"
            )
        src_device = x.device
        h, w = int(x.shape[-2]), int(x.shape[-1])
        x = x.to(self._device, torch.float32)
        if self.info.input_upsampled:
            x = imresize(x, self.info.scale)
        if self.self_ensemble:
            total: torch.Tensor | None = None
            for k in range(4):  # x8 geometric self-ensemble: 4 rotations x (no flip, horizontal flip)
                for flip in (False, True):
                    t = torch.rot90(x, k, dims=(-2, -1))
                    y = self._run(t.flip(-1) if flip else t, batch=batch)
                    y = torch.rot90(y.flip(-1) if flip else y, -k, dims=(-2, -1))
                    total = y if total is None else total + y
            assert total is not None
            out = total / 8
        else:
            out = self._run(x, batch=batch)
        if self.outscale is not None and not model_scale:
            target = self.output_size(h, w)
            if tuple(out.shape[-2:]) != target:
                out = imresize(out, output_shape=target)
        self.stats["images"] += int(x.shape[0])
        out = out.to(src_device)
        return out[0] if squeeze else out

    @torch.no_grad()
    def upscale_array(self, arr: np.ndarray) -> np.ndarray:
        """Upscale an image array ``(H, W, C)`` (or ``(H, W)``), uint8 / uint16 / float in ``[0, 1]``.

        ``C`` is 1 (grey), 3 (RGB), 2 or 4 (last channel alpha, resized with MATLAB bicubic). Colour is converted to
        and from the model's colour space (see the class docs). Returns float32 ``(H', W', C)`` (``(H', W')`` for 2-D
        input) clamped to ``[0, 1]``.
        """
        if not isinstance(arr, np.ndarray) or arr.ndim not in (2, 3):
            raise ConfigError(f"upscale_array expects an (H, W, C) or (H, W) array; got {getattr(arr, 'shape', arr)}")
        flat = arr.ndim == 2
        a = _to_unit_float(arr[..., None] if flat else arr)
        c = a.shape[2]
        if c not in (1, 2, 3, 4):
            raise ConfigError(f"upscale_array expects 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA) channels; got {c}")
        colour, alpha = (a[..., : c - 1], a[..., c - 1]) if c in (2, 4) else (a, None)
        x = torch.from_numpy(np.ascontiguousarray(colour)).permute(2, 0, 1)[None].to(self._device)
        y = self._upscale_colour(x).clamp_(0, 1)[0]
        planes = [y]
        if alpha is not None:
            planes.append(self._resize_plane(alpha, (int(y.shape[-2]), int(y.shape[-1])))[None])
        out = torch.cat(planes, 0).permute(1, 2, 0).to("cpu", torch.float32).numpy()
        return out[..., 0] if flat else out

    @torch.no_grad()
    def upscale_frames(self, window: Sequence[np.ndarray]) -> np.ndarray:
        """Upscale the centre frame of ``window``, a list of ``2r + 1`` video frames ``(H, W, C)`` (t-r .. t+r), using
        its neighbours when the model is temporal (``info.temporal_radius = r > 0``).

        Frames are uint8, uint16 or float in ``[0, 1]``, all of one shape and dtype, ``C`` 1 (grey) or 3 (RGB). Each
        frame goes through the model's colour space as in :meth:`upscale_array`; the converted frames are packed on
        the channel axis, so padding, tiling (tiles cut at the same place in every frame), self-ensemble and
        ``outscale`` are those of :meth:`upscale_tensor`. An image model (r = 0) upscales the centre frame alone,
        whatever the window's length. Returns ``(H', W', C)`` in the input's dtype (integers clamped and rounded
        like :meth:`upscale_image`; floats clamped to ``[0, 1]``).
        """
        frames = list(window)
        r = int(self.info.temporal_radius)
        if not frames or len(frames) % 2 == 0:
            raise ConfigError(f"upscale_frames expects an odd number of frames (t-r .. t+r); got {len(frames)}")
        centre = frames[len(frames) // 2]
        if r == 0:
            frames = [centre]
        elif len(frames) != 2 * r + 1:
            raise ConfigError(
                f"upscale_frames: model {self.descriptor.name or self.descriptor.architecture} takes {2 * r + 1} "
                f"frames (temporal radius {r}); got {len(frames)}: pass frames t-{r} .. t+{r} (edge frames repeated)"
            )
        first = frames[0]
        for i, f in enumerate(frames):
            if not isinstance(f, np.ndarray) or f.ndim != 3 or f.shape[2] not in (1, 3):
                raise ConfigError(f"upscale_frames: frame {i} must be an (H, W, 1|3) array; got "
                                  f"{getattr(f, 'shape', type(f).__name__)}")  # fmt: skip
            if f.shape != first.shape or f.dtype != first.dtype:
                raise ConfigError(f"upscale_frames: frame {i} is {f.shape} {f.dtype}, frame 0 is {first.shape} "
                                  f"{first.dtype}; all frames of a window must match")  # fmt: skip
        cs = self.info.color_space
        expected = model_channels(cs)
        if self.info.in_channels != expected or self.info.out_channels != expected:
            raise InferenceError(f"a {cs} model should take and return {expected} channels; this one has "
                                 f"in={self.info.in_channels}, out={self.info.out_channels}")  # fmt: skip
        xs = [torch.from_numpy(np.ascontiguousarray(_to_unit_float(f))).permute(2, 0, 1)[None].to(self._device)
              for f in frames]  # fmt: skip
        packed = torch.cat([to_model_space(x, cs) for x in xs], 1)
        y = self._upscale_tensor(packed, frames=len(frames))
        y = from_model_space(y, cs, source=xs[len(xs) // 2]).clamp_(0, 1)[0]
        if first.dtype in (np.uint8, np.uint16):
            return _quantize_into(y, np.empty((int(y.shape[-2]), int(y.shape[-1]), int(y.shape[0])), first.dtype))
        return y.permute(1, 2, 0).to("cpu", torch.float32).numpy()

    def upscale_image(self, img: DecodedImage) -> DecodedImage:
        """Upscale a decoded image; pixels and alpha keep their dtype (8 or 16 bit) and channel count.

        Values are clamped and rounded like MATLAB (``floor(x * max + 0.5)``). Alpha is resized with MATLAB bicubic
        ``imresize``, never through the network. Other fields (mode, format, ICC profile, info) are carried over.

        Memory: the output is allocated once in its integer dtype and filled region by region (see :meth:`plan`);
        when the image and its working set fit ``max_memory`` it is one region and the result is exactly the
        untiled one. :attr:`last_plan` tells how it was cut.
        """
        pix = _check_image(img)
        h, w, c = pix.shape
        has_alpha = img.alpha is not None
        plan = self.plan(h, w, channels=c, has_alpha=has_alpha, itemsize=pix.itemsize, hold_input=True)
        oh, ow = plan.out_height, plan.out_width
        out = np.empty((oh, ow, c), pix.dtype)
        out_alpha = np.empty((oh, ow), pix.dtype) if has_alpha else None
        for _ in self.iter_bands(image_reader(img), plan, channels=c, has_alpha=has_alpha, dtype=pix.dtype,
                                 out=(out, out_alpha)):  # fmt: skip
            pass
        return dataclasses.replace(img, pixels=out, alpha=out_alpha, info=dict(img.info))

    def upscale_images(
        self, imgs: Sequence[DecodedImage], *, batch: int | None = None
    ) -> list[DecodedImage | Exception]:
        """:meth:`upscale_image` of each image, with whole images of one shape sent through the network together.

        Images the plan runs whole (one region) that share ``(height, width, channels, dtype, alpha or not)`` are
        stacked, at most ``batch`` (default ``device_batch``) per forward pass, fewer when the memory plan says a
        batch of that many does not fit (``k`` whole images need ``k`` times one's working set). Images that need
        regions, and every image of a batch whose run raised, are done one by one with :meth:`upscale_image`. The
        result of image ``i`` is in slot ``i``: a :class:`DecodedImage`, or the exception it raised (never raised
        here; ``KeyboardInterrupt`` and other non-``Exception`` errors propagate).

        Results equal :meth:`upscale_image`'s up to float rounding of the batched convolution (a kernel may sum in
        another order for another batch size), which can move a value by one level at a rounding boundary.
        """
        want = self.device_batch if batch is None else batch
        if isinstance(want, bool) or not isinstance(want, int) or want < 1:
            raise ConfigError(f"batch: expected a positive integer (images per forward); got {batch!r}")
        results: list[DecodedImage | Exception | None] = [None] * len(imgs)
        groups: dict[tuple, list[int]] = {}
        for i, img in enumerate(imgs):
            try:
                pix = _check_image(img)
                h, w, c = pix.shape
                has_alpha = img.alpha is not None
                plan = self.plan(h, w, channels=c, has_alpha=has_alpha, itemsize=pix.itemsize, hold_input=True)
            except Exception as e:  # noqa: BLE001 - returned in the image's slot
                results[i] = e
                continue
            key = (h, w, c, pix.dtype.str, has_alpha) if not plan.tiled else ("regions", i)
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            k = 1 if key[0] == "regions" or len(idx) == 1 else self._whole_batch_size(*key, want=min(want, len(idx)))
            for start in range(0, len(idx), k):
                part = idx[start : start + k]
                if len(part) > 1:
                    try:
                        for i, out in zip(part, self._whole_batch([imgs[i] for i in part])):
                            results[i] = out
                        continue
                    except Exception as e:  # noqa: BLE001 - the images are redone one by one below
                        logger.warning("a batch of %d %dx%d images failed (%s: %s); running them one by one",
                                       len(part), key[1], key[0], type(e).__name__, e)  # fmt: skip
                        self._empty_cache()
                for i in part:
                    try:
                        results[i] = self.upscale_image(imgs[i])
                    except Exception as e:  # noqa: BLE001 - returned in the image's slot
                        results[i] = e
        return results  # type: ignore[return-value]

    def _whole_batch_size(
        self, height: int, width: int, channels: int, dtype: str, has_alpha: bool, *, want: int
    ) -> int:
        """The most whole ``height x width`` images (at most ``want``) one forward pass may take under the memory
        budget: as :meth:`plan`'s whole-image check with ``k`` times the pixels (working set, held input and output
        arrays, and on CUDA the host staging buffers); a batch of at most :data:`PROBE_PIXELS` in all is not
        measured, like one such image."""
        if want <= 1 or want * height * width <= PROBE_PIXELS:
            return max(want, 1)
        itemsize = np.dtype(dtype).itemsize
        ct = channels + int(has_alpha)
        oh, ow = self.output_size(height, width)
        per_in, per_out = height * width * ct * itemsize, oh * ow * ct * itemsize
        budget, dev_budget = self.budget(), self._device_budget()
        a, b = self._estimate(channels, has_alpha, itemsize)
        for k in range(want, 1, -1):
            work = a + b * k * height * width
            if dev_budget is not None:  # the network's working set is on the device; the host holds staging copies
                if work > dev_budget:
                    continue
                work = k * (per_in + 2 * per_out)
            if k * (per_in + per_out) + work <= budget:
                return k
        return 1

    @torch.no_grad()
    def _whole_batch(self, imgs: list[DecodedImage]) -> list[DecodedImage]:
        """Images of one shape, dtype and alpha layout, each run whole, through the network together: one upload,
        ``len(imgs)`` images per forward pass, one quantised download on CUDA (up to :data:`_PINNED_MAX` bytes;
        image by image above)."""
        pix0 = imgs[0].pixels
        h, w, c = pix0.shape
        dt = pix0.dtype
        has_alpha = imgs[0].alpha is not None
        n = len(imgs)
        maxv = float(np.iinfo(dt).max)
        oh, ow = self.output_size(h, w)
        src = self._upload([image_reader(im)(0, h, 0, w) for im in imgs])  # (n, h, w, c [+ alpha])
        x = src[..., :c].permute(0, 3, 1, 2).to(torch.float32).div_(maxv)
        y = self._upscale_colour(x, batch=n)
        del x
        alpha = None
        if has_alpha:  # MATLAB bicubic per plane, as upscale_image does
            planes = src[..., c].to(torch.float32).div_(maxv)
            alpha = torch.stack([imresize(planes[i], output_shape=(oh, ow)) for i in range(n)]).clamp_(0, 1)
            del planes
        del src
        outs: list[DecodedImage] = []
        if self._device.type == "cuda" and n * oh * ow * (c + int(has_alpha)) * dt.itemsize <= _PINNED_MAX:
            full = y if alpha is None else torch.cat([y, alpha[:, None]], 1)
            del y, alpha
            host = _quantize_to_host(full, dt).numpy()  # (n, oh, ow, c [+ 1]), one copy back
            del full
            for i, img in enumerate(imgs):
                pix = np.ascontiguousarray(host[i, ..., :c])
                a_out = np.ascontiguousarray(host[i, ..., c]) if has_alpha else None
                outs.append(dataclasses.replace(img, pixels=pix, alpha=a_out, info=dict(img.info)))
        else:
            for i, img in enumerate(imgs):
                pix = _quantize_into(y[i], np.empty((oh, ow, c), dt))
                a_out = None
                if alpha is not None:
                    a_out = _quantize_into(alpha[i][None], np.empty((oh, ow, 1), dt))[..., 0]
                outs.append(dataclasses.replace(img, pixels=pix, alpha=a_out, info=dict(img.info)))
        self.stats["regions"] += n
        return outs

    def _upload(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """Integer ``(h, w, C)`` arrays of one shape -> one ``(k, h, w, C)`` tensor on the device. On CUDA (up to
        :data:`_PINNED_MAX` bytes) through a pinned host buffer and a non-blocking copy, ordered on the current
        stream before the kernels that read it."""
        first = arrays[0]
        shape = (len(arrays), *first.shape)
        nbytes = math.prod(shape) * first.itemsize
        if self._device.type == "cuda" and nbytes <= _PINNED_MAX:
            buf = torch.empty(shape, dtype=_TORCH_INT[first.dtype], pin_memory=True)
            np.stack(arrays, axis=0, out=buf.numpy())
            return buf.to(self._device, non_blocking=True)
        return torch.from_numpy(np.stack(arrays, axis=0)).to(self._device)

    # ------------------------------------------------------------------ large images

    @property
    def halo(self) -> int:
        """Context (input pixels) around each region: the tile overlap (or the model's receptive halo) plus 4 for
        the bicubic steps (pre-upsampling, chroma, alpha) and the inner tiles' cross-fade."""
        cfg = self.tiling
        base = cfg.overlap if cfg.overlap is not None else int(self.info.receptive_halo)
        return ceil_to(base + 4 + math.ceil(cfg.blend / 2), max(int(self.info.size_multiple), 1))

    def budget(self) -> int:
        """Host bytes one image may use now: ``max_memory``, or ``memory_share`` of the memory available."""
        if self.max_memory is not None:
            return self.max_memory
        return int(available_memory() * self.memory_share)

    def _device_budget(self) -> int | None:
        if self._device.type != "cuda":
            return None
        free, _total = torch.cuda.mem_get_info(self._device)
        return int(free * 0.8)

    def plan(
        self, height: int, width: int, *, channels: int = 3, has_alpha: bool = False, itemsize: int = 1,
        hold_input: bool = False, hold_output: bool = True, reserve: int = 0,
    ) -> RegionPlan:
        """How an image of ``height x width`` is cut into regions under the memory budget.

        ``hold_input``/``hold_output``: the whole input / output array stays in memory (decoded images; array
        outputs) and counts against the budget; otherwise only a band of output rows is held (streamed writers).
        ``reserve``: bytes the caller holds besides (a reader's cache, a writer's buffers), also counted.
        The working set of a region comes from measuring this upscaler on two small probe regions (once per
        channel layout), so it holds for any architecture. Images of up to :data:`PROBE_PIXELS` are run whole
        without measuring. Raises :class:`InferenceError` when not even a small region fits.
        """
        oh, ow = self.output_size(height, width)
        ct = channels + int(has_alpha)
        m = max(int(self.info.size_multiple), 1)
        integer = None if self.outscale is not None else int(self.info.scale)
        held = (height * width * ct * itemsize if hold_input else 0) + (oh * ow * ct * itemsize if hold_output else 0)
        held += int(reserve)
        if height * width <= PROBE_PIXELS:
            plan = plan_regions(height=height, width=width, out_height=oh, out_width=ow, halo=self.halo, multiple=m,
                                integer_scale=integer, fits=lambda _h, _w: None, budget=None)  # fmt: skip
            self.last_plan = plan
            return plan
        budget = self.budget()
        dev_budget = self._device_budget()
        if self._device.type == "cpu":
            bound_heap()
        a, b = self._estimate(channels, has_alpha, itemsize)
        halo = self.halo
        ry, rx = oh / height, ow / width

        def fits(core_h: int, core_w: int) -> int | None:
            px = min(height, core_h + 2 * halo) * min(width, core_w + 2 * halo)
            band = 0 if hold_output else math.ceil(core_h * ry) * ow * ct * itemsize
            work = a + b * px
            if dev_budget is not None:  # the network's working set is on the device; the host holds uint arrays
                if work > dev_budget:
                    return None
                work = px * ct * itemsize + math.ceil(core_h * ry) * math.ceil(core_w * rx) * ct * itemsize * 2
            total = int(held + band + work)
            return total if total <= budget else None

        advice = "raise --max-memory (max_memory=...)"
        if hold_output:
            advice += "; PNG and TIFF outputs of the upscale job are streamed and need no whole output in memory"
        plan = plan_regions(height=height, width=width, out_height=oh, out_width=ow, halo=halo, multiple=m,
                            integer_scale=integer, fits=fits, budget=budget, advice=advice)  # fmt: skip
        self.last_plan = plan
        if plan.tiled:
            logger.info(
                "%dx%d image: %d regions of up to %s input pixels (budget %s, estimated peak %s)", width, height,
                plan.regions, "x".join(map(str, plan.tile or ())), format_bytes(budget),
                format_bytes(plan.estimate or 0),
            )  # fmt: skip
        return plan

    def _estimate(self, channels: int, has_alpha: bool, itemsize: int) -> tuple[float, float]:
        """``(a, b)``: a region window of ``p`` input pixels peaks at about ``a + b * p`` bytes (device memory on
        CUDA, process memory on CPU), measured on two probe regions and padded by 25% + 16 MiB."""
        key = (channels, has_alpha, itemsize)
        if key in self._estimates:
            return self._estimates[key]
        dtype = np.uint8 if itemsize == 1 else np.uint16
        rng = np.random.default_rng(0)
        m = max(int(self.info.size_multiple), 1)
        points = []
        for i, side in enumerate((_PROBE_SIDES[0], *_PROBE_SIDES)):  # the first run warms up (one-time allocations)
            side = ceil_to(side, m)
            crop = rng.integers(0, np.iinfo(dtype).max, (side, side, channels + int(has_alpha)), dtype=dtype)
            geom = (0, 0, 0, side, 0, side)
            oh, ow = self.output_size(side, side)
            peak = measure_peak(
                lambda crop=crop, geom=geom, oh=oh, ow=ow: self._region(
                    crop, geom, (0, oh, 0, ow), None, channels=channels, has_alpha=has_alpha, dtype=dtype),
                self._device,
            )  # fmt: skip
            if i:
                points.append((side * side, peak))
        self.stats["probes"] += 1
        if any(p is None for _, p in points):  # cannot measure (not Linux): a generous static guess per pixel
            s2 = float(self.scale) ** 2
            b = 4.0 * (channels + 1) * (8 + 8 * s2) + 4096.0
            est = (64.0 * 1024**2, b)
        else:
            (p1, m1), (p2, m2) = points
            b = max((m2 - m1) / (p2 - p1), m2 / p2, 1.0)  # type: ignore[operator]
            a = max(m1 - b * p1, 0.0)  # type: ignore[operator]
            est = (a * 1.25 + 16 * 1024**2, b * 1.25)
        logger.info("memory per region: %s + %.0f bytes per input pixel (measured on %s)",
                    format_bytes(est[0]), est[1], self._device)  # fmt: skip
        self._estimates[key] = est
        return est

    def iter_bands(
        self, read: RegionReader, plan: RegionPlan, *, channels: int, has_alpha: bool, dtype: np.dtype | type,
        out: tuple[np.ndarray, np.ndarray | None] | None = None, name: str = "",
        progress: Callable[[str], None] | None = None,
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """Run ``plan`` over the input ``read`` gives, one row of regions at a time.

        Yields ``(first output row, pixels band (rows, W', C), alpha band (rows, W') or None)`` in row order, of
        ``dtype``. With ``out`` (preallocated output pixels and alpha), bands are views of it, filled in place;
        otherwise each band is a new array (for streamed writers). Long images report their progress every 10 s
        through ``progress`` (default: the ``srbatch.inference`` logger at INFO).
        """
        report = progress if progress is not None else logger.info
        self.last_plan = plan
        dt = np.dtype(dtype)
        ow = plan.out_width
        start = last_log = time.monotonic()
        for i, ((y0, y1), (a, b)) in enumerate(zip(plan.rows, plan.out_rows)):
            if out is not None:
                band, band_alpha = out[0][a:b], (out[1][a:b] if out[1] is not None else None)
            else:
                band = np.empty((b - a, ow, channels), dt)
                band_alpha = np.empty((b - a, ow), dt) if has_alpha else None
            for (x0, x1), (c, d) in zip(plan.cols, plan.out_cols):
                need_y, need_x = self._needed(plan, a, b, c, d)
                wy0, wy1 = plan.window(y0, y1, plan.height, need_y)
                wx0, wx1 = plan.window(x0, x1, plan.width, need_x)
                crop = read(wy0, wy1, wx0, wx1)
                self._region(crop, (wy0, wx0, y0, y1, x0, x1), (a, b, c, d), plan, channels=channels,
                             has_alpha=has_alpha, dtype=dt, dest=(band[:, c:d], None if band_alpha is None else
                                                                  band_alpha[:, c:d]))  # fmt: skip
                del crop
                self.stats["regions"] += 1
            now = time.monotonic()
            if plan.tiled and now - last_log >= 10:
                last_log = now
                report(f"{name or 'image'}: {i + 1} of {len(plan.rows)} rows of regions done "
                       f"({100 * b / plan.out_height:.0f}%, {now - start:.0f} s)")
            yield a, band, band_alpha

    def _resize_bands(self, plan: RegionPlan, upscaled: bool) -> tuple[tuple, tuple]:
        """Banded MATLAB weights of the final resize per axis: from the model's output (``upscaled``) or from the
        input (alpha) to the output size."""
        from srbatch.metrics.resize import banded_weights

        s = int(self.info.scale) if upscaled else 1
        hy, wx = plan.height * s, plan.width * s
        return (banded_weights(hy, plan.out_height, plan.out_height / hy, True),
                banded_weights(wx, plan.out_width, plan.out_width / wx, True))  # fmt: skip

    def _needed(
        self, plan: RegionPlan, a: int, b: int, c: int, d: int
    ) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """Input ranges the final resize of output rows [a, b) and columns [c, d) reads (outscale only)."""
        if self.outscale is None or not plan.tiled:
            return None, None
        s = int(self.info.scale)
        (iy, _), (ix, _) = self._resize_bands(plan, True)
        ya, yb = int(iy[a:b].min()), int(iy[a:b].max()) + 1
        xa, xb = int(ix[c:d].min()), int(ix[c:d].max()) + 1
        return (ya // s, -(-yb // s)), (xa // s, -(-xb // s))

    @torch.no_grad()
    def _region(
        self, crop: np.ndarray, geom: tuple[int, int, int, int, int, int], out_box: tuple[int, int, int, int],
        plan: RegionPlan | None, *, channels: int, has_alpha: bool, dtype: np.dtype | type,
        dest: tuple[np.ndarray, np.ndarray | None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One region: ``crop`` is the window (input pixels, alpha last) whose top-left input pixel is
        ``geom[:2]``; ``geom[2:]`` the core (y0, y1, x0, x1); ``out_box`` the output rows and columns (a, b, c, d)
        it makes. Writes the quantised core output into ``dest`` (or returns it)."""
        wy0, wx0, y0, y1, x0, x1 = geom
        a, b, c, d = out_box
        dt = np.dtype(dtype)
        maxv = float(np.iinfo(dt).max)
        whole = plan is None or not plan.tiled
        if self._device.type == "cuda":  # one pinned upload of the window, alpha included
            src = self._upload([crop])[0]
            colour_src, alpha_src = src[..., :channels], (src[..., channels] if has_alpha else None)
        else:
            colour_src = torch.from_numpy(np.ascontiguousarray(crop[..., :channels]))
            alpha_src = torch.from_numpy(np.ascontiguousarray(crop[..., channels])) if has_alpha else None
        x = colour_src.permute(2, 0, 1)[None].to(torch.float32).div_(maxv)
        if self.outscale is None or whole:
            y = self._upscale_colour(x)
            if not whole:
                s = int(self.info.scale)
                y = y[..., (y0 - wy0) * s : (y1 - wy0) * s, (x0 - wx0) * s : (x1 - wx0) * s]
        else:  # model scale, then the exact rows/columns of the final MATLAB resize this core produces
            from srbatch.metrics.resize import resize_axis

            assert plan is not None
            s = int(self.info.scale)
            y = self._upscale_colour(x, model_scale=True)
            (iy, wy), (ix, wx) = self._resize_bands(plan, True)
            y = resize_axis(y, -2, iy[a:b].to(y.device), wy[a:b], offset=wy0 * s)
            y = resize_axis(y, -1, ix[c:d].to(y.device), wx[c:d], offset=wx0 * s)
        del x, colour_src
        pix = _quantize_into(y[0], dest[0] if dest is not None else np.empty((b - a, d - c, channels), dt))
        del y
        alpha = None
        if alpha_src is not None:
            plane = alpha_src.to(torch.float32).div_(maxv)
            if whole:
                ar = imresize(plane, output_shape=(b - a, d - c))
            else:
                from srbatch.metrics.resize import resize_axis

                assert plan is not None
                (iy, wy), (ix, wx) = self._resize_bands(plan, False)
                ar = resize_axis(plane.double(), -2, iy[a:b].to(plane.device), wy[a:b], offset=wy0)
                ar = resize_axis(ar, -1, ix[c:d].to(plane.device), wx[c:d], offset=wx0).float()
            plane_out = dest[1] if dest is not None and dest[1] is not None else np.empty((b - a, d - c), dt)
            alpha = _quantize_into(ar.clamp_(0, 1)[None], plane_out[..., None])[..., 0]
        return pix, alpha

    # ------------------------------------------------------------------ colour handling

    def _upscale_colour(
        self, x: torch.Tensor, *, model_scale: bool = False, batch: int | None = None
    ) -> torch.Tensor:
        """(N, 1|3, H, W) grey or RGB in [0, 1] -> same channels upscaled, via the model's colour space; ``batch``
        items per forward pass (None: ``tiling.batch_size``)."""
        cs = self.info.color_space
        expected = model_channels(cs)
        if self.info.in_channels != expected or self.info.out_channels != expected:
            raise InferenceError(
                f"a {cs} model should take and return {expected} channels; this one has in={self.info.in_channels},"
                f" out={self.info.out_channels}; use upscale_tensor for models outside the RGB/Y/YCbCr/L conventions"
            )
        y = self._upscale_tensor(to_model_space(x, cs), model_scale=model_scale, batch=batch)
        return from_model_space(y, cs, source=x)

    def _resize_plane(self, plane: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(plane, dtype=np.float32)).to(self._device)
        return imresize(t, output_shape=size).clamp_(0, 1)

    # ------------------------------------------------------------------ tiling

    def _run(self, x: torch.Tensor, *, batch: int | None = None) -> torch.Tensor:
        """Model-input tensor (N, C, H, W) float32 on device -> model output, with padding, tiling and OOM splits;
        ``batch`` items (whole images or tiles) per forward (None: ``tiling.batch_size``), never above a cap an
        earlier out-of-memory split set."""
        m = max(int(self.info.size_multiple), 1)
        s = 1 if self.info.input_upsampled else int(self.info.scale)
        h, w = int(x.shape[-2]), int(x.shape[-1])
        ph, pw = ceil_to(h, m) - h, ceil_to(w, m) - w
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        cfg = self.tiling
        hp, wp = int(x.shape[-2]), int(x.shape[-1])
        half_blend = math.ceil(cfg.blend / 2)
        margin = (cfg.overlap if cfg.overlap is not None else int(self.info.receptive_halo)) + half_blend
        if cfg.tile == 0:
            tile = None
        else:
            tile = cfg.tile if cfg.tile is not None else self.info.tile_hint
            tile = max(hp, wp) if tile is None else tile
            if self._tile_cap is not None:
                tile = min(tile, self._tile_cap)
        want = cfg.batch_size if batch is None else max(int(batch), 1)
        batch = min(want, self._batch_cap or want)
        while True:
            try:
                out = run_tiled(
                    x, lambda t: self._forward_checked(t, s), tile=tile, margin=margin, half_blend=half_blend,
                    multiple=m, scale=s, batch=batch, out_channels=int(self.info.out_channels),
                )
                break
            except _TileOOM as e:
                self._empty_cache()
                new_batch = max(1, batch // 2)
                new_tile = None if tile is None else ceil_to(min(tile, max(hp, wp)) // 2, m)
                too_small = tile is None or new_tile is None or new_tile < max(cfg.min_tile, m)
                if too_small and new_batch == batch:
                    what = "with tiling disabled (tile=0)" if tile is None else f"at the minimum tile of {tile} px"
                    raise InferenceError(
                        f"out of memory on a {hp}x{wp} model input {what}, batch {batch}, {self._dtype} on "
                        f"{self._device}; use a smaller tile (TilingConfig(tile=..., min_tile=...)), half precision "
                        "or a device with more memory"
                    ) from e.original
                if not too_small:
                    tile = new_tile
                batch = new_batch
                self._tile_cap, self._batch_cap = tile, batch
                self.stats["oom_splits"] += 1
                logger.warning("out of memory; retrying with tile=%s batch=%d (%s)", tile, batch, e)
        return out[..., : h * s, : w * s]

    # ------------------------------------------------------------------ forward passes

    def _forward(self, x: torch.Tensor, *, fp32: bool = False) -> torch.Tensor:
        """One forward pass of the network on a batch already on the device (``x`` in the compute dtype).

        ``fp32=True`` uses the float32 copy of the network. Tests override this to simulate failures.
        """
        if fp32:
            module: Callable[[torch.Tensor], torch.Tensor] = self._fp32_module()
        else:
            module = self._compiled if self._compiled is not None else self.module
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():  # not inference_mode: its tensors refuse the in-place steps after the network
            if fp32 or not self._compile_pending:
                return module(x)
            start = time.perf_counter()  # the first compiled forward: dynamo tracing + inductor codegen
            out = module(x)
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
            self._compile_pending = False
            self.stats["compile_s"] = time.perf_counter() - start
            logger.info("torch.compile: first forward (compilation) took %.1f s on a %s input",
                        self.stats["compile_s"], tuple(x.shape))  # fmt: skip
            return out

    def _fp32_module(self) -> torch.nn.Module:
        if self._module_fp32 is None:
            logger.info("making a float32 copy of the network for half-precision fallbacks")
            self._module_fp32 = copy.deepcopy(self.descriptor.module).to(self._device, torch.float32).eval()
        return self._module_fp32

    def _forward_checked(self, inp: torch.Tensor, s: int) -> torch.Tensor:
        """Forward a batch in the compute dtype; redo it in float32 when half precision broke; float32 result."""
        try:
            out = self._forward(inp.to(self._dtype))
            if self._dtype != torch.float32 and bool(half_precision_failed(inp, out).any()):
                self.stats["fp32_fallbacks"] += 1
                logger.warning("%s output was non-finite or black; redoing the batch in float32", self._dtype)
                out = self._forward(inp.to(torch.float32), fp32=True)
        except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
            if _is_oom(e):
                raise _TileOOM(e) from e
            raise
        expected = (inp.shape[0], self.info.out_channels, inp.shape[-2] * s, inp.shape[-1] * s)
        if tuple(out.shape) != tuple(expected):
            raise InferenceError(
                f"model {self.descriptor.name or self.descriptor.architecture} returned shape {tuple(out.shape)} for "
                f"input {tuple(inp.shape)}; expected {tuple(expected)} from its descriptor (scale {s}, "
                f"{self.info.out_channels} channels)"
            )
        self.stats["tiles"] += int(inp.shape[0])
        self.stats["batches"] += 1
        out = out.float()
        if not _all_finite(out):
            raise InferenceError(
                f"model {self.descriptor.name or self.descriptor.architecture} produced NaN/inf in float32 on a "
                f"{tuple(inp.shape)} input; the weights may be corrupt or the input out of range"
            )
        return out

    def _empty_cache(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


def image_reader(img: DecodedImage) -> RegionReader:
    """The :data:`RegionReader` of a decoded image: views of its pixels, with alpha appended (a copy) when it has
    one."""
    pix, alpha = img.pixels, img.alpha

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if alpha is None:
            return pix[y0:y1, x0:x1]
        return np.concatenate([pix[y0:y1, x0:x1], alpha[y0:y1, x0:x1, None].astype(pix.dtype)], axis=2)

    return read


def _all_finite(t: torch.Tensor) -> bool:
    """``torch.isfinite(t).all()`` without a temporary: one min/max reduction, through which NaN propagates (an inf
    is the min or the max). 17x faster than ``isfinite`` on CPU and it allocates nothing the size of ``t``."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def half_precision_failed(inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per-item bool: the output has NaN/inf, or is all black (max < 1e-6) while the input is not."""
    n = out.shape[0]
    o = out.detach().reshape(n, -1).float()
    i = inp.detach().reshape(inp.shape[0], -1).float()
    nonfinite = ~torch.isfinite(o).all(dim=1)
    black = (o.amax(dim=1) < _BLACK) & (i.amax(dim=1) >= _BLACK)
    return nonfinite | black


def _to_unit_float(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if a.dtype in (np.float32, np.float64, np.float16):
        return a.astype(np.float32, copy=False)
    raise ConfigError(f"expected uint8, uint16 or float pixels in [0, 1]; got {a.dtype}")


def _check_image(img: DecodedImage) -> np.ndarray:
    """The pixels of a decoded image the engine can run, or :class:`ConfigError` saying what is wrong."""
    pix = img.pixels
    if not isinstance(pix, np.ndarray) or pix.dtype not in (np.uint8, np.uint16) or pix.ndim != 3 or (
        pix.shape[2] not in (1, 3)
    ):
        raise ConfigError(
            f"upscale_image expects pixels (H, W, 1|3) of uint8 or uint16; got {getattr(pix, 'dtype', type(pix))} "
            f"{getattr(pix, 'shape', '')}"
        )
    if img.alpha is not None and img.alpha.shape != pix.shape[:2]:
        raise ConfigError(f"alpha shape {img.alpha.shape} does not match pixels {pix.shape[:2]}")
    return pix


def _quantize_to_host(y: torch.Tensor, dtype: np.dtype | type) -> torch.Tensor:
    """CUDA ``(N, C, H, W)`` floats in [0, 1] -> pinned host ``(N, H, W, C)`` uint8/uint16 with MATLAB's rounding
    ``floor(x * max + 0.5)`` in float64, quantised on the device (a few MB of float64 rows at a time) and copied
    back in one non-blocking copy followed by one synchronisation."""
    n, c, h, w = (int(v) for v in y.shape)
    dt = np.dtype(dtype)
    maxv = float(np.iinfo(dt).max)
    tdt = _TORCH_INT[dt]
    q = torch.empty((n, h, w, c), dtype=tdt, device=y.device)
    step = max(1, (64 * 1024**2) // max(1, n * c * w * 8))
    for r in range(0, h, step):
        f = y[:, :, r : r + step].to(torch.float64).clamp_(0.0, 1.0).mul_(maxv).add_(0.5).floor_()
        q[:, r : r + step] = f.permute(0, 2, 3, 1)
        del f
    host = torch.empty(q.shape, dtype=tdt, pin_memory=True)
    host.copy_(q, non_blocking=True)
    torch.cuda.current_stream(y.device).synchronize()
    return host


def _quantize_into(y: torch.Tensor, out: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` floats in [0, 1] -> ``out`` ``(H, W, C)`` uint8/uint16, MATLAB's rounding ``floor(x * max + 0.5)``
    computed in float64 (as ``im2uint8``; uint8 from float32 in float32, see below), a few MB of rows at a time so the float64 copy stays small. On CUDA (up to
    :data:`_PINNED_MAX` bytes) quantised on the device and copied back at once (:func:`_quantize_to_host`)."""
    if y.device.type == "cuda" and out.nbytes <= _PINNED_MAX:
        out[...] = _quantize_to_host(y[None], out.dtype).numpy()[0]
        return out
    c, h, w = (int(v) for v in y.shape)
    if out.dtype == np.uint8 and y.dtype == torch.float32:
        # uint8 from float32 in float32: clamp(x * 255 + 0.5, 0, 255) truncated (= floored: it is not negative) is
        # floor(clamp(x, 0, 1) * 255 + 0.5) except where x * 255 lies within one float32 rounding of a half level
        # (7 in 10^6 uniformly random values, then 1 level up). Written through torch's transposing copy. About 3x
        # faster than the float64 path on CPU.
        dst = torch.from_numpy(out)
        step = max(1, (8 * 1024**2) // max(1, c * w * 4))
        for r in range(0, h, step):
            q = y[:, r : r + step].mul(255.0).add_(0.5).clamp_(0.0, 255.0).to(torch.uint8)
            dst[r : r + step].copy_(q.permute(1, 2, 0))
        return out
    maxv = float(np.iinfo(out.dtype).max)
    target = torch.uint8 if out.dtype == np.uint8 else torch.int32
    step = max(1, (8 * 1024**2) // max(1, c * w * 8))
    for r in range(0, h, step):
        q = y[:, r : r + step].to(torch.float64).clamp_(0.0, 1.0).mul_(maxv).add_(0.5).floor_()
        out[r : r + step] = q.to(target).permute(1, 2, 0).cpu().numpy()
    return out
