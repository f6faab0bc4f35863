"""Checks of a dataset's image files before training, from their headers only.

A missing, unreadable or wrongly sized image otherwise stops training when the
data stream reaches it, possibly hours in. Opening an image's header (PIL reads
the size without decoding the pixels) is cheap next to a training step, so every
training image is checked before the first iteration, and all the bad ones are
reported together.

The size compared is the one detectron2's `read_image` returns: the header's
width x height, swapped when the EXIF orientation is 5 to 8 (a transpose or a
quarter turn), as `check_image_size` in the mapper would see it.
"""
import concurrent.futures
import logging
import time

from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from PIL import Image, UnidentifiedImageError

from .image_io import ImageReadError, image_header

__all__ = ["check_dataset_images", "check_training_images", "image_problems"]

logger = logging.getLogger(__name__)

# EXIF tag 274, "Orientation"; 5-8 turn the image a quarter (or transpose it).
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
# Bad images listed one per line in the error; the rest are counted.
MAX_LISTED = 20
# Datasets of at least this many images log the check's start, progress and end.
LOG_FROM = 2000
_PROGRESS_EVERY_S = 15.0
_THREADS = 8  # header reads wait on the disk (or the network), not on the CPU
_BLOCK = 1024  # images handed to the threads at a time

# The problems, and what to do about each.
MISSING, UNREADABLE, SIZE, TOO_LARGE = "missing", "unreadable", "size", "too large"
_FIXES = {
    MISSING: "a missing file: check the dataset's image root and the images' file_name",
    UNREADABLE: "an unreadable file: replace it with a complete image, or remove the image "
                "(and its annotations) from the json",
    SIZE: "a size mismatch: fix the image's width/height in the json (or replace the file "
          "with the image the points were drawn on)",
    TOO_LARGE: "an image over INPUT.MAX_IMAGE_PIXELS: tile it into smaller ones, or raise the "
               "limit if the machine has the memory (about 30 bytes per pixel)",
}


def _orientation(image):
    """The EXIF orientation detectron2's read_image applies, or None. A PNG keeps its
    EXIF chunk before or after the pixels; reading one after them would decode the
    image, so it is only looked for when the size asks for it (see _header)."""
    if image.format == "PNG" and "exif" not in image.info:
        return None
    return _exif_orientation(image)


def _exif_orientation(image):
    try:
        return image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # read_image ignores an unreadable EXIF block too
        return None


def _header(file_name, expected):
    """(width, height, orientation) of the image as read_image returns it: the header's
    size, swapped for EXIF orientations 5-8."""
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            width, height = image.size
            orientation = _orientation(image)
            if orientation is None and image.format == "PNG" and (height, width) == expected:
                orientation = _exif_orientation(image)  # an EXIF chunk after the pixels
    except Image.DecompressionBombError:
        # Over PIL's own pixel limit, which the project's reader lifts (it checks
        # INPUT.MAX_IMAGE_PIXELS itself): the size from that reader's header read; the
        # EXIF orientation of such an image is not looked at.
        width, height, _ = image_header(file_name)
        orientation = None
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return width, height, orientation


def _check_one(record, max_pixels):
    """(kind, description) of what is wrong with `record`'s image, or None."""
    file_name = record.get("file_name")
    iid = record.get("image_id")
    expected = (record.get("width"), record.get("height"))
    try:
        width, height, orientation = _header(file_name, expected)
    except FileNotFoundError:
        return MISSING, f"image of image id {iid!r} not found: {file_name}"
    except UnidentifiedImageError:
        return UNREADABLE, (f"cannot read the image of image id {iid!r}: {file_name} (not an "
                            "image file: PIL cannot identify its format)")
    except ImageReadError as e:
        return UNREADABLE, f"cannot read the image of image id {iid!r}: {file_name} ({e.reason})"
    except Exception as e:  # PIL raises several types for files it cannot identify
        return UNREADABLE, (f"cannot read the image of image id {iid!r}: {file_name} "
                            f"({type(e).__name__}: {_first_line(e)})")
    if ("width" in record or "height" in record) and expected != (width, height):
        turned = (f" after its EXIF orientation {orientation}"
                  if orientation in _SWAPPING_ORIENTATIONS else "")
        return SIZE, (f"image id {iid!r} ({file_name}): the file is {width} x {height} "
                      f"(width x height){turned}, the json says {expected[0]} x {expected[1]}")
    if max_pixels and width * height > max_pixels:
        return TOO_LARGE, (f"image id {iid!r} ({file_name}): {width} x {height} = "
                           f"{width * height:,} pixels is more than INPUT.MAX_IMAGE_PIXELS = "
                           f"{max_pixels:,}")
    return None


