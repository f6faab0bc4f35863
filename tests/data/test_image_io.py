"""cpr_d2.data.image_io: 8-bit images exactly as detectron2 reads them, 16-bit and float
images scaled by the stated rules, and the pixel limit checked from the header."""
import struct
import time
import zlib

import numpy as np
import pytest
from detectron2.data import detection_utils
from PIL import Image, ImageFile

from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.data import PointDatasetMapper, load_point_json
from cpr_d2.data import image_io
from cpr_d2.data.image_io import ImageReadError, PixelLimitError, image_header, read_image

from .helpers import write_dataset


def png_declaring(path, width, height):
    """A valid 1 x 1 RGB PNG whose IHDR is patched to declare width x height (CRC fixed):
    a few dozen bytes that PIL opens as a huge image."""
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def expected_uint8(values, low, high):
    """The rule of image_io, written out: 255 (v - low) / (high - low), clipped, rounded;
    non-finite values 0."""
    values, low, high = np.asarray(values, np.float64), float(low), float(high)
    out = np.rint(np.clip((values - low) / (high - low) * 255.0, 0, 255))
    out[~np.isfinite(values)] = 0
    return out.astype(np.uint8)


def percentile_bounds(values):
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    return tuple(np.percentile(finite, [0.5, 99.5]))


def ramp_with_outliers(dtype, height=20, width=50):
    """A shuffled ramp 1000, 1010, ... whose four lowest and four highest pixels are
    outliers (0..3 and 60000..65535): the 0.5th and 99.5th percentiles (the 5th pixel
    from either end of 1000) fall just inside the ramp, so the outliers saturate."""
    values = 1000.0 + 10.0 * np.arange(height * width)
    values[:4] = [0, 1, 2, 3]
    values[-4:] = np.linspace(60000, 65535, 4)
    return np.random.default_rng(0).permutation(values).reshape(height, width).astype(dtype)


def channels(image):
    """The one channel of a three-channel image whose channels are equal."""
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    assert (image == image[:, :, :1]).all()
    return image[:, :, 0]


# ---- 8-bit images: bit-identical to detectron2 -------------------------------------------

def _rgb(height=37, width=53):
    return np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write_8bit(tmp_path, kind):
    rgb = Image.fromarray(_rgb())
    if kind == "RGB png":
        rgb.save(tmp_path / "x.png")
    elif kind == "L png":
        rgb.convert("L").save(tmp_path / "x.png")
    elif kind == "P png":
        rgb.convert("P").save(tmp_path / "x.png")
    elif kind == "RGBA png":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(_rgb()[:, :, 0]))
        rgba.save(tmp_path / "x.png")
    elif kind == "LA png":
        rgb.convert("LA").save(tmp_path / "x.png")
    elif kind == "JPEG":
        rgb.save(tmp_path / "x.png", format="JPEG", quality=90)
    elif kind == "JPEG rotated by EXIF":
        exif = Image.Exif()
        exif[0x0112] = 6
        rgb.save(tmp_path / "x.png", format="JPEG", quality=90, exif=exif)
    return tmp_path / "x.png"


@pytest.mark.parametrize("fmt", ["BGR", "RGB", "L"])
@pytest.mark.parametrize("kind", ["RGB png", "L png", "P png", "RGBA png", "LA png", "JPEG",
                                  "JPEG rotated by EXIF"])
def test_8bit_images_are_read_exactly_as_detectron2_reads_them(tmp_path, kind, fmt):
    path = _write_8bit(tmp_path, kind)
    ours = read_image(path, format=fmt)
    theirs = detection_utils.read_image(str(path), format=fmt)
    assert ours.dtype == theirs.dtype == np.uint8
    assert ours.shape == theirs.shape == ((53, 37) if "EXIF" in kind else (37, 53)) + (
        (1,) if fmt == "L" else (3,))
    np.testing.assert_array_equal(ours, theirs)


