"""Decoding and rendering of stored instances (dicomweb.rendering).

Every instance is built here, in the test's folder: a small CT phantom (air, soft tissue, a
gradient, bone) with the CT rescale and a window, written in each transfer syntax this machine
can encode (pydicom's own RLE, JPEG-LS with pyjpegls, JPEG 2000 with openjpeg, deflate), JPEG
baseline through Pillow, and JPEG lossless through the small encoder below. The few transfer
syntaxes nothing here can write come from the files pydicom itself ships, read back against
pydicom's whole-data-set decoding.
"""

import io
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom.data
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_windowing
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EncapsulatedPDFStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicomweb import rendering
from dicomweb.rendering import (
    CannotDecodeError,
    InvalidParameterError,
    NoSuchFrameError,
    NotAnImageError,
    RenderCache,
    Viewport,
    VOIFunction,
    Window,
)

ROWS, COLUMNS = 64, 80  # not square, so that a lost aspect ratio shows
INTERCEPT = -1024
# Stored values of the phantom's regions (HU = stored - 1024).
AIR, TISSUE, BONE = 24, 1064, 2200  # -1000 HU, 40 HU, 1176 HU

# Where each region lies (row, column) in the phantom.
AIR_AT = (2, 2)
TISSUE_AT = (32, 20)
BONE_AT = (32, 40)
GRADIENT_ROW = 55


def _ct_pixels(offset: int = 0) -> npt.NDArray[np.uint16]:
    pixels = np.full((ROWS, COLUMNS), AIR, dtype=np.uint16)
    pixels[8:48, 8:72] = TISSUE
    pixels[24:40, 32:48] = BONE
    # A ramp of -200…+300 HU across the bottom rows, and a little texture, so that codecs
    # have something to do and windows something to show.
    pixels[50:60, :] = np.linspace(824, 1324, COLUMNS).astype(np.uint16)
    pixels[10:20, 50:70] += (np.arange(20, dtype=np.uint16) * 7 % 23)[None, :]
    return pixels + np.uint16(offset)


def _image(
    pixels: npt.NDArray[np.generic],
    *,
    photometric: str = "MONOCHROME2",
    rescale: bool = True,
    window: tuple[float, float] | None = (40, 400),
    bits_stored: int = 12,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage if rescale else SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT" if rescale else "OT"
    ds.PatientName = "Test^Rendering"
    samples = 3 if photometric == "RGB" else 1
    frame_dimensions = 2 if samples == 1 else 3
    if pixels.ndim > frame_dimensions:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-frame_dimensions:][:2]
    ds.SamplesPerPixel = samples
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if rescale:
        ds.RescaleSlope = 1
        ds.RescaleIntercept = INTERCEPT
        ds.RescaleType = "HU"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.tobytes()
    return ds


