"""Read one scan (DICOM, PNG, JPEG, TIFF, NIfTI, DICOM series) into a channel-first float array.

2D scans come out as ``(C, H, W)``: row 0 is the top of the picture as a viewer shows it, for
every format, so the same picture saved as PNG and as DICOM loads to the same array. Dense
tissue is bright: MONOCHROME1 DICOM is inverted. Colour scans come out as RGB (C=3).
3D volumes come out as ``(1, X, Y, Z)`` in RAS orientation (MONAI's readers + ``Orientation``).

No metadata but geometry and the file name leaves this module: DICOM header fields such as
PatientName or PatientID are never copied into the returned meta data, nor into an error's
:attr:`ScanReadError.summary` (what may be shown to someone who is not the data's owner).

Every 2D reader takes a path or the scan's bytes (a served model decodes uploads in memory). Sizes are
checked before anything large is allocated: the size a header declares (:data:`MAX_PIXELS`), the size the
compressed frame inside a DICOM declares (it must not exceed the DICOM's own), and the inflated size of a
Deflated DICOM data set (:func:`deflated_limit`), measured before it is held in memory.
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from wsr_med.settings import default

__all__ = [
    "ScanReadError",
    "IMAGE_SUFFIXES",
    "DICOM_SUFFIXES",
    "VOLUME_SUFFIXES",
    "SCAN_SUFFIXES",
    "RADIOGRAPH_MODALITIES",
    "read_scan",
    "read_dicom",
    "read_image",
    "read_volume",
    "dicom_patient_id",
    "deflated_limit",
    "read_header",
    "HEADER_BYTES",
    "scan_format",
    "ScanSource",
]

# A scan to read: a file, or the file's bytes (decoded in memory; errors name it UPLOAD).
ScanSource = Union[str, Path, bytes]
UPLOAD = "<uploaded scan>"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")  # and any other name, when the content is DICOM (see scan_format)
VOLUME_SUFFIXES = (".nii", ".nii.gz")
SCAN_SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES + VOLUME_SUFFIXES
# Largest scan accepted, in pixels over all frames: full-field mammograms (~4000 x 5000 at 50 um) and the
# largest radiographs (~4300 x 4300) are far below; a declared 65535 x 65535 is a decompression bomb.
MAX_PIXELS = default("max_pixels")
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM")
# Projection radiography: the VOI LUT / window in the header is what a reader looks at.
RADIOGRAPH_MODALITIES = ("CR", "DX", "MG", "RF", "XA", "IO", "PX", "RG")
_DICOMDIR_REASON = "DICOMDIR: the index of a DICOM media export, not an image (the images it lists are read on their own)"
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as PIL's convert("L")


class ScanReadError(ValueError):
    """A scan that cannot be used; the message names the file and the reason.

    Args:
        path: the file (or :data:`UPLOAD`).
        summary: what is wrong, in wsr_med's own words: no header value, no path (a served model answers it).
        detail: what the decoder or the header said, for the data's owner (bad-file report, local log).
    """

    def __init__(self, path: str | Path, summary: str, detail: str | None = None) -> None:
        self.path = str(path)
        self.summary = summary
        reason = f"{summary} ({detail})" if detail else summary
        # the reason travels alone (reports, MLflow): decoders quote the path, which may name a patient
        self.reason = reason.replace(str(path), "<file>") if str(path) else reason
        super().__init__(f"{path}: {self.reason}")


def _name(source: ScanSource) -> str | Path:
    return UPLOAD if isinstance(source, bytes) else source


def _open(source: ScanSource) -> BinaryIO:
    return io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")


def suffix_of(path: str | Path) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _is_dicom_content(f: BinaryIO, head: bytes) -> bool:
    """DICOM by content: ``DICM`` at byte 128 (a Part 10 file), or a data set without preamble that starts
    with a group 0x0002 or 0x0008 element and holds an SOP class or a modality, as pydicom reads it."""
    if head[128:132] == b"DICM":
        return True
    if head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    try:
        f.seek(0)
        ds = pydicom.dcmread(f, force=True, stop_before_pixels=True)
        return "SOPClassUID" in ds or "Modality" in ds
    except Exception:
        return False


def scan_format(source: ScanSource) -> str | None:
    """How to read ``source``: ``image``, ``dicom``, ``dicomdir``, ``volume``, or None (not a scan).

    Known extensions decide; any other file (and bytes) is probed by content, so that DICOM files named by
    UID (``1.2.840.113619.2.55.3.604688119``) or without extension, as PACS exports name them, are found.
    """
    if not isinstance(source, bytes):
        path = Path(source)
        if path.name.upper() == "DICOMDIR":
            return "dicomdir"
        suffix = suffix_of(path)
        if suffix in IMAGE_SUFFIXES:
            return "image"
        if suffix in VOLUME_SUFFIXES:
            return "volume"
        if suffix in DICOM_SUFFIXES:
            return "dicom"
    try:
        with _open(source) as f:
            head = f.read(132)
            if _is_dicom_content(f, head):
                return "dicom"
    except OSError:
        return None
    if head.startswith(_IMAGE_MAGIC):
        return "image"
    return None


HEADER_BYTES = 64 * 2**20  # what a DICOM file may hold besides its pixel data


def deflated_limit(max_pixels: int = MAX_PIXELS) -> int:
    """The largest inflated size of a Deflated DICOM data set: 2 bytes for each of ``max_pixels`` (a 16-bit
    grayscale image of the largest size accepted) and :data:`HEADER_BYTES` for everything else in the header."""
    return 2 * int(max_pixels) + HEADER_BYTES


def _inflate(f: BinaryIO, limit: int, name, header_only: bool = False) -> bytes:
    """The raw deflate stream from ``f``'s position to its end, inflated; refused past ``limit`` bytes
    (``header_only``: its first ``limit`` bytes, the rest never inflated).

    The size is measured first, holding one chunk at a time, so that a bomb (1 MB inflating to GiBs) costs
    milliseconds and no memory; only a stream within the limit is inflated again and kept.
    """
    start, chunk = f.tell(), 1 << 22
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    try:
        if header_only:
            out = bytearray()
            while len(out) < limit and (data := f.read(chunk)):
                while data and len(out) < limit:
                    out += inflater.decompress(data, min(chunk, limit - len(out)))
                    data = inflater.unconsumed_tail
            return bytes(out)
        while data := f.read(chunk):
            while data:
                total += len(inflater.decompress(data, chunk))
                if total > limit:
                    raise ScanReadError(name, f"Deflated DICOM inflating past {limit / 2**20:.0f} MiB (the limit that "
                                              "max_pixels sets): refused before it is held in memory")
                data = inflater.unconsumed_tail
        f.seek(start)
        return zlib.decompress(f.read(), -zlib.MAX_WBITS)
    except zlib.error as e:
        raise ScanReadError(name, "damaged Deflated DICOM data set", str(e)) from None


def _read_dataset(f: BinaryIO, name, max_pixels: int, header_only: bool = False) -> pydicom.Dataset:
    """pydicom's data set from ``f`` (a Part 10 file, or a data set without preamble that looks like DICOM);
    a Deflated data set is inflated here, within :func:`deflated_limit`, never by pydicom (which has no limit).
    ``header_only``: no pixel data, values over 1 MiB left unread, at most :data:`HEADER_BYTES` inflated."""
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info

    options = {"stop_before_pixels": True, "defer_size": "1 MB"} if header_only else {}
    head = f.read(132)
    if head[128:132] != b"DICM":
        force = _is_dicom_content(f, head)
        f.seek(0)
        return pydicom.dcmread(f, force=force, **options)
    f.seek(0)
    read_preamble(f, False)
    meta = _read_file_meta_info(f)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        f.seek(0)
        return pydicom.dcmread(f, **options)
    inflated = _inflate(f, HEADER_BYTES if header_only else deflated_limit(max_pixels), name, header_only)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian  # the data set as it was before deflating
    rebuilt = pydicom.filebase.DicomBytesIO()
    rebuilt.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(rebuilt, meta, enforce_standard=True)
    rebuilt.write(inflated)
    del inflated
    rebuilt.seek(0)
    options.pop("defer_size", None)  # in memory already
    return pydicom.dcmread(rebuilt, **options)


def read_header(source: ScanSource, max_pixels: int = MAX_PIXELS) -> pydicom.Dataset:
    """The header of a DICOM file (or its bytes) without its pixel data, read within bounds: a Deflated data set
    inflated no further than :data:`HEADER_BYTES` (pydicom alone inflates it whole), values over 1 MiB unread.

    Raises:
        ScanReadError: not a readable DICOM file.
    """
    name = _name(source)
    try:
        with _open(source) as f:
            return _read_dataset(f, name, max_pixels, header_only=True)
    except ScanReadError:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for damaged files; all mean the same
        raise ScanReadError(name, "not a readable DICOM file", type(e).__name__) from None


_JPEG_FRAME_MARKERS = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7}  # SOF0-15 (not DHT/JPG/DAC), JPEG-LS SOF55


def _frame_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) that a compressed frame's own header declares (JPEG, JPEG-LS: the SOF marker; JPEG 2000 /
    HTJ2K: the SIZ marker), or None when it does not say."""
    if frame[:2] == b"\xff\xd8":
        i = 2
        while i + 9 <= len(frame) and frame[i] == 0xFF:
            marker = frame[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in _JPEG_FRAME_MARKERS:
                return int.from_bytes(frame[i + 5:i + 7], "big"), int.from_bytes(frame[i + 7:i + 9], "big")
            i += 2 + int.from_bytes(frame[i + 2:i + 4], "big")
        return None
    at = frame.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC then SIZ, at the start of the codestream (or of a JP2 box)
    if at < 0 or len(frame) < at + 24:
        return None
    x, y, x0, y0 = (int.from_bytes(frame[at + k:at + k + 4], "big") for k in (8, 12, 16, 20))
    return y - y0, x - x0


def _check_frame_size(ds: pydicom.Dataset, name, n_frames: int) -> None:
    """Refuse compressed pixel data whose frames declare more pixels than the DICOM header: decoders allocate what
    the frame says, before anyone compares it with Rows and Columns."""
    from pydicom.encaps import generate_frames

    syntax = getattr(ds.get("file_meta"), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed or "PixelData" not in ds:
        return
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    try:
        for frame in generate_frames(ds.PixelData, number_of_frames=n_frames):
            declared = _frame_size(frame)
            if declared is not None and declared[0] * declared[1] > rows * columns:
                raise ScanReadError(name, f"the compressed frame declares {declared[0]}x{declared[1]} pixels, the DICOM "
                                          f"header {rows}x{columns}: refused before decoding")
    except ScanReadError:
        raise
    except Exception as e:  # damaged encapsulation: the decoder reports it below
        del e


def _number(ds: pydicom.Dataset, keyword: str, default: float, name) -> float:
    """A numeric header value (e.g. RescaleSlope), refused by name when it is not a number (the value is not echoed)."""
    try:
        return float(ds.get(keyword, default) or default)
    except (TypeError, ValueError):
        raise ScanReadError(name, f"{keyword} is not a number") from None


def _to_channels(array: np.ndarray, channels: int | None) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3|4)`` -> ``(C, H, W)`` float32 with C = ``channels`` (None keeps the scan's own)."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = np.moveaxis(array[..., :3], -1, 0)
    elif array.ndim == 2:
        array = array[None]
    else:
        raise ValueError(f"unsupported pixel array shape {array.shape}")
    if channels is None or array.shape[0] == channels:
        return array
    if channels == 1:
        return np.tensordot(LUMA, array, axes=1)[None].astype(np.float32)
    if channels == 3:
        return np.repeat(array, 3, axis=0)
    raise ValueError(f"channels must be 1, 3 or None, got {channels}")


def _check_declared_size(path, width: int, height: int, frames: int = 1, bytes_per_pixel: float = 1.0,
                          max_pixels: int = MAX_PIXELS) -> None:
    """Refuse a size the header declares, before anything is decoded or allocated."""
    pixels = width * height * frames
    if width < 1 or height < 1:
        raise ScanReadError(path, f"declares no pixels ({width}x{height})")
    if pixels > max_pixels:
        raise ScanReadError(path, f"declares {width}x{height}" + (f" x {frames} frames" if frames > 1 else "")
                            + f" = {pixels / 1e6:.0f} Mpixel ({pixels * bytes_per_pixel / 2**30:.1f} GiB decoded), "
                            f"above max_pixels={max_pixels / 1e6:.0f} Mpixel")


def _as_input(name, pixels: np.ndarray, channels: int | None) -> np.ndarray:
    """Decoded ``pixels`` as ``(C, H, W)`` float32 (:func:`_to_channels`), refused when their layout is unusable or a
    value is not finite."""
    try:
        array = _to_channels(pixels, channels)
    except ValueError as e:
        raise ScanReadError(name, "unsupported pixel layout", str(e)) from None
    return _finite(name, array)


def _finite(path, array: np.ndarray) -> np.ndarray:
    if not np.isfinite(array).all():
        raise ScanReadError(path, "non-finite pixel values (NaN or infinity, e.g. from the modality rescale)")
    return array


def _reduced_jpeg2000(ds: pydicom.Dataset, min_size: int | None) -> np.ndarray | None:
    """The pixels of a single-frame, unsigned grayscale JPEG 2000 DICOM decoded at a reduced resolution, or None.

    JPEG 2000 stores an image as resolution levels; OpenJPEG (through PIL's ``reduce``) can stop ``k`` levels
    early and return the image at 1/2^k of its size (the wavelet low-pass), skipping most of the decoding. The
    largest ``k`` that keeps the longest side >= ``min_size`` is used; None where that is 0 or anything does not fit
    (the full decode then runs, with its own error report).
    """
    from io import BytesIO

    from pydicom.encaps import generate_frames
    from pydicom.uid import JPEG2000, JPEG2000Lossless

    if not min_size or ds.file_meta.get("TransferSyntaxUID") not in (JPEG2000, JPEG2000Lossless) or \
            int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1) or 1) != 1 or \
            int(ds.get("PixelRepresentation", 0) or 0) != 0:
        return None
    longest, factor = max(int(ds.Rows), int(ds.Columns)), 0
    while longest / 2 ** (factor + 1) >= min_size:
        factor += 1
    if factor == 0:
        return None
    try:
        image = Image.open(BytesIO(next(generate_frames(ds.PixelData, number_of_frames=1))))
        image.reduce = factor
        image.load()
        pixels = np.asarray(image)
    except Exception:  # e.g. fewer resolution levels than asked: decode in full
        return None
    expected = [-(-n // 2 ** factor) for n in (int(ds.Rows), int(ds.Columns))]
    if list(pixels.shape) != expected:
        return None
    shift = 16 - int(ds.get("BitsStored", 16) or 16) if pixels.dtype == np.uint16 else 0
    if shift > 0:  # PIL widens 9-15 bit samples to 16 bits; the DICOM's own values come back with a shift
        if (pixels & ((1 << shift) - 1)).any():
            return None
        pixels = pixels >> shift
    return pixels


def read_dicom(path: ScanSource, channels: int | None = 1, voi_lut: bool | None = None, frame: int | None = None,
               max_pixels: int = MAX_PIXELS, min_size: int | None = None):
    """Read a single-frame DICOM image.

    Grayscale: modality LUT (RescaleSlope/Intercept), then the VOI LUT or window centre/width
    when the header has one and ``voi_lut`` asks for it (``None``: for radiograph modalities
    only, :data:`RADIOGRAPH_MODALITIES`), then MONOCHROME1 is inverted so dense tissue is bright.
    Colour: PALETTE COLOR goes through its palette, YBR is converted, both come out as RGB.

    Args:
        path: the file, or its bytes.
        channels: 1 (colour converted to luma), 3 (grayscale replicated) or None (as stored).
        voi_lut: apply the VOI LUT / window; ``None`` decides by modality.
        frame: index of the frame to read from a multi-frame file; multi-frame files are
            refused when it is None.
        max_pixels: the largest size accepted (rows x columns x frames), checked on the header
            before decoding; it also bounds the inflated size of a Deflated data set (:func:`deflated_limit`).
        min_size: the size the image is resized to next; JPEG 2000 pixel data then decodes at a reduced
            resolution that keeps the longest side at least this large (:func:`_reduced_jpeg2000`).

    Returns:
        ``(array (C, H, W) float32, meta dict)``.

    Raises:
        ScanReadError: not DICOM, no pixel data (e.g. a structured report), multi-frame
            without ``frame``, a declared size above ``max_pixels`` (in the header, in a compressed frame, or
            inflated), a decoding failure, or non-finite values after the modality rescale.
    """
    name = _name(path)
    try:
        with _open(path) as f:
            ds = _read_dataset(f, name, max_pixels)
    except ScanReadError:
        raise
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise ScanReadError(name, "not a readable DICOM file", f"{type(e).__name__}: {e}") from None
    if getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", None) == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        raise ScanReadError(name, _DICOMDIR_REASON)
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ScanReadError(name, "DICOM without pixel data (e.g. a report or a structured document)",
                            f"modality {ds.get('Modality', '?')}")
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 8) or 8)
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        raise ScanReadError(name, "the image size attributes (Rows, Columns, NumberOfFrames, SamplesPerPixel, "
                                  "BitsAllocated) are not numbers") from None
    if n_frames > 1 and frame is None:
        raise ScanReadError(name, f"multi-frame DICOM ({n_frames} frames): pass frame=<index> to read one frame")
    _check_declared_size(name, columns, rows, n_frames, samples * max(bits, 8) / 8, max_pixels)
    _check_frame_size(ds, name, n_frames)
    try:
        pixels = _reduced_jpeg2000(ds, min_size)
        if pixels is None:
            pixels = ds.pixel_array  # decodes any syntax with an installed plugin; YBR -> RGB
    except Exception as e:  # decoders raise many types; all mean the same to the user
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        kind = syntax.name if syntax is not None and syntax.is_transfer_syntax else "unknown transfer syntax"
        raise ScanReadError(name, f"pixel data cannot be decoded ({kind})", f"{type(e).__name__}: {e}") from None
    if n_frames > 1:
        if not 0 <= frame < n_frames:
            raise ScanReadError(name, f"frame {frame} out of range: the file has {n_frames} frames")
        pixels = pixels[frame]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    modality = str(ds.get("Modality", ""))
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    elif photometric.startswith("MONOCHROME"):
        if "ModalityLUTSequence" in ds:
            pixels = apply_modality_lut(pixels, ds).astype(np.float32)
        else:  # the common case, in float32 (pydicom's float64 path doubles time and memory on large scans)
            slope, intercept = _number(ds, "RescaleSlope", 1, name), _number(ds, "RescaleIntercept", 0, name)
            pixels = pixels.astype(np.float32)
            if slope != 1 or intercept != 0:
                with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported as non-finite below
                    pixels = pixels * np.float32(slope) + np.float32(intercept)
        has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds
        if has_voi and (voi_lut or (voi_lut is None and modality in RADIOGRAPH_MODALITIES)):
            try:
                pixels = apply_voi_lut(pixels, ds).astype(np.float32)
            except (TypeError, ValueError, IndexError) as e:
                raise ScanReadError(name, "the VOI LUT or window in the header cannot be applied", str(e)) from None
        if photometric == "MONOCHROME1":
            pixels = pixels.max() + pixels.min() - pixels
    meta = {"filename_or_obj": str(name), "format": "dicom", "modality": modality, "photometric": photometric,
            "original_shape": (rows, columns)}
    return _as_input(name, pixels, channels), meta