def test_one_two_and_four_channels_give_three_without_alpha(tmp_path):
    rgb = _rgb()
    gray = Image.fromarray(rgb).convert("L")
    gray.save(tmp_path / "l.png")
    la = gray.convert("LA")
    la.putalpha(7)
    la.save(tmp_path / "la.png")
    rgba = Image.fromarray(rgb).convert("RGBA")
    rgba.putalpha(0)  # fully transparent: the colours must survive
    rgba.save(tmp_path / "rgba.png")
    assert image_header(tmp_path / "la.png")[2] == "LA"
    assert image_header(tmp_path / "rgba.png")[2] == "RGBA"
    np.testing.assert_array_equal(channels(read_image(tmp_path / "l.png", "RGB")), np.asarray(gray))
    np.testing.assert_array_equal(channels(read_image(tmp_path / "la.png", "RGB")), np.asarray(gray))
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png", "RGB"), rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png", "BGR"), rgb[:, :, ::-1])
    assert read_image(tmp_path / "l.png", "L").shape == (37, 53, 1)


# ---- more than 8 bits per sample -----------------------------------------------------------

def test_what_pil_gives_for_16bit_png_and_float_tiff(tmp_path):
    Image.fromarray(ramp_with_outliers(np.uint16)).save(tmp_path / "a.png")
    Image.fromarray(ramp_with_outliers(np.uint16)).save(tmp_path / "a.tif")
    Image.fromarray(ramp_with_outliers(np.float32)).save(tmp_path / "f.tif")
    assert image_header(tmp_path / "a.png") == (50, 20, "I")  # PIL's 16-bit grey PNG
    assert image_header(tmp_path / "a.tif") == (50, 20, "I;16")
    assert image_header(tmp_path / "f.tif") == (50, 20, "F")
    # PIL's own 8-bit conversion clips: the bug this module exists for.
    assert (np.asarray(Image.open(tmp_path / "a.png").convert("L")) == 255).mean() > 0.99


@pytest.mark.parametrize("suffix,dtype", [(".png", np.uint16), (".tif", np.uint16),
                                          (".tif", ">u2"), (".tif", np.float32)])
def test_percentile_rule(tmp_path, suffix, dtype):
    values = ramp_with_outliers(dtype)
    path = tmp_path / f"a{suffix}"
    Image.fromarray(values).save(path)
    low, high = percentile_bounds(values)
    assert 1000 < low < 1060 and 10900 < high < 10990  # the outliers are outside
    got = channels(read_image(path, "BGR"))
    want = expected_uint8(values, low, high)
    np.testing.assert_array_equal(got, want)
    # The ramp spreads over 0..255; only the outliers and the 0.5% tails saturate.
    assert len(np.unique(got)) == 256
    assert 5 <= (got == 0).sum() <= 12 and 5 <= (got == 255).sum() <= 12
    assert got[values == 1000 + 10 * 500].item() == 128  # mid-ramp -> mid-grey
    np.testing.assert_array_equal(read_image(path, "L")[:, :, 0], want)


def test_range_rule(tmp_path):
    values = ramp_with_outliers(np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    Image.fromarray(values).save(tmp_path / "a.tif")
    want = expected_uint8(values, 0, 65535)
    for name in ("a.png", "a.tif"):
        np.testing.assert_array_equal(
            channels(read_image(tmp_path / name, "RGB", normalize="range")), want)
    floats = ramp_with_outliers(np.float32) / 1000 - 7.5  # -7.5 .. 58.035
    Image.fromarray(floats).save(tmp_path / "f.tif")
    got = channels(read_image(tmp_path / "f.tif", "RGB", normalize="range"))
    np.testing.assert_array_equal(got, expected_uint8(floats, floats.min(), floats.max()))
    assert got.min() == 0 and got.max() == 255
    # 32-bit integers beyond 0..65535: their own min..max.
    wide = (ramp_with_outliers(np.int32) - 5) * 100  # -500 .. 6,553,000
    Image.fromarray(wide, "I").save(tmp_path / "i.tif")
    np.testing.assert_array_equal(channels(read_image(tmp_path / "i.tif", "RGB", normalize="range")),
                                  expected_uint8(wide, wide.min(), wide.max()))


def test_constant_images_do_not_divide_by_zero(tmp_path):
    Image.fromarray(np.full((8, 9), 1234, np.uint16)).save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 9), 3.5, np.float32)).save(tmp_path / "f.tif")
    with np.errstate(all="raise"):
        assert (read_image(tmp_path / "a.png", "RGB") == 0).all()
        # The 16-bit range rule has fixed bounds: 1234 / 65535 * 255 = 4.80 -> 5.
        assert (read_image(tmp_path / "a.png", "RGB", normalize="range") == 5).all()
        for normalize in ("percentile", "range"):
            assert (read_image(tmp_path / "f.tif", "RGB", normalize=normalize) == 0).all()


