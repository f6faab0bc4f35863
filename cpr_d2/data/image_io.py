"""Reading images as users have them: 8- and 16-bit, 1 to 4 channels, float TIFFs, with the
pixel limit checked from the file's header before anything is decoded.

Every reader of the project (the dataset mapper, the demo) decodes through
:func:`read_image`, which returns what the model takes: an H x W x 3 uint8 array
(H x W x 1 for "L") in a detectron2 format. The rules:

* EXIF orientation is applied, as detectron2's ``read_image`` does (once: a TIFF's
  Orientation tag, which PIL applies while decoding, is not applied again).
* 8-bit images (L, P, RGB, RGBA, LA, CMYK, ...) are converted exactly as detectron2
  converts them: bit-identical to ``detectron2.data.detection_utils.read_image``.
  One channel is replicated to three, alpha (LA, RGBA) is dropped.
* Images of more than 8 bits per sample, which PIL opens as one channel ("I;16",
  "I;16B", "I;16L", "I;16N": 16-bit; "I": 32-bit integer, which is also what PIL
  gives for a 16-bit grey PNG; "F": 32-bit float), are scaled to 0..255 and then
  replicated to three channels, by one of two rules (INPUT.NORMALIZE):

  - "percentile" (the default): per image, the value ``low`` at the 0.5th percentile
    and ``high`` at the 99.5th percentile (numpy's linear interpolation, over the
    finite values) map to 0 and 255: ``255 * (v - low) / (high - low)``, clipped to
    0..255 and rounded to the nearest integer (halves to even). When ``high`` equals
    ``low`` (more than 99% of the pixels share one value) the image's minimum and
    maximum are used instead, so a few bright spots on a flat background still show.
  - "range": the type's full range: ``low, high = 0, 65535`` for 16-bit images (and
    for "I" images whose values all lie in 0..65535), the image's finite minimum and
    maximum for float images (and for other "I" images); same formula.

  A constant image (``high == low`` after the fall-back) maps to 0 everywhere; so does
  an image without a finite value. NaN, +inf and -inf pixels of float images are
  treated as the low value: they map to 0 and take no part in the percentiles or the
  minimum and maximum.
* 16-bit colour PNGs and TIFFs are reduced to 8 bits by PIL itself while decoding (it
  has no 16-bit colour mode): each sample becomes its high byte, ``v // 256``, whatever
  INPUT.NORMALIZE says. Colour images that use only part of the 16-bit range (12-bit
  cameras) come out dark: stretch them to 8 bits before training.

The pixel limit (INPUT.MAX_IMAGE_PIXELS) is checked from the header, which PIL reads
without decoding, so a small file that declares a huge image is refused at once.
PIL's own decompression-bomb limit is lifted while this module opens and decodes a
file whose size it has checked itself: the error a user sees names the project's key.
"""
import contextlib
import glob
import os
import threading

import numpy as np
from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageReadError",
    "NORMALIZE_RULES",
    "PERCENTILES",
    "PixelLimitError",
    "check_normalize",
    "IMAGE_EXTENSIONS",
    "check_pixel_limit",
    "find_images",
    "image_header",
    "normalize_to_uint8",
    "read_image",
]

# The files a folder given as input contributes (find_images).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
# The default of INPUT.MAX_IMAGE_PIXELS (cpr_d2/config.py).
DEFAULT_MAX_PIXELS = 100_000_000
NORMALIZE_RULES = ("percentile", "range")
# The percentiles that the "percentile" rule maps to 0 and 255.
PERCENTILES = (0.5, 99.5)
_EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_FIX = ("is it a complete image file? Check that it opens in an image viewer, else export or "
        "copy it again")
_ROWS_PER_BLOCK_PIXELS = 1 << 22  # >8-bit images are scaled in blocks of about 4 M pixels


class ImageReadError(ValueError):
    """A file that PIL cannot open or decode; `path` and `reason` (the underlying error)."""

    def __init__(self, path, reason, fix=_FIX):
        self.path = path
        self.reason = reason
        super().__init__(f"cannot read the image {path} ({reason}); {fix}")


