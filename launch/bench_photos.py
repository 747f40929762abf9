"""Photo-like JPEGs for the loader benchmark (docs/benchmarks.md): smooth structure (blurred
random shapes and gradients) plus mild sensor-like noise, quality 90, in an ImageFolder of 2
classes. `python launch/bench_photos.py OUT --count 300 --size 500x375` (about 100 KiB each at the default --noise);
`--count 12 --size 4000x3000` for phone-sized photos."""
import argparse
import os

import numpy as np
from PIL import Image, ImageFilter


def photo(rng: np.random.Generator, w: int, h: int, noise: float) -> Image.Image:
    small_w, small_h = 64, 48
    yy, xx = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    base = np.zeros((small_h, small_w, 3), np.float32)
    for c in range(3):  # a sky-to-ground gradient per channel, then soft blobs
        base[..., c] = rng.uniform(40, 200) + rng.uniform(-60, 60) * yy / small_h
    for _ in range(12):
        cy, cx, r = rng.uniform(0, small_h), rng.uniform(0, small_w), rng.uniform(3, 15)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        base += blob * rng.uniform(-90, 90, size=3)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    img = img.filter(ImageFilter.GaussianBlur(radius=w / 400))
    detail = rng.normal(0, noise, size=(h // 2, w // 2, 3)).astype(np.float32)  # texture, then grain
    detail = np.asarray(Image.fromarray(np.clip(detail + 128, 0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                        np.float32) - 128
    pixels = np.asarray(img, np.float32) + detail + rng.normal(0, noise / 2, size=(h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--size", default="500x375")
    p.add_argument("--noise", type=float, default=27.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(args.seed)
    for i in range(args.count):
        folder = os.path.join(args.out, f"class{i % 2}")
        os.makedirs(folder, exist_ok=True)
        photo(rng, w, h, args.noise).save(os.path.join(folder, f"{i:04d}.jpg"), quality=90)


if __name__ == "__main__":
    main()