def test_a_few_bright_spots_on_a_flat_background_still_show(tmp_path):
    values = np.zeros((30, 40), np.uint16)  # more than 99.5% of the pixels are 0
    values[3, 4], values[10, 20], values[25, 30] = 40000, 20000, 100
    Image.fromarray(values).save(tmp_path / "a.png")
    got = channels(read_image(tmp_path / "a.png", "RGB"))
    np.testing.assert_array_equal(got, expected_uint8(values, 0, 40000))
    assert got[3, 4] == 255 and got[10, 20] == 128 and got[25, 30] == 1


def test_nan_and_inf_are_the_low_value(tmp_path):
    values = np.linspace(-2, 3, 400, dtype=np.float32).reshape(20, 20)
    values[0, :3] = [np.nan, np.inf, -np.inf]
    values[5, 5] = np.nan
    Image.fromarray(values).save(tmp_path / "f.tif")
    got = channels(read_image(tmp_path / "f.tif", "RGB"))
    low, high = percentile_bounds(values)  # over the finite values only
    np.testing.assert_array_equal(got, expected_uint8(values, low, high))
    assert (got[0, :3] == 0).all() and got[5, 5] == 0 and got.max() == 255
    finite = values[np.isfinite(values)]
    got = channels(read_image(tmp_path / "f.tif", "RGB", normalize="range"))
    np.testing.assert_array_equal(got, expected_uint8(values, finite.min(), finite.max()))
    Image.fromarray(np.full((4, 4), np.nan, np.float32)).save(tmp_path / "nan.tif")
    assert (read_image(tmp_path / "nan.tif", "RGB") == 0).all()


def test_tiff_orientation_is_applied_once(tmp_path):
    """PIL turns a TIFF as its Orientation tag says while decoding; the reader must not
    turn it again (detectron2's read_image does)."""
    values = ramp_with_outliers(np.uint16)
    Image.fromarray(values).save(tmp_path / "a.tif", tiffinfo={0x0112: 6})
    got = channels(read_image(tmp_path / "a.tif", "RGB"))
    want = expected_uint8(values, *percentile_bounds(values))
    np.testing.assert_array_equal(got, np.rot90(want, -1))  # 6: turned 90 degrees clockwise
    rgb = _rgb()
    Image.fromarray(rgb).save(tmp_path / "c.tif", tiffinfo={0x0112: 6})
    np.testing.assert_array_equal(read_image(tmp_path / "c.tif", "RGB"), np.rot90(rgb, -1))


