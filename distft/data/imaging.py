"""Image decoding: the one decoder behind training, validation, `check`, `eval`, `predict` and
`make-rec`, and its self-test.

Why this module exists: Pillow's `_imaging` binds its codec functions (`jpeg_*`, `png_*`,
`inflate`, `TIFF*`) when it is loaded. libmxnet.so exports the same names, unversioned (its own
libjpeg-turbo, libpng, zlib, libtiff), and `horovod.mxnet` loads its library with RTLD_GLOBAL,
which makes libmxnet.so's symbols global. A Pillow loaded after that binds to MXNet's libjpeg
with its own structures, and every JPEG fails ("broken data stream"). So Pillow is loaded here,
before anything of Horovod's, with RTLD_DEEPBIND: its own libraries come ahead of the global
scope, whatever the process imported first. `dist.py` imports this module before Horovod.

`self_test()` decodes small built-in images (baseline, progressive and CMYK JPEG, PNG) and a
JPEG it encodes itself; when that fails, the environment is at fault, not the user's files, and
the error says which library the codec symbols resolve to.
"""
from __future__ import annotations

import base64
import ctypes
import importlib
import io
import os
import sys
from typing import NamedTuple, Optional

import numpy as np

from distft.errors import DataError, DistftError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def load_pillow():
    """Pillow's Image module, its C core loaded with its own codec libraries ahead of the global
    scope. Call it before anything loads Horovod (`dist.py`, `baseline.py` do)."""
    if "PIL._imaging" not in sys.modules and hasattr(os, "RTLD_DEEPBIND"):
        flags = sys.getdlopenflags()
        sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
        try:
            importlib.import_module("PIL._imaging")
        finally:
            sys.setdlopenflags(flags)
    from PIL import Image

    return Image


Image = load_pillow()
Image.MAX_IMAGE_PIXELS = 200_000_000  # a 12 MP photo is fine; a decompression bomb is not

# EXIF orientation -> the transpose that shows the image upright (what a photo viewer does)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_ORIENTATION = 0x0112


class Encoded(NamedTuple):
    """An image file's bytes and the name its errors give (the file, or the record)."""
    payload: bytes
    where: str


class DecoderError(DistftError):
    """The image decoder does not work in this process: the environment, not the data."""


def identity() -> str:
    """The decoder and its codec versions: part of every cached verdict's key."""
    from PIL import __version__, features

    return (f"pillow-{__version__}/libjpeg-turbo-{features.version('libjpeg_turbo')}"
            f"/zlib-{features.version('zlib')}/libtiff-{features.version('libtiff')}/orient-1")


def _orientation(im) -> int:
    return im.getexif().get(_ORIENTATION, 1) if im.format in ("JPEG", "TIFF", "WEBP", "PNG") else 1


def _upright_rgb_image(im, orientation: int):
    """A decoded Pillow image in RGB, turned as its EXIF orientation says. 16-bit greyscale is
    scaled to 8 bits (Pillow's own conversion would clip it to white)."""
    if im.mode.startswith("I;16") or (im.mode == "I" and im.getextrema()[1] > 255):
        wide = np.asarray(im, dtype=np.uint32)
        im = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    if im.mode != "RGB":
        im = im.convert("RGB")
    if orientation in _UPRIGHT:
        im = im.transpose(_UPRIGHT[orientation])
    return im


def upright_rgb(im) -> np.ndarray:
    """A Pillow image as (H, W, 3) uint8 RGB, upright (see `_upright_rgb_image`)."""
    return np.asarray(_upright_rgb_image(im, _orientation(im)))


def dct_scale(crop_w: float, crop_h: float, size: int) -> int:
    """The largest JPEG DCT scale-down (8, 4, 2 or 1) at which a crop of crop_w x crop_h source
    pixels still has at least `size` pixels on each side: the decoder then makes no more pixels
    than the resize to `size` needs (libjpeg-turbo's scaled IDCT costs almost nothing)."""
    for scale in (8, 4, 2):
        if min(crop_w, crop_h) >= scale * size:
            return scale
    return 1


def resampling(box, size: int, scaled: bool = True):
    """Area averaging (Pillow's BOX filter) where the box shrinks to `size`, bilinear where it
    grows (or, not `scaled`, always: the decoding of runs before DCT scaling). Both weigh every
    source pixel they cover; BOX takes fewer taps."""
    shrinks = min(box[2] - box[0], box[3] - box[1]) >= size
    return Image.BOX if scaled and shrinks else Image.BILINEAR


