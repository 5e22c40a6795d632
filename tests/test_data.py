"""Scan readers, polarity, compression, bad input, patient-level splits and caching."""

import csv
import json
import shutil

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from wsr_med.data import (
    ScanReadError,
    hash_id,
    make_synthetic_folder,
    read_datalist,
    read_scan,
    scan_dataset,
    scan_folder,
    scan_manifest,
    scan_transforms,
    split_items,
    transform_signature,
    write_datalist,
    write_dicom,
)
from wsr_med.errors import WsrMedError


def gradient_image(h=48, w=64):
    """A picture with no symmetry: any flip or transpose changes it."""
    y, x = np.mgrid[:h, :w]
    return ((x * 3 + y * 7) % 251 / 250.0 * (y < 40)).astype(np.float64)


# ---------------------------------------------------------------- real files


def test_monochrome1_copy_loads_inverted(real_dicom_dir):
    siim = next(real_dicom_dir.glob("siim_cr_chest_*.dcm"))
    mono1 = real_dicom_dir / "txv_Fake_MONOCHROME1_cr_chest.dcm"
    a, meta_a = read_scan(siim, voi_lut=False)
    b, meta_b = read_scan(mono1, voi_lut=False)
    assert meta_a["photometric"] == "MONOCHROME2" and meta_b["photometric"] == "MONOCHROME1"
    np.testing.assert_array_equal(b, a.max() + a.min() - a)


def test_real_dicom_files(real_dicom_dir):
    us, _ = read_scan(real_dicom_dir / "US1_UNCI.dcm", channels=None)
    assert us.shape == (3, 480, 640)
    us_gray, _ = read_scan(real_dicom_dir / "US1_UNCI.dcm", channels=1)
    np.testing.assert_allclose(us_gray[0], 0.299 * us[0] + 0.587 * us[1] + 0.114 * us[2], rtol=1e-5)
    mr, meta = read_scan(real_dicom_dir / "MR2_UNCI.dcm")
    assert mr.shape == (1, 1024, 1024) and meta["modality"] == "MR" and mr.max() > 255  # 12-bit kept
    dx, meta = read_scan(real_dicom_dir / "highdicom_dx_image.dcm")
    assert dx.shape == (1, 169, 211) and meta["photometric"] == "MONOCHROME1"


def test_real_chest_xray_jpeg_and_rgb(chest_dir):
    gray, meta = read_scan(next((chest_dir / "NORMAL").glob("*.jpeg")))
    assert gray.shape[0] == 1 and gray.shape[1] > 224 and meta["format"] == "jpeg"
    rgb = next(p for p in sorted((chest_dir / "PNEUMONIA").glob("*.jpeg")) if Image.open(p).mode == "RGB")
    assert read_scan(rgb, channels=1)[0].shape[0] == 1
    assert read_scan(rgb, channels=3)[0].shape[0] == 3


# ---------------------------------------------------------------- compressed syntaxes


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_pydicom_compressed_files_decode_to_reference(name):
    reference, _ = read_scan(get_testdata_file("MR_small.dcm"))
    decoded, _ = read_scan(get_testdata_file(name))
    np.testing.assert_array_equal(decoded, reference)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_generated_compressed_fixtures_round_trip(tmp_path, syntax):
    image = gradient_image()
    plain = tmp_path / "plain.dcm"
    write_dicom(plain, image, "PID-1")
    ds = pydicom.dcmread(plain)
    ds.compress(syntax)
    ds.save_as(tmp_path / "compressed.dcm")
    assert pydicom.dcmread(tmp_path / "compressed.dcm").file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_scan(tmp_path / "compressed.dcm")[0], read_scan(plain)[0])


def test_jpeg2000_dicom_decodes_at_a_reduced_scale_for_a_small_target(tmp_path):
    from wsr_med.data.transforms import ResizeLongestd

    y, x = np.mgrid[:1200, :1000]
    image = 0.5 + 0.25 * np.sin(x / 40.0) * np.cos(y / 55.0)  # smooth anatomy-like structure at every scale
    write_dicom(tmp_path / "plain.dcm", image, "PID-1")
    ds = pydicom.dcmread(tmp_path / "plain.dcm")
    ds.compress(JPEG2000Lossless)
    ds.save_as(tmp_path / "j2k.dcm")
    full, meta = read_scan(tmp_path / "j2k.dcm")
    reduced, meta_reduced = read_scan(tmp_path / "j2k.dcm", min_size=256)
    assert full.shape == (1, 1200, 1000) and reduced.shape == (1, 300, 250)  # two resolution levels skipped
    assert meta_reduced["original_shape"] == meta["original_shape"] == (1200, 1000)
    assert read_scan(tmp_path / "j2k.dcm", min_size=700)[0].shape == (1, 1200, 1000)  # halving would undershoot
    a = ResizeLongestd("image", 256)({"image": torch.from_numpy(full)})["image"]
    b = ResizeLongestd("image", 256)({"image": torch.from_numpy(reduced)})["image"]
    # the same picture at the network's size, up to the low-pass filter's sub-pixel offset (~0.5% of the range here)
    assert a.shape == b.shape and (a - b).abs().mean() < 0.01 * 4095


