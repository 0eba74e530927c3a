"""Set5 table: the TensorFlow ESPCN/FSRCNN graphs run by srbatch vs by OpenCV's dnn_superres.

    .venv/bin/python scripts/tf_opencv_table.py [REFS]      # REFS: ../shared/refs beside the checkout by default

Needs the test extra (opencv-contrib-python-headless==4.10.0.84). For each graph and scale: the mean PSNR_Y over Set5
of ``srbatch.evaluate`` (what ``srbatch evaluate --model X.pb --scale s --hr ... --lr ...`` prints) and of OpenCV's
images measured with the same function (``srbatch.metrics.quality.measure``, Y of MATLAB rgb2ycbcr, ``s`` border
pixels shaved), and the largest difference between the Y (OpenCV YCrCb) of srbatch's 8-bit output and OpenCV's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from srbatch.evaluate import evaluate
from srbatch.inference import Upscaler
from srbatch.io.images import decode_image
from srbatch.metrics.quality import measure
from srbatch.models.loader import load_model

MODELS = [
    *(f"tf_espcn_fannymonori/ESPCN_x{s}.pb" for s in (2, 3, 4)),
    *(f"tf_fsrcnn_saafke/FSRCNN{v}_x{s}.pb" for v in ("", "-small") for s in (2, 3, 4)),
]


def main(refs: Path) -> None:
    print("| model | scale | PSNR_Y srbatch (dB) | PSNR_Y OpenCV (dB) | difference (dB) | largest Y difference |")
    print("|---|---|---|---|---|---|")
    for rel in MODELS:
        s = int(rel[-4])
        path = str(refs / "weights" / rel)
        folder = refs / "sets" / "Set5" / f"image_SRF_{s}"
        ours = evaluate(path, scale=s, hr=str(folder / "*_HR.png"), lr=str(folder / "*_LR.png"), device="cpu")
        sr = cv2.dnn_superres.DnnSuperResImpl_create()
        sr.readModel(path)
        sr.setModel("espcn" if "ESPCN" in rel else "fsrcnn", s)
        up = Upscaler(load_model(path), device="cpu")
        psnrs, worst = [], 0
        for lr in sorted(folder.glob("*_LR.png")):
            ref = np.ascontiguousarray(sr.upsample(cv2.imread(str(lr)))[..., ::-1])
            hr = decode_image(lr.with_name(lr.name.replace("_LR", "_HR")).read_bytes()).pixels
            psnrs.append(measure(ref, hr, crop_border=s).psnr_y)
            mine = up.upscale_image(decode_image(lr.read_bytes())).pixels
            ym = cv2.cvtColor(mine, cv2.COLOR_RGB2YCrCb)[..., 0].astype(int)
            yr = cv2.cvtColor(ref, cv2.COLOR_RGB2YCrCb)[..., 0].astype(int)
            worst = max(worst, int(np.abs(ym - yr).max()))
        cv_mean = float(np.mean(psnrs))
        name = rel.rsplit("/", 1)[-1].removesuffix(".pb").rsplit("_x", 1)[0]
        print(f"| {name} | x{s} | {ours.psnr_y:.4f} | {cv_mean:.4f} | {ours.psnr_y - cv_mean:+.4f} | {worst} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1].parent / "shared" / "refs")