def decode_crop(payload: bytes, where: str, size: int, choose, scaled: bool = True):
    """Encoded image -> (size, size, 3) uint8 RGB: the box `choose(width, height)` picks in the
    upright image (-> ((x0, y0, x1, y1), flip)), resized to size x size in one resample
    (`resampling`), flipped left-right when asked. `scaled`: a JPEG is decoded at the
    DCT scale `dct_scale` allows: its pixels depend only on the file and the box, never on
    where or when it is decoded. Errors: one line naming `where`."""
    from PIL import UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(payload)) as im:
            orientation = _orientation(im)
            w, h = im.size
            upright_w, upright_h = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
            box, flip = choose(upright_w, upright_h)
            scale = dct_scale(box[2] - box[0], box[3] - box[1], size) if scaled and im.format in ("JPEG", "MPO") else 1
            drafted = im.draft("RGB", (w // scale, h // scale)) if scale > 1 else None  # Pillow picks `scale`
            if drafted is not None:  # None: a JPEG Pillow cannot scale (it decodes it whole)
                scale = w / drafted[1][2]
                box = tuple(v / scale for v in box)
            img = _upright_rgb_image(im, orientation).resize((size, size), resampling(box, size, scaled), box=box)
    except UnidentifiedImageError:
        raise DataError(f"{where}: not an image (unknown format, {len(payload)} bytes)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where}: cannot decode image ({exc})") from None
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img


def decode(payload: bytes, where: str) -> np.ndarray:
    """Encoded image -> (H, W, 3) uint8 RGB, upright. Pillow, not MXNet's imdecode: a corrupt
    image makes MXNet's engine op fail and its error resurfaces at a later, unrelated sync."""
    from PIL import UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(payload)) as im:
            return upright_rgb(im)
    except UnidentifiedImageError:  # its text names the BytesIO object, not the file
        raise DataError(f"{where}: not an image (unknown format, {len(payload)} bytes)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where}: cannot decode image ({exc})") from None


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --- the self-test -------------------------------------------------------------------------------

# 16 x 16 images of four quadrants: red, green, blue, grey (JPEGs at quality 90, no chroma
# subsampling), made once with Pillow
_QUADRANTS = {(2, 2): (230, 30, 30), (2, 10): (30, 200, 40), (10, 2): (30, 40, 220), (10, 10): (128, 128, 128)}
_TOLERANCE = 12  # per channel, on the mean of each quadrant's centre (JPEG rounding is ~1)
_BUILT_IN = {
    "jpeg": (
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAMCAgMCAgMDAwMEAwMEBQgFBQQEBQoHBwYIDAoMDAsKCwsNDhIQDQ4RDgsLEBYQ"
    "ERMUFRUVDA8XGBYUGBIUFRT/2wBDAQMEBAUEBQkFBQkUDQsNFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQU"
    "FBQUFBQUFBQUFBQUFBT/wAARCAAQABADAREAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAA"
    "AgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6"
    "Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWGh4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXG"
    "x8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/8QAHwEAAwEBAQEBAQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREA"
    "AgECBAQDBAcFBAQAAQJ3AAECAxEEBSExBhJBUQdhcRMiMoEIFEKRobHBCSMzUvAVYnLRChYkNOEl8RcYGRomJygpKjU2Nzg5"
    "OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0tba3uLm6wsPE"
    "xcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq8vP09fb3+Pn6/9oADAMBAAIRAxEAPwDxqvyQ/wBCz22vkj/DQ+PK/wBfT+iz67r+"
    "Cj7U/9k="),
    "progressive jpeg": (
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAMCAgMCAgMDAwMEAwMEBQgFBQQEBQoHBwYIDAoMDAsKCwsNDhIQDQ4RDgsLEBYQ"
    "ERMUFRUVDA8XGBYUGBIUFRT/2wBDAQMEBAUEBQkFBQkUDQsNFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQU"
    "FBQUFBQUFBQUFBQUFBT/wgARCAAQABADAREAAhEBAxEB/8QAFQABAQAAAAAAAAAAAAAAAAAABgf/xAAXAQADAQAAAAAAAAAA"
    "AAAAAAAFBwgG/9oADAMBAAIQAxAAAAEZkaFbiYajtfMWvIU3/8QAFBABAAAAAAAAAAAAAAAAAAAAIP/aAAgBAQABBQIf/8QA"
    "FBEBAAAAAAAAAAAAAAAAAAAAIP/aAAgBAwEBPwEf/8QAFBEBAAAAAAAAAAAAAAAAAAAAIP/aAAgBAgEBPwEf/8QAFBABAAAA"
    "AAAAAAAAAAAAAAAAIP/aAAgBAQAGPwIf/8QAFBABAAAAAAAAAAAAAAAAAAAAIP/aAAgBAQABPyEf/9oADAMBAAIAAwAAABDj"
    "j//EABQRAQAAAAAAAAAAAAAAAAAAACD/2gAIAQMBAT8QH//EABQRAQAAAAAAAAAAAAAAAAAAACD/2gAIAQIBAT8QH//EABQQ"
    "AQAAAAAAAAAAAAAAAAAAACD/2gAIAQEAAT8QH//Z"),
    "cmyk jpeg": (
    "/9j/7gAOQWRvYmUAZAAAAAAA/9sAQwADAgIDAgIDAwMDBAMDBAUIBQUEBAUKBwcGCAwKDAwLCgsLDQ4SEA0OEQ4LCxAWEBET"
    "FBUVFQwPFxgWFBgSFBUU/8AAFAgAEAAQBEMRAE0RAFkRAEsRAP/EAB8AAAEFAQEBAQEBAAAAAAAAAAABAgMEBQYHCAkKC//E"
    "ALUQAAIBAwMCBAMFBQQEAAABfQECAwAEEQUSITFBBhNRYQcicRQygZGhCCNCscEVUtHwJDNicoIJChYXGBkaJSYnKCkqNDU2"
    "Nzg5OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6g4SFhoeIiYqSk5SVlpeYmZqio6Slpqeoqaqys7S1tre4ubrC"
    "w8TFxsfIycrS09TV1tfY2drh4uPk5ebn6Onq8fLz9PX29/j5+v/aAA4EQwBNAFkASwAAPwD9EK/Pqvz6r9U6/nqr9xa2qKK/"
    "FSv3gor9Ba+66+CqK//Z"),
    "png": (
    "iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAKklEQVR42mN8JifHgA1YrOLCKs7EQCIY1UAMYJTTuINVIili"
    "yWgo0U8DABHoBK0zq33bAAAAAElFTkSuQmCC"),
}

_passed: Optional[bool] = None


def _quadrants_wrong(img: np.ndarray) -> Optional[str]:
    if img.shape != (16, 16, 3):
        return f"decoded to shape {img.shape}, not (16, 16, 3)"
    for (y, x), want in _QUADRANTS.items():
        got = img[y:y + 4, x:x + 4].reshape(-1, 3).mean(axis=0)
        if np.abs(got - np.array(want)).max() > _TOLERANCE:
            return f"pixels {got.round().astype(int).tolist()} where {list(want)} belong"
    return None


def _codec_owner(symbol: str = "jpeg_read_header") -> str:
    """Which loaded library the global scope resolves `symbol` to (dladdr), or a note."""
    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    try:
        process = ctypes.CDLL(None)
        address = ctypes.cast(getattr(process, symbol), ctypes.c_void_p).value
        info = DlInfo()
        if not ctypes.CDLL(None).dladdr(ctypes.c_void_p(address), ctypes.byref(info)):
            return f"{symbol} is global here, from an unknown library"
        return f"{symbol} resolves globally to {info.dli_fname.decode()}"
    except (AttributeError, OSError, TypeError):
        return f"{symbol} is not global here"


def self_test() -> None:
    """Decode the built-in images and a JPEG encoded here; raise DecoderError (one line naming
    the environment) when any comes out wrong. Runs once per process."""
    global _passed
    if _passed:
        return
    failures = []
    for name, text in _BUILT_IN.items():
        try:
            wrong = _quadrants_wrong(decode(base64.b64decode(text), name))
        except DataError as exc:
            wrong = str(exc).split(": ", 1)[1]
        if wrong:
            failures.append(f"{name}: {wrong}")
    if not failures:
        reference = decode(base64.b64decode(_BUILT_IN["png"]), "png")
        try:
            wrong = _quadrants_wrong(decode(encode_jpeg(reference, 95), "jpeg encoded here"))
        except (DataError, OSError) as exc:
            wrong = str(exc)
        if wrong:
            failures.append(f"a JPEG encoded here: {wrong}")
    if failures:
        _passed = False
        from PIL import __version__

        loaded_first = "horovod.mxnet" in sys.modules and "PIL._imaging" in sys.modules
        raise DecoderError(
            f"the image decoder fails its self-test in this process, so no image file is at fault "
            f"(Pillow {__version__}; {'; '.join(failures[:2])}): {_codec_owner()}, and Pillow's codecs bound to it"
            + (" (horovod.mxnet made libmxnet.so's jpeg_*/png_* global before Pillow was loaded: import distft "
               "or PIL before horovod.mxnet)" if loaded_first else ""))
    _passed = True


def self_test_passed() -> bool:
    """Whether the self-test passed in this process: only then is a decode failure a fact
    about the file (and may be cached)."""
    return bool(_passed)