def test_a_real_radiograph_as_jpeg2000_reads_at_a_reduced_scale_like_in_full(tmp_path, real_dicom_dir):
    from wsr_med.data.transforms import ResizeLongestd

    ds = pydicom.dcmread(next(real_dicom_dir.glob("siim_cr_chest_*.dcm")))  # 8-bit, stored as baseline JPEG
    ds.decompress()
    ds.compress(JPEG2000Lossless)
    ds.save_as(tmp_path / "cr_j2k.dcm")
    full, _ = read_scan(tmp_path / "cr_j2k.dcm")
    reduced, _ = read_scan(tmp_path / "cr_j2k.dcm", min_size=256)
    assert max(reduced.shape[1:]) >= 256 and max(reduced.shape[1:]) <= max(full.shape[1:]) // 2
    a = ResizeLongestd("image", 256)({"image": torch.from_numpy(full)})["image"]
    b = ResizeLongestd("image", 256)({"image": torch.from_numpy(reduced)})["image"]
    # measured 1.0% of the range on average: the wavelet low-pass sits ~3/8 of a pixel from the box average
    assert a.shape == b.shape and (a - b).abs().mean() < 0.015 * (full.max() - full.min())


def test_generated_jpeg_baseline_fixture(tmp_path):
    import io

    from pydicom.encaps import encapsulate

    image = (gradient_image() * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    write_dicom(tmp_path / "plain.dcm", image / 255.0, "PID-1")
    ds = pydicom.dcmread(tmp_path / "plain.dcm")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.save_as(tmp_path / "jpeg.dcm")
    decoded, _ = read_scan(tmp_path / "jpeg.dcm")
    assert np.abs(decoded[0] - image).mean() < 2  # lossy, but the same picture


def test_palette_and_ybr_come_out_rgb():
    palette, meta = read_scan(get_testdata_file("examples_palette.dcm"), channels=None)
    assert meta["photometric"] == "PALETTE COLOR" and palette.shape[0] == 3
    assert not np.array_equal(palette[0], palette[1])  # a real colour map, not gray
    ybr, _ = read_scan(get_testdata_file("SC_ybr_full_422_uncompressed.dcm"), channels=None)
    rgb, _ = read_scan(get_testdata_file("SC_rgb_small_odd.dcm"), channels=None)
    assert ybr.shape[0] == 3 and rgb.shape[0] == 3
    assert ybr[0].max() > 200 and ybr[1].max() > 200 and ybr[2].max() > 200  # red, green and blue bands present


# ---------------------------------------------------------------- LUTs, bit depth, orientation


def test_rescale_voi_and_monochrome1(tmp_path):
    image = gradient_image()
    write_dicom(tmp_path / "m2.dcm", image, "PID-1", slope=2.0, intercept=-100.0)
    write_dicom(tmp_path / "m1.dcm", image, "PID-1", monochrome1=True, slope=2.0, intercept=-100.0)
    m2, _ = read_scan(tmp_path / "m2.dcm")
    np.testing.assert_allclose(m2[0], np.round(image * 4095) * 2 - 100)  # modality LUT applied
    m1, _ = read_scan(tmp_path / "m1.dcm")
    np.testing.assert_allclose(m1, m2)  # inverted back: dense is bright in both
    ds = pydicom.dcmread(tmp_path / "m2.dcm")
    ds.WindowCenter, ds.WindowWidth = 3000, 2000
    ds.save_as(tmp_path / "window.dcm")
    windowed, _ = read_scan(tmp_path / "window.dcm")  # DX: VOI on by default
    raw, _ = read_scan(tmp_path / "window.dcm", voi_lut=False)
    assert not np.allclose(windowed, raw)
    assert np.all(windowed[raw < 2000] == windowed.min()) and np.all(windowed[raw > 4000] == windowed.max())
    ds.Modality = "MR"
    ds.save_as(tmp_path / "mr.dcm")
    np.testing.assert_allclose(read_scan(tmp_path / "mr.dcm")[0], raw)  # MR: VOI off by default
    assert not np.allclose(read_scan(tmp_path / "mr.dcm", voi_lut=True)[0], raw)


def test_same_picture_as_png_and_dicom_loads_the_same(tmp_path):
    image = gradient_image()
    write_dicom(tmp_path / "a.dcm", image, "PID-1")
    Image.fromarray(np.round(image * 4095).astype(np.uint16)).save(tmp_path / "a.png")
    dcm, _ = read_scan(tmp_path / "a.dcm")
    png, _ = read_scan(tmp_path / "a.png")
    assert dcm.shape == png.shape == (1, 48, 64)
    np.testing.assert_array_equal(dcm, png)
    t = scan_transforms(image_size=32)
    torch.testing.assert_close(t({"image": str(tmp_path / "a.dcm")})["image"], t({"image": str(tmp_path / "a.png")})["image"])


def test_16bit_png_keeps_full_range(tmp_path):
    values = np.array([[0, 1, 65534, 65535]], dtype=np.uint16).repeat(4, 0)
    Image.fromarray(values).save(tmp_path / "x.png")
    loaded, _ = read_scan(tmp_path / "x.png")
    np.testing.assert_array_equal(loaded[0], values)


def test_resize_keeps_aspect_and_pads(tmp_path):
    image = 0.5 + 0.5 * np.random.default_rng(0).random((40, 80))
    Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / "wide.png")
    out = scan_transforms(image_size=32, intensity_percentiles=(0, 100))({"image": str(tmp_path / "wide.png")})["image"]
    assert out.shape == (1, 32, 32)
    rows_with_image = (out[0].sum(1) > 0).sum().item()
    assert rows_with_image == 16  # 40x80 -> 16x32, padded top and bottom
    assert out[0, :8].sum() == 0 and out[0, -8:].sum() == 0


