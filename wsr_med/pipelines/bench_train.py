"""Training images/s of the bundle's real loop against a bare PyTorch loop over the same model, as a ratio in one run.

    wsr-med bench train                                  # DenseNet121, 224 px, batch 16, the bundle's defaults
    wsr-med bench train --size 512 --cache disk memory   # on a GPU: both caches

* bundle: ``train.json`` run as ``monai.bundle run`` runs it (initialize, run, finalize) on a generated data
  set, with its loader (workers, cache, augmentation), its trainer and every training handler; MLflow off.
  The time of each epoch's training loop is ignite's (validation and other end-of-epoch handlers excluded).
* bare: the same network, loss and optimizer (AdamW, the bundle's autocast and memory format on CUDA) over
  tensors already in memory on the device, no augmentation, no handlers.

The first epoch of each is left out (decoding and caching, warm-up). The bare loop runs before and after the
bundle's and the two are averaged, so that drift in machine load hits both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from wsr_med.networks import WiseSrNet
from wsr_med.workflows.model import amp_dtype


def bundle_images_per_second(data: Path, output: Path, settings: dict, epochs: int) -> tuple[float, int, int]:
    """Training images/s of the bundle's loop over epochs 2..``epochs``, the number of training images and of
    loader processes."""
    from ignite.engine import Events

    from wsr_med.workflows import parse_bundle

    parser = parse_bundle("train", dataset_dir=str(data), output_dir=str(output), tracking_uri="none",
                          progress_bar=False, max_epochs=epochs, **settings)
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    loop_seconds: list[float] = []
    # ignite's epoch time when EPOCH_COMPLETED fires: the loop with its iteration handlers, before validation
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: loop_seconds.append(e.state.times["EPOCH_COMPLETED"]))
    try:
        parser.get_parsed_content("run")
    finally:
        parser.get_parsed_content("finalize")
    n = len(parser.get_parsed_content("train#dataset"))
    return n * len(loop_seconds[1:]) / sum(loop_seconds[1:]), n, parser.get_parsed_content("num_workers")


def bare_images_per_second(settings: dict, n_images: int, epochs: int, device: torch.device) -> float:
    """Training images/s of a plain PyTorch loop: same network, AdamW and loss, tensors in device memory."""
    torch.manual_seed(0)
    size, batch = settings["image_size"], settings["batch_size"]
    net = WiseSrNet(settings["backbone"], 2, 1, 2, size, backbone_kwargs=settings.get("backbone_kwargs")).to(device).train()
    channels_last = device.type == "cuda"
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), settings.get("learning_rate", 3e-4), weight_decay=1e-4)
    images = torch.rand(n_images, 1, size, size, device=device)
    labels = torch.randint(0, 2, (n_images,), device=device)
    autocast = torch.autocast("cuda", dtype=amp_dtype()) if device.type == "cuda" else contextlib.nullcontext()
    seconds = []
    for _ in range(epochs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for idx in torch.randperm(n_images, device=device).split(batch):
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = torch.nn.functional.cross_entropy(net(images[idx]), labels[idx])
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return n_images * len(seconds[1:]) / sum(seconds[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="densenet121")
    parser.add_argument("--backbone-kwargs", type=json.loads, default={},
                        help="e.g. a reduced DenseNet for a quick check")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=64, help="training images (a fifth more are generated for validation)")
    parser.add_argument("--epochs", type=int, default=3, help="the first is not counted")
    parser.add_argument("--cache", nargs="+", default=["disk"], help="the bundle's cache modes to measure")
    parser.add_argument("--num-workers", type=int, help="the bundle's loader processes (default: the bundle's)")
    args = parser.parse_args(argv)
    from wsr_med.data import make_synthetic_folder

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = {"backbone": args.backbone, "backbone_kwargs": args.backbone_kwargs, "image_size": args.size,
                "batch_size": args.batch, **({"num_workers": args.num_workers} if args.num_workers is not None else {})}
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
          + (f", GPU {torch.cuda.get_device_name()}, autocast {amp_dtype()}" if device.type == "cuda" else ""))
    print(f"{args.backbone}, {args.size} px, batch {args.batch}, epochs 2..{args.epochs} of each loop\n")
    print("| device | cache | loader workers | training images | bundle img/s | bare img/s | bundle / bare |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="wsr_med_bench_train_") as tmp:
        data = make_synthetic_folder(Path(tmp) / "data", n_per_class=round(args.images * 1.25 / 2),
                                     image_size=max(args.size, 64), n_classes=2, formats=("png",))
        for cache in args.cache:
            before = bare_images_per_second(settings, args.images, args.epochs, device)
            bundle, n, workers = bundle_images_per_second(data, Path(tmp) / f"run_{cache}", {**settings, "cache": cache},
                                                          args.epochs)
            after = bare_images_per_second(settings, args.images, args.epochs, device)
            bare = (before + after) / 2
            print(f"| {device.type} | {cache} | {workers} | {n} | {bundle:.2f} | {bare:.2f} | {bundle / bare:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