def test_16bit_colour_is_reduced_by_pil_to_its_high_byte(tmp_path):
    """PIL has no 16-bit colour mode: it decodes 16-bit RGB PNGs to 8 bits (v // 256)."""
    samples = np.random.default_rng(2).integers(0, 65536, (6, 7, 3)).astype(">u2")

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    raw = b"".join(b"\x00" + row.tobytes() for row in samples)
    (tmp_path / "c.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 7, 6, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    assert image_header(tmp_path / "c.png") == (7, 6, "RGB")
    np.testing.assert_array_equal(read_image(tmp_path / "c.png", "RGB"), samples // 256)


def test_normalize_must_be_a_rule(tmp_path):
    Image.new("L", (4, 4)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"INPUT.NORMALIZE must be one of .*'percentile'.*'minmax'"):
        read_image(tmp_path / "a.png", "RGB", normalize="minmax")
    assert get_cpr_d2_cfg().INPUT.NORMALIZE == "percentile"


# ---- headers, limits and errors --------------------------------------------------------------

def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path, monkeypatch):
    huge = png_declaring(tmp_path / "huge.png", 30000, 30000)
    assert huge.stat().st_size < 100
    assert image_header(huge) == (30000, 30000, "RGB")

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    start = time.monotonic()
    with pytest.raises(PixelLimitError, match=r"huge.png: 30000 x 30000 = 900,000,000 pixels is "
                                              r"more than INPUT.MAX_IMAGE_PIXELS = 100,000,000 "
                                              r".*INPUT.MAX_IMAGE_PIXELS 900000000 \(0 = no limit\)"):
        read_image(huge, "BGR")  # the default limit: INPUT.MAX_IMAGE_PIXELS's
    assert time.monotonic() - start < 2
    with pytest.raises(ValueError, match=r"huge.png: .* more than --max-pixels = 1,000"):
        read_image(huge, "BGR", max_pixels=1000, limit_key="--max-pixels")
    image_io.check_pixel_limit(huge, 30000, 30000, 0)  # 0: no limit
    image_io.check_pixel_limit(huge, 30000, 30000, 900_000_000)  # at the limit: fine
    with pytest.raises(ValueError, match=r"huge.png: 30000 x 30000 .* = 899,999,999"):
        image_io.check_pixel_limit(huge, 30000, 30000, 899_999_999)


def test_the_user_sees_the_projects_limit_never_pils(tmp_path, monkeypatch):
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses > 200 pixels
    assert read_image(tmp_path / "a.png", "RGB", max_pixels=0).shape == (64, 64, 3)
    with pytest.raises(PixelLimitError, match=r"a.png: 64 x 64 = 4,096 .* INPUT.MAX_IMAGE_PIXELS"):
        read_image(tmp_path / "a.png", "RGB", max_pixels=4000)
    assert Image.MAX_IMAGE_PIXELS == 100  # PIL's own limit is back


def test_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing.png: no such image file"):
        image_header(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match=r"missing.png"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image\n")
    Image.fromarray(_rgb()).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "header.png").write_bytes(data[:20])  # cut inside the IHDR chunk
    (tmp_path / "pixels.png").write_bytes(data[:200])  # header complete, pixels cut
    for name in ("notes.png", "header.png"):
        for read in (image_header, read_image):
            with pytest.raises(ImageReadError, match=rf"cannot read the image .*{name} \(.*\); "
                                                     "is it a complete image file\\?"):
                read(tmp_path / name)
    assert image_header(tmp_path / "pixels.png") == (53, 37, "RGB")
    with pytest.raises(ValueError, match=r"cannot read the image .*pixels.png \(OSError: image "
                                         r"file is truncated"):
        read_image(tmp_path / "pixels.png")
    with pytest.raises(ValueError, match=r"cannot read the image .* \(a folder, not a file\); "
                                         "pass an image file"):
        read_image(tmp_path)


# ---- the mapper ------------------------------------------------------------------------------

def test_mapper_reads_16bit_images_by_the_configured_rule(tmp_path):
    json_file, root = write_dataset(tmp_path)
    record = load_point_json(json_file, root)[0]  # a.png, 60 x 40
    values = ramp_with_outliers(np.uint16, 40, 60)
    Image.fromarray(values).save(f"{root}/a.png")
    cfg = get_cpr_d2_cfg()
    cfg.INPUT.MIN_SIZE_TEST = 0  # no test-time resize
    mapper = PointDatasetMapper(cfg, is_train=False)
    assert mapper.normalize == "percentile"
    image = mapper(record)["image"].numpy()  # C, H, W
    assert image.shape == (3, 40, 60) and image.dtype == np.uint8
    want = expected_uint8(values, *percentile_bounds(values))
    for c in range(3):
        np.testing.assert_array_equal(image[c], want)
    cfg.INPUT.NORMALIZE = "range"
    image = PointDatasetMapper(cfg, is_train=False)(record)["image"].numpy()
    np.testing.assert_array_equal(image[0], expected_uint8(values, 0, 65535))
    with pytest.raises(ValueError, match="INPUT.NORMALIZE"):
        PointDatasetMapper(False, augmentations=[], normalize="linear")


def test_mapper_checks_the_pixel_limit_from_the_header(tmp_path, monkeypatch):
    json_file, root = write_dataset(tmp_path)
    record = load_point_json(json_file, root)[0]
    del record["height"], record["width"]  # nothing to check before the file is opened
    png_declaring(tmp_path / "images" / "a.png", 30000, 30000)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    mapper = PointDatasetMapper(get_cpr_d2_cfg(), is_train=True)
    with pytest.raises(ValueError, match=r"image id 1: .*a.png: 30000 x 30000 = 900,000,000 "
                                         r"pixels is more than INPUT.MAX_IMAGE_PIXELS = "
                                         r"100,000,000"):
        mapper(record)