def _write(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """Save `ds` as `transfer_syntax`, compressing it where that is a compressed syntax."""
    syntax = UID(transfer_syntax)
    if syntax.is_compressed:
        ds.compress(syntax, generate_instance_uid=False)
    else:
        if syntax == ExplicitVRBigEndian:
            # pydicom writes the OW value as it is: the bytes must already be big endian.
            dtype = np.dtype(f">{'i' if ds.PixelRepresentation else 'u'}{ds.BitsAllocated // 8}")
            ds.PixelData = (
                np.frombuffer(ds.PixelData, dtype=dtype.newbyteorder("<")).astype(dtype).tobytes()
            )
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _png(
    path: Path, frame: int = 1, *, window: Window | None = None, viewport: Viewport | None = None
) -> npt.NDArray[np.uint8]:
    """Render to PNG (lossless, so pixel values can be compared exactly) and read it back."""
    data = rendering.render(
        path, frame, media_type="image/png", window=window, viewport=viewport, cache=None
    )
    return np.asarray(_open(data))


# --- A JPEG lossless encoder (ITU-T T.81 Annex H), for test data only --------------------------


def _jpeg_lossless(pixels: npt.NDArray[np.uint16], precision: int, predictor: int) -> bytes:
    """One grayscale frame as a JPEG lossless codestream (process 14, point transform 0) with a
    fixed Huffman table: every difference category 0…16 has a 5-bit code."""
    x = pixels.astype(np.int64)
    prediction = np.empty_like(x)
    # H.1.2.1: the first sample of the first line is predicted by 2^(P-1), the rest of the first
    # line by the sample to the left (Ra), the first column by the sample above (Rb).
    prediction[0, 0] = 1 << (precision - 1)
    prediction[0, 1:] = x[0, :-1]
    prediction[1:, 0] = x[:-1, 0]
    ra, rb, rc = x[1:, :-1], x[:-1, 1:], x[:-1, :-1]
    prediction[1:, 1:] = {1: ra, 2: rb, 3: rc, 4: ra + rb - rc, 7: (ra + rb) >> 1}[predictor]
    # H.1.2.2: differences modulo 2^16.
    differences = (x - prediction) % 65536
    differences = np.where(differences >= 32768, differences - 65536, differences)

    bits = 0
    count = 0
    for difference in differences.ravel().tolist():
        category = abs(difference).bit_length()
        bits = (bits << 5) | category
        count += 5
        if category and category < 16:
            extra = difference if difference > 0 else difference + (1 << category) - 1
            bits = (bits << category) | extra
            count += category
    padding = -count % 8
    bits = (bits << padding) | ((1 << padding) - 1)  # F.1.2.3: pad with 1-bits
    scan = (bits).to_bytes((count + padding) // 8, "big").replace(b"\xff", b"\xff\x00")

    rows, columns = pixels.shape
    frame_header = bytes([0xFF, 0xC3, 0, 11, precision]) + rows.to_bytes(2, "big")
    frame_header += columns.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    lengths = [0] * 16
    lengths[4] = 17
    huffman = bytes([0xFF, 0xC4, 0, 2 + 1 + 16 + 17, 0x00]) + bytes(lengths) + bytes(range(17))
    scan_header = bytes([0xFF, 0xDA, 0, 8, 1, 1, 0x00, predictor, 0, 0])
    return b"\xff\xd8" + frame_header + huffman + scan_header + scan + b"\xff\xd9"


def _encapsulated(ds: Dataset, frames: list[bytes], transfer_syntax: str) -> Dataset:
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    return ds


# --- Fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def ct(tmp_path: Path) -> Path:
    return _write(_image(_ct_pixels()), tmp_path / "ct.dcm")


LOSSLESS = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
]


class TestDecoding:
    @pytest.mark.parametrize("transfer_syntax", LOSSLESS, ids=lambda uid: UID(uid).name)
    def test_it_decodes_lossless_syntaxes_to_the_original_pixels(
        self, tmp_path: Path, transfer_syntax: str
    ) -> None:
        path = _write(_image(_ct_pixels()), tmp_path / "ct.dcm", transfer_syntax)
        assert dcmread(path).file_meta.TransferSyntaxUID == transfer_syntax

        decoded = rendering.decode_frame(path, 1)

        assert decoded.shape == (ROWS, COLUMNS)
        np.testing.assert_array_equal(decoded, _ct_pixels())

    @pytest.mark.parametrize("transfer_syntax", LOSSLESS, ids=lambda uid: UID(uid).name)
    def test_it_gives_native_little_endian_frame_bytes(
        self, tmp_path: Path, transfer_syntax: str
    ) -> None:
        path = _write(_image(_ct_pixels()), tmp_path / "ct.dcm", transfer_syntax)

        assert rendering.uncompressed_frame_bytes(path, 1) == _ct_pixels().astype("<u2").tobytes()

    @pytest.mark.parametrize("predictor", [1, 7])
    def test_it_decodes_jpeg_lossless(self, tmp_path: Path, predictor: int) -> None:
        pixels = _ct_pixels()
        codestream = _jpeg_lossless(pixels, precision=12, predictor=predictor)
        syntax = JPEGLosslessSV1 if predictor == 1 else "1.2.840.10008.1.2.4.57"
        ds = _encapsulated(_image(pixels), [codestream], syntax)
        path = _write(ds, tmp_path / "jpll.dcm", ExplicitVRLittleEndian)
        _set_transfer_syntax(path, syntax)

        np.testing.assert_array_equal(rendering.decode_frame(path, 1), pixels)
        assert rendering.uncompressed_frame_bytes(path, 1) == pixels.astype("<u2").tobytes()

    @pytest.mark.parametrize(
        ("transfer_syntax", "options"),
        [(JPEGLSNearLossless, {"jls_error": 3}), (JPEG2000, {"j2k_cr": [10]})],
        ids=["jpeg-ls-near-lossless", "jpeg-2000"],
    )
    def test_it_decodes_lossy_syntaxes_close_to_the_original(
        self, tmp_path: Path, transfer_syntax: str, options: dict[str, object]
    ) -> None:
        ds = _image(_ct_pixels())
        ds.compress(transfer_syntax, generate_instance_uid=False, **options)  # type: ignore[arg-type]
        path = tmp_path / "lossy.dcm"
        ds.save_as(path, enforce_file_format=True)

        decoded = rendering.decode_frame(path, 1).astype(np.int64)

        error = np.abs(decoded - _ct_pixels().astype(np.int64))
        assert 0 < error.mean() < 8
        if transfer_syntax == JPEGLSNearLossless:
            assert error.max() <= 3  # near-lossless: the error bound holds for every pixel

    def test_it_decodes_jpeg_baseline_grayscale(self, tmp_path: Path) -> None:
        pixels = (_ct_pixels() >> 4).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=95)
        ds = _encapsulated(_image(pixels, bits_stored=8), [out.getvalue()], JPEGBaseline8Bit)
        path = tmp_path / "jpeg.dcm"
        ds.save_as(path, enforce_file_format=True)

        decoded = rendering.decode_frame(path, 1).astype(np.int64)

        assert decoded.shape == (ROWS, COLUMNS)
        assert np.abs(decoded - pixels).mean() < 2

    def test_it_decodes_jpeg_baseline_colour_to_rgb(self, tmp_path: Path) -> None:
        rgb = _rgb_pixels()
        out = io.BytesIO()
        # Pillow writes YCbCr with 4:2:0 sub-sampling by default; 4:2:2 is what DICOM names.
        Image.fromarray(rgb).save(out, format="JPEG", quality=95, subsampling="4:2:2")
        ds = _image(rgb, photometric="RGB", rescale=False, window=None, bits_stored=8)
        ds.PhotometricInterpretation = "YBR_FULL_422"
        path = tmp_path / "colour.dcm"
        _encapsulated(ds, [out.getvalue()], JPEGBaseline8Bit).save_as(
            path, enforce_file_format=True
        )

        decoded = rendering.decode_frame(path, 1).astype(np.int64)

        assert decoded.shape == (ROWS, COLUMNS, 3)
        assert np.abs(decoded - rgb).mean() < 4

    @pytest.mark.parametrize(
        "name",
        [
            "JPGExtended.dcm",  # JPEG Extended, 12 bits
            "JPEGLSNearLossless_16.dcm",
            "MR_small_bigendian.dcm",
            "image_dfl.dcm",
            "examples_ybr_color.dcm",
            "SC_rgb_rle_2frame.dcm",
            "examples_jpeg2k.dcm",
        ],
    )
    def test_it_agrees_with_pydicoms_whole_data_set_decoding(self, name: str) -> None:
        path = Path(pydicom.data.__file__).parent / "test_files" / name
        ds = dcmread(path)
        expected = ds.pixel_array
        frames = rendering.number_of_frames(ds)
        last = expected[-1] if frames > 1 else expected

        np.testing.assert_array_equal(rendering.decode_frame(path, frames), last)
        image = _open(rendering.render(path, frames, media_type="image/png", cache=None))
        assert image.size == (ds.Columns, ds.Rows)

    def test_it_reads_any_frame_of_a_multi_frame(self, tmp_path: Path) -> None:
        stack = np.stack([_ct_pixels(offset) for offset in (0, 100, 200)])
        for syntax in (ExplicitVRLittleEndian, RLELossless, JPEGLSLossless):
            path = _write(_image(stack), tmp_path / f"{UID(syntax).keyword}.dcm", syntax)
            for number in (1, 2, 3):
                np.testing.assert_array_equal(
                    rendering.decode_frame(path, number), stack[number - 1]
                )
            assert rendering.uncompressed_frame_bytes(path, 3) == stack[2].tobytes()


