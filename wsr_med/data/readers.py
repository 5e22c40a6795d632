"""Read one scan (DICOM, PNG, JPEG, TIFF, NIfTI, DICOM series) into a channel-first float array.

2D scans come out as ``(C, H, W)``: row 0 is the top of the picture as a viewer shows it, for
every format, so the same picture saved as PNG and as DICOM loads to the same array. Dense
tissue is bright: MONOCHROME1 DICOM is inverted. Colour scans come out as RGB (C=3).
3D volumes come out as ``(1, X, Y, Z)`` in RAS orientation (MONAI's readers + ``Orientation``).

No metadata but geometry and the file name leaves this module: DICOM header fields such as
PatientName or PatientID are never copied into the returned meta data.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

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
    "scan_format",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")  # and any other name, when the content is DICOM (see scan_format)
VOLUME_SUFFIXES = (".nii", ".nii.gz")
SCAN_SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES + VOLUME_SUFFIXES
# Largest scan accepted, in pixels over all frames: full-field mammograms (~4000 x 5000 at 50 um) and the
# largest radiographs (~4300 x 4300) are far below; a declared 65535 x 65535 is a decompression bomb.
MAX_PIXELS = 100_000_000
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM")
# Projection radiography: the VOI LUT / window in the header is what a reader looks at.
RADIOGRAPH_MODALITIES = ("CR", "DX", "MG", "RF", "XA", "IO", "PX", "RG")
_DICOMDIR_REASON = "DICOMDIR: the index of a DICOM media export, not an image (the images it lists are read on their own)"
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as PIL's convert("L")


class ScanReadError(ValueError):
    """A scan that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        # the reason travels alone (reports, MLflow): decoders quote the path, which may name a patient
        self.reason = reason.replace(str(path), "<file>") if str(path) else reason
        super().__init__(f"{path}: {self.reason}")


def suffix_of(path: str | Path) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _is_dicom_content(path: Path, head: bytes) -> bool:
    """DICOM by content: ``DICM`` at byte 128 (a Part 10 file), or a data set without preamble that starts
    with a group 0x0002 or 0x0008 element and holds an SOP class or a modality, as pydicom reads it."""
    if head[128:132] == b"DICM":
        return True
    if head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        return "SOPClassUID" in ds or "Modality" in ds
    except Exception:
        return False


def scan_format(path: str | Path) -> str | None:
    """How to read ``path``: ``image``, ``dicom``, ``dicomdir``, ``volume``, or None (not a scan).

    Known extensions decide; any other file is probed by content, so that DICOM files named by UID
    (``1.2.840.113619.2.55.3.604688119``) or without extension, as PACS exports name them, are found.
    """
    path = Path(path)
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
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return None
    if _is_dicom_content(path, head):
        return "dicom"
    if head.startswith(_IMAGE_MAGIC):
        return "image"
    return None


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
        return np.tensordot(_LUMA, array, axes=1)[None].astype(np.float32)
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