def test_training_augmentation_changes_the_image_but_not_its_size(synthetic_dir):
    path = str(next((synthetic_dir / "left").glob("*.png")))
    plain = scan_transforms(image_size=64)({"image": path})["image"]
    augmented = [scan_transforms(image_size=64, train=True)({"image": path})["image"] for _ in range(3)]
    assert all(a.shape == plain.shape for a in augmented)
    assert any(not torch.allclose(a, plain) for a in augmented)


def test_volume_nifti(tmp_path):
    import nibabel as nib

    volume = np.random.default_rng(0).random((20, 24, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    loaded, _ = read_scan(tmp_path / "v.nii.gz", spatial_dims=3)
    assert loaded.shape == (1, 20, 24, 16)
    np.testing.assert_allclose(loaded[0], volume)
    out = scan_transforms(image_size=16, spatial_dims=3)({"image": str(tmp_path / "v.nii.gz")})["image"]
    assert out.shape == (1, 16, 16, 16)


# ---------------------------------------------------------------- bad input


def test_bad_files_are_reported_and_skipped(tmp_path, chest_dir):
    root = tmp_path / "hospital"
    make_synthetic_folder(root, n_per_class=6, image_size=32, n_classes=2)
    good = scan_folder(root, num_workers=0)
    real = next((chest_dir / "NORMAL").glob("*.jpeg"))
    data = real.read_bytes()
    (root / "left" / "truncated.jpeg").write_bytes(data[: len(data) // 3])
    (root / "left" / "empty.png").write_bytes(b"")
    (root / "left" / "garbage.png").write_bytes(b"\x89PNG not really")
    (root / "left" / "notes.txt").write_text("hello")
    shutil.copy(get_testdata_file("test-SR.dcm"), root / "right" / "report.dcm")
    (root / "empty_class").mkdir()
    scan = scan_folder(root, num_workers=2)
    reasons = {row["file"]: row["reason"] for row in scan.bad_files}
    assert "truncated" in reasons["left/truncated.jpeg"]
    assert "empty file" in reasons["left/empty.png"]
    assert "not a readable image" in reasons["left/garbage.png"]
    assert "unknown file type" in reasons["left/notes.txt"]
    assert "without pixel data" in reasons["right/report.dcm"]
    assert "empty class folder" in reasons["empty_class/"]
    assert len(scan.items) == len(good.items)
    report = scan.write_report(tmp_path / "bad_files.csv")
    with open(report) as f:
        assert len(list(csv.DictReader(f))) == 6


def test_no_valid_scans_is_a_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"")
    with pytest.raises(WsrMedError, match="no valid scans"):
        scan_folder(tmp_path, num_workers=0)
    with pytest.raises(WsrMedError, match="not found"):
        scan_folder(tmp_path / "missing")


def test_unreadable_file_error_names_the_file(tmp_path):
    (tmp_path / "broken.dcm").write_bytes(b"\x00" * 200)
    with pytest.raises(ScanReadError, match="broken.dcm"):
        read_scan(tmp_path / "broken.dcm")
    (tmp_path / "scan.xyz").write_bytes(b"1")
    with pytest.raises(ScanReadError, match="unknown file type"):
        read_scan(tmp_path / "scan.xyz")


# ---------------------------------------------------------------- datasets, splits, identifiers


def test_manifest_patient_ids_and_three_class_task(chest_dir):
    scan = scan_manifest(chest_dir / "labels_3class.csv")
    assert scan.classes == ["bacterial", "normal", "viral"]
    assert scan.class_counts == {"bacterial": 192, "normal": 200, "viral": 108}
    assert len({i["patient"] for i in scan.items}) == 466
    folder = scan_folder(chest_dir)  # the file-name rule finds the same patients
    assert len({i["patient"] for i in folder.items}) == 466


def test_patient_level_stratified_split_and_folds(chest_dir):
    scan = scan_manifest(chest_dir / "labels_3class.csv")
    splits = split_items(scan.items, val_fraction=0.2, test_fraction=0.2, seed=3)
    groups = [{i["patient"] for i in splits[k]} for k in ("training", "validation", "test")]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert sum(len(v) for v in splits.values()) == 500
    for part in ("validation", "test"):
        share = np.mean([i["label"] == 2 for i in splits[part]])
        assert abs(share - 108 / 500) < 0.06  # stratified
    assert splits == split_items(scan.items, val_fraction=0.2, test_fraction=0.2, seed=3)  # seeded
    assert splits != split_items(scan.items, val_fraction=0.2, test_fraction=0.2, seed=4)
    seen = set()
    for fold in range(5):
        k = split_items(scan.items, n_folds=5, fold=fold, seed=0)
        val = {i["image"] for i in k["validation"]}
        assert not seen & val
        seen |= val
        assert not {i["patient"] for i in k["training"]} & {i["patient"] for i in k["validation"]}
    assert len(seen) == 500


def test_manifest_split_column_and_bad_label(tmp_path, synthetic_dir):
    rows = ["path,label,patient_id,split"]
    for n, p in enumerate(sorted(synthetic_dir.rglob("*.png"))[:6]):
        rows.append(f"{p},{p.parent.name},P{n},{'train' if n < 4 else 'val'}")
    rows.append(f"{p},unknown_class,P9,train")
    (tmp_path / "m.csv").write_text("\n".join(rows))
    scan = scan_manifest(tmp_path / "m.csv", num_workers=0, classes=["left", "right", "above"])
    assert "label 'unknown_class'" in scan.bad_files[0]["reason"]
    splits = split_items(scan.items)
    assert (len(splits["training"]), len(splits["validation"])) == (4, 2)


def test_no_patient_identifier_leaves_the_scan(tmp_path, synthetic_dir, caplog):
    caplog.set_level("DEBUG")
    scan = scan_folder(synthetic_dir, num_workers=0)
    splits = split_items(scan.items, val_fraction=0.25)
    datalist = write_datalist(tmp_path / "datalist.json", scan, splits, seed=0)
    written = datalist.read_text() + caplog.text
    for path in synthetic_dir.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        for value in (ds.PatientID, str(ds.PatientName), ds.AccessionNumber, ds.PatientBirthDate):
            assert value not in written
        assert hash_id(ds.PatientID) in written  # the split used the DICOM PatientID, hashed
    doc = json.loads(datalist.read_text())
    assert doc["classes"] == ["above", "left", "right"]
    assert read_datalist(datalist, "validation")[0]["image"].startswith(str(synthetic_dir))


def test_cache_reuses_and_invalidates(tmp_path, synthetic_dir):
    scan = scan_folder(synthetic_dir, num_workers=0)
    items = [{**i, "image": str(synthetic_dir / i["image"])} for i in scan.items[:4]]
    dataset = scan_dataset(items, scan_transforms(32), tmp_path / "cache")
    first = [dataset[i]["image"] for i in range(4)]
    cached = sorted((tmp_path / "cache").glob("*.cache"))
    assert len(cached) == 4
    mtimes = [p.stat().st_mtime_ns for p in cached]
    again = [scan_dataset(items, scan_transforms(32), tmp_path / "cache")[i]["image"] for i in range(4)]
    assert [p.stat().st_mtime_ns for p in cached] == mtimes  # read, not rewritten
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    bigger = scan_dataset(items, scan_transforms(48), tmp_path / "cache")[0]["image"]
    assert bigger.shape == (1, 48, 48) and len(list((tmp_path / "cache").glob("*.cache"))) == 5
    # any setting of a cached transform is part of the key, e.g. the intensity window
    windowed = scan_dataset(items, scan_transforms(48, intensity_percentiles=(2, 98)), tmp_path / "cache")[0]["image"]
    assert len(list((tmp_path / "cache").glob("*.cache"))) == 6 and not torch.equal(windowed, bigger)
    # the random augmentations are not cached, so they do not change the key of the deterministic part
    assert transform_signature(scan_transforms(48, train=True)) == transform_signature(scan_transforms(48, train=True))


def test_a_2048_px_scan_goes_through_read_cache_and_a_training_step(tmp_path):
    from wsr_med.networks import WiseSrNet

    write_dicom(tmp_path / "big.dcm", gradient_image(2400, 2100), "PID-1")  # larger than the input, as exports are
    items = [{"image": str(tmp_path / "big.dcm"), "label": 1}]
    uncached = scan_dataset(items, scan_transforms(2048))[0]["image"]
    first = scan_dataset(items, scan_transforms(2048), tmp_path / "cache")[0]["image"]
    again = scan_dataset(items, scan_transforms(2048), tmp_path / "cache")[0]["image"]
    assert first.shape == (1, 2048, 2048) and first.dtype == torch.float32
    assert torch.equal(first, again)  # the first epoch sees what later epochs read
    assert (first - uncached).abs().max() <= 0.5 / 65535 + 1e-7  # uint16 storage: a rounding, nothing more
    entry = next((tmp_path / "cache").glob("*.cache"))
    assert entry.stat().st_size <= 0.5 * first.numel() * 4 + 4096  # half of float32's 16 MiB, plus the header
    net = WiseSrNet("densenet121", out_channels=2, img_size=2048, checkpointing=True,
                    backbone_kwargs={"init_features": 4, "growth_rate": 2, "block_config": [1, 1, 1, 1]})
    assert net.head.compression.pre_pool == (10, 10) and net.head.compression.kernel_size == (6, 6)
    optimizer = torch.optim.AdamW(net.parameters(), 1e-3)
    loss = torch.nn.functional.cross_entropy(net(first[None]), torch.tensor([1]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in net.parameters())


def test_jpeg_reduced_decode_keeps_enough_pixels(chest_dir):
    path = max((chest_dir / "NORMAL").glob("*.jpeg"), key=lambda p: Image.open(p).size[0])
    full, meta = read_scan(path)
    reduced, meta_reduced = read_scan(path, min_size=256)
    assert max(reduced.shape[1:]) >= 256 and max(reduced.shape[1:]) < max(full.shape[1:]) / 2
    assert meta_reduced["original_shape"] == meta["original_shape"] == full.shape[1:]
    from monai.transforms import Resize

    a = Resize(256, size_mode="longest", mode="area")(torch.from_numpy(full))
    b = Resize(256, size_mode="longest", mode="area")(torch.from_numpy(reduced))
    assert a.shape == b.shape and (a - b).abs().mean() < 2.0  # same picture, 8-bit scale


def test_generated_jpeg_lossless_fixture(tmp_path):
    imagecodecs = pytest.importorskip("imagecodecs")
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    image = gradient_image()
    write_dicom(tmp_path / "plain.dcm", image, "PID-1")
    ds = pydicom.dcmread(tmp_path / "plain.dcm")
    stored = ds.pixel_array
    ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(stored, lossless=True, predictor=1, bitspersample=12)])
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.save_as(tmp_path / "lossless.dcm")
    np.testing.assert_array_equal(read_scan(tmp_path / "lossless.dcm")[0], read_scan(tmp_path / "plain.dcm")[0])


def test_16bit_tiff_and_rgb_png(tmp_path):
    values = (np.arange(32 * 40).reshape(32, 40) * 50).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "x.tif")
    np.testing.assert_array_equal(read_scan(tmp_path / "x.tif")[0][0], values)
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    gray, _ = read_scan(tmp_path / "c.png", channels=1)
    np.testing.assert_allclose(gray[0], np.asarray(Image.fromarray(rgb).convert("L")), atol=1.0)
    assert read_scan(tmp_path / "c.png", channels=3)[0].shape == (3, 20, 30)


def test_dicom_series_volume(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    volume = np.random.default_rng(0).random((6, 16, 20))
    uid = pydicom.uid.generate_uid()
    for z, plane in enumerate(volume):
        path = series / f"slice{z}.dcm"
        write_dicom(path, plane, "PID-3")
        ds = pydicom.dcmread(path)
        ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "CT", uid, z + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, float(z)], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [1, 1], 1
        ds.save_as(path)
    loaded, meta = read_scan(series, spatial_dims=3)
    assert loaded.ndim == 4 and sorted(loaded.shape[1:]) == [6, 16, 20]
    assert "PID-3" not in json.dumps({k: str(v) for k, v in meta.items()})


def test_dicom_found_by_content_whatever_its_name(tmp_path):
    """PACS exports name files by UID or not at all; a DICOMDIR is an index, not an image; a .dcm name proves nothing."""
    root = make_synthetic_folder(tmp_path / "export", n_per_class=4, image_size=32, n_classes=2, formats=("dcm",))
    source = sorted((root / "left").glob("*.dcm"))
    uid_named = root / "left" / "1.2.840.113619.2.55.3.604688119"
    source[0].rename(uid_named)
    ds = pydicom.dcmread(source[1])
    ds.preamble = None
    no_preamble = root / "left" / "IM000017"  # no 128-byte preamble, no 'DICM': only pydicom's own reading finds it
    ds.save_as(no_preamble, enforce_file_format=False)
    source[1].unlink()
    assert no_preamble.read_bytes()[128:132] != b"DICM"
    shutil.copy(get_testdata_file("DICOMDIR"), root / "DICOMDIR")
    shutil.copy(get_testdata_file("DICOMDIR"), root / "right" / "DICOMDIR")
    (root / "right" / "fake.dcm").write_text("not DICOM at all, just a name")
    scan = scan_folder(root, num_workers=0)
    reasons = {row["file"]: row["reason"] for row in scan.bad_files}
    found = {i["image"] for i in scan.items}
    assert {"left/1.2.840.113619.2.55.3.604688119", "left/IM000017"} <= found
    assert len(found) == 8  # every scan, whatever its name
    assert reasons["DICOMDIR"].startswith("DICOMDIR") and reasons["right/DICOMDIR"].startswith("DICOMDIR")
    assert "not a readable DICOM file" in reasons["right/fake.dcm"]
    image, _ = read_scan(uid_named)
    assert image.shape == (1, 32, 32)
    with pytest.raises(ScanReadError, match="DICOMDIR"):
        read_scan(root / "right" / "DICOMDIR")


def test_memory_cache_and_the_loaders_the_bundle_builds(tmp_path, synthetic_dir):
    from monai.data import CacheDataset, ThreadDataLoader

    from wsr_med.data import scan_loader
    from wsr_med.workflows import parse_bundle

    scan = scan_folder(synthetic_dir, num_workers=0)
    items = [{**i, "image": str(synthetic_dir / i["image"])} for i in scan.items[:4]]
    memory = scan_dataset(items, scan_transforms(32, device="cpu"), cache="memory")
    assert isinstance(memory, CacheDataset)
    plain = scan_dataset(items, scan_transforms(32))
    assert all(torch.equal(memory[i]["image"], plain[i]["image"]) for i in range(4))  # float32, as computed
    assert isinstance(scan_loader(memory, 2), ThreadDataLoader)
    loader = scan_loader(plain, 2, num_workers=2)
    assert loader.persistent_workers and loader.prefetch_factor == 4 and not loader.pin_memory  # pinned on CUDA only
    with pytest.raises(ValueError, match="disk"):
        scan_dataset(items, scan_transforms(32), cache="ram")
    parser = parse_bundle("train", dataset_dir=str(synthetic_dir), output_dir=str(tmp_path / "run"), cache="memory",
                          image_size=32, tracking_uri="none")
    assert isinstance(parser.get_parsed_content("train#dataloader"), ThreadDataLoader)
    assert not (tmp_path / "run").exists()  # building the loader wrote nothing
