"""Scan ingestion speed and memory: the wsr_med pipeline vs a bare PIL/pydicom + resize loop, and the disk cache.

    wsr-med bench io                       # real chest X-rays + generated 3000x2500 16-bit DICOM
    wsr-med bench io --limit 100 --n-dicom 10

For each dataset, in the same run and each in a fresh process (so that peak RSS is its own):
* bare loop: PIL (JPEG/PNG) or pydicom ``pixel_array`` -> float32 -> PIL area resize of the longest side to 512;
* wsr_med: ``scan_transforms(512)`` (LoadScand with LUTs and polarity, area resize, intensity scaling, padding);
* first epoch through ``PersistentDataset`` (decode + write the cache) and a second, cached epoch.
Targets: wsr_med >= 0.8x the bare loop's images/s; the cached epoch >= 20x faster than the first.
Last, the size of one cache entry at 2048 px (images are cached as uint16) against its float32 size.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

# Real radiographs, where the checkout has ../shared beside it (pass --chest-dir elsewhere).
CHEST = Path("../shared/data/chest_xray_pneumonia")
SIZE = 512


def bare_load(path: str) -> np.ndarray:
    """What a script without wsr_med would do: decode, to float, resize the longest side with PIL's area filter."""
    from PIL import Image

    if path.endswith(".dcm"):
        import pydicom

        array = pydicom.dcmread(path).pixel_array.astype(np.float32)
        image = Image.fromarray(array, mode="F")
    else:
        image = Image.open(path).convert("F")
    scale = SIZE / max(image.size)
    return np.asarray(image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BOX))


def _phase(kind: str, files: list[str], cache_dir: str, queue) -> None:
    from wsr_med.data import scan_dataset, scan_transforms

    start = time.perf_counter()
    if kind == "bare":
        for f in files:
            bare_load(f)
    elif kind == "wsr_med":
        transform = scan_transforms(SIZE)
        for f in files:
            transform({"image": f})
    else:  # "first" / "cached": PersistentDataset epochs
        items = [{"image": f, "sha1": f} for f in files]  # path as key: the benchmark's files never change
        dataset = scan_dataset(items, scan_transforms(SIZE), cache_dir)
        for i in range(len(dataset)):
            dataset[i]
    seconds = time.perf_counter() - start
    queue.put((seconds, peak_rss_mib()))


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it does not carry the parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def measure(kind: str, files: list[str], cache_dir: str) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_phase, args=(kind, files, cache_dir, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def make_dicoms(folder: Path, n: int, compress: bool) -> list[str]:
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    from wsr_med.data import synthetic_image, write_dicom

    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        path = folder / f"{'j2k' if compress else 'raw'}_{i:03d}.dcm"
        image = np.kron(synthetic_image("left", 500, rng), np.ones((6, 5)))  # 3000 x 2500
        write_dicom(path, image, f"BENCH{i}")
        if compress:
            ds = pydicom.dcmread(path)
            ds.compress(JPEG2000Lossless)
            ds.save_as(path)
        files.append(str(path))
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=500, help="chest X-rays used (of 500; 0 skips them)")
    parser.add_argument("--n-dicom", type=int, default=20, help="generated DICOM files per encoding")
    parser.add_argument("--chest-dir", type=Path, default=CHEST, help="folder of real JPEG radiographs (default %(default)s)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="wsr_bench_io_"))
    datasets = {}
    if args.chest_dir.is_dir() and args.limit > 0:
        datasets["chest X-ray JPEG (real, 1-3 kpx)"] = sorted(str(p) for p in args.chest_dir.rglob("*.jpeg"))[: args.limit]
    datasets["DICOM 3000x2500 16-bit, uncompressed"] = make_dicoms(work, args.n_dicom, compress=False)
    datasets["DICOM 3000x2500 16-bit, JPEG 2000"] = make_dicoms(work, args.n_dicom, compress=True)
    print(f"resize to {SIZE}; each phase in a fresh process; peak RSS of that process\n")
    print("| data | files | bare img/s | wsr_med img/s | wsr_med / bare | first epoch img/s | cached epoch img/s | cached / first | peak RSS bare / wsr_med / first / cached (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for name, files in datasets.items():
            cache = work / f"cache_{abs(hash(name))}"
            results = {kind: measure(kind, files, str(cache)) for kind in ("bare", "wsr_med", "first", "cached")}
            rate = {k: len(files) / v[0] for k, v in results.items()}
            rss = " / ".join(f"{results[k][1]:.0f}" for k in ("bare", "wsr_med", "first", "cached"))
            print(f"| {name} | {len(files)} | {rate['bare']:.1f} | {rate['wsr_med']:.1f} | {rate['wsr_med'] / rate['bare']:.2f} | "
                  f"{rate['first']:.1f} | {rate['cached']:.1f} | {rate['cached'] / rate['first']:.0f}x | {rss} |", flush=True)
        entry, float32 = cached_entry_bytes(datasets["DICOM 3000x2500 16-bit, uncompressed"][0], work / "cache_2048", 2048)
        print(f"\ncache entry of a 3000x2500 scan at 2048 px: {entry / 2**20:.2f} MiB; as float32 "
              f"{float32 / 2**20:.2f} MiB: {entry / float32:.3f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cached_entry_bytes(path: str, cache_dir: Path, size: int) -> tuple[int, int]:
    """The bytes of ``path``'s disk-cache entry at ``size`` px, and the bytes of that image as float32."""
    from wsr_med.data import scan_dataset, scan_transforms

    image = scan_dataset([{"image": path, "label": 0}], scan_transforms(size), cache_dir)[0]["image"]
    return sum(p.stat().st_size for p in cache_dir.glob("*.cache")), image.numel() * 4


if __name__ == "__main__":
    main()
