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


def folder(root, counts, size=12, seed=0):
    """An ImageFolder: {class name: number of PNGs} (0 makes an empty class folder)."""
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        os.makedirs(root / cls, exist_ok=True)
        for i in range(n):
            (root / cls / f"{i}.png").write_bytes(png(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)))
    return str(root)


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


# --- photos as users have them: JPEG (several kinds) and PNG, of varying sizes ---------------

PHOTO_KINDS = ("baseline", "progressive", "grayscale", "cmyk", "exif-rotated", "png")


def photo_bytes(img: np.ndarray, kind: str, quality: int = 92) -> bytes:
    """`img` (H, W, 3 uint8) encoded as a user's camera or editor would have written it. An
    `exif-rotated` JPEG stores the pixels turned a quarter (as a phone held upright does) with
    EXIF orientation 6, so that decoding it upright gives `img` back."""
    import io

    from PIL import Image

    im = Image.fromarray(img)
    buf = io.BytesIO()
    if kind == "png":
        im.save(buf, format="PNG")
    elif kind == "baseline":
        im.save(buf, format="JPEG", quality=quality)
    elif kind == "progressive":
        im.save(buf, format="JPEG", quality=quality, progressive=True, optimize=True)
    elif kind == "grayscale":
        im.convert("L").save(buf, format="JPEG", quality=quality)
    elif kind == "cmyk":
        im.convert("CMYK").save(buf, format="JPEG", quality=quality)
    elif kind == "exif-rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        im.transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", quality=quality, exif=exif)
    else:
        raise ValueError(kind)
    return buf.getvalue()


def photo_extension(kind: str) -> str:
    return ".png" if kind == "png" else ".jpg"


def make_photo_folder(root, classes, per_class=6, sizes=((40, 52), (56, 44), (48, 48)), seed=0, kinds=PHOTO_KINDS):
    """An ImageFolder of JPEGs and PNGs of varying sizes and kinds (cycled per file). A class
    has its own brightness and dominant colour channel, so that even a head on a backbone that
    sees little colour (the demo's digits) can learn it, grayscale files included."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    n = 0
    for c, name in enumerate(classes):
        os.makedirs(root / name)
        for i in range(per_class):
            h, w = sizes[n % len(sizes)]
            kind = kinds[n % len(kinds)]
            level = 20 + (200 * c) // max(len(classes) - 1, 1)
            img = np.clip(rng.integers(-15, 16, (h, w, 3)) + level, 0, 255)
            img[:, :, c % 3] = np.clip(img[:, :, c % 3] + 40, 0, 255)
            (root / name / f"{i:03d}{photo_extension(kind)}").write_bytes(photo_bytes(img.astype(np.uint8), kind))
            n += 1
    return str(root)


def make_users_folder(root, seed=0, cafe="café"):
    """A folder as a user's own photos arrive: four classes (one with a non-ASCII name, one with
    a space), JPEGs of every kind and PNGs of varying sizes, an uppercase .JPG, photos nested in
    `dog/from_phone/2023/`, one truncated JPEG, and the litter of real folders: `.DS_Store`,
    `Thumbs.db`, a macOS `._` AppleDouble file, `.ipynb_checkpoints/` with an image in it.
    `cafe`: the spelling of that class's folder name (pass the NFD form to play macOS)."""
    classes = [cafe, "cat", "dog", "red fox"]
    make_photo_folder(root, classes, per_class=6, seed=seed, sizes=((40, 52), (56, 44), (64, 48)))
    rng = np.random.default_rng(seed + 100)

    def photo(level, kind="baseline"):
        img = np.clip(rng.integers(-15, 16, (44, 50, 3)) + level, 0, 255).astype(np.uint8)
        return photo_bytes(img, kind)

    nested = root / "dog" / "from_phone" / "2023"
    os.makedirs(nested)
    for i in range(4):
        (nested / f"IMG_{i:04d}.jpg").write_bytes(photo(153, "exif-rotated" if i % 2 else "progressive"))
    (root / "red fox" / "UPPER.JPG").write_bytes(photo(220))
    whole = photo(86)
    (root / "cat" / "truncated.jpg").write_bytes(whole[:len(whole) // 3])
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (root / "dog" / "Thumbs.db").write_bytes(bytes(128))
    (root / cafe / "._000.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(40))
    os.makedirs(root / ".ipynb_checkpoints")
    (root / ".ipynb_checkpoints" / "stray.jpg").write_bytes(photo(20))
    return str(root)