class PixelLimitError(ValueError):
    """An image whose header declares more pixels than the limit; raised before decoding."""

    def __init__(self, path, width, height, limit, key):
        self.path, self.width, self.height = path, int(width), int(height)
        self.pixels = self.width * self.height
        self.limit, self.key = int(limit), key
        super().__init__(
            f"{path}: {self.width} x {self.height} = {self.pixels:,} pixels is more than "
            f"{key} = {self.limit:,} (read from the file's header, before decoding); tile the "
            "image into smaller ones, or raise the limit if the machine has the memory (about "
            f"30 bytes per pixel): {key} {self.pixels} (0 = no limit)")


_lift_lock = threading.Lock()
_lift_count = 0
_pil_limit = None


@contextlib.contextmanager
def _pil_limit_lifted():
    """PIL's Image.MAX_IMAGE_PIXELS off while this module opens and decodes files (it
    checks the size itself, first); restored when the last concurrent reader is done."""
    global _lift_count, _pil_limit
    with _lift_lock:
        if _lift_count == 0:
            _pil_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _lift_count += 1
    try:
        yield
    finally:
        with _lift_lock:
            _lift_count -= 1
            if _lift_count == 0:
                Image.MAX_IMAGE_PIXELS = _pil_limit


def _reason(error):
    return f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def _opened(path):
    """The lazily opened PIL image of `path` (header read, pixels not decoded), its file
    open until the block ends. Errors name the file."""
    with _pil_limit_lifted():
        try:
            f = PathManager.open(path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such image file") from None
        except IsADirectoryError:
            raise ImageReadError(path, "a folder, not a file", "pass an image file") from None
        with f:
            try:
                image = Image.open(f)
                width, height = image.size
            except MemoryError:
                raise
            except Exception as e:  # PIL raises several types for broken headers
                raise ImageReadError(path, _reason(e)) from None
            if width <= 0 or height <= 0:
                raise ImageReadError(path, f"its header declares an empty {width} x {height} image")
            yield image


def image_header(path):
    """(width, height, mode) from the file's header, without decoding its pixels (EXIF
    orientation not applied: a rotation keeps the pixel count). FileNotFoundError for a
    missing file, ImageReadError (a ValueError) for a file PIL cannot identify."""
    path = os.fspath(path)
    with _opened(path) as image:
        return image.size[0], image.size[1], image.mode


def check_pixel_limit(path, width, height, limit, key="INPUT.MAX_IMAGE_PIXELS"):
    """PixelLimitError (a ValueError naming the file, its size, the limit and `key`, the
    config key or option that raises it) when width x height > limit; 0 = no limit."""
    if limit and int(width) * int(height) > int(limit):
        raise PixelLimitError(path, width, height, limit, key)


def check_normalize(normalize, key="INPUT.NORMALIZE"):
    """ValueError naming `key` unless `normalize` is one of NORMALIZE_RULES."""
    if normalize not in NORMALIZE_RULES:
        raise ValueError(f"{key} must be one of {NORMALIZE_RULES}, got {normalize!r}")
    return normalize


def _is_high_bit_depth(mode):
    return mode in ("I", "F") or mode.startswith("I;16")


def _exif_transposed(image):
    """`image` turned as its EXIF orientation says (the transposes of detectron2's
    read_image); unreadable EXIF data counts as none. TIFFs are left alone: PIL applies
    their Orientation tag itself while decoding (detectron2 turns them a second time)."""
    if image.format == "TIFF":
        return image
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # broken EXIF blocks are common and harmless
        return image
    method = _TRANSPOSE.get(orientation)
    return image if method is None else image.transpose(method)


def _finite_values(array):
    values = array.ravel() if array.dtype.kind in "iu" else array[np.isfinite(array)]
    return values.astype(np.float64)


def _scale_bounds(array, mode, normalize):
    """(low, high) of the normalisation rule (module docstring); None when the image has
    no finite value or is constant."""
    if normalize == "range" and mode.startswith("I;16"):
        return 0.0, 65535.0
    values = _finite_values(array)
    if values.size == 0:
        return None
    low, high = float(values.min()), float(values.max())
    if normalize == "range":
        if mode == "I" and low >= 0 and high <= 65535:
            return 0.0, 65535.0
    else:
        p_low, p_high = np.percentile(values, PERCENTILES, overwrite_input=True)
        if p_high > p_low:
            low, high = float(p_low), float(p_high)
    return (low, high) if high > low else None


def normalize_to_uint8(array, mode, normalize="percentile"):
    """An H x W uint8 array of a one-channel image of more than 8 bits per sample (PIL
    `mode` "I;16*", "I" or "F"), scaled to 0..255 by `normalize` (module docstring)."""
    check_normalize(normalize)
    array = np.asarray(array)
    out = np.zeros(array.shape[:2], np.uint8)
    bounds = _scale_bounds(array, mode, normalize)
    if bounds is None:
        return out
    low, high = bounds
    rows = max(1, _ROWS_PER_BLOCK_PIXELS // max(1, array.shape[1]))
    for y in range(0, array.shape[0], rows):
        block = array[y:y + rows].astype(np.float64)
        scaled = np.rint(np.clip((block - low) / (high - low) * 255.0, 0.0, 255.0))
        if array.dtype.kind == "f":
            scaled[~np.isfinite(block)] = 0.0
        out[y:y + rows] = scaled.astype(np.uint8)
    return out


def read_image(path, format="BGR", max_pixels=DEFAULT_MAX_PIXELS, normalize="percentile",
               limit_key="INPUT.MAX_IMAGE_PIXELS"):
    """The image of `path` as an H x W x 3 uint8 array in `format` ("BGR", "RGB"; "L"
    gives H x W x 1; any format of detectron2's read_image), by the rules of the module
    docstring.

    Args:
        max_pixels: refuse images whose header declares more pixels, before decoding
            (0 = no limit); `limit_key` is the config key or option named in the error.
        normalize: "percentile" or "range", the rule for images of more than 8 bits per
            sample (INPUT.NORMALIZE); 8-bit images are never rescaled.

    Raises:
        FileNotFoundError: no such file.
        PixelLimitError: the image has more than `max_pixels` pixels.
        ImageReadError: PIL cannot identify or decode the file (both ValueErrors, and
            all three name the file).
    """
    check_normalize(normalize)
    path = os.fspath(path)
    with _opened(path) as image:
        check_pixel_limit(path, image.size[0], image.size[1], max_pixels, limit_key)
        try:
            image = _exif_transposed(image)
            if not _is_high_bit_depth(image.mode):
                return utils.convert_PIL_to_numpy(image, format)
            mode = image.mode
            gray = normalize_to_uint8(np.asarray(image), mode, normalize)
        except MemoryError:
            raise
        except Exception as e:  # truncated or corrupt pixel data
            raise ImageReadError(path, _reason(e)) from None
    return utils.convert_PIL_to_numpy(Image.fromarray(gray), format)


def find_images(patterns):
    """[(path, explicit)] for image files, folders (their IMAGE_EXTENSIONS files, sorted)
    and glob patterns, in order, without repeats. `explicit`: the file was named itself
    (a command makes its read error fatal; the others are reported and skipped).
    FileNotFoundError, naming the pattern, for a missing file or folder, a folder
    without images and a pattern that matches nothing."""
    found = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            files = sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                           if f.lower().endswith(IMAGE_EXTENSIONS)
                           and os.path.isfile(os.path.join(pattern, f)))
            if not files:
                raise FileNotFoundError(f"--input {pattern}: the folder holds no image "
                                        f"({', '.join(IMAGE_EXTENSIONS)})")
            found += [(f, False) for f in files]
        elif os.path.isfile(pattern):
            found.append((pattern, True))
        elif glob.has_magic(pattern):
            files = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
            if not files:
                raise FileNotFoundError(f"--input {pattern}: the pattern matches no file")
            found += [(f, False) for f in files]
        else:
            raise FileNotFoundError(f"--input {pattern}: no such file or folder")
    seen, unique = set(), []
    for path, explicit in found:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append((path, explicit))
    return unique
