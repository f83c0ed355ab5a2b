"""Pixels of stored instances, for recipients: decoded frames, native frame bytes, and rendered
images (PS3.18 §8.3.5 "Rendered Resources", with the query parameters of §8.3.5.1).

This module works from the path of a stored Part 10 file and knows nothing of HTTP, shares or
the index: the DICOMweb views and the viewer check the share, find the file, parse the query
parameters with `parse_window`, `parse_viewport`, `parse_quality` and `parse_media_type`, and
answer 400 with the message of an `InvalidParameterError`, 404 for `NotAnImageError` and
`NoSuchFrameError`.

Only the frame asked for is read: the header is parsed up to Pixel Data and pydicom's decoder
seeks to the frame (through the Basic or Extended Offset Table when the data is encapsulated).
A deflated file is the exception: it has to be inflated from its start.

Rendering follows the grayscale pipeline of PS3.3 C.11 (Modality LUT, then VOI LUT, then
the polarity of MONOCHROME1) with one precomputed 8-bit look-up table per (data type, rescale,
window): a 16-bit frame is one `np.take` over a 65536-entry table, whatever the window
function. Colour frames are shown as they are, scaled to 8 bits.
"""

from __future__ import annotations

import enum
import functools
import io
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, NamedTuple

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, as_pixel_options, get_decoder
from pydicom.uid import UID

__all__ = [
    "DEFAULT_QUALITY",
    "RENDER_CACHE",
    "THUMBNAIL_SIZE",
    "CannotDecodeError",
    "InvalidParameterError",
    "MediaType",
    "NoSuchFrameError",
    "NotAnImageError",
    "RenderCache",
    "RenderingError",
    "VOIFunction",
    "Viewport",
    "Window",
    "decode_frame",
    "number_of_frames",
    "parse_media_type",
    "parse_quality",
    "parse_viewport",
    "parse_window",
    "render",
    "thumbnail",
    "uncompressed_frame_bytes",
]


# ---------------------------------------------------------------------------------------------
# Errors


class RenderingError(Exception):
    """Anything this module cannot do with a stored file or a request's parameters."""


class NotAnImageError(RenderingError):
    """The instance has no pixels (an encapsulated PDF, a structured report, a KOS…)."""


class NoSuchFrameError(RenderingError):
    """The frame number is outside 1…Number of Frames."""


class CannotDecodeError(RenderingError):
    """The stored file cannot be read, or its pixel data cannot be decoded (no decoder for its
    transfer syntax here, or corrupt pixel data)."""

    def __init__(self, message: str, *, transfer_syntax_uid: str = "") -> None:
        super().__init__(message)
        self.transfer_syntax_uid = transfer_syntax_uid


class InvalidParameterError(RenderingError):
    """A malformed query parameter; the message says what is wrong (the view answers 400)."""


# ---------------------------------------------------------------------------------------------
# Parameters


class VOIFunction(enum.StrEnum):
    """VOI LUT Function (0028,1056), PS3.3 C.11.2.1.3."""

    LINEAR = "LINEAR"
    LINEAR_EXACT = "LINEAR_EXACT"
    SIGMOID = "SIGMOID"


class Window(NamedTuple):
    """A VOI window in the units of the Modality LUT's output (Hounsfield units for CT)."""

    center: float
    width: float
    function: VOIFunction = VOIFunction.LINEAR


class Viewport(NamedTuple):
    """The largest image wanted, and optionally the region of the frame to show (its source
    rectangle, `sx,sy,sw,sh` in PS3.18 §8.3.5.1), all in pixels."""

    rows: int
    columns: int
    source: tuple[int, int, int, int] | None = None  # (x, y, width, height)


class MediaType(enum.StrEnum):
    JPEG = "image/jpeg"
    PNG = "image/png"


DEFAULT_QUALITY = 90
THUMBNAIL_SIZE = Viewport(rows=128, columns=128)
THUMBNAIL_QUALITY = 75


def parse_window(value: str) -> Window:
    """Parse the `window` query parameter (PS3.18 §8.3.5.1): `center,width,function` with
    function `linear`, `linear-exact` or `sigmoid` (the function may be left out: linear)."""
    parts = [part.strip() for part in value.split(",")]
    if len(parts) not in (2, 3):
        raise InvalidParameterError(
            "window must be center,width,function (for example 40,400,linear)"
        )
    center = _finite_number(parts[0], "window center")
    width = _finite_number(parts[1], "window width")
    function = VOIFunction.LINEAR
    if len(parts) == 3:
        name = parts[2].upper().replace("-", "_")
        try:
            function = VOIFunction(name)
        except ValueError:
            raise InvalidParameterError(
                "window function must be linear, linear-exact or sigmoid"
            ) from None
    window = Window(center, width, function)
    _check_window(window)
    return window


