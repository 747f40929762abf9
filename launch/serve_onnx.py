"""Classify images with an exported distft model, using only onnxruntime, Pillow and numpy (no
MXNet, no distft): what a serving process does with `distft export --format onnx`.

    python launch/serve_onnx.py served/model.onnx photo1.jpg photo2.jpg

It reads the preprocessing that distft wrote beside the model (`<name>-input.json`) and prints
one JSON line per image: {"image": path, "top": [{"class": name, "prob": p}, ...]}.
"""
import json
import sys

import numpy as np
import onnxruntime
from PIL import Image, ImageOps


def preprocess(path: str, spec: dict) -> np.ndarray:
    """upright as its EXIF orientation says (as distft decodes), resize the short side, centre
    crop, x/255, (x - mean) / std, HWC RGB -> CHW."""
    img = ImageOps.exif_transpose(Image.open(path)).convert(spec["channel_order"])
    w, h = img.size
    size, crop = spec["resize_short"], spec["crop"]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.BILINEAR)
    top, left = (nh - crop) // 2, (nw - crop) // 2
    x = np.asarray(img, dtype=np.float32)[top:top + crop, left:left + crop] / 255.0
    x = (x - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    return x.transpose(2, 0, 1)


def main(model_path: str, images: list[str], k: int = 5) -> None:
    with open(model_path[:-len(".onnx")] + "-input.json") as fh:
        meta = json.load(fh)
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    batch = np.stack([preprocess(p, meta["input"]) for p in images])
    logits = session.run(None, {meta["input_name"]: batch})[0].astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    for path, p in zip(images, probs):
        top = np.argsort(-p, kind="stable")[:min(k, len(p))]
        print(json.dumps({"image": path, "top": [{"class": meta["classes"][j], "prob": float(p[j])} for j in top]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