def read_image(path: ScanSource, channels: int | None = 1, min_size: int | None = None, max_pixels: int = MAX_PIXELS):
    """Read a PNG/JPEG/TIFF/BMP picture (a file or its bytes); 16-bit grayscale keeps its full range.
    Returns ``(array (C, H, W), meta)``.

    Args:
        min_size: for JPEG, let the decoder downscale by a power of two in the DCT domain as long
            as the longest side stays >= ``min_size`` (PIL's ``draft``): a 3000 px radiograph needed
            at 512 px decodes several times faster. The exact resize happens afterwards.
        max_pixels: the largest size accepted, checked on the header before decoding.

    Multi-page images (TIFF) are refused like multi-frame DICOM.
    """
    name = _name(path)
    try:
        with warnings.catch_warnings():  # PIL's bomb warning: the size is checked against max_pixels below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(path) if isinstance(path, bytes) else path)
        with img:
            original, kind = img.size, (img.format or "image").lower()
            pages = getattr(img, "n_frames", 1)
            if pages > 1:
                raise ScanReadError(name, f"multi-page image ({pages} pages): export the page to classify as its own file")
            _check_declared_size(name, *img.size, max_pixels=max_pixels)
            if min_size and img.format == "JPEG":
                scale = min_size / max(img.size)
                img.draft(img.mode, (int(img.size[0] * scale) + 1, int(img.size[1] * scale) + 1))
            img.load()  # decodes now, so truncated files fail here
            if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            elif img.mode in ("1", "LA"):
                img = img.convert("L")
            pixels = np.asarray(img)
    except Image.DecompressionBombError as e:
        raise ScanReadError(name, "image too large (decompression-bomb guard)", str(e)) from None
    except ScanReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ScanReadError(name, "not a readable image", f"{type(e).__name__}: {e}") from None
    meta = {"filename_or_obj": str(name), "format": kind if isinstance(path, bytes) else suffix_of(path).lstrip("."),
            "original_shape": original[::-1]}
    return _as_input(name, pixels, channels), meta


