"""The comparison job's parts without Ray: crop choice, user boxes, labels, mode choice, the plot and the page."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from srbatch.compare.config import CompareConfig, Crop, parse_crops
from srbatch.compare.crops import auto_crops, fit_crops
from srbatch.compare.report import ImagePanel, build_html, plot_svg, render_panel
from srbatch.compare.runner import choose_mode, model_labels
from srbatch.errors import ConfigError


def _flat_with_texture(h: int = 200, w: int = 240, at: tuple[int, int] = (120, 40)) -> np.ndarray:
    img = np.full((h, w, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    img[at[0] : at[0] + 48, at[1] : at[1] + 48] = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)  # the only detail
    return img


def test_auto_crops_find_the_detail_then_the_disagreement() -> None:
    hr = _flat_with_texture()
    a = hr.copy()
    b = hr.copy()
    b[16:56, 160:200] = 0  # the models differ only here
    crops = auto_crops(hr, [a, b], scale=4, size=48, count=2)
    assert [c.reason for c in crops] == ["detail", "models disagree"]
    d, g = crops
    from srbatch.compare.crops import _overlap

    assert d.w == d.h == 48 and _overlap(d, Crop(x=40, y=120, w=48, h=48)) >= 0.75  # on a 12 px grid
    assert _overlap(g, Crop(x=160, y=16, w=40, h=40)) >= 0.75 and g.x % 4 == 0 and g.y % 4 == 0
    # one model: no disagreement map; the crops are the most detailed regions that do not overlap much
    only = auto_crops(hr, [a], scale=2, size=40, count=3)
    assert [c.reason for c in only] == ["detail"] * len(only) and only[0].x % 2 == 0
    # a crop larger than the image shrinks to it
    assert auto_crops(hr[:30, :30], [], scale=4, size=96, count=1)[0].w == 28


def test_user_boxes_parse_clip_align_and_errors() -> None:
    boxes = parse_crops("10,11,40,30; 500,500,8,8")
    assert boxes[0] == Crop(x=10, y=11, w=40, h=30)
    fitted = fit_crops(boxes, width=100, height=80, scale=4)
    assert fitted == [Crop(x=8, y=8, w=40, h=32)]  # aligned to the LR grid, the outside box dropped
    for bad in ("1,2,3", "a,b,c,d", "1,2,0,4", ";"):
        with pytest.raises(ConfigError, match="crops"):
            parse_crops(bad)
    with pytest.raises(ConfigError, match="crops"):
        from srbatch.compare.config import load_compare_config

        load_compare_config(None, {"images": "x/", "models": "bicubic", "output": "o/", "crops": "1,2"})


def test_config_models_and_mode_errors() -> None:
    from srbatch.compare.config import load_compare_config

    cfg = load_compare_config(None, {"images": "x/", "models": "bicubic, default ,s3://m/a.pth", "output": "o/"})
    assert cfg.models == ["bicubic", "default", "s3://m/a.pth"]
    with pytest.raises(ConfigError, match="models"):
        load_compare_config(None, {"images": "x/", "models": " , ", "output": "o/"})
    with pytest.raises(ConfigError, match="--lr"):
        load_compare_config(None, {"images": "x/", "models": "bicubic", "output": "o/", "lr": "y/", "mode": "real"})
    with pytest.raises(ConfigError, match="unknown field"):
        load_compare_config(None, {"images": "x/", "models": "bicubic", "output": "o/", "modle": "x"})


def test_model_labels_are_short_and_unique() -> None:
    specs = ["bicubic", "s3://zoo/IMDN_x4.pth", "/m/dogs-x4/", "a/IMDN_x4.pth", "default"]
    assert model_labels(specs) == ["bicubic", "IMDN_x4#1", "dogs-x4", "IMDN_x4#2", "default"]


def test_choose_mode_from_image_headers(tmp_path) -> None:
    for i, size in enumerate([(300, 200), (256, 256), (20, 20)]):
        Image.new("RGB", size).save(tmp_path / f"{i}.png")
    uris = sorted(str(p) for p in tmp_path.iterdir())
    cfg = CompareConfig(images=str(tmp_path), models="bicubic", output="o/", scale=4)
    assert choose_mode(cfg, uris)[0] == "reference"  # median short side 200 >= 32 x 4
    assert choose_mode(cfg.model_copy(update={"scale": 8}), uris)[0] == "real"  # 200 < 256
    assert choose_mode(cfg.model_copy(update={"mode": "real"}), uris) == ("real", "as asked")
    assert choose_mode(cfg.model_copy(update={"lr": "x/"}), uris)[0] == "reference"


def _tags(page: str) -> list[dict]:
    """Every start tag of ``page`` with its id, class and src, and the ids of the elements it is inside."""
    from html.parser import HTMLParser

    out: list[dict] = []

    class P(HTMLParser):
        stack: list[str | None] = []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            out.append({"tag": tag, "id": a.get("id"), "class": a.get("class"), "src": a.get("src"),
                        "inside": [i for i in self.stack if i]})  # fmt: skip
            if tag not in ("img", "br", "meta"):
                self.stack.append(a.get("id"))

        def handle_endtag(self, tag):
            if tag not in ("img", "br", "meta") and self.stack:
                self.stack.pop()

    P().feed(page)
    return out


def test_panel_files_and_page(tmp_path) -> None:
    hr = _flat_with_texture(64, 96, at=(8, 8))
    lr = hr[::4, ::4].copy()
    written: dict[str, bytes] = {}
    panel = render_panel(index=3, image="cat <1>", lr=lr, hr=hr, outputs={"bicubic": hr, "m2": hr[..., ::-1]},
                         scale=4, crops=None, crop_size=32, crops_per_image=2,
                         write=lambda rel, data: written.__setitem__(rel, data))  # fmt: skip
    assert isinstance(panel, ImagePanel) and len(panel.crops) == 2
    assert set(written) == {panel.thumb, *panel.lr_files, *(panel.hr_files or []), *panel.model_files["bicubic"],
                            *panel.model_files["m2"]}  # fmt: skip
    for rel, data in written.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
        with Image.open(tmp_path / rel) as im:
            assert im.size[0] > 0
            if "crop" in rel:
                assert im.size == (32, 32)  # every crop at output resolution: the same zoom side by side
    rows = [
        {"image": "cat <1>", "model": m, "status": "ok", "psnr_y": p, "ssim_y": 0.9, "psnr_rgb": p, "ssim_rgb": 0.9,
         "runtime_s": t, "architecture": "x", "params": 10, "device": "cpu", "error_type": None, "error_message": None}
        for m, p, t in (("bicubic", 28.0, 0.01), ("m2", 30.5, 0.2))
    ]  # fmt: skip
    page = build_html(title="T <&>", rows=rows, models=["bicubic", "m2"], panels=[panel], scale=4, mode="reference",
                      mode_text="as asked", n_images=1, max_images=40, convention="c", created="now")  # fmt: skip
    assert "<title>T &lt;&amp;&gt;</title>" in page and "cat &lt;1&gt;" in page  # escaped
    assert '<td class="best">30.500</td>' in page and '<td class="best">0.0100</td>' in page
    assert page.count("<circle") == 2 and "Showing" not in page
    assert "src=\"http" not in page and "<script" not in page
    # the structure the browser test and users' links rely on, read back with the standard library's HTML parser
    tags = _tags(page)
    summary_rows = [t for t in tags if t["tag"] == "tr" and "summary" in t["inside"]]
    assert len(summary_rows) == 3  # header + one row per model
    assert [t["id"] for t in tags if t["tag"] == "section"] == ["img1"]
    imgs = [t for t in tags if t["tag"] == "img"]
    classes = [t["class"] for t in imgs]
    assert classes.count("thumb") == 1 and classes.count("crop") == 2 * (1 + 2 + 1)  # 2 crops x (LR, 2 models, HR)
    assert {t["src"] for t in imgs} == set(written)  # every picture shown is a file written, by its relative path
    assert len([t for t in tags if t["tag"] == "div" and t["class"] == "row crop-row"]) == 2
    svg = plot_svg([{"model": "a", "runtime_s": 0.05, "psnr_y": 30.0}, {"model": "b", "runtime_s": 2.0, "psnr_y": 31}])
    assert svg.startswith("<svg") and ">0.1 s<" in svg and ">1 s<" in svg
    assert plot_svg([{"model": "a", "runtime_s": None, "psnr_y": None}]) == ""


def test_large_panel_loads_one_output_at_a_time_and_finds_the_same_places() -> None:
    """The large-image panel: each output loaded twice (maps, then crops), crops cut from the right place, and the
    automatic crops land where the full-resolution ones do (detail, then disagreement)."""
    from srbatch.compare.report import reduced_maps, render_panel_large

    hr = _flat_with_texture(200, 240, at=(120, 40))
    lr = hr[::4, ::4].copy()
    a, b = hr.copy(), hr.copy()
    b[16:56, 160:200] = 0
    loads: list[str] = []

    def loader(name: str, arr: np.ndarray):
        return lambda: (loads.append(name), arr)[1]

    written: dict[str, bytes] = {}
    panel = render_panel_large(index=0, image="x", lr=lr, hr=None, outputs={"a": loader("a", a), "b": loader("b", b)},
                               scale=4, crops=None, crop_size=48, crops_per_image=2,
                               write=lambda rel, data: written.__setitem__(rel, data), factor=8)  # fmt: skip
    assert loads == ["a", "b", "a", "b"]
    full = auto_crops(np.mean([a, b], axis=0).astype(np.uint8), [a, b], scale=4, size=48, count=2)
    from srbatch.compare.crops import _overlap

    assert [c.reason for c in panel.crops] == [c.reason for c in full] == ["detail", "models disagree"]
    for mine, ref in zip(panel.crops, full):
        assert _overlap(mine, ref) >= 0.5 and mine.x % 4 == 0 and mine.y % 4 == 0 and mine.w == 48
    import io

    for j, c in enumerate(panel.crops):
        for label, arr in (("a", a), ("b", b)):
            got = np.asarray(Image.open(io.BytesIO(written[panel.model_files[label][j]])).convert("RGB"))
            np.testing.assert_array_equal(got, arr[c.y : c.y + c.h, c.x : c.x + c.w])
    # the block maps equal plain block means of the whole image
    lum, det, disp = reduced_maps(hr, 8, band=3)
    ref_disp = hr[:200, :240].astype(np.float64).reshape(25, 8, 30, 8, 3).mean(axis=(1, 3))
    assert np.abs(disp.astype(np.float64) - ref_disp).max() <= 0.5 + 1e-9
    assert lum.shape == det.shape == (25, 30) and det.max() > 0
