"""Parameter count and training-step time of every head, as ratios to GAP measured in the same run.

    python -m pipelines.bench_heads                       # DenseNet121 and EfficientNet-b0 at 224 and 512
    python -m pipelines.bench_heads --sizes 224 --repeats 3 --heads gap wise flatten

Heads are timed round-robin (one step of each head, then again, ``--repeats`` times) so that
drift in machine load hits every head alike; the median step is reported. A whole step varies by
a few percent from run to run on a busy CPU, more than any head costs, so each head is also timed
alone (forward + backward on the backbone's feature map, median of 50): ``head ms`` and the
resulting ``est. ratio`` = 1 + (head ms - gap head ms) / gap step ms are the precise figures.
Runs on the CPU, and on CUDA too when a GPU is present.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from wsr_med.networks import HEADS, WiseSrNet, attach_constraints


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


def bench(backbone: str, size: int, heads: list[str], batch: int, repeats: int, device: torch.device) -> list[dict]:
    nets, optimizers = {}, {}
    for head in heads:
        torch.manual_seed(0)
        net = WiseSrNet(backbone, in_channels=1, out_channels=2, img_size=size, head=head).to(device).train()
        nets[head], optimizers[head] = net, torch.optim.Adam(net.parameters(), 1e-4)
        attach_constraints(optimizers[head], net)
    x = torch.rand(batch, 1, size, size, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    times: dict[str, list[float]] = {h: [] for h in heads}
    for h in heads:  # warm-up
        step_seconds(nets[h], optimizers[h], x, y)
    for r in range(repeats):
        order = heads[r % len(heads):] + heads[: r % len(heads)]
        for h in order:
            times[h].append(step_seconds(nets[h], optimizers[h], x, y))
    with torch.no_grad():
        features = nets[heads[0]].backbone(x)
    rows = []
    for h in heads:
        total = sum(p.numel() for p in nets[h].parameters())
        head_params = sum(p.numel() for p in nets[h].head.parameters())
        rows.append({"backbone": backbone, "size": size, "device": device.type, "head": h, "params": total,
                     "head_params": head_params, "ms_per_image": 1000 * statistics.median(times[h]) / batch,
                     "head_ms": 1000 * head_seconds(nets[h], features, y)})
    base = next(r for r in rows if r["head"] == "gap")
    for r in rows:
        r["time_ratio"] = r["ms_per_image"] / base["ms_per_image"]
        r["head_share"] = r["head_params"] / r["params"]
        r["est_ratio"] = 1 + (r["head_ms"] - base["head_ms"]) / (base["ms_per_image"] * batch)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["densenet121", "efficientnet-b0"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 512])
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    heads = ["gap"] + [h for h in args.heads if h != "gap"]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
          + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print(f"batch {args.batch}, median of {args.repeats} round-robin training steps (forward+backward+Adam+projection)\n")
    print("| backbone | size | device | head | params | head params | head share | step ms/image | step vs gap | head ms (batch) | est. ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for device in devices:
        for backbone in args.backbones:
            for size in args.sizes:
                for r in bench(backbone, size, heads, args.batch, args.repeats, device):
                    print(f"| {r['backbone']} | {r['size']} | {r['device']} | {r['head']} | {r['params']:,} | "
                          f"{r['head_params']:,} | {100 * r['head_share']:.2f}% | {r['ms_per_image']:.1f} | "
                          f"{r['time_ratio']:.3f} | {r['head_ms']:.2f} | {r['est_ratio']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