@functools.lru_cache(maxsize=None)
def _volume_loader(reader: str):
    """MONAI's ``LoadImage`` with ``reader``, made once per process and quietly: making one builds every MONAI reader,
    and the nvImageCodec one warns twice on each machine without nvImageCodec (nothing a user can act on)."""
    from monai.transforms import LoadImage

    probe = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = probe.level
    probe.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            return LoadImage(reader=reader, image_only=True, ensure_channel_first=True)
    finally:
        probe.setLevel(level)


def read_volume(path: str | Path):
    """Read a NIfTI file or a folder holding one DICOM series as ``(1, X, Y, Z)`` in RAS orientation.

    Uses MONAI's ``LoadImage`` (nibabel / pydicom readers) and ``Orientation``; of the meta data
    only the affine and the file name are kept.
    """
    from monai.transforms import Orientation

    reader = "PydicomReader" if Path(path).is_dir() else "NibabelReader"
    try:
        volume = _volume_loader(reader)(str(path))
    except Exception as e:
        raise ScanReadError(path, "not a readable volume", f"{type(e).__name__}: {e}") from None
    volume = Orientation(axcodes="RAS")(volume)
    array = np.asarray(volume.array, dtype=np.float32)
    if array.ndim != 4:
        raise ScanReadError(path, f"expected a 3D volume, got array shape {array.shape[1:]}")
    meta = {"filename_or_obj": str(path), "format": "volume", "affine": np.asarray(volume.affine),
            "original_shape": tuple(array.shape[1:])}
    return array, meta


