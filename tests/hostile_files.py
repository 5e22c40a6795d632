"""Hostile inputs, built at test time (nothing binary is committed): each function writes one file and returns it."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

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