def _set_transfer_syntax(path: Path, syntax: str) -> None:
    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.save_as(path, enforce_file_format=True)


def _rgb_pixels() -> npt.NDArray[np.uint8]:
    rows = np.linspace(0, 255, ROWS, dtype=np.float32)[:, None]
    columns = np.linspace(0, 255, COLUMNS, dtype=np.float32)[None, :]
    return np.rint(
        np.stack([rows + 0 * columns, columns + 0 * rows, (rows + columns) / 2], axis=-1)
    ).astype(np.uint8)


class TestRendering:
    def test_it_renders_a_jpeg_of_the_frame_size(self, ct: Path) -> None:
        image = _open(rendering.render(ct, 1, cache=None))

        assert image.format == "JPEG"
        assert image.mode == "L"
        assert image.size == (COLUMNS, ROWS)

    def test_it_applies_the_rescale_and_the_instances_window(self, ct: Path) -> None:
        pixels = _png(ct)

        assert pixels[AIR_AT] == 0
        assert pixels[BONE_AT] == 255
        # 40 HU at the centre of 40/400: PS3.3 C.11.2.1.2.1 gives ((40 - 39.5) / 399 + 0.5) * 255.
        assert pixels[TISSUE_AT] == round((0.5 / 399 + 0.5) * 255)

    def test_the_window_asked_for_replaces_the_instances(self, ct: Path) -> None:
        # A 1-wide window at 0 HU is a threshold: below is black, above is white.
        pixels = _png(ct, window=Window(0, 1))

        assert pixels[AIR_AT] == 0
        assert pixels[TISSUE_AT] == 255
        assert pixels[BONE_AT] == 255
        assert (pixels[GRADIENT_ROW] == 0).any() and (pixels[GRADIENT_ROW] == 255).any()
        assert set(np.unique(pixels)) == {0, 255}

    def test_a_threshold_at_air_follows_the_standards_edges(self, tmp_path: Path) -> None:
        # Center -1024, width 1 (C.11.2.1.2.1): x <= c - 0.5 is black, x > c - 0.5 is white.
        pixels = _ct_pixels().astype(np.int16)
        pixels[AIR_AT] = -1  # -1025 HU; the rest of the air is 24, -1000 HU
        path = _write(_image(pixels), tmp_path / "edge.dcm")

        rendered = _png(path, window=Window(-1024, 1))

        assert rendered[AIR_AT] == 0
        assert rendered[1, 1] == 255

    def test_without_a_window_it_uses_the_frames_range(self, tmp_path: Path) -> None:
        path = _write(_image(_ct_pixels(), window=None), tmp_path / "nowindow.dcm")

        pixels = _png(path)

        assert pixels[AIR_AT] == 0  # the smallest value
        assert pixels[BONE_AT] == 255  # the largest
        assert 0 < pixels[TISSUE_AT] < 255

    @pytest.mark.parametrize("function", list(VOIFunction))
    def test_it_agrees_with_pydicoms_windowing(self, tmp_path: Path, function: VOIFunction) -> None:
        ds = _image(_ct_pixels(), window=(100, 600))
        ds.VOILUTFunction = function.value
        path = _write(ds, tmp_path / "voi.dcm")
        modality = _ct_pixels().astype(np.float64) + INTERCEPT
        # pydicom's output spans the rescaled stored range; ours spans 0…255.
        low, high = float(INTERCEPT), float(4095 + INTERCEPT)
        expected = (apply_windowing(modality, dcmread(path)) - low) / (high - low) * 255

        rendered = _png(path).astype(np.float64)

        assert np.abs(rendered - expected).max() <= 1.0

    def test_sigmoid_differs_from_linear(self, ct: Path) -> None:
        linear = _png(ct, window=Window(40, 400, VOIFunction.LINEAR))
        sigmoid = _png(ct, window=Window(40, 400, VOIFunction.SIGMOID))

        ramp = slice(GRADIENT_ROW, GRADIENT_ROW + 1)
        assert not np.array_equal(linear[ramp], sigmoid[ramp])
        # 200 HU: linear is ((200 - 39.5) / 399 + 0.5) * 255, sigmoid 255 / (1 + exp(-4·160/400)).
        column = int(np.argmin(np.abs(np.linspace(824, 1324, COLUMNS) - 1224)))
        hu = int(np.linspace(824, 1324, COLUMNS).astype(np.uint16)[column]) + INTERCEPT
        assert linear[GRADIENT_ROW, column] == round(((hu - 39.5) / 399 + 0.5) * 255)
        assert sigmoid[GRADIENT_ROW, column] == round(255 / (1 + np.exp(-4 * (hu - 40) / 400)))

    def test_monochrome1_is_shown_inverted(self, tmp_path: Path) -> None:
        mono2 = _write(_image(_ct_pixels()), tmp_path / "mono2.dcm")
        mono1 = _write(_image(_ct_pixels(), photometric="MONOCHROME1"), tmp_path / "mono1.dcm")

        np.testing.assert_array_equal(_png(mono1), 255 - _png(mono2))
        assert _png(mono1)[BONE_AT] == 0

    def test_signed_pixels_render_through_the_same_table(self, tmp_path: Path) -> None:
        signed = (_ct_pixels().astype(np.int32) + INTERCEPT).astype(np.int16)
        path = _write(_image(signed, rescale=False, bits_stored=16), tmp_path / "signed.dcm")
        reference = _write(_image(_ct_pixels()), tmp_path / "ct.dcm")

        np.testing.assert_array_equal(_png(path), _png(reference))

    def test_colour_is_shown_as_it_is(self, tmp_path: Path) -> None:
        rgb = _rgb_pixels()
        path = _write(
            _image(rgb, photometric="RGB", rescale=False, window=None, bits_stored=8),
            tmp_path / "rgb.dcm",
        )

        rendered = _png(path, window=Window(0, 1))  # a window does not apply to colour

        np.testing.assert_array_equal(rendered, rgb)

    def test_it_renders_the_frame_asked_for(self, tmp_path: Path) -> None:
        stack = np.stack([_ct_pixels(), _ct_pixels(), _ct_pixels()])
        stack[1][:] = AIR
        stack[2][:] = BONE
        path = _write(_image(stack), tmp_path / "multi.dcm")

        assert (_png(path, 2) == 0).all()
        assert (_png(path, 3) == 255).all()
        np.testing.assert_array_equal(
            _png(path, 1), _png(_write(_image(_ct_pixels()), tmp_path / "one.dcm"))
        )

    def test_the_thumbnail_is_a_small_jpeg_of_the_middle_frame(self, tmp_path: Path) -> None:
        stack = np.stack([np.full((256, 320), value, np.uint16) for value in (AIR, BONE, AIR)])
        path = _write(_image(stack), tmp_path / "multi.dcm")

        image = _open(rendering.thumbnail(path, cache=None))

        assert image.format == "JPEG"
        assert image.size == (128, 102)  # 320×256 within 128×128
        assert np.asarray(image).min() > 250  # the bone frame, not the air ones

    def test_it_renders_png(self, ct: Path) -> None:
        image = _open(rendering.render(ct, media_type="image/png", cache=None))

        assert image.format == "PNG"
        assert image.size == (COLUMNS, ROWS)

    def test_jpeg_quality_changes_the_size(self, ct: Path) -> None:
        low = rendering.render(ct, quality=10, cache=None)
        high = rendering.render(ct, quality=100, cache=None)

        assert len(low) < len(high)