def read_scan(path: ScanSource, channels: int | None = 1, voi_lut: bool | None = None, spatial_dims: int = 2,
              min_size: int | None = None, max_pixels: int = MAX_PIXELS):
    """Read any supported scan, a file or its bytes; the format is the file's :func:`scan_format` (extension, else
    content).

    Returns ``(array, meta)``: ``(C, H, W)`` for ``spatial_dims=2``, ``(1, X, Y, Z)`` for 3 (files only).
    ``min_size`` lets JPEG files and JPEG 2000 DICOM decode at a reduced scale (:func:`read_image`,
    :func:`read_dicom`); a 2D scan whose header
    declares more than ``max_pixels`` is refused before decoding.
    Raises :class:`ScanReadError` naming the file and the problem.
    """
    if isinstance(path, bytes):
        if spatial_dims == 3:
            raise ScanReadError(UPLOAD, "volumes are read from files or folders, not from bytes")
        if not path:
            raise ScanReadError(UPLOAD, "empty file (0 bytes)")
    else:
        path = Path(path)
        if spatial_dims == 3:
            return read_volume(path)
        if not path.is_file():
            raise ScanReadError(path, "file not found")
        if path.stat().st_size == 0:
            raise ScanReadError(path, "empty file (0 bytes)")
    kind = scan_format(path)
    if kind == "image":
        return read_image(path, channels, min_size, max_pixels)
    if kind == "dicom":
        return read_dicom(path, channels, voi_lut, max_pixels=max_pixels, min_size=min_size)
    if kind == "dicomdir":
        raise ScanReadError(_name(path), _DICOMDIR_REASON)
    if kind == "volume":
        raise ScanReadError(_name(path), "a volume: read it with spatial_dims=3")
    suffix = "" if isinstance(path, bytes) else f"extension '{suffix_of(path)}' is not a scan's ({', '.join(SCAN_SUFFIXES)}) and "
    raise ScanReadError(_name(path), f"unknown file type: {suffix}the content is neither DICOM nor an image")


def dicom_patient_id(path: str | Path) -> str | None:
    """The PatientID of a DICOM file (header only), or None. The caller must hash it before storing it."""
    try:
        ds = read_header(path)
    except ScanReadError:
        return None
    value = str(ds.get("PatientID", "") or "").strip()
    return value or None
