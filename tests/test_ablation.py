"""The ablation runner on a tiny grid, and the spatial-shuffle diagnostic."""

import csv
import json

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from scipy import stats

from wsr_med.data import make_synthetic_folder
from wsr_med.networks import WiseSrNet, gradcam, gradcam_layer, logits_with_shuffled_positions
from wsr_med.pipelines import ablation

from conftest import drawn

TINY = ["image_size=64", "backbone_kwargs={'init_features':8,'growth_rate':4,'block_config':[1,1,1,1]}",
        "max_epochs=2", "batch_size=8", "num_workers=0", "progress_bar=False", "learning_rate=0.01"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    data = make_synthetic_folder(root / "data", n_per_class=12, image_size=64, n_classes=2)
    argv = ["--dataset-dir", str(data), "--output-dir", str(root / "out"), "--heads", "gap", "wise",
            "--sizes", "64", "--folds", "2", "--seeds", "0", "1", "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--experiment-name", "study", "--set", *TINY]
    ablation.main(argv)
    return {"root": root, "out": root / "out", "argv": argv, "uri": f"sqlite:///{root / 'mlflow.db'}"}


NET = "densenet-8-4-1111"  # what the cells' backbone is, in their names
CELLS = [f"{NET}-64-{h}-fold{f}-seed{s}" for h in ("gap", "wise") for f in (0, 1) for s in (0, 1)]


def test_parent_and_child_runs(study):
    client = MlflowClient(study["uri"])
    runs = client.search_runs([client.get_experiment_by_name("study").experiment_id])
    parent_id = (study["out"] / "parent_run_id").read_text().strip()
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(runs) == 9 and len(children) == 8
    assert client.get_run(parent_id).info.status == "FINISHED"  # the grid is done, and so is its parent run
    assert {r.info.run_name for r in children} == set(CELLS)
    assert all("eval_test_auc_shuffled" in r.data.metrics and "eval_test_auc_last_epoch" in r.data.metrics for r in children)
    # the held-out fold is evaluated after training only: one selected-model evaluation reaches MLflow per cell
    assert all(len(client.get_metric_history(r.info.run_id, "eval_test_auc")) == 1 for r in children)
    artifacts = {a.path for a in client.list_artifacts(parent_id, "summary")}
    assert {"summary/grid.json", "summary/summary.csv", "summary/summary.md", "summary/auc_by_head.png",
            "summary/val_curves.png"} <= artifacts


def held_out_auc(cell_dir) -> float:
    """scikit-learn's AUC of a two-class cell's held-out cases, read from its eval/cases.csv."""
    from sklearn.metrics import roc_auc_score

    with open(cell_dir / "eval" / "cases.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = [k[len("prob_"):] for k in rows[0] if k.startswith("prob_")]
    return roc_auc_score([classes.index(r["label"]) for r in rows], [float(r[f"prob_{classes[1]}"]) for r in rows])


def test_summary_and_paired_comparison(study):
    with open(study["out"] / "summary.csv") as f:
        rows = {r["head"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"gap", "wise"}
    assert rows["gap"]["auc_vs_gap"] == "" and rows["wise"]["auc_vs_gap"] != "" and rows["wise"]["cells"] == "4"
    # the corrected resampled t-test recomputed here, with scikit-learn's AUC on each cell's cases.csv and the cells'
    # case counts (Nadeau & Bengio: variance (1/J + n_test/n_train) s^2, t with J-1 degrees of freedom)
    differences = np.array([held_out_auc(study["out"] / name) - held_out_auc(study["out"] / name.replace("-wise-", "-gap-"))
                            for name in CELLS if "-wise-" in name])
    cells = [json.loads((study["out"] / name / "cell.json").read_text()) for name in CELLS if "-wise-" in name]
    n_train, n_test = np.mean([c["n_train"] for c in cells]), np.mean([c["n_test"] for c in cells])
    se = np.sqrt((1 / len(differences) + n_test / n_train) * differences.var(ddof=1))
    half = stats.t.ppf(0.975, len(differences) - 1) * se
    row = rows["wise"]
    assert float(row["auc_vs_gap"]) == pytest.approx(differences.mean(), abs=1e-6)
    assert float(row["auc_vs_gap_ci_high"]) - float(row["auc_vs_gap_ci_low"]) == pytest.approx(2 * half, abs=1e-6)
    if se > 0:
        p = 2 * stats.t.sf(abs(differences.mean() / se), len(differences) - 1)
        assert float(row["auc_vs_gap_p"]) == pytest.approx(p, abs=1e-6)
    assert float(row["auc_vs_gap_bootstrap_low"]) < float(row["auc_vs_gap_bootstrap_high"])
    # fold by fold, so the difference is the difference of the per-fold means
    assert float(rows["wise"]["auc_vs_gap"]) == pytest.approx(float(rows["wise"]["auc_mean"]) - float(rows["gap"]["auc_mean"]))
    assert int(rows["wise"]["head_params"]) > int(rows["gap"]["head_params"])
    summary = (study["out"] / "summary.md").read_text()
    assert "corrected t" in summary and "wise - gap, per fold x seed: f0s0" in summary
    assert f"torch {torch.__version__}" in summary and "MONAI " in summary and "MLflow " in summary  # what made the table
    for name in ("auc_by_head.png", "val_curves.png"):
        assert drawn(study["out"] / name)["coloured"] > 1e-4, name  # markers and curves in colour: empty axes have none
    cell = json.loads((study["out"] / CELLS[4] / "cell.json").read_text())
    assert len(cell["val_auc_curve"]) == 2 and cell["seed"] == 0 and len(cell["overrides_id"]) == 12
    assert drawn(study["out"] / CELLS[4] / "eval" / "diagnostics.png")["grey_levels"] > 64  # the mean input image


def test_inner_validation_never_holds_a_held_out_patient(study):
    folds = {}
    for name in CELLS:
        datalist = json.loads((study["out"] / name / "datalist.json").read_text())
        patients = {k: {i["patient"] for i in datalist[k]} for k in ("training", "validation", "test")}
        assert patients["test"] and patients["validation"] and patients["training"]
        assert not patients["test"] & (patients["validation"] | patients["training"])
        assert not patients["validation"] & patients["training"]
        folds.setdefault(name.split("-", 5)[-1].replace("wise-", "").replace("gap-", ""), []).append(patients["test"])
    assert all(a == b for a, b in folds.values())  # gap and wise are tested on the same patients
    assert folds["fold0-seed0"] != folds["fold0-seed1"]  # each seed draws its own folds


def test_a_study_folder_refuses_other_overrides(study):
    from wsr_med.errors import WsrMedError

    argv = [a if a != "max_epochs=2" else "max_epochs=3" for a in study["argv"]]
    with pytest.raises(WsrMedError, match="max_epochs: 2 -> 3"):
        ablation.main(argv)


def test_paired_difference_ignores_a_fold_shifted_scores(tmp_path):
    # both heads rank every case right in both folds; wise's fold-1 scores are all low (badly calibrated),
    # which pooled over folds would read as a worse AUC
    labels = ["a", "b", "a", "b"]
    scores = {("gap", 0): [0.2, 0.8, 0.3, 0.7], ("gap", 1): [0.2, 0.8, 0.3, 0.7],
              ("wise", 0): [0.2, 0.8, 0.3, 0.7], ("wise", 1): [0.01, 0.05, 0.02, 0.04]}
    cells = [ablation.Cell("net", 64, "wise", fold) for fold in (0, 1)]
    for (head, fold), probs in scores.items():
        cases = tmp_path / ablation.Cell("net", 64, head, fold).name / "eval" / "cases.csv"
        cases.parent.mkdir(parents=True)
        rows = [f"f{fold}_{i}.png,{y},{1 - p},{p}" for i, (y, p) in enumerate(zip(labels, probs))]
        cases.write_text("\n".join(["path,label,prob_a,prob_b", *rows]) + "\n")
    assert ablation.paired_difference(tmp_path, cells, "wise", n_boot=50) == (0.0, 0.0, 0.0)


def test_gap_is_blind_to_shuffled_positions(study):
    for name in CELLS[:4]:
        cell = json.loads((study["out"] / name / "cell.json").read_text())
        assert cell["auc_shuffled"] == pytest.approx(cell["auc"], abs=1e-6)


def test_trained_wise_head_sees_positions(study):
    # the cell's folder alone says which network and preprocessing it was trained with
    net, images, labels, _ = ablation.load_cell(study["out"] / CELLS[4], str(study["out"] / "cache"))
    assert images.shape[1:] == (1, 64, 64) and net.head.compression.depthwise.weight.shape[-1] > 1
    with torch.no_grad():
        plain = net(images)
    shuffled = logits_with_shuffled_positions(net, images, torch.Generator().manual_seed(0))
    assert not torch.allclose(plain, shuffled, atol=1e-5)


def test_resume_skips_finished_cells(study, caplog):
    cells = sorted(study["out"].glob("*/cell.json"))
    before = [p.stat().st_mtime_ns for p in cells]
    caplog.set_level("INFO")
    ablation.main(study["argv"])
    assert [p.stat().st_mtime_ns for p in cells] == before
    assert caplog.text.count("skipping finished cell") == 8
    client = MlflowClient(study["uri"])
    assert len(client.search_runs([client.get_experiment_by_name("study").experiment_id])) == 9


def test_summary_only_trains_nothing(study):
    """``--summary-only`` on a larger grid: the finished cells' summary, no new cell."""
    (study["out"] / "summary.md").unlink()
    argv = list(study["argv"])
    argv.insert(argv.index("wise") + 1, "flatten")  # --heads gap wise flatten
    ablation.main(argv + ["--summary-only"])
    assert not list(study["out"].glob("*-flatten-*"))
    summary = (study["out"] / "summary.md").read_text()
    assert "| wise | 4 |" in summary and "| flatten |" not in summary
    assert "**Partial: 4 of the grid's 12 cells have not finished**" in summary
    assert f"{NET}-64-flatten-fold1-seed1" in summary


def test_shuffle_leaves_gap_logits_unchanged():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 64, 64)
    kwargs = {"img_size": 64, "backbone_kwargs": {"init_features": 8, "growth_rate": 4, "block_config": [1, 1, 1, 1]}}
    gap = WiseSrNet(head="gap", **kwargs).eval()
    with torch.no_grad():
        np.testing.assert_allclose(gap(x).numpy(), logits_with_shuffled_positions(gap, x).numpy(), atol=1e-6)


def test_gradcam_is_hottest_where_the_class_score_depends_most():
    """MONAI's default post-processing flips Grad-CAM (max -> 0); ``gradcam`` keeps max -> 1."""
    from monai.visualize import GradCAM

    torch.manual_seed(0)
    net = WiseSrNet(head="wise", img_size=64, out_channels=2,
                    backbone_kwargs={"init_features": 8, "growth_rate": 4, "block_config": [1, 1, 1, 1]}).eval()
    x = torch.rand(2, 1, 64, 64)
    heat = gradcam(net, x, class_idx=1)
    raw = GradCAM(nn_module=net, target_layers=gradcam_layer(net), postprocessing=lambda h: h)(x, class_idx=1).detach()
    assert heat.shape == (2, 1, 64, 64) and heat.amin() == 0 and heat.amax() == 1
    for h, r in zip(heat, raw):
        assert r.flatten()[h.argmax()] == r.max() and r.flatten()[h.argmin()] == r.min()
        np.testing.assert_allclose(h.numpy(), ((r - r.min()) / (r.max() - r.min())).numpy(), atol=1e-5)


def test_paper_size_study_runs_its_path_on_a_cpu(tmp_path):
    """wsr-med ablate-paper --tiny: cache warmed first, then gap vs wise under the ablation's protocol."""
    from wsr_med.pipelines import paper_size

    data = make_synthetic_folder(tmp_path / "data", n_per_class=12, image_size=64, n_classes=3)
    out = tmp_path / "paper"
    paper_size.main(["--tiny", "--dataset-dir", str(data), "--output-dir", str(out), "--max-epochs", "1", "--seeds", "0",
                     "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    entries = len(list((out / "cache").glob("*.cache")))
    assert entries == 2 * 36  # every scan, for the training and the validation transforms
    with open(out / "summary.csv") as f:
        rows = {r["head"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"gap", "wise"} and rows["wise"]["cells"] == "2" and rows["wise"]["network"] == "densenet-8-4-1111"
    assert len(list((out / "cache").glob("*.cache"))) == entries  # training found every scan in the warmed cache


# ---------------------------------------------------------------- a study spread over processes


def _ablate(home, name, *extra):
    """``wsr-med ablate`` on the seed-0 half of the ``study`` grid, started from ``home``, logging to ``<name>.log``."""
    import subprocess
    import sys
    from pathlib import Path

    argv = [str(Path(sys.executable).parent / "wsr-med"), "ablate", "--dataset-dir", "data", "--output-dir", "spread",
            "--tracking-uri", "sqlite:///spread.db", "--heads", "gap", "wise", "--sizes", "64", "--folds", "2",
            "--seeds", "0", "--experiment-name", "spread", *extra, "--set", *TINY]
    return subprocess.Popen(argv, cwd=home, stdout=open(home / f"{name}.log", "w"), stderr=subprocess.STDOUT, text=True)


def _summary(out):
    with open(out / "summary.csv") as f:
        return {r["head"]: {k: v for k, v in r.items() if k != "seconds_per_epoch"} for r in csv.DictReader(f)}


def test_shards_and_workers_make_the_one_process_study_and_a_killed_worker_leaves_its_cell_to_the_rerun(study, tmp_path):
    """Shard 1/2 in two worker processes and shard 2/2 in one, at once, the started worker killed in the middle of a cell,
    then shard 1/2 again: the summary is the one the ``study`` fixture's single process gives for these cells."""
    import argparse
    import os
    import re
    import shutil
    import signal
    import time

    make_synthetic_folder(tmp_path / "data", n_per_class=12, image_size=64, n_classes=2)  # the study's data
    first, second = _ablate(tmp_path, "shard1", "--shard", "1/2", "--workers", "2"), _ablate(tmp_path, "shard2", "--shard", "2/2")
    out, killed, deadline = tmp_path / "spread", None, time.monotonic() + 600
    while killed is None and time.monotonic() < deadline and first.poll() is None:
        for pid, cell in re.findall(r"worker pid (\d+) runs cell (\S+)", (tmp_path / "shard1.log").read_text()):
            if int(pid) != first.pid and (out / cell / "eval").is_dir() and not (out / cell / "cell.json").exists():
                os.kill(int(pid), signal.SIGKILL)  # trained, evaluating: the cell has not finished
                killed = cell
                break
        time.sleep(0.05)
    assert killed, "no worker was caught in the middle of a cell"
    assert first.wait(timeout=900) != 0 and second.wait(timeout=900) == 0, (tmp_path / "shard2.log").read_text()[-3000:]
    log = (tmp_path / "shard1.log").read_text()
    assert f"{killed}: its worker process ended" in log and "Run the same command again" in log
    assert not (out / killed / "cell.json").exists() and len(list(out.glob("*/cell.json"))) == 3  # the others went on
    rerun = _ablate(tmp_path, "rerun", "--shard", "1/2", "--workers", "2")
    assert rerun.wait(timeout=900) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    assert "skipping finished cell" in (tmp_path / "rerun.log").read_text()

    reference = tmp_path / "one"  # the same four cells, trained by the study fixture's single process
    cells = [ablation.Cell("densenet121", 64, h, f, 0, NET) for h in ("gap", "wise") for f in (0, 1)]
    for cell in cells:
        shutil.copytree(study["out"] / cell.name, reference / cell.name)
    done, results = ablation.finished_results(cells, argparse.Namespace(output_dir=str(reference), tracking_uri=study["uri"]))
    ablation.summarise(reference, results, done)
    spread, one = _summary(out), _summary(reference)
    assert spread.keys() == one.keys() == {"gap", "wise"} and spread["wise"]["cells"] == "2"
    for head in one:
        for key, value in one[head].items():
            try:
                assert float(spread[head][key]) == pytest.approx(float(value), abs=1e-6), (head, key)
            except ValueError:
                assert spread[head][key] == value, (head, key)
    client = MlflowClient(f"sqlite:///{tmp_path / 'spread.db'}")
    runs = client.search_runs([client.get_experiment_by_name("spread").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 5  # one parent run for every process, four cells under it
    assert {r.data.tags["mlflow.parentRunId"] for r in runs if r not in parents} == {parents[0].info.run_id}
