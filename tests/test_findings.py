"""Multi-label label files as datasets ship them (NIH ChestX-ray14, CheXpert-style), the generated set that needs no
download, and patient-level splits over findings."""

import csv
import shutil
from pathlib import Path

import pytest

from test_cli import ok, refused, wsr_med
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


def test_a_value_that_is_no_label_names_its_line_and_column(findings_set, tmp_path):
    rows = _rows(findings_set / "chexpert.csv")
    rows[3]["effusion"] = "probable"
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(WsrMedError, match=r"line 5, column 'effusion': 'probable' is not a label"):
        read_label_file(bad)
    nih_rows = _rows(findings_set / "Data_Entry_2017.csv")
    nih_rows[1]["Finding Labels"] = ""
    nih = tmp_path / "Data_Entry_2017.csv"
    with open(nih, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(nih_rows[0]))
        writer.writeheader()
        writer.writerows(nih_rows)
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


def test_training_on_a_label_file_is_refused_in_one_line_for_now(findings_set):
    home = findings_set.parent
    refused(wsr_med(home, "train", "--dataset-dir", "chest/chexpert.csv", "--output-dir", "runs/ml", "--set",
                    "image_size=48", "num_workers=0"),
            "multi-label file (4 findings: nodule, pneumothorax, effusion, cardiomegaly)", "cannot train multi-label")
    assert not (home / "runs/ml/config.json").exists()