class TestViewport:
    def test_it_scales_down_keeping_the_aspect_ratio(self, ct: Path) -> None:
        data = rendering.render(ct, viewport=rendering.parse_viewport("40,40"), cache=None)

        assert _open(data).size == (40, 32)  # 80×64 halved: the width is what limits

    def test_the_height_can_be_what_limits(self, ct: Path) -> None:
        data = rendering.render(ct, viewport=Viewport(rows=16, columns=1000), cache=None)

        assert _open(data).size == (20, 16)

    def test_it_never_scales_up(self, ct: Path) -> None:
        data = rendering.render(ct, viewport=rendering.parse_viewport("1000,800"), cache=None)

        assert _open(data).size == (COLUMNS, ROWS)

    def test_a_source_rectangle_crops_before_scaling(self, ct: Path) -> None:
        # The bone square: columns 32…47, rows 24…39.
        viewport = rendering.parse_viewport("8,8,32,24,16,16")

        pixels = _png(ct, viewport=viewport)

        assert pixels.shape == (8, 8)
        assert (pixels == 255).all()

    def test_a_source_rectangle_outside_the_frame_is_refused(self, ct: Path) -> None:
        with pytest.raises(InvalidParameterError, match="outside"):
            rendering.render(ct, viewport=rendering.parse_viewport("8,8,500,0,16,16"), cache=None)


