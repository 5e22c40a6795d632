"""Multi-label label files as datasets ship them (NIH ChestX-ray14, CheXpert-style), the generated set that needs no
download, and patient-level splits over findings."""

import csv
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_cli import SMALL, ok, refused, wsr_med
from wsr_med.data import read_label_file, scan_manifest, split_items
from wsr_med.errors import WsrMedError


@pytest.fixture(scope="module")
def findings_set(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("findings")
    result = ok(wsr_med(home, "synth", "chest", "--multilabel", "--n-per-class", "60", "--image-size", "48"))
    assert "Data_Entry_2017.csv" in result.stdout and "chexpert.csv" in result.stdout
    return home / "chest"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_both_layouts_are_recognised_and_agree(findings_set):
    nih = read_label_file(findings_set / "Data_Entry_2017.csv")
    chexpert = read_label_file(findings_set / "chexpert.csv", uncertain="ignore")
    assert nih.layout == "nih" and chexpert.layout == "chexpert"
    assert sorted(chexpert.findings) == nih.findings == ["cardiomegaly", "effusion", "nodule", "pneumothorax"]
    assert (nih.root / nih.items[0]["image"]).is_file() and (chexpert.root / chexpert.items[0]["image"]).is_file()
    truth = {i["image"]: dict(zip(nih.findings, i["label"])) for i in nih.items}
    masked = 0
    for item in chexpert.items:
        for finding, value in zip(chexpert.findings, item["label"]):
            if value is None:
                masked += 1
            else:  # a certain label, blank or not, is the truth the image was drawn with
                assert value == truth[Path(item["image"]).name][finding], (item, finding)
    assert masked == chexpert.n_uncertain > 0
    assert {len({tuple(i["label"]) for i in nih.items})} != {1} and any(sum(i["label"]) >= 2 for i in nih.items)


@pytest.mark.parametrize("policy, value", [("zeros", 0.0), ("ones", 1.0), ("ignore", None)])
def test_uncertain_labels_follow_the_setting(findings_set, policy, value):
    rows = _rows(findings_set / "chexpert.csv")
    line, column = next((n, c) for n, r in enumerate(rows) for c in ("nodule", "effusion") if r[c] == "-1")
    labels = read_label_file(findings_set / "chexpert.csv", uncertain=policy)
    assert labels.items[line]["label"][labels.findings.index(column)] == value
    with pytest.raises(WsrMedError, match="uncertain='maybe' is not one of: ignore, zeros, ones"):
        read_label_file(findings_set / "chexpert.csv", uncertain="maybe")


def _with(source: Path, target: Path, line: int, column: str, value: str) -> Path:
    """``source`` copied to ``target`` with the value of ``column`` on data row ``line`` (0-based) replaced."""
    rows = _rows(source)
    rows[line][column] = value
    with open(target, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return target


def test_a_value_that_is_no_label_names_its_line_and_column(findings_set, tmp_path):
    with pytest.raises(WsrMedError, match=r"line 5, column 'effusion': 'probable' is not a label"):
        read_label_file(_with(findings_set / "chexpert.csv", tmp_path / "bad.csv", 3, "effusion", "probable"))
    nih = _with(findings_set / "Data_Entry_2017.csv", tmp_path / "Data_Entry_2017.csv", 1, "Finding Labels", "")
    with pytest.raises(WsrMedError, match=r"line 3, column 'Finding Labels': empty"):
        read_label_file(nih)


def test_findings_picked_and_renamed_and_images_found_where_datasets_put_them(findings_set, tmp_path):
    picked = read_label_file(findings_set / "chexpert.csv", findings={"effusion": "Pleural Effusion", "nodule": "Nodule"})
    assert picked.findings == ["Pleural Effusion", "Nodule"] and all(len(i["label"]) == 2 for i in picked.items)
    with pytest.raises(WsrMedError, match=r"findings \['Mass'\] are not among"):
        read_label_file(findings_set / "Data_Entry_2017.csv", findings=["Mass"])
    # NIH images directly beside the CSV; CheXpert paths relative to the CSV's parent, as CheXpert ships them
    flat = tmp_path / "flat"
    shutil.copytree(findings_set / "images", flat)
    shutil.copy(findings_set / "Data_Entry_2017.csv", flat)
    nih = read_label_file(flat / "Data_Entry_2017.csv")
    assert nih.root == flat and (flat / nih.items[0]["image"]).is_file()
    (tmp_path / "CheXpert-v1.0").mkdir()
    shutil.copy(findings_set / "chexpert.csv", tmp_path / "CheXpert-v1.0" / "train.csv")
    shutil.copytree(findings_set / "images", tmp_path / "images")
    shipped = read_label_file(tmp_path / "CheXpert-v1.0" / "train.csv")
    assert shipped.root == tmp_path and (tmp_path / shipped.items[0]["image"]).is_file()


def test_patient_level_split_over_findings(findings_set):
    scan = scan_manifest(findings_set / "chexpert.csv", num_workers=0, uncertain="ignore")
    assert scan.multilabel and scan.classes == ["nodule", "pneumothorax", "effusion", "cardiomegaly"]
    assert all(v > 0 for v in scan.class_counts.values())
    splits = split_items(scan.items, val_fraction=0.2, test_fraction=0.2, seed=0)
    patients = {name: {i["patient"] for i in items} for name, items in splits.items()}
    assert not patients["training"] & patients["validation"] and not patients["training"] & patients["test"]
    assert sum(len(v) for v in splits.values()) == len(scan.items)
    for name, items in splits.items():  # every finding has positives in every split of a 60-image set
        assert all(sum(i["label"][k] == 1.0 for i in items) > 0 for k in range(4)), name


@pytest.fixture(scope="module")
def multilabel_run(findings_set) -> dict:
    """The README's loop on the CheXpert-style file with no task setting: train, evaluate the test split, predict."""
    home = findings_set.parent
    train = ok(wsr_med(home, "train", "--dataset-dir", "chest/chexpert.csv", "--output-dir", "runs/ml", "--set",
                       "image_size=48", SMALL, "max_epochs=2", "batch_size=8", "learning_rate=0.01", "uncertain=ignore",
                       "num_workers=0", "progress_bar=false"))
    ok(wsr_med(home, "evaluate", "--output-dir", "runs/ml", "--eval-split", "test"))
    (home / "new").mkdir(exist_ok=True)
    for scan in sorted((findings_set / "images").glob("*.png"))[:5]:
        shutil.copy(scan, home / "new" / scan.name)
    ok(wsr_med(home, "predict", "--output-dir", "runs/ml", "--dataset-dir", "new"))
    return {"home": home, "run": home / "runs/ml", "train": train, "uri": f"sqlite:///{home / 'mlflow.db'}"}


def test_a_multilabel_model_trains_and_calibrates_per_finding(multilabel_run):
    import json

    from mlflow import MlflowClient

    run = multilabel_run["run"]
    assert json.loads((run / "config.json").read_text())["task"] == "multilabel"
    findings = json.loads((run / "classes.json").read_text())
    assert findings == ["nodule", "pneumothorax", "effusion", "cardiomegaly"]
    decision = json.loads((run / "calibration.json").read_text())["decision"]
    assert list(decision["findings"]) == findings and decision["fitted_on"].startswith("validation split")
    client = MlflowClient(multilabel_run["uri"])
    run_id = (run / "mlflow_run_id").read_text()
    for name in ["val_auc", *[f"val_auc_{f}" for f in findings]]:
        assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2], name
    assert "eval_test_macro_auc" in client.get_run(run_id).data.metrics


def test_the_multilabel_report_is_per_finding(multilabel_run):
    import json

    eval_dir = multilabel_run["run"] / "eval"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["split"] == "test"
    assert set(metrics["per_finding"]) == {"nodule", "pneumothorax", "effusion", "cardiomegaly"}
    aucs = [metrics["per_finding"][f]["auc"] for f in metrics["by_auc"]]
    assert aucs == sorted(aucs, reverse=True)
    html = (eval_dir / "report.html").read_text()
    assert "macro AUC (mean of the findings&#x27; AUCs)" in html and "micro AUC (every labelled finding" in html
    rows = [html.index(f"<tr><td>{f}</td>") for f in metrics["by_auc"]]
    assert rows == sorted(rows)  # the table, best AUC first
    with open(eval_dir / "cases.csv", newline="") as f:
        cases = list(csv.DictReader(f))
    assert len(cases) == metrics["n"] and {"label_nodule", "prob_nodule"} <= set(cases[0])
    masked = sum(metrics["per_finding"][f]["masked"] for f in metrics["findings"])
    assert masked == sum(row[f"label_{f}"] == "" for row in cases for f in metrics["findings"])


def test_multilabel_predictions_served_and_exported_alike(multilabel_run):
    import base64
    import json

    home, run = multilabel_run["home"], multilabel_run["run"]
    predictions = _rows(run / "predictions.csv")
    findings = ["nodule", "pneumothorax", "effusion", "cardiomegaly"]
    assert len(predictions) == 5
    for row in predictions:
        present = [f for f in findings if row[f"present_{f}"] == "yes"]
        assert row["findings"] == ("|".join(present) or "none") and row["decision_rule"].startswith("per finding")
    from test_leaks import Server

    server = Server(home, model="models:/wsr_med-nodule-pneumothorax-effusion-cardiomegaly/1")
    try:  # wsr-med serve, over HTTP: the same findings and probabilities as wsr-med predict
        served = server.answer({"dataframe_records": [
            {"bytes": base64.b64encode((home / "new" / row["path"]).read_bytes()).decode()} for row in predictions]})
    finally:
        server.stop()
    for row, answer in zip(predictions, served):
        assert answer["findings"] == row["findings"] and "predicted_class" not in answer
        assert all(abs(answer[f"prob_{f}"] - float(row[f"prob_{f}"])) < 1e-5 for f in findings)
    ok(wsr_med(home, "export-bundle", "--output-dir", "runs/ml", "--bundle-dir", "exported/ml"))
    bundle = home / "exported/ml"
    metadata = json.loads((bundle / "configs/metadata.json").read_text())
    assert metadata["task"].startswith("Multi-label") and "macro_auc" in metadata["eval_metrics"]
    assert "applies a sigmoid to each" in (bundle / "docs/README.md").read_text()
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                           "--dataset_dir", str(home / "new"), "--num_workers", "0"], cwd=bundle, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    exported = _rows(bundle / "eval/predictions.csv")
    assert [r["findings"] for r in exported] == [r["findings"] for r in predictions]


