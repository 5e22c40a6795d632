"""Training cost of every head as ratios to GAP measured in the same run: parameters, images/s, memory.

    wsr-med bench heads                       # DenseNet121 and EfficientNet-b0 at 224 and 512
    wsr-med bench heads --sizes 224 --repeats 3 --heads gap wise flatten

Each head trains in fresh processes, one head after another, so that nothing else is counted:

* ``train img/s``: the batch over the median of ``--repeats`` training steps (forward, backward,
  AdamW, non-negativity projection) after a warm-up step. ``img/s vs gap`` comes from steps of the
  head alternated with steps of ``gap`` in the same process, so that drift in machine load hits
  both alike. A whole step still varies by a few percent on a busy CPU, more than any head costs,
  so each head is also timed alone (forward + backward on the backbone's real feature map, median
  of 50): ``head ms`` and ``est. time ratio`` = 1 + (head ms - gap head ms) / gap step ms are the
  precise figures.
* ``peak MiB``: the peak memory of training (model, gradients, AdamW state, activations) over two
  steps: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the rise of the process's peak
  resident set (``VmHWM``) from just before the model is built, with glibc returning large
  blocks to the system as they are freed (``fix_mmap_threshold``) so that the peak follows the
  tensors alive. ``saved MiB`` is the exact size of the activations autograd keeps for the backward
  pass (what grows with image size and batch).

Runs on the CPU, and on CUDA too when a GPU is present.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from wsr_med.networks import HEADS, WiseSrNet, attach_constraints


def fix_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Make glibc hand allocations of ``nbytes`` or more straight back to the system when freed.

    By default glibc raises this threshold as large blocks are freed and keeps them in its heap, so
    a process's peak resident set depends on what ran before. Costs page faults on every large
    allocation (~40% of a CPU step at 224 px), so it is set only where memory is measured.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # -3: M_MMAP_THRESHOLD
    except OSError:  # not glibc: nothing to fix
        pass


def build(backbone: str, size: int, head: str, device: torch.device, backbone_kwargs: dict | None = None):
    """The benchmarked network (train mode) and its optimizer, with the non-negativity projection attached."""
    torch.manual_seed(0)
    net = WiseSrNet(backbone, in_channels=1, out_channels=2, img_size=size, head=head,
                    backbone_kwargs=backbone_kwargs).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), 1e-4)
    attach_constraints(optimizer, net)
    return net, optimizer


def _batch(batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, size, size, generator=generator)
    return x.to(device), torch.randint(0, 2, (batch,), generator=generator).to(device)


def step_seconds(net: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def paired_step_seconds(backbone: str, size: int, head: str, batch: int, repeats: int, device_type: str,
                        backbone_kwargs: dict | None = None) -> tuple[float, float]:
    """Median training step of ``gap`` and of ``head``, alternating one step of each after a warm-up step.

    Alternating (in one fresh process) lets drift in machine load hit both alike, so their ratio is
    steadier than either time; only two networks are alive, so the process does not grow with the
    number of heads benchmarked.
    """
    device = torch.device(device_type)
    x, y = _batch(batch, size, device)
    nets = [build(backbone, size, h, device, backbone_kwargs) for h in ("gap", head)]
    times: list[list[float]] = [[], []]
    for i in range(repeats + 1):
        for k in (i % 2, 1 - i % 2):  # alternate which goes first
            times[k].append(step_seconds(*nets[k], x, y))
    return statistics.median(times[0][1:]), statistics.median(times[1][1:])


def _warm_up_runtime(device: torch.device) -> None:
    """One tiny training step, so that the runtime's one-time set-up (~50 MiB on the CPU) is not counted."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(2, 2)).to(device)
    step_seconds(net, torch.optim.AdamW(net.parameters()), torch.rand(2, 1, 16, 16, device=device),
                 torch.zeros(2, dtype=torch.long, device=device))


def peak_training_mib(make: Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer]], step: Callable,
                      x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.nn.Module]:
    """Peak memory of building ``make()``'s network and optimizer and of two ``step``s on ``(x, y)``, and the
    network; meant for a fresh process. The second step holds AdamW's state as well."""
    fix_mmap_threshold()
    _warm_up_runtime(x.device)
    if x.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    before = peak_rss_mib(reset=True)
    net, optimizer = make()
    for _ in range(2):
        step(net, optimizer, x, y)
    return (torch.cuda.max_memory_allocated() / 2**20 if x.is_cuda else peak_rss_mib() - before), net