def parse_viewport(value: str) -> Viewport:
    """Parse the `viewport` query parameter (PS3.18 §8.3.5.1): `vw,vh` (width, then height) or
    `vw,vh,sx,sy,sw,sh` with a source rectangle. Flipping (a negative sw or sh) is refused."""
    parts = [part.strip() for part in value.split(",")]
    if len(parts) not in (2, 6):
        raise InvalidParameterError("viewport must be width,height or width,height,sx,sy,sw,sh")
    numbers = [_non_negative_integer(part, "viewport") for part in parts]
    # Within what a browser can show; no one asks for a 100000-pixel-wide rendering in good faith.
    if numbers[0] > 16384 or numbers[1] > 16384:
        raise InvalidParameterError("viewport width and height must be at most 16384")
    source = None
    if len(numbers) == 6:
        if numbers[4] == 0 or numbers[5] == 0:
            raise InvalidParameterError("viewport source width and height must be positive")
        source = (numbers[2], numbers[3], numbers[4], numbers[5])
    if numbers[0] == 0 or numbers[1] == 0:
        raise InvalidParameterError("viewport width and height must be positive")
    return Viewport(rows=numbers[1], columns=numbers[0], source=source)


def parse_quality(value: str) -> int:
    """Parse the `quality` query parameter (PS3.18 §8.3.5.1): an integer from 1 to 100."""
    quality = _non_negative_integer(value, "quality")
    if not 1 <= quality <= 100:
        raise InvalidParameterError("quality must be an integer from 1 to 100")
    return quality


def parse_media_type(value: str) -> MediaType:
    """The rendered media type from an Accept value's type (parameters such as `q` are the
    view's business)."""
    try:
        return MediaType(value.split(";", 1)[0].strip().lower())
    except ValueError:
        raise InvalidParameterError("rendered media types are image/jpeg and image/png") from None


