"""Training memory and speed of large scans with and without activation checkpointing, as ratios in one run.

    wsr-med bench memory                                  # DenseNet121, 1024 px, batch 4, on the CPU
    wsr-med bench memory --backbones densenet121 efficientnet-b0 --sizes 512 1024 2048 --device cuda

Per backbone and size, in fresh processes:

* ``saved MiB``: the exact size of the activations autograd keeps for backward in one training forward
  (saved-tensor hooks; with checkpointing, what the checkpointed segments keep plus the last segment's).
* ``peak MiB``: peak memory over two training steps (model, gradients, AdamW state, activations, and the
  recomputed segment): ``torch.cuda.max_memory_allocated`` on CUDA, the rise of the peak resident set on the CPU.
* ``step s``: the median training step (forward, backward, AdamW), plain and checkpointed steps
  alternated in one process after a warm-up step, so that load drift hits both.

On CUDA the step runs as the bundle trains: autocast (bfloat16 where the card supports it, else float16
with a gradient scaler) and channels-last memory for 2D.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch

from wsr_med.networks import WiseSrNet
from wsr_med.pipelines.bench_heads import in_fresh_process, peak_training_mib, saved_activations_mib
from wsr_med.workflows.model import amp_dtype


def build(backbone: str, size: int, checkpointing: bool, device: torch.device, backbone_kwargs: dict | None = None):
    """The network in training mode (the same initial weights either way) and its optimizer."""
    torch.manual_seed(0)
    net = WiseSrNet(backbone, in_channels=1, out_channels=2, img_size=size, backbone_kwargs=backbone_kwargs,
                    checkpointing=checkpointing).to(device).train()
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return net, torch.optim.AdamW(net.parameters(), 1e-4)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=amp_dtype()) if device.type == "cuda" else contextlib.nullcontext()


def _step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with _autocast(x.device):
        loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.float().backward()  # bfloat16 needs no scaler; float16 gradients of this size do not underflow in a bench
    optimizer.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _batch(batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, size, size, generator=generator).to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 2, (batch,), generator=generator).to(device)


def step_seconds(backbone: str, size: int, batch: int, repeats: int, device_type: str,
                 backbone_kwargs: dict | None = None) -> tuple[float, float]:
    """Median step of the plain and of the checkpointed network, alternated after one warm-up step each."""
    device = torch.device(device_type)
    x, y = _batch(batch, size, device)
    nets = [build(backbone, size, c, device, backbone_kwargs) for c in (False, True)]
    times: list[list[float]] = [[], []]
    for i in range(repeats + 1):
        for k in (i % 2, 1 - i % 2):
            times[k].append(_step(*nets[k], x, y))
    return statistics.median(times[0][1:]), statistics.median(times[1][1:])


def memory_mib(backbone: str, size: int, batch: int, checkpointing: bool, device_type: str,
               backbone_kwargs: dict | None = None) -> tuple[float, float]:
    """Peak training memory over two steps and the saved activations of one forward; meant for a fresh process."""
    device = torch.device(device_type)
    x, y = _batch(batch, size, device)
    peak, net = peak_training_mib(lambda: build(backbone, size, checkpointing, device, backbone_kwargs), _step, x, y)
    with _autocast(device):
        return peak, saved_activations_mib(net, x, y)


def bench(backbone: str, size: int, batch: int, repeats: int, device_type: str,
          backbone_kwargs: dict | None = None) -> dict:
    """One row: plain and checkpointed memory and step time, and their ratios."""
    plain_s, ckpt_s = in_fresh_process(step_seconds, backbone, size, batch, repeats, device_type, backbone_kwargs)
    plain_peak, plain_saved = in_fresh_process(memory_mib, backbone, size, batch, False, device_type, backbone_kwargs)
    ckpt_peak, ckpt_saved = in_fresh_process(memory_mib, backbone, size, batch, True, device_type, backbone_kwargs)
    return {"backbone": backbone, "size": size, "batch": batch, "device": device_type,
            "plain_img_s": batch / plain_s, "ckpt_img_s": batch / ckpt_s, "time_ratio": ckpt_s / plain_s,
            "plain_saved": plain_saved, "ckpt_saved": ckpt_saved, "saved_ratio": ckpt_saved / plain_saved,
            "plain_peak": plain_peak, "ckpt_peak": ckpt_peak, "peak_ratio": ckpt_peak / plain_peak}


HEADER = ("| backbone | size | batch | device | img/s plain | img/s checkpointed | step time ratio | saved MiB plain | "
          "saved MiB checkpointed | saved ratio | peak MiB plain | peak MiB checkpointed | peak ratio |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def row(r: dict) -> str:
    return (f"| {r['backbone']} | {r['size']} | {r['batch']} | {r['device']} | {r['plain_img_s']:.2f} | "
            f"{r['ckpt_img_s']:.2f} | {r['time_ratio']:.3f} | {r['plain_saved']:.0f} | {r['ckpt_saved']:.0f} | "
            f"{r['saved_ratio']:.3f} | {r['plain_peak']:.0f} | {r['ckpt_peak']:.0f} | {r['peak_ratio']:.3f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["densenet121"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone-kwargs", type=json.loads, default=None, help="e.g. a reduced DenseNet for a quick check")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
          + (f", GPU {torch.cuda.get_device_name()}, autocast {amp_dtype()}" if args.device == "cuda" else ""))
    print(HEADER, flush=True)
    for backbone in args.backbones:
        for size in args.sizes:
            print(row(bench(backbone, size, args.batch, args.repeats, args.device, args.backbone_kwargs)), flush=True)


if __name__ == "__main__":
    main()
