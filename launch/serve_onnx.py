"""Classify images with an exported distft model, using only onnxruntime, Pillow and numpy (no
MXNet, no distft): what a serving process does with `distft export --format onnx`.

    python launch/serve_onnx.py served/model.onnx photo1.jpg photo2.jpg --top-k 3

It reads the preprocessing that distft wrote beside the model (`<name>-input.json`) and prints
one JSON line per image, in the order given: {"image": path, "top": [{"class": name, "prob": p},
...]}, or {"image": path, "error": reason} for a file it cannot read (as `distft predict` does).
Exit code 0; 1 when some image could not be read (the others are answered); 2 for a bad command
line or a model it cannot load.
"""
import argparse
import json
import os
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


def load(path: str, spec: dict):
    """The image's input tensor, or why there is none (`path: reason`)."""
    try:
        return preprocess(path, spec)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        return f"{path}: cannot read ({reason})"


def input_spec_path(model_path: str) -> str:
    """Where `distft export` wrote the preprocessing: STEM-input.json beside STEM.onnx."""
    stem = model_path[:-len(".onnx")] if model_path.lower().endswith(".onnx") else model_path
    return stem + "-input.json"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve_onnx.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the exported .onnx file")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5, at most the model's)")
    p.add_argument("--batch-size", type=int, default=32, help="images per onnxruntime call (default 32)")
    return p


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        p.error("--top-k and --batch-size must be at least 1")
    spec_path = input_spec_path(args.model)
    for path in (args.model, spec_path):
        if not os.path.isfile(path):
            p.error(f"{path}: no such file (written by `distft export --format onnx`)")
    with open(spec_path) as fh:
        meta = json.load(fh)
    try:
        session = onnxruntime.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        p.error(f"{args.model}: onnxruntime cannot load it ({exc})")
    classes = meta["classes"]
    failed = 0
    for start in range(0, len(args.images), args.batch_size):
        chunk = args.images[start:start + args.batch_size]
        xs = [load(path, meta["input"]) for path in chunk]
        good = [x for x in xs if not isinstance(x, str)]
        probs = iter(softmax(session.run(None, {meta["input_name"]: np.stack(good)})[0]) if good else [])
        for path, x in zip(chunk, xs):
            if isinstance(x, str):
                failed += 1
                print(f"serve_onnx: warning: {x}", file=sys.stderr, flush=True)
                print(json.dumps({"image": path, "error": x}), flush=True)
                continue
            prob = next(probs)
            top = np.argsort(-prob, kind="stable")[:min(args.top_k, len(prob))]
            print(json.dumps({"image": path, "top": [{"class": classes[j], "prob": float(prob[j])} for j in top]}),
                  flush=True)
    if failed:
        print(f"serve_onnx: {failed} of {len(args.images)} images could not be read", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