def _finite_number(text: str, what: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise InvalidParameterError(f"{what} must be a number") from None
    if not math.isfinite(number):
        raise InvalidParameterError(f"{what} must be a finite number")
    return number


def _non_negative_integer(text: str, what: str) -> int:
    if not text.isdecimal() or not text.isascii() or len(text) > 9:
        raise InvalidParameterError(f"{what} values must be non-negative integers")
    return int(text)


def _check_window(window: Window) -> None:
    # PS3.3 C.11.2.1.2.1: "Window Width (0028,1051) shall always be greater than or equal to 1"
    # for LINEAR; C.11.2.1.3.1-2: greater than 0 for LINEAR_EXACT and SIGMOID.
    if window.function is VOIFunction.LINEAR and window.width < 1:
        raise InvalidParameterError("window width must be at least 1 for the linear function")
    if window.width <= 0:
        raise InvalidParameterError("window width must be greater than 0")


# ---------------------------------------------------------------------------------------------
# Reading one frame


@dataclass(frozen=True)
class _Frame:
    header: Dataset  # everything before Pixel Data (the whole data set when deflated)
    index: int  # 0-based
    photometric_interpretation: str  # of the decoded pixels, after any colour conversion
    pixels: npt.NDArray[Any] | None = None
    stored: bytes | None = None  # native little-endian data: the frame's bytes as stored


_PIXEL_DATA_TAGS = {
    (0x7FE0, 0x0010): "PixelData",
    (0x7FE0, 0x0008): "FloatPixelData",
    (0x7FE0, 0x0009): "DoubleFloatPixelData",
}


def number_of_frames(header: Dataset) -> int:
    """Number of Frames (0028,0008), 1 when absent (or, wrongly, empty or 0)."""
    value = header.get("NumberOfFrames")
    try:
        count = int(value) if value not in (None, "") else 1
    except (TypeError, ValueError):
        return 1
    return max(count, 1)


def _frame_index(header: Dataset, frame_number: int) -> int:
    # Frame numbers in DICOMweb URLs start at 1, as in the Referenced Frame Number (0008,1160).
    count = number_of_frames(header)
    if not 1 <= frame_number <= count:
        raise NoSuchFrameError(f"frame {frame_number} does not exist (frames 1 to {count})")
    return frame_number - 1


def _read_frame(
    path: str | os.PathLike[str], frame_number: int, *, raw: bool, stored: bool = False
) -> _Frame:
    """Decode frame `frame_number` (1-based) of the file at `path`. With `stored`, native
    little-endian data is not decoded: the frame's stored bytes are returned instead."""
    tsyntax = UID("")
    try:
        with open(path, "rb") as f:
            header = dcmread(f, stop_before_pixels=True)
            tsyntax = UID(header.file_meta.get("TransferSyntaxUID", ""))
            if not tsyntax:
                raise CannotDecodeError("the stored file has no transfer syntax")
            source: Dataset | IO[bytes]
            if tsyntax.is_deflated:
                # The pixels are inside the deflated stream: the data set is inflated whole.
                f.seek(0)
                header = source = dcmread(f)
                if not any(keyword in header for keyword in _PIXEL_DATA_TAGS.values()):
                    raise NotAnImageError("the instance has no Pixel Data")
                options = as_pixel_options(header)
            else:
                keyword, vr = _pixel_data_element(f, tsyntax)
                source = f
                options = as_pixel_options(header, transfer_syntax_uid=tsyntax)
                options["pixel_keyword"] = keyword
                if vr:
                    options["pixel_vr"] = vr
            if "Rows" not in header or "Columns" not in header or "BitsAllocated" not in header:
                raise NotAnImageError("the instance has no Image Pixel description")
            index = _frame_index(header, frame_number)
            decoder = _decoder(tsyntax)
            if stored and tsyntax.is_little_endian and not tsyntax.is_encapsulated:
                data, properties = decoder.as_buffer(source, index=index, **options)
                photometric = str(properties.get("photometric_interpretation", ""))
                return _Frame(header, index, photometric, stored=bytes(data))
            pixels, properties = decoder.as_array(source, index=index, raw=raw, **options)
    except (InvalidDicomError, EOFError) as exc:
        raise CannotDecodeError(f"the stored file is not readable DICOM: {exc}") from exc
    except RenderingError:
        raise
    except (ValueError, RuntimeError, KeyError, AttributeError, NotImplementedError) as exc:
        # pydicom's decoders and their plugins report a corrupt codestream, inconsistent Image
        # Pixel elements or a plugin that cannot handle the data with these.
        raise CannotDecodeError(
            f"the pixel data cannot be decoded: {exc}", transfer_syntax_uid=tsyntax
        ) from exc
    photometric = str(properties.get("photometric_interpretation", ""))
    return _Frame(header, index, photometric, pixels=pixels)


def _pixel_data_element(f: IO[bytes], tsyntax: UID) -> tuple[str, str]:
    """Read the tag, VR and length of the element at `f`'s position (where dcmread stopped
    before the pixels) and return its keyword and VR, leaving `f` at the start of its value."""
    head = f.read(8)
    if len(head) < 8:
        raise NotAnImageError("the instance has no Pixel Data")
    order = "<" if tsyntax.is_little_endian else ">"
    group, element = np.frombuffer(head[:4], dtype=f"{order}u2")
    keyword = _PIXEL_DATA_TAGS.get((int(group), int(element)))
    if keyword is None:
        raise NotAnImageError("the instance has no Pixel Data")
    if tsyntax.is_implicit_VR:
        return keyword, ""
    # PS3.5 7.1.2: OB, OW, OF, OD have a 2-byte reserved field and a 4-byte length.
    f.read(4)
    return keyword, head[4:6].decode("ascii", "replace")


def _decoder(tsyntax: UID) -> Any:
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise CannotDecodeError(
            f"no decoder for the transfer syntax {tsyntax.name}", transfer_syntax_uid=tsyntax
        ) from None
    if not decoder.is_available:
        raise CannotDecodeError(
            f"no decoding plugin installed for {tsyntax.name}", transfer_syntax_uid=tsyntax
        )
    return decoder


def decode_frame(path: str | os.PathLike[str], frame_number: int) -> npt.NDArray[Any]:
    """Frame `frame_number` (1-based) of a stored instance as stored values (before the
    Modality LUT): (rows, columns) for one sample per pixel, (rows, columns, 3) for colour,
    with YBR colour converted to RGB."""
    frame = _read_frame(path, frame_number, raw=False)
    assert frame.pixels is not None
    return frame.pixels


def uncompressed_frame_bytes(path: str | os.PathLike[str], frame_number: int) -> bytes:
    """Frame `frame_number` (1-based) as native little-endian pixel bytes: what WADO-RS
    `/frames/{n}` returns as application/octet-stream.

    Native little-endian data (deflated included) comes back as stored, byte for byte.
    Big-endian data is byte-swapped. Compressed data is decoded in the codec's own colour
    space (pydicom's `raw` decoding), except that the libjpeg decoder still turns baseline
    JPEG's YCbCr into RGB, as dcmtk and Orthanc do when they decompress."""
    frame = _read_frame(path, frame_number, raw=True, stored=True)
    if frame.stored is not None:
        return frame.stored
    assert frame.pixels is not None
    if int(frame.header.BitsAllocated) == 1:
        # PS3.5 8.1.1: 1-bit pixels are packed, the first pixel in the least significant bit.
        return np.packbits(frame.pixels.astype(np.uint8), bitorder="little").tobytes()
    return frame.pixels.astype(frame.pixels.dtype.newbyteorder("<"), copy=False).tobytes()


# ---------------------------------------------------------------------------------------------
# Grayscale pipeline: Modality LUT, VOI LUT, polarity (PS3.3 C.11, PS3.4 N.2)


def _functional_group_value(header: Dataset, index: int, sequence: str, keyword: str) -> Any:
    """An attribute that an enhanced multi-frame instance keeps in a functional group macro
    (PS3.3 C.7.6.16): the frame's own item of the Per-Frame Functional Groups Sequence, else
    the Shared one, else the top-level attribute of a classic instance."""
    for groups_keyword, item_index in (
        ("PerFrameFunctionalGroupsSequence", index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = header.get(groups_keyword)
        if not groups or item_index >= len(groups):
            continue
        macro = groups[item_index].get(sequence)
        if macro and keyword in macro[0]:
            return macro[0][keyword].value
    return header.get(keyword)


def _first_number(value: Any) -> float | None:
    """The first value of a DS/IS element (Window Center and Width may hold several), or None
    when it is absent, empty or not a finite number."""
    if value is None or value == "":
        return None
    if not isinstance(value, str | int | float):
        try:
            value = value[0]
        except (TypeError, IndexError):
            return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _rescale(header: Dataset, index: int) -> tuple[float, float]:
    """Rescale Slope and Intercept (PS3.3 C.11.1.1.2), the Modality LUT of CT, PET and most
    other images; absent, the identity."""
    group = "PixelValueTransformationSequence"
    slope = _first_number(_functional_group_value(header, index, group, "RescaleSlope"))
    intercept = _first_number(_functional_group_value(header, index, group, "RescaleIntercept"))
    return (slope if slope else 1.0), (intercept or 0.0)


def _stored_window(header: Dataset, index: int) -> Window | None:
    """The first window the instance suggests (PS3.3 C.11.2.1.2), if it is a valid one."""
    group = "FrameVOILUTSequence"
    center = _first_number(_functional_group_value(header, index, group, "WindowCenter"))
    width = _first_number(_functional_group_value(header, index, group, "WindowWidth"))
    if center is None or width is None:
        return None
    name = str(_functional_group_value(header, index, group, "VOILUTFunction") or "LINEAR")
    try:
        function = VOIFunction(name.strip().upper())
    except ValueError:
        function = VOIFunction.LINEAR
    window = Window(center, width, function)
    try:
        _check_window(window)
    except InvalidParameterError:
        return None
    return window


def _full_range_window(low: float, high: float) -> Window:
    """A window from the frame's smallest to its largest value: LINEAR_EXACT maps `low` to
    black and `high` to white exactly."""
    center = (low + high) / 2
    return Window(center, max(high - low, 1.0), VOIFunction.LINEAR_EXACT)


def _voi(values: npt.NDArray[np.floating[Any]], window: Window, invert: bool) -> npt.NDArray[Any]:
    """The VOI LUT function of PS3.3 C.11.2.1.2-3 on modality values, to 0…255, inverted for
    MONOCHROME1 (PS3.3 C.7.6.3.1.2: its minimum value is white)."""
    c, w = window.center, window.width
    y: npt.NDArray[Any]
    if window.function is VOIFunction.SIGMOID:
        # C.11.2.1.3.1: y = (ymax - ymin) / (1 + exp(-4 (x - c) / w)) + ymin
        with np.errstate(over="ignore"):
            y = 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    elif window.function is VOIFunction.LINEAR_EXACT:
        # C.11.2.1.3.2: x <= c - w/2 -> ymin, x > c + w/2 -> ymax, else (x - c) / w + 0.5
        y = np.clip((values - c) / w + 0.5, 0.0, 1.0)
    elif w == 1:
        # C.11.2.1.2.1 with a width of 1: a threshold at c - 0.5.
        y = (values > c - 0.5).astype(np.float32)
    else:
        # C.11.2.1.2.1: x <= c - 0.5 - (w-1)/2 -> ymin, x > c - 0.5 + (w-1)/2 -> ymax,
        # else ((x - (c - 0.5)) / (w-1) + 0.5) * (ymax - ymin) + ymin
        y = np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    if invert:
        y = 1.0 - y
    return np.rint(y * 255.0).astype(np.uint8)


@functools.lru_cache(maxsize=32)
def _lut(dtype: str, slope: float, intercept: float, window: Window, invert: bool) -> Any:
    """The 8-bit output of every possible stored value of an 8- or 16-bit data type, indexed by
    the value's bit pattern read as unsigned."""
    stored = np.dtype(dtype)
    patterns = np.arange(2 ** (8 * stored.itemsize), dtype=f"u{stored.itemsize}")
    values = patterns.view(stored).astype(np.float32) * np.float32(slope) + np.float32(intercept)
    lut = _voi(values, window, invert)
    lut.setflags(write=False)
    return lut


def _grayscale(
    pixels: npt.NDArray[Any], header: Dataset, index: int, window: Window | None, invert: bool
) -> npt.NDArray[np.uint8]:
    slope, intercept = _rescale(header, index)
    window = window or _stored_window(header, index)
    if window is None:
        ends = (float(pixels.min()) * slope + intercept, float(pixels.max()) * slope + intercept)
        window = _full_range_window(min(ends), max(ends))
    if pixels.dtype.kind in "ui" and pixels.dtype.itemsize <= 2:
        lut = _lut(pixels.dtype.str, slope, intercept, window, invert)
        return np.take(lut, pixels.view(f"u{pixels.dtype.itemsize}"))
    values = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return _voi(values, window, invert)


def _colour(frame: _Frame) -> npt.NDArray[np.uint8]:
    pixels = frame.pixels
    assert pixels is not None
    if frame.photometric_interpretation == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, frame.header)
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype.kind == "u":
        # 16-bit palette entries, or RGB of more than 8 bits stored: keep the top 8 bits.
        bits = 16 if frame.photometric_interpretation == "PALETTE COLOR" else None
        bits = bits or int(frame.header.get("BitsStored") or 8 * pixels.dtype.itemsize)
        return (pixels >> max(bits - 8, 0)).astype(np.uint8)
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels.astype(np.float32) - low) * (255.0 / max(high - low, 1e-9))
    return np.rint(scaled).astype(np.uint8)


def _to_8bit(frame: _Frame, window: Window | None) -> npt.NDArray[np.uint8]:
    """The displayable 8-bit frame; `window` (or the instance's own) applies to grayscale."""
    pixels = frame.pixels
    assert pixels is not None
    photometric = frame.photometric_interpretation
    if pixels.ndim == 2 and photometric != "PALETTE COLOR":
        return _grayscale(pixels, frame.header, frame.index, window, photometric == "MONOCHROME1")
    return _colour(frame)


# ---------------------------------------------------------------------------------------------
# Geometry and encoding


def _crop(pixels: npt.NDArray[np.uint8], source: tuple[int, int, int, int]) -> Any:
    x, y, width, height = source
    rows, columns = pixels.shape[:2]
    if x >= columns or y >= rows:
        raise InvalidParameterError("the viewport source rectangle is outside the frame")
    return pixels[y : min(y + height, rows), x : min(x + width, columns)]


def _fit(image: Image.Image, viewport: Viewport) -> Image.Image:
    """Scale down to fit the viewport, keeping the aspect ratio; never up (PS3.18 §8.3.5.1
    leaves the choice, and an enlarged image only weighs more)."""
    scale = min(viewport.columns / image.width, viewport.rows / image.height)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # reducing_gap=1: the integer part of the factor by averaging blocks of pixels (a box
    # filter, some 25 times faster than Lanczos alone on a 512×512 slice), Lanczos for the rest.
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=1.0)