def memory_mib(backbone: str, size: int, head: str, batch: int, device_type: str,
               backbone_kwargs: dict | None = None) -> tuple[float, float]:
    """Peak training memory of one head over two steps, and its saved activations; meant for a fresh process."""
    device = torch.device(device_type)
    x, y = _batch(batch, size, device)
    peak, net = peak_training_mib(lambda: build(backbone, size, head, device, backbone_kwargs), step_seconds, x, y)
    return peak, saved_activations_mib(net, x, y)


def peak_rss_mib(reset: bool = False) -> float:
    """This process's peak resident set (Linux ``VmHWM``); ``reset`` restarts it from the current resident set.

    Not ``ru_maxrss``: a spawned process inherits its parent's peak there.
    """
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a newly spawned Python process (so that no other model's memory or caches are in it)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def head_seconds(net: torch.nn.Module, features: torch.Tensor, y: torch.Tensor, repeats: int = 50) -> float:
    """Median time of the head alone: forward and backward on a fixed feature map (gradients to the map too)."""
    times = []
    for _ in range(repeats + 5):
        f = features.detach().requires_grad_(True)
        if f.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.nn.functional.cross_entropy(net.head(f), y).backward()
        if f.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[5:])


def saved_activations_mib(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """MiB of tensors autograd saves for backward in one training forward pass (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: list[torch.Tensor] = []  # alive until the end, as in a real step, so no address is reused

    def pack(t: torch.Tensor) -> int:
        saved.append(t)
        return len(saved) - 1  # not the tensor: a saved output holding itself would be a reference cycle

    with torch.autograd.graph.saved_tensors_hooks(pack, saved.__getitem__):
        torch.nn.functional.cross_entropy(net(x), y)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(n for ptr, n in storages.items() if ptr not in params) / 2**20


def bench(backbone: str, size: int, heads: list[str], batch: int, repeats: int, device: torch.device,
          backbone_kwargs: dict | None = None) -> list[dict]:
    """One row per head (``heads[0]`` must be ``gap``, the reference of every ratio)."""
    x, y = _batch(batch, size, device)
    rows = []
    for h in heads:
        gap_step, step = in_fresh_process(paired_step_seconds, backbone, size, h, batch, repeats, device.type,
                                          backbone_kwargs)
        peak, saved = in_fresh_process(memory_mib, backbone, size, h, batch, device.type, backbone_kwargs)
        net, _ = build(backbone, size, h, device, backbone_kwargs)
        with torch.no_grad():
            features = net.backbone(x)
        total = sum(p.numel() for p in net.parameters())
        head_params = sum(p.numel() for p in net.head.parameters())
        rows.append({"backbone": backbone, "size": size, "device": device.type, "head": h, "params": total,
                     "head_params": head_params, "head_share": head_params / total, "images_per_s": batch / step,
                     "speed_ratio": 1.0 if h == heads[0] else gap_step / step,
                     "head_ms": 1000 * head_seconds(net, features, y), "peak_mib": peak, "saved_mib": saved})
        del net, features
    base = rows[0]
    for r in rows:
        r["est_time_ratio"] = 1 + (r["head_ms"] - base["head_ms"]) * base["images_per_s"] / (1000 * batch)
        r["peak_ratio"] = r["peak_mib"] / base["peak_mib"]
        r["saved_ratio"] = r["saved_mib"] / base["saved_mib"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["densenet121", "efficientnet-b0"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 512])
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    heads = ["gap"] + [h for h in args.heads if h != "gap"]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
          + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print(f"batch {args.batch}, median of {args.repeats} training steps (forward+backward+AdamW+projection)\n")
    print("| backbone | size | device | head | params | head params | head share | train img/s | img/s vs gap | "
          "head ms (batch) | est. time ratio | peak MiB | peak vs gap | saved MiB | saved vs gap |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for device in devices:
        for backbone in args.backbones:
            for size in args.sizes:
                for r in bench(backbone, size, heads, args.batch, args.repeats, device):
                    print(f"| {r['backbone']} | {r['size']} | {r['device']} | {r['head']} | {r['params']:,} | "
                          f"{r['head_params']:,} | {100 * r['head_share']:.2f}% | {r['images_per_s']:.2f} | "
                          f"{r['speed_ratio']:.3f} | {r['head_ms']:.2f} | {r['est_time_ratio']:.4f} | "
                          f"{r['peak_mib']:.0f} | {r['peak_ratio']:.3f} | {r['saved_mib']:.1f} | "
                          f"{r['saved_ratio']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
