"""A minimal PNG encoder for test images (MXNet's OpenCV decodes PNG; no imaging library needed),
and small ImageFolders made with it."""
import os
import struct
import zlib

import numpy as np


def png(img: np.ndarray) -> bytes:
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].astype(np.uint8).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def make_folder(root, classes, per_class=4, size=40, seed=0):
    """An ImageFolder at `root` (a pathlib.Path): one sub-folder per class name, PNGs whose
    dominant colour channel depends on the class (learnable)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        os.makedirs(root / name)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size + 6, 3), dtype=np.uint8)
            img[:, :, c % 3] += 150
            (root / name / f"{i}.png").write_bytes(png(img))
    return str(root)