def test_nih_file_trains_as_downloaded(findings_set):
    home = findings_set.parent
    ok(wsr_med(home, "train", "--dataset-dir", "chest/Data_Entry_2017.csv", "--output-dir", "runs/nih", "--set",
               "image_size=48", SMALL, "max_epochs=1", "num_workers=0", "progress_bar=false", "--tracking-uri", "none"))
    import json

    assert json.loads((home / "runs/nih/classes.json").read_text()) == ["cardiomegaly", "effusion", "nodule", "pneumothorax"]
    refused(wsr_med(home, "train", "--dataset-dir", "chest/chexpert.csv", "--output-dir", "runs/sampled", "--set",
                    "class_balance=sampler", "num_workers=0", "--tracking-uri", "none"), "use class_balance=weighted_loss")


def test_multilabel_metrics_by_hand():
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from wsr_med.metrics.multilabel import fit_finding_decisions, multilabel_metrics

    rng = np.random.default_rng(0)
    labels = (rng.random((200, 3)) < [0.3, 0.5, 0.04]).astype(float)
    probs = np.clip(labels * 0.4 + rng.random((200, 3)) * 0.6, 0, 1)
    labels[:20, 0] = np.nan  # masked: takes no part in finding 0's figures
    probs[:20, 0] = 1 - labels[:20, 1]  # nonsense scores where masked: would change the AUC if counted
    m = multilabel_metrics(labels, probs, ["a", "b", "c"], {"a": 0.5}, n_boot=200)
    known = ~np.isnan(labels[:, 0])
    assert m["per_finding"]["a"]["auc"] == pytest.approx(roc_auc_score(labels[known, 0], probs[known, 0]))
    assert m["per_finding"]["a"]["masked"] == 20 and m["per_finding"]["a"]["n"] == 180
    aucs = [roc_auc_score(labels[~np.isnan(labels[:, k]), k], probs[~np.isnan(labels[:, k]), k]) for k in range(3)]
    assert m["macro_auc"] == pytest.approx(np.mean(aucs))
    pooled = ~np.isnan(labels)
    assert m["micro_auc"] == pytest.approx(roc_auc_score(labels[pooled], probs[pooled]))
    low, high = m["macro_auc_ci95"]
    assert low < m["macro_auc"] < high and m["by_auc"] == sorted("abc", key=lambda f: -m["per_finding"][f]["auc"])
    assert any(w.startswith("c: only") for w in m["warnings"])  # 4% of 200: a handful of positives, said
    sens, low, high = m["per_finding"]["a"]["sensitivity"]
    positive, called = labels[known, 0] == 1, probs[known, 0] >= 0.5
    assert sens == pytest.approx((called & positive).sum() / positive.sum()) and low <= sens <= high
    decisions = fit_finding_decisions(labels, probs, ["a", "b", "c"])
    assert all(d["fitted"] and 0 < d["threshold"] < 1 for d in decisions.values())


