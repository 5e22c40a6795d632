"""Do eval-mode outputs mean anything after a short training? BatchNorm momentum x bias-corrected running statistics.

    wsr-med bench batchnorm                         # 16 real chest X-rays from ../shared, 64 px, 30 steps
    wsr-med bench batchnorm --steps 100 --size 128

For each backbone, BatchNorm momentum (MONAI EfficientNet's 0.01, PyTorch's 0.1) and with or without
:func:`wsr_med.networks.warm_start_batchnorm`, the same 30 AdamW steps from the same initialisation, then the
spread of the eval-mode class probabilities over the 16 images (max over classes of max - min; a collapsed
model is below :data:`wsr_med.metrics.COLLAPSE_TOLERANCE`). Training losses are identical across the rows
of one backbone: momentum and the warm start change only the running statistics.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

CHEST = Path("../shared/data/chest_xray_pneumonia")


def train_briefly(backbone: str, images: torch.Tensor, labels: torch.Tensor, momentum: float | None, warm_start: bool,
                  steps: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Train a fresh WiseSrNet for ``steps`` AdamW steps on ``images``; returns (eval-mode probabilities, last loss).

    ``momentum`` None keeps the backbone's own BatchNorm momentum (MONAI EfficientNet's 0.01).
    """
    from wsr_med.networks import WiseSrNet, warm_start_batchnorm

    torch.manual_seed(seed)
    net = WiseSrNet(backbone, img_size=images.shape[-1], out_channels=2, bn_momentum=momentum)
    optimizer = torch.optim.AdamW(net.parameters(), 1e-3)
    if warm_start:
        warm_start_batchnorm(optimizer, net)
    for _ in range(steps):
        batch = torch.randperm(len(images))[:8]
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(images[batch]), labels[batch])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return torch.softmax(net.eval()(images), 1), float(loss.detach())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chest-dir", type=Path, default=CHEST, help="folder with NORMAL/ and PNEUMONIA/ JPEGs")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet-b0", "densenet121"])
    args = parser.parse_args(argv)
    from wsr_med.data import scan_transforms

    files = sorted((args.chest_dir / "NORMAL").glob("*.jpeg"))[:8] + sorted((args.chest_dir / "PNEUMONIA").glob("*.jpeg"))[:8]
    if len(files) < 16:
        raise SystemExit(f"{args.chest_dir}: 8 NORMAL and 8 PNEUMONIA JPEGs are needed (--chest-dir)")
    transform = scan_transforms(args.size)
    images = torch.stack([transform({"image": str(f)})["image"] for f in files])
    labels = torch.tensor([0] * 8 + [1] * 8)
    print(f"{len(files)} chest X-rays, {args.size} px, {args.steps} AdamW steps (lr 1e-3, batch 8), torch {torch.__version__}\n")
    print("| backbone | BN momentum | warm start | eval-mode probability spread | last training loss |")
    print("|---|---|---|---|---|")
    for backbone in args.backbones:
        for momentum in (0.01, 0.1):
            for warm in (False, True):
                probs, loss = train_briefly(backbone, images, labels, momentum, warm, args.steps)
                spread = float((probs.max(0).values - probs.min(0).values).max())
                print(f"| {backbone} | {momentum} | {'yes' if warm else 'no'} | {spread:.3g} | {loss:.4f} |", flush=True)


if __name__ == "__main__":
    main()
