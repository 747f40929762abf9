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


DCT_SCALED = "crop-box-area/jpeg-dct-scaled"  # distft's decoding policy (distft/data/transforms.py)


def preprocess(path: str, spec: dict) -> np.ndarray:
    """As distft decodes for evaluation: upright as the EXIF orientation says, the centre square
    resized to the crop in one resample (area averaging where it shrinks, bilinear where it
    grows; a JPEG decoded at the largest DCT scale-down, 1/8, 1/4 or 1/2, that leaves the square
    at least `crop` wide), or with `decode` "full" (older runs): no DCT scaling, bilinear; then
    x/255, (x - mean) / std, HWC RGB -> CHW."""
    crop = spec["crop"]
    if spec["resize_short"] != crop:
        raise ValueError(f"resize_short {spec['resize_short']} != crop {crop}: not a distft preprocessing")
    with Image.open(path) as img:
        w, h = img.size
        side = min(w, h)  # the square's side, the same whether the image is turned or not
        scale = 1
        for s in (8, 4, 2):
            if side >= s * crop:
                scale = s
                break
        scaled = spec.get("decode", "full") == DCT_SCALED
        if scaled and scale > 1 and img.format in ("JPEG", "MPO"):
            drafted = img.draft("RGB", (w // scale, h // scale))
            scale = w / drafted[1][2] if drafted else 1
        else:
            scale = 1
        turned = img.getexif().get(0x0112, 1)  # EXIF orientation
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I;16") or (img.mode == "I" and img.getextrema()[1] > 255):  # 16-bit grey
            wide = np.asarray(img, dtype=np.uint32)
            img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
        img = img.convert(spec["channel_order"])
        uw, uh = (h, w) if turned in (5, 6, 7, 8) else (w, h)  # turned by 90 degrees
        box = ((uw - side) / 2 / scale, (uh - side) / 2 / scale, (uw + side) / 2 / scale, (uh + side) / 2 / scale)
        shrinks = side / scale >= crop
        img = img.resize((crop, crop), Image.BOX if scaled and shrinks else Image.BILINEAR, box=box)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
    mean = np.array(spec["mean"], np.float32).reshape(3, 1, 1) * 255.0
    std = np.array(spec["std"], np.float32).reshape(3, 1, 1) * 255.0
    return (x - mean) / std


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