def test_masked_loss_ignores_masked_labels_and_weights_positives():
    import torch

    from wsr_med.workflows.losses import MaskedBCEWithLogitsLoss, finding_pos_weight

    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]], requires_grad=True)
    labels = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    loss = MaskedBCEWithLogitsLoss()(logits, labels)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.stack([logits[0, 0], logits[1, 0], logits[1, 1]]), torch.tensor([1.0, 0.0, 1.0]))
    assert torch.isclose(loss, expected)
    loss.backward()
    assert logits.grad[0, 1] == 0 and torch.isfinite(logits.grad).all()  # no gradient from a masked label
    weight = finding_pos_weight([[1.0, 0.0], [0.0, None], [0.0, 1.0], [0.0, 0.0]])
    assert weight.tolist() == [3.0, 2.0]
    weighted = MaskedBCEWithLogitsLoss(weight)(logits.detach(), labels)
    assert weighted > loss


def test_ablation_compares_heads_by_macro_auc_and_lists_findings(findings_set):
    import json

    home = findings_set.parent
    ok(wsr_med(home, "ablate", "--dataset-dir", "chest/chexpert.csv", "--output-dir", "study", "--heads", "gap", "wise",
               "--sizes", "48", "--folds", "2", "--seeds", "0", "--tracking-uri", f"sqlite:///{home / 'study.db'}",
               "--set", "image_size=48", SMALL, "max_epochs=2", "batch_size=8", "learning_rate=0.01", "uncertain=ignore",
               "num_workers=0", "progress_bar=false", timeout=1200))
    cell = next((home / "study").glob("*-wise-fold0-seed0"))
    result = json.loads((cell / "cell.json").read_text())
    assert result["auc"] == json.loads((cell / "eval" / "metrics.json").read_text())["macro_auc"]
    summary = (home / "study" / "summary.md").read_text()
    line = next(x for x in summary.splitlines() if "wise - gap, per finding" in x)
    assert all(f in line for f in ("nodule", "pneumothorax", "effusion", "cardiomegaly"))
    with open(home / "study" / "summary.csv", newline="") as f:
        rows = {r["head"]: r for r in csv.DictReader(f)}
    assert rows["wise"]["auc_vs_gap"] != "" and float(rows["gap"]["auc_mean"]) == float(rows["gap"]["auc_mean"])


