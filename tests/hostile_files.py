"""Hostile inputs, built at test time (nothing binary is committed): each function writes one file and returns it."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
                         RLELossless, generate_uid)

from wsr_med.data import write_dicom


def _dicom(rows: int, columns: int, syntax=ExplicitVRLittleEndian) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "SEC-000042"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    return ds


def nan_pixel_dicom(path: Path) -> Path:
    """Float pixel data (a parametric map, as some exports write) with one NaN."""
    pixels = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    pixels[5, 7] = np.nan
    ds = _dicom(32, 32)
    ds.BitsAllocated = 32
    ds.FloatPixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def huge_slope_dicom(path: Path) -> Path:
    """A valid 16-bit image whose RescaleSlope 1e38 overflows float32 to infinity."""
    write_dicom(path, np.random.default_rng(1).random((32, 32)), "SEC-000043", slope=1e38)
    return path


def declared_huge_rle_dicom(path: Path, bits: int = 8) -> Path:
    """838 bytes declaring 65535 x 65535 RLE-compressed pixels: decoding would allocate 4 to 8 GB."""
    ds = _dicom(65535, 65535, RLELossless)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    segment = bytes([129, 0]) * 8  # RLE runs of zeros, far too few for the declared size
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    ds.PixelData = pydicom.encaps.encapsulate([header + segment])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width x height`` 8-bit gray pixels (no image data follows)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def constant_png(path: Path, size: int = 64) -> Path:
    Image.fromarray(np.full((size, size), 117, np.uint8)).save(path)
    return path


def one_pixel_png(path: Path) -> Path:
    Image.fromarray(np.array([[200]], np.uint8)).save(path)
    return path


def multipage_tiff(path: Path) -> Path:
    pages = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 48), dtype=np.uint8)) for i in range(3)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    return path


def non_utf8_manifest(path: Path, image: str) -> Path:
    path.write_bytes(b"path,label\n" + image.encode() + b",left\n" + b"caf\xe9.png,right\n")
    return path


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _small_image(ds: pydicom.Dataset, size: int = 64) -> pydicom.Dataset:
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.random.default_rng(2).integers(0, 255, (size, size), dtype=np.uint8).tobytes()
    return ds


def deflated_bomb_dicom(path: Path, inflated_gib: float = 1.0) -> Path:
    """~1 MB of Deflated Explicit VR Little Endian: a valid 64x64 image behind a private element of
    ``inflated_gib`` GiB of zeros (pydicom inflates the whole data set before anything can look at it)."""
    ds = _small_image(_dicom(64, 64, DeflatedExplicitVRLittleEndian))
    ds.add_new(0x00091010, "UN", bytes(int(inflated_gib * 2**30)))
    return _save(ds, path)


def deflated_dicom(path: Path) -> Path:
    """A plain, honest Deflated DICOM 64x64 image."""
    return _save(_small_image(_dicom(64, 64, DeflatedExplicitVRLittleEndian)), path)


def _lying_frame_dicom(path: Path, frame: bytes, syntax) -> Path:
    ds = _dicom(64, 64, syntax)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pydicom.encaps.encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return _save(ds, path)


def lying_jpeg_dicom(path: Path, declared: int = 30000) -> Path:
    """A DICOM of 64x64 pixels whose JPEG frame declares ``declared`` x ``declared`` (SOF patched): the decoder
    would allocate what the frame says (900 MB at 30000) before anything compares it with Rows and Columns."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, "JPEG")
    frame = bytearray(buffer.getvalue())
    sof = frame.index(b"\xff\xc0")
    frame[sof + 5:sof + 9] = struct.pack(">HH", declared, declared)
    return _lying_frame_dicom(path, bytes(frame), JPEGBaseline8Bit)


def lying_jpeg2000_dicom(path: Path, declared: int = 30000) -> Path:
    """The same lie in a JPEG 2000 codestream (the SIZ marker's image size patched)."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (64, 64), dtype=np.uint8)).save(
        buffer, "JPEG2000", no_jp2=True, irreversible=False)
    frame = bytearray(buffer.getvalue())
    siz = frame.index(b"\xff\x51")
    frame[siz + 6:siz + 14] = struct.pack(">II", declared, declared)
    return _lying_frame_dicom(path, bytes(frame), JPEG2000Lossless)


def text_in_rescale_slope_dicom(path: Path, text: str = "DOE^JOHN") -> Path:
    """A valid image whose RescaleSlope holds a name instead of a number (written as LO, as a broken exporter does)."""
    ds = _small_image(_dicom(64, 64))
    ds.add_new(0x00281053, "LO", text)
    return _save(ds, path)
