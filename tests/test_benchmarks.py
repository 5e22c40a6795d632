"""The head benchmark's measurements on a tiny network (the numbers themselves come from wsr-med bench heads)."""

import pytest
import torch

from wsr_med.pipelines.bench_heads import bench, saved_activations_mib

SMALL = {"init_features": 8, "growth_rate": 4, "block_config": [1, 1, 1, 1]}


def test_saved_activations_counts_what_autograd_keeps():
    net = torch.nn.Linear(1024, 1)
    x = torch.rand(256, 1024)
    y = torch.zeros(256, dtype=torch.long)
    # Linear saves its input (1 MiB); the weight is a parameter and not counted; cross-entropy on
    # one logit saves its (256, 1) log-softmax.
    assert saved_activations_mib(net, x, y) == pytest.approx(1.0, abs=0.01)


def test_bench_rows_are_ratios_to_gap():
    # 256 px, batch 4: the stem's activations (2 MiB) are above the 1 MiB the memory probe resolves
    gap, wise = bench("densenet121", 256, ["gap", "wise"], batch=4, repeats=1, device=torch.device("cpu"),
                      backbone_kwargs=SMALL)
    assert (gap["head"], wise["head"]) == ("gap", "wise")
    assert gap["speed_ratio"] == gap["peak_ratio"] == gap["saved_ratio"] == gap["est_time_ratio"] == 1.0
    assert all(r["peak_mib"] > 2 and r["images_per_s"] > 0 and r["saved_mib"] > 2 for r in (gap, wise))
    # the 8x8 feature map is pooled to 4x4, so wise adds a 4x4 kernel and a bias per channel
    channels = (gap["head_params"] - 2) // 2  # gap's head is Linear(C, 2)
    assert wise["head_params"] - gap["head_params"] == channels * (16 + 1)


def test_train_bench_runs_the_bundle_loop_and_the_bare_loop(capsys):
    from wsr_med.pipelines import bench_train

    bench_train.main(["--backbone-kwargs", '{"init_features": 8, "growth_rate": 4, "block_config": [1, 1, 1, 1]}',
                      "--size", "64", "--images", "16", "--batch", "8", "--epochs", "2", "--num-workers", "0"])
    row = capsys.readouterr().out.strip().splitlines()[-1].split("|")
    assert row[1].strip() == "cpu" and 10 <= int(row[4]) <= 20 and float(row[5]) > 0 and float(row[6]) > 0
    assert float(row[7]) == pytest.approx(float(row[5]) / float(row[6]), abs=2e-3)


def test_the_prepared_gpu_check_runs_its_path_on_the_cpu(tmp_path):
    from wsr_med.pipelines import bench_gpu

    report = tmp_path / "benchmarks.md"
    report.write_text("# Benchmarks\n")
    bench_gpu.main(["--tiny", "--append", str(report)])
    text = report.read_text()
    assert text.startswith("# Benchmarks\n") and "## GPU check: CPU" in text  # appended, headed by the device's name
    assert "| densenet121 | 128 | 4 | cpu |" in text
    assert "| cpu | disk |" in text and "| cpu | memory |" in text and "Wall time of the check" in text