def _encode(image: Image.Image, media_type: MediaType, quality: int) -> bytes:
    out = io.BytesIO()
    if media_type is MediaType.JPEG:
        image.save(out, format="JPEG", quality=quality)
    else:
        # Level 1: most of the size gain for a fraction of the default's time.
        image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _render(
    path: str | os.PathLike[str],
    frame_number: int,
    media_type: MediaType,
    window: Window | None,
    viewport: Viewport | None,
    quality: int,
) -> bytes:
    frame = _read_frame(path, frame_number, raw=False)
    pixels = _to_8bit(frame, window)
    if viewport is not None and viewport.source is not None:
        pixels = _crop(pixels, viewport.source)
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if viewport is not None:
        image = _fit(image, viewport)
    return _encode(image, media_type, quality)


# ---------------------------------------------------------------------------------------------
# Cache


class RenderCache:
    """A bounded, thread-safe, least-recently-used store of rendered images, measured in bytes.

    Keys name the stored file by its path and identity (inode, size, modification time), so a
    file written anew at the same path is never served from an old rendering."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """Bytes held now."""
        return self._size

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[Any, ...]) -> bytes | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: tuple[Any, ...], value: bytes) -> None:
        """Keep `value`, evicting the least recently used entries past the budget; a value
        larger than the whole budget is not kept."""
        if len(value) > self.max_bytes:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._size -= len(previous)
            self._entries[key] = value
            self._size += len(value)
            while self._size > self.max_bytes:
                _key, evicted = self._entries.popitem(last=False)
                self._size -= len(evicted)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._size = 0

    def get_or_render(self, key: tuple[Any, ...], produce: Callable[[], bytes]) -> bytes:
        """The cached value of `key`, else `produce()`, kept. Rendering happens outside the
        lock: two threads asking for the same cold image may both render it."""
        value = self.get(key)
        if value is None:
            value = produce()
            self.put(key, value)
        return value


# 64 MiB: some 2000 rendered 512×512 slices at the default quality, per process.
RENDER_CACHE = RenderCache(max_bytes=64 * 1024 * 1024)


def _file_identity(path: str | os.PathLike[str]) -> tuple[str, int, int, int]:
    status = os.stat(path)
    return os.fspath(path), status.st_ino, status.st_size, status.st_mtime_ns


# ---------------------------------------------------------------------------------------------
# Public rendering


def render(
    path: str | os.PathLike[str],
    frame_number: int = 1,
    *,
    media_type: MediaType | str = MediaType.JPEG,
    window: Window | None = None,
    viewport: Viewport | None = None,
    quality: int = DEFAULT_QUALITY,
    cache: RenderCache | None = RENDER_CACHE,
) -> bytes:
    """Frame `frame_number` (1-based) of the instance at `path` rendered as an 8-bit JPEG or
    PNG (PS3.18 §8.3.5): Modality LUT, then `window` (else the instance's first window, else
    the frame's full range), MONOCHROME1 shown inverted; colour shown as it is (`window` does
    not apply); scaled down into `viewport`, keeping the aspect ratio. `quality` (1…100)
    applies to JPEG. Raises a `RenderingError`; an `OSError` when the file cannot be read."""
    media = media_type if isinstance(media_type, MediaType) else parse_media_type(media_type)
    if not 1 <= quality <= 100:
        raise InvalidParameterError("quality must be an integer from 1 to 100")
    if window is not None:
        _check_window(window)
    if cache is None:
        return _render(path, frame_number, media, window, viewport, quality)
    used_quality = quality if media is MediaType.JPEG else None
    key = (_file_identity(path), frame_number, media, window, viewport, used_quality)
    return cache.get_or_render(
        key, lambda: _render(path, frame_number, media, window, viewport, quality)
    )


def thumbnail(path: str | os.PathLike[str], *, cache: RenderCache | None = RENDER_CACHE) -> bytes:
    """A small JPEG of the instance (a DICOMweb thumbnail, whose size is the server's
    to choose): its middle frame, with its own window, within `THUMBNAIL_SIZE`."""

    def produce() -> bytes:
        try:
            header = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, EOFError) as exc:
            raise CannotDecodeError(f"the stored file is not readable DICOM: {exc}") from exc
        middle = (number_of_frames(header) + 1) // 2
        return _render(path, middle, MediaType.JPEG, None, THUMBNAIL_SIZE, THUMBNAIL_QUALITY)

    if cache is None:
        return produce()
    return cache.get_or_render((_file_identity(path), "thumbnail"), produce)