class TestParameters:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("40,400", Window(40, 400, VOIFunction.LINEAR)),
            ("-600.5, 1500, linear", Window(-600.5, 1500, VOIFunction.LINEAR)),
            ("40,400,linear-exact", Window(40, 400, VOIFunction.LINEAR_EXACT)),
            ("40,0.5,SIGMOID", Window(40, 0.5, VOIFunction.SIGMOID)),
        ],
    )
    def test_it_parses_windows(self, value: str, expected: Window) -> None:
        assert rendering.parse_window(value) == expected

    @pytest.mark.parametrize(
        ("value", "reason"),
        [
            ("", "center,width"),
            ("40", "center,width"),
            ("40,400,linear,extra", "center,width"),
            ("forty,400", "center must be a number"),
            ("40,nan", "finite"),
            ("40,inf", "finite"),
            ("40,0", "at least 1"),
            ("40,0.5,linear", "at least 1"),
            ("40,0,sigmoid", "greater than 0"),
            ("40,-3,linear-exact", "greater than 0"),
            ("40,400,cubic", "linear, linear-exact or sigmoid"),
        ],
    )
    def test_it_refuses_malformed_windows_with_a_reason(self, value: str, reason: str) -> None:
        with pytest.raises(InvalidParameterError, match=reason):
            rendering.parse_window(value)

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("512,256", Viewport(rows=256, columns=512)),
            (" 64 , 32 ", Viewport(rows=32, columns=64)),
            ("64,32,0,10,100,50", Viewport(rows=32, columns=64, source=(0, 10, 100, 50))),
        ],
    )
    def test_it_parses_viewports(self, value: str, expected: Viewport) -> None:
        assert rendering.parse_viewport(value) == expected

    @pytest.mark.parametrize(
        ("value", "reason"),
        [
            ("512", "width,height"),
            ("1,2,3", "width,height"),
            ("a,b", "non-negative integers"),
            ("-5,10", "non-negative integers"),
            ("5.5,10", "non-negative integers"),
            ("٣,4", "non-negative integers"),  # a decimal digit, but not an ASCII one
            ("0,10", "positive"),
            ("99999,10", "at most 16384"),
            ("10,10,0,0,0,5", "source width and height must be positive"),
            ("10,10,0,0,-5,5", "non-negative integers"),
        ],
    )
    def test_it_refuses_malformed_viewports_with_a_reason(self, value: str, reason: str) -> None:
        with pytest.raises(InvalidParameterError, match=reason):
            rendering.parse_viewport(value)

    def test_it_parses_quality_and_media_type(self) -> None:
        assert rendering.parse_quality("75") == 75
        assert rendering.parse_media_type("image/PNG; q=0.9") is rendering.MediaType.PNG
        for value in ("0", "101", "abc", "-1"):
            with pytest.raises(InvalidParameterError, match="quality"):
                rendering.parse_quality(value)
        with pytest.raises(InvalidParameterError, match="image/jpeg and image/png"):
            rendering.parse_media_type("image/gif")

    def test_render_checks_what_it_is_given_by_code(self, ct: Path) -> None:
        with pytest.raises(InvalidParameterError):
            rendering.render(ct, quality=0, cache=None)
        with pytest.raises(InvalidParameterError):
            rendering.render(ct, window=Window(40, 0), cache=None)
        with pytest.raises(InvalidParameterError):
            rendering.render(ct, media_type="image/webp", cache=None)