def _first_line(error):
    text = str(error).strip().splitlines()
    return (text[0][:300] if text else "") or "no message"


def image_problems(records, max_pixels=0, *, dataset_name=None, log=True):
    """[(position in `records`, kind, description)] of the records whose image is
    missing, cannot be opened as an image, has another size than the record's
    width/height, or (max_pixels > 0) has more than max_pixels pixels. Reads the
    headers only (see the module docstring); with `log`, a dataset of LOG_FROM images
    or more logs its progress."""
    records = list(records)
    verbose = log and len(records) >= LOG_FROM
    name = f" of {dataset_name}" if dataset_name else ""
    if verbose:
        logger.info("Checking the headers of %d images%s ...", len(records), name)
    start = last = time.monotonic()
    problems = []
    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
        for first in range(0, len(records), _BLOCK):
            block = records[first:first + _BLOCK]
            for k, problem in enumerate(pool.map(_check_one, block, [max_pixels] * len(block)),
                                        first):
                if problem is not None:
                    problems.append((k, *problem))
            if verbose and time.monotonic() - last >= _PROGRESS_EVERY_S:
                last = time.monotonic()
                logger.info("Checked %d of %d image headers%s (%d bad so far)",
                            first + len(block), len(records), name, len(problems))
    if verbose:
        logger.info("Checked %d image headers%s in %.1f s: %d bad", len(records), name,
                    time.monotonic() - start, len(problems))
    return problems


def _raise_for(problems, what, total):
    lines = [f"  {description}" for _, _, description in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    kinds = {kind for _, kind, _ in problems}
    fixes = [f"  {_FIXES[kind]}" for kind in _FIXES if kind in kinds]
    raise ValueError(
        f"{what}: {len(problems)} of {total} images cannot be used (checked from the image "
        "files' headers):\n" + "\n".join(lines)
        + "\nFix " + ("each" if len(fixes) > 1 else "it") + ":\n" + "\n".join(fixes))


def check_dataset_images(records, dataset_name, max_pixels=0):
    """Raise one ValueError listing every record of `records` (detectron2 dataset dicts
    with file_name, image_id, height, width) whose image file is missing, is not a
    readable image, is not the size the record says (as detectron2's read_image reads
    it, EXIF orientation applied), or (max_pixels > 0, as INPUT.MAX_IMAGE_PIXELS) has
    more pixels than max_pixels. The first MAX_LISTED are named with their image id,
    file and problem, the rest counted; the fix of each kind of problem follows.
    Returns the number of images checked."""
    records = list(records)
    problems = image_problems(records, max_pixels, dataset_name=dataset_name)
    if problems:
        _raise_for(problems, f"dataset {dataset_name!r}", len(records))
    return len(records)


def check_training_images(cfg, records=None):
    """check_images_of for the training data of `cfg` (cfg.DATASETS.TRAIN; `records` as the
    training loader loaded them, or else from the DatasetCatalog)."""
    return check_images_of(cfg, tuple(cfg.DATASETS.TRAIN), records, role="DATASETS.TRAIN")


def check_images_of(cfg, names, records=None, role=None):
    """check_dataset_images for the datasets `names` (their records `records`, or else
    from the DatasetCatalog), against cfg.INPUT.MAX_IMAGE_PIXELS; `role` (e.g.
    "DATASETS.TRAIN") says in the error where the names came from.

    Every process calls it: each checks its share of the images, the shares are
    gathered, and every process raises the same error, so that none is left waiting
    in a collective operation for one that stopped. Only the main process logs."""
    names = tuple(names)
    what = (f"dataset {names[0]!r}" if len(names) == 1 else
            "datasets " + ", ".join(map(repr, names))) + (f" ({role})" if role else "")
    if records is None:
        from detectron2.data import DatasetCatalog

        records = [r for name in names for r in DatasetCatalog.get(name)]
    records = list(records)
    rank, world = comm.get_rank(), comm.get_world_size()
    problems = image_problems(
        records[rank::world], cfg.INPUT.MAX_IMAGE_PIXELS, log=comm.is_main_process(),
        dataset_name=", ".join(names) + (f" (this process's share, 1 in {world})"
                                         if world > 1 else ""))
    if world > 1:
        gathered = comm.all_gather([(k * world + rank, kind, text) for k, kind, text in problems])
        problems = sorted(p for part in gathered for p in part)
    if problems:
        _raise_for(problems, what, len(records))
    return len(records)