def test_other_layouts_with_task_multilabel_and_picked_findings(findings_set, tmp_path):
    """A path,label manifest with |-joined findings is multi-label when task=multilabel; findings picks the outputs."""
    import json

    home = findings_set.parent
    rows = _rows(findings_set / "Data_Entry_2017.csv")
    with open(findings_set / "joined.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "patient_id"])
        writer.writerows([[f"images/{r['Image Index']}", "" if r["Finding Labels"] == "No Finding" else r["Finding Labels"],
                           r["Patient ID"]] for r in rows])
    refused(wsr_med(home, "train", "--dataset-dir", "chest/chexpert.csv", "--output-dir", "runs/x", "--set",
                    "task=multiclass", "--tracking-uri", "none"), "is a multi-label file", "task=multiclass")
    ok(wsr_med(home, "train", "--dataset-dir", "chest/joined.csv", "--output-dir", "runs/joined", "--set", "task=multilabel",
               "findings=['effusion','nodule']", "image_size=48", SMALL, "max_epochs=1", "num_workers=0",
               "progress_bar=false", "--tracking-uri", "none"))
    run = home / "runs/joined"
    assert json.loads((run / "classes.json").read_text()) == ["effusion", "nodule"]
    assert json.loads((run / "config.json").read_text())["task"] == "multilabel"
    # the findings the run picked are picked again: the user passes only the data
    ok(wsr_med(home, "evaluate", "--output-dir", "runs/joined", "--dataset-dir", "chest/joined.csv", "--tracking-uri", "none"))
    assert set(json.loads((run / "eval/metrics.json").read_text())["per_finding"]) == {"effusion", "nodule"}


def test_a_collapse_is_checked_per_finding():
    from types import SimpleNamespace

    import numpy as np

    from wsr_med.handlers import CollapseMonitor

    monitor = CollapseMonitor(["nodule", "effusion"])
    monitor.probs = [np.array([0.3, 0.5]), np.array([0.7, 0.5]), np.array([0.4, 0.5])]
    monitor.finish(SimpleNamespace(state=SimpleNamespace(epoch=1)))
    assert "effusion" in monitor.warning and "nodule" not in monitor.warning
    whole = CollapseMonitor()  # single-label: the spread over classes, as before
    whole.probs = monitor.probs
    whole.finish(SimpleNamespace(state=SimpleNamespace(epoch=1)))
    assert whole.warning is None


def test_finding_reliability_is_probability_against_frequency():
    import numpy as np

    from wsr_med.metrics.multilabel import finding_calibration

    labels = np.array([[1.0], [0.0], [0.0], [0.0], [1.0], [1.0], [1.0], [0.0]])
    probs = np.array([[0.05], [0.05], [0.05], [0.05], [0.95], [0.95], [0.95], [0.95]])
    c = finding_calibration(labels, probs, probs, ["a"])["a"]
    # the low bin holds 1 of 4 with the finding at p 0.05, the high bin 3 of 4 at p 0.95: ECE = 0.2 either side
    assert c["reliability"]["accuracy"][0] == 0.25 and c["reliability"]["accuracy"][9] == 0.75
    assert abs(c["ece_after"] - 0.2) < 1e-9


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_pneumonia"


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_a_chexpert_style_file_over_real_radiographs(tmp_path):
    """Real full-resolution chest X-rays (8-bit and RGB JPEGs) listed CheXpert-style: two findings, pneumonia and its viral
    kind (blank for normal scans: not mentioned), some uncertain; read, decoded, and split by patient."""
    with open(SHARED / "labels_3class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    picked = [r for r in rows if r["label"] == "normal"][:8] + [r for r in rows if r["label"] != "normal"][:16]
    with open(tmp_path / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Path", "Patient", "Sex", "Pneumonia", "Viral"])
        for n, r in enumerate(picked):
            viral = "" if r["label"] == "normal" else ("-1" if n % 7 == 0 else str(int(r["label"] == "viral")))
            writer.writerow([str(SHARED / r["path"]), r["patient_id"], "M", str(int(r["label"] != "normal")), viral])
    scan = scan_manifest(tmp_path / "train.csv", num_workers=0, uncertain="ignore")
    assert scan.multilabel and scan.classes == ["Pneumonia", "Viral"] and not scan.bad_files
    assert len(scan.items) == 24 and scan.class_counts["Pneumonia"] == 16
    masked = sum(i["label"][1] is None for i in scan.items)
    assert masked == sum(1 for n, r in enumerate(picked) if r["label"] != "normal" and n % 7 == 0) > 0
    splits = split_items(scan.items, val_fraction=0.25, test_fraction=0.25, seed=0)
    patients = [{i["patient"] for i in items} for items in splits.values()]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])


# --- which epoch a multi-label run keeps ------------------------------------------------------------------------
def _validation(labels):
    return SimpleNamespace(multilabel=True, classes=["effusion", "nodule", "rare"],
                           validation=[{"label": list(row)} for row in labels])


def test_a_finding_with_two_validation_positives_does_not_choose_the_model():
    """Epoch A ranks the two frequent findings well and the rare one (2 positives) badly; epoch B the reverse. The
    macro AUC over every finding keeps B; the selection keeps A, and says which findings chose."""
    import numpy as np

    from wsr_med.metrics.multilabel import macro_auc, selection_auc
    from wsr_med.workflows import ModelSelection

    rng = np.random.default_rng(0)
    labels = np.zeros((40, 3))
    labels[:20, 0] = labels[10:30, 1] = 1.0
    labels[[3, 17], 2] = 1.0

    def epoch(frequent_signal: float, rare_right: bool) -> np.ndarray:
        probs = rng.random((40, 3)) * (1 - frequent_signal) + labels * frequent_signal
        probs[:, 2] = rng.random(40) * 0.5 + (0.5 if rare_right else -0.5) * labels[:, 2] + 0.25
        return probs

    a, b = epoch(0.3, rare_right=False), epoch(0.05, rare_right=True)
    assert macro_auc(labels, b) > macro_auc(labels, a)  # today's rule keeps B
    selection = ModelSelection.of(_validation(labels))
    assert selection.findings == ("effusion", "nodule") and selection.left_out == {"rare": "2 positive and 38 negative cases"}
    for average in ("macro", "micro", "weighted"):
        assert selection_auc(labels, a, list(selection.indices), average) > \
            selection_auc(labels, b, list(selection.indices), average), average
    assert "chosen on the macro validation AUC" in selection.describe() and "rare: 2 positive" in selection.describe()
    loss = ModelSelection.of(_validation(labels), min_cases=25)
    assert loss.metric == "val_neg_loss" and loss.findings == () and "validation loss" in loss.describe()
    single = ModelSelection.of(SimpleNamespace(multilabel=False))
    assert single.metric == "val_auc" and single.to_dict() == {}


def test_the_findings_that_chose_the_model_are_said_and_recorded(tmp_path):
    """Through wsr-med: the scan-time line, best.json, MLflow (run tag, registered version tag) and the report name the
    selecting findings; the rare finding (a handful of positives in all) is monitored, not selecting."""
    import json

    import numpy as np
    from mlflow import MlflowClient

    ok(wsr_med(tmp_path, "synth", "chest", "--multilabel", "--n-per-class", "150", "--image-size", "48"))
    rows = _rows(tmp_path / "chest" / "chexpert.csv")
    rare = set(np.random.default_rng(1).choice(len(rows), 6, replace=False).tolist())
    with open(tmp_path / "chest" / "rare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, [*rows[0], "rare"])
        writer.writeheader()
        writer.writerows({**row, "rare": "1" if k in rare else "0"} for k, row in enumerate(rows))
    result = ok(wsr_med(tmp_path, "train", "--dataset-dir", "chest/rare.csv", "--output-dir", "runs/rare", "--set",
                        "image_size=48", SMALL, "max_epochs=2", "batch_size=16", "num_workers=0", "progress_bar=false",
                        "registered_model_name=rare"))
    output = result.stdout + result.stderr
    said = [line for line in output.splitlines() if "the best epoch is chosen on" in line]
    assert len(said) == 1 and "rare: " in said[0] and "monitored, not selecting" in said[0], output[-3000:]
    best = json.loads((tmp_path / "runs/rare/best.json").read_text())
    assert best["metric"] == "val_auc" and "rare" in best["selection"]["left_out"]
    assert json.loads((tmp_path / "runs/rare/config.json").read_text())["model_selection"] == best["selection"]
    assert best["selection"]["findings"] and "rare" not in best["selection"]["findings"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("wsr_med").experiment_id])
    assert run.data.tags["model_selection"] == best["selection"]["rule"] and "val_auc_rare" in run.data.metrics
    version = client.get_model_version("rare", "1")
    assert version.tags["selected_on"].startswith("macro AUC of ") and "rare" not in version.tags["selected_on"]
    ok(wsr_med(tmp_path, "evaluate", "--output-dir", "runs/rare", "--eval-split", "test"))
    assert "model selection" in (tmp_path / "runs/rare/eval/report.html").read_text()