class TestErrors:
    def _no_pixels(self, tmp_path: Path, sop_class: str) -> Path:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Modality = "DOC"
        if sop_class == EncapsulatedPDFStorage:
            ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
            ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
        path = tmp_path / "document.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    @pytest.mark.parametrize(
        "transfer_syntax", [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
    )
    @pytest.mark.parametrize(
        "function",
        [
            rendering.decode_frame,
            rendering.uncompressed_frame_bytes,
            lambda path, frame: rendering.render(path, frame, cache=None),
        ],
        ids=["decode_frame", "uncompressed_frame_bytes", "render"],
    )
    def test_an_instance_without_pixels_is_not_an_image(
        self, tmp_path: Path, transfer_syntax: str, function: Callable[[Path, int], object]
    ) -> None:
        path = self._no_pixels(tmp_path, EncapsulatedPDFStorage)
        _set_transfer_syntax(path, transfer_syntax)

        with pytest.raises(NotAnImageError):
            function(path, 1)

    def test_a_structured_report_has_no_thumbnail(self, tmp_path: Path) -> None:
        path = self._no_pixels(tmp_path, "1.2.840.10008.5.1.4.1.1.88.11")

        with pytest.raises(NotAnImageError):
            rendering.thumbnail(path, cache=None)

    @pytest.mark.parametrize("frame", [0, -1, 4, 1000])
    def test_frames_outside_the_instance_do_not_exist(self, tmp_path: Path, frame: int) -> None:
        stack = np.stack([_ct_pixels()] * 3)
        for syntax in (ExplicitVRLittleEndian, RLELossless, DeflatedExplicitVRLittleEndian):
            path = _write(_image(stack.copy()), tmp_path / f"{UID(syntax).keyword}.dcm", syntax)
            with pytest.raises(NoSuchFrameError, match="frames 1 to 3"):
                rendering.decode_frame(path, frame)
            with pytest.raises(NoSuchFrameError):
                rendering.render(path, frame, cache=None)

    def test_a_single_frame_instance_has_only_frame_1(self, ct: Path) -> None:
        with pytest.raises(NoSuchFrameError):
            rendering.uncompressed_frame_bytes(ct, 2)

    def test_a_corrupt_codestream_cannot_be_decoded(self, tmp_path: Path) -> None:
        ds = _image(_ct_pixels())
        ds.compress(JPEGLSLossless, generate_instance_uid=False)
        codestream = b"\xff\xd8\xff\xf7" + bytes(200)  # SOF55, then nonsense
        path = tmp_path / "corrupt.dcm"
        _encapsulated(ds, [codestream], JPEGLSLossless).save_as(path, enforce_file_format=True)

        with pytest.raises(CannotDecodeError) as raised:
            rendering.decode_frame(path, 1)
        assert raised.value.transfer_syntax_uid == JPEGLSLossless

    def test_a_transfer_syntax_without_a_decoder_cannot_be_decoded(self, tmp_path: Path) -> None:
        mpeg2 = "1.2.840.10008.1.2.4.100"
        path = tmp_path / "video.dcm"
        sequence_header = b"\x00\x00\x01\xb3" + bytes(12)
        _encapsulated(_image(_ct_pixels()), [sequence_header], mpeg2).save_as(
            path, enforce_file_format=True
        )

        with pytest.raises(CannotDecodeError, match="MPEG2") as raised:
            rendering.render(path, cache=None)
        assert raised.value.transfer_syntax_uid == mpeg2

    def test_a_file_that_is_not_dicom_cannot_be_decoded(self, tmp_path: Path) -> None:
        path = tmp_path / "not.dcm"
        path.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")

        with pytest.raises(CannotDecodeError):
            rendering.decode_frame(path, 1)

    def test_every_error_is_a_rendering_error(self) -> None:
        for error in (NotAnImageError, NoSuchFrameError, CannotDecodeError, InvalidParameterError):
            assert issubclass(error, rendering.RenderingError)