def read_dicom(path: str | Path, channels: int | None = 1, voi_lut: bool | None = None, frame: int | None = None,
               max_pixels: int = MAX_PIXELS, min_size: int | None = None):
    """Read a single-frame DICOM image.

    Grayscale: modality LUT (RescaleSlope/Intercept), then the VOI LUT or window centre/width
    when the header has one and ``voi_lut`` asks for it (``None``: for radiograph modalities
    only, :data:`RADIOGRAPH_MODALITIES`), then MONOCHROME1 is inverted so dense tissue is bright.
    Colour: PALETTE COLOR goes through its palette, YBR is converted, both come out as RGB.

    Args:
        path: the file.
        channels: 1 (colour converted to luma), 3 (grayscale replicated) or None (as stored).
        voi_lut: apply the VOI LUT / window; ``None`` decides by modality.
        frame: index of the frame to read from a multi-frame file; multi-frame files are
            refused when it is None.
        max_pixels: the largest size accepted (rows x columns x frames), checked on the header
            before decoding.
        min_size: the size the image is resized to next; JPEG 2000 pixel data then decodes at a reduced
            resolution that keeps the longest side at least this large (:func:`_reduced_jpeg2000`).

    Returns:
        ``(array (C, H, W) float32, meta dict)``.

    Raises:
        ScanReadError: not DICOM, no pixel data (e.g. a structured report), multi-frame
            without ``frame``, a declared size above ``max_pixels``, a decoding failure, or
            non-finite values after the modality rescale.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        # a data set without the Part 10 preamble is read as pydicom reads it, with force, once probed
        ds = pydicom.dcmread(path, force=head[128:132] != b"DICM" and _is_dicom_content(Path(path), head))
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as e:
        raise ScanReadError(path, f"not a readable DICOM file ({type(e).__name__}: {e})") from None
    if getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", None) == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        raise ScanReadError(path, _DICOMDIR_REASON)
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        modality = ds.get("Modality", "?")
        raise ScanReadError(path, f"DICOM without pixel data (modality {modality}, e.g. a report or a structured document)")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1 and frame is None:
        raise ScanReadError(path, f"multi-frame DICOM ({n_frames} frames): pass frame=<index> to read one frame")
    samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 8) or 8)
    _check_declared_size(path, int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0), n_frames,
                         samples * max(bits, 8) / 8, max_pixels)
    try:
        pixels = _reduced_jpeg2000(ds, min_size)
        if pixels is None:
            pixels = ds.pixel_array  # decodes any syntax with an installed plugin; YBR -> RGB
    except Exception as e:  # decoders raise many types; all mean the same to the user
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise ScanReadError(path, f"pixel data cannot be decoded ({name}: {type(e).__name__}: {e})") from None
    if n_frames > 1:
        if not 0 <= frame < n_frames:
            raise ScanReadError(path, f"frame {frame} out of range: the file has {n_frames} frames")
        pixels = pixels[frame]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    modality = str(ds.get("Modality", ""))
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    elif photometric.startswith("MONOCHROME"):
        if "ModalityLUTSequence" in ds:
            pixels = apply_modality_lut(pixels, ds).astype(np.float32)
        else:  # the common case, in float32 (pydicom's float64 path doubles time and memory on large scans)
            slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
            pixels = pixels.astype(np.float32)
            if slope != 1 or intercept != 0:
                with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported as non-finite below
                    pixels = pixels * np.float32(slope) + np.float32(intercept)
        has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds
        if has_voi and (voi_lut or (voi_lut is None and modality in RADIOGRAPH_MODALITIES)):
            pixels = apply_voi_lut(pixels, ds).astype(np.float32)
        if photometric == "MONOCHROME1":
            pixels = pixels.max() + pixels.min() - pixels
    meta = {"filename_or_obj": str(path), "format": "dicom", "modality": modality, "photometric": photometric,
            "original_shape": (int(ds.Rows), int(ds.Columns))}
    return _finite(path, _to_channels(pixels, channels)), meta


def read_image(path: str | Path, channels: int | None = 1, min_size: int | None = None, max_pixels: int = MAX_PIXELS):
    """Read a PNG/JPEG/TIFF/BMP picture; 16-bit grayscale keeps its full range. Returns ``(array (C, H, W), meta)``.

    Args:
        min_size: for JPEG, let the decoder downscale by a power of two in the DCT domain as long
            as the longest side stays >= ``min_size`` (PIL's ``draft``): a 3000 px radiograph needed
            at 512 px decodes several times faster. The exact resize happens afterwards.
        max_pixels: the largest size accepted, checked on the header before decoding.

    Multi-page images (TIFF) are refused like multi-frame DICOM.
    """
    try:
        with warnings.catch_warnings():  # PIL's bomb warning: the size is checked against max_pixels below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            original = img.size
            pages = getattr(img, "n_frames", 1)
            if pages > 1:
                raise ScanReadError(path, f"multi-page image ({pages} pages): export the page to classify as its own file")
            _check_declared_size(path, *img.size, max_pixels=max_pixels)
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
        raise ScanReadError(path, f"image too large (decompression-bomb guard: {e})") from None
    except ScanReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ScanReadError(path, f"not a readable image ({type(e).__name__}: {e})") from None
    meta = {"filename_or_obj": str(path), "format": suffix_of(path).lstrip("."), "original_shape": original[::-1]}
    try:
        return _finite(path, _to_channels(pixels, channels)), meta
    except ValueError as e:
        raise ScanReadError(path, str(e)) from None


def read_volume(path: str | Path):
    """Read a NIfTI file or a folder holding one DICOM series as ``(1, X, Y, Z)`` in RAS orientation.

    Uses MONAI's ``LoadImage`` (nibabel / pydicom readers) and ``Orientation``; of the meta data
    only the affine and the file name are kept.
    """
    from monai.transforms import LoadImage, Orientation

    reader = "PydicomReader" if Path(path).is_dir() else "NibabelReader"
    try:
        volume = LoadImage(reader=reader, image_only=True, ensure_channel_first=True)(str(path))
    except Exception as e:
        raise ScanReadError(path, f"not a readable volume ({type(e).__name__}: {e})") from None
    volume = Orientation(axcodes="RAS")(volume)
    array = np.asarray(volume.array, dtype=np.float32)
    if array.ndim != 4:
        raise ScanReadError(path, f"expected a 3D volume, got array shape {array.shape[1:]}")
    meta = {"filename_or_obj": str(path), "format": "volume", "affine": np.asarray(volume.affine),
            "original_shape": tuple(array.shape[1:])}
    return array, meta


def read_scan(path: str | Path, channels: int | None = 1, voi_lut: bool | None = None, spatial_dims: int = 2,
              min_size: int | None = None, max_pixels: int = MAX_PIXELS):
    """Read any supported scan; the format is the file's :func:`scan_format` (extension, else content).

    Returns ``(array, meta)``: ``(C, H, W)`` for ``spatial_dims=2``, ``(1, X, Y, Z)`` for 3.
    ``min_size`` lets JPEG files and JPEG 2000 DICOM decode at a reduced scale (:func:`read_image`,
    :func:`read_dicom`); a 2D scan whose header
    declares more than ``max_pixels`` is refused before decoding.
    Raises :class:`ScanReadError` naming the file and the problem.
    """
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
        raise ScanReadError(path, _DICOMDIR_REASON)
    if kind == "volume":
        raise ScanReadError(path, "a volume: read it with spatial_dims=3")
    raise ScanReadError(path, f"unknown file type: extension '{suffix_of(path)}' is not a scan's "
                              f"({', '.join(SCAN_SUFFIXES)}) and the content is neither DICOM nor an image")


def dicom_patient_id(path: str | Path) -> str | None:
    """The PatientID of a DICOM file (header only), or None. The caller must hash it before storing it."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:
        return None
    value = str(ds.get("PatientID", "") or "").strip()
    return value or None