class TestCache:
    def test_a_warm_rendering_is_the_same_bytes_without_rendering_again(
        self, ct: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        cache = RenderCache(max_bytes=10_000_000)
        renders: list[int] = []
        real = rendering._render

        def counting(*args: object) -> bytes:
            renders.append(1)
            return real(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(rendering, "_render", counting)

        first = rendering.render(ct, window=Window(40, 400), cache=cache)
        second = rendering.render(ct, window=Window(40, 400), cache=cache)
        other = rendering.render(ct, window=Window(40, 80), cache=cache)

        assert first == second
        assert other != first
        assert len(renders) == 2
        assert len(cache) == 2
        assert cache.size == len(first) + len(other)

    def test_a_warm_rendering_takes_well_under_2_ms(self, ct: Path) -> None:
        cache = RenderCache(max_bytes=10_000_000)
        rendering.render(ct, cache=cache)
        timings = []
        for _ in range(50):
            start = time.perf_counter()
            rendering.render(ct, cache=cache)
            timings.append(time.perf_counter() - start)

        assert statistics.median(timings) < 0.002

    def test_a_file_replaced_at_the_same_path_is_rendered_anew(self, tmp_path: Path) -> None:
        cache = RenderCache(max_bytes=10_000_000)
        path = _write(_image(_ct_pixels()), tmp_path / "ct.dcm")
        before = rendering.render(path, cache=cache)

        replacement = _write(_image(_ct_pixels(), photometric="MONOCHROME1"), tmp_path / "new.dcm")
        os.replace(replacement, path)

        assert rendering.render(path, cache=cache) != before

    def test_it_evicts_the_least_recently_used_past_its_budget(self) -> None:
        cache = RenderCache(max_bytes=100)
        cache.put(("a",), b"a" * 40)
        cache.put(("b",), b"b" * 40)
        assert cache.get(("a",)) == b"a" * 40  # "a" is now the most recently used

        cache.put(("c",), b"c" * 40)

        assert cache.get(("b",)) is None
        assert cache.get(("a",)) == b"a" * 40
        assert cache.get(("c",)) == b"c" * 40
        assert cache.size == 80

    def test_a_value_larger_than_the_budget_is_not_kept(self) -> None:
        cache = RenderCache(max_bytes=100)
        cache.put(("small",), b"s" * 10)

        cache.put(("large",), b"l" * 101)

        assert cache.get(("large",)) is None
        assert cache.get(("small",)) == b"s" * 10

    def test_replacing_a_key_counts_its_size_once(self) -> None:
        cache = RenderCache(max_bytes=100)
        cache.put(("a",), b"a" * 60)
        cache.put(("a",), b"A" * 30)

        assert cache.size == 30
        assert cache.get(("a",)) == b"A" * 30

    def test_it_keeps_its_budget_under_concurrent_use(self) -> None:
        cache = RenderCache(max_bytes=1000)
        errors: list[BaseException] = []

        def work(worker: int) -> None:
            try:
                for i in range(2000):
                    key = (worker, i % 37)
                    if cache.get(key) is None:
                        cache.put(key, bytes(17 + i % 50))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert not errors
        assert 0 < cache.size <= 1000
        assert cache.size == sum(len(v) for v in cache._entries.values())

    def test_the_thumbnail_is_cached_too(self, ct: Path) -> None:
        cache = RenderCache(max_bytes=10_000_000)

        first = rendering.thumbnail(ct, cache=cache)

        assert len(cache) == 1
        assert rendering.thumbnail(ct, cache=cache) == first
