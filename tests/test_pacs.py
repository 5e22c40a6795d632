"""PACS in, PACS out, through ``wsr-med predict`` against a real Orthanc (started here on 127.0.0.1) and a DICOM folder;
every SR and Secondary Capture checked by ``dciodvfy`` (dicom3tools) and ``dsrdump`` (dcmtk), probabilities read back
with highdicom and compared with plain ``wsr-med predict`` on the same files.

Orthanc, dciodvfy and dsrdump are Debian packages that ``.ci/run`` installs; where they are missing the tests skip,
except under CI=true, where they fail.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from hostile_archive import MODES, HostileArchive
from hostile_files import deflated_bomb_dicom
from test_cli import SMALL, WSR_MED, ok, refused
from wsr_med.pacs import ClassCodes, ModelIdentity, Selection, classification_sr, read_sr_probabilities
from wsr_med.pacs.archive import AUTH_ENV
from wsr_med.pacs.orthanc import LocalOrthanc, orthanc_available
from wsr_med.pacs.results import NOT_FOR_CLINICAL_USE, result_uid
from wsr_med.runs import RunFolder

QUIET = ["num_workers=0", "progress_bar=false"]
NEEDED = {"Orthanc (orthanc, orthanc-dicomweb)": orthanc_available(), "dciodvfy (dicom3tools)": bool(shutil.which("dciodvfy")),
          "dsrdump (dcmtk)": bool(shutil.which("dsrdump"))}


def _require_tools() -> None:
    missing = [name for name, there in NEEDED.items() if not there]
    if missing:
        message = f"not installed: {', '.join(missing)} (.ci/run installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def run(home: Path, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WSR_MED_DICOMWEB"))}
    return subprocess.run([str(WSR_MED), *args], cwd=home, capture_output=True, text=True, timeout=timeout,
                          env={**base, **(env or {})})


# Forks wsr-med from a small process and reports its peak resident memory: a child forked from the test process itself
# would inherit the test's own high-water mark (Linux keeps it across exec).
_MEASURED = ("import os, sys\npid = os.fork()\nif pid == 0:\n    os.execv(sys.argv[1], sys.argv[1:])\n"
             "_, status, usage = os.wait4(pid, 0)\nprint(f'PEAK_KIB {usage.ru_maxrss}', file=sys.stderr)\n"
             "sys.exit(os.waitstatus_to_exitcode(status))")


def run_measured(home: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float, float]:
    """``run``, and the wsr-med process's own peak resident memory (MiB) and its wall time (s)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WSR_MED_DICOMWEB"))}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", _MEASURED, str(WSR_MED), *args], cwd=home, capture_output=True,
                            text=True, timeout=600, env={**base, **(env or {})})
    seconds = time.monotonic() - started
    stderr, _, peak = result.stderr.rstrip().rpartition("PEAK_KIB ")
    result.stderr = stderr
    return result, int(peak) / 1024, seconds


def valid(path: Path) -> None:
    """dciodvfy finds no error in the object; an SR also renders with dsrdump."""
    checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
    assert not errors, f"{path.name}: {errors}"
    if pydicom.dcmread(path, stop_before_pixels=True).Modality == "SR":
        dumped = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True)
        assert dumped.returncode == 0 and "Imaging Measurement Report" in dumped.stdout, dumped.stderr
        assert NOT_FOR_CLINICAL_USE in dumped.stdout


def _content(ds: pydicom.Dataset, value_type: str) -> list[pydicom.Dataset]:
    """Every SR content item of ``value_type`` (SCOORD, TEXT, ...) in ``ds``, at any depth."""
    found = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == value_type:
            found.append(item)
        found += _content(item, value_type)
    return found


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A small binary model trained as the README says, on a synthetic folder of DICOM files only (one study each)."""
    _require_tools()
    home = tmp_path_factory.mktemp("pacs")
    ok(run(home, "synth", "hospital", "--n-per-class", "14", "--image-size", "64", "--formats", "dcm"))
    ok(run(home, "train", "--dataset-dir", "hospital", "--output-dir", "runs/a", "--set", "image_size=64", SMALL,
           "max_epochs=2", "batch_size=8", "learning_rate=0.01", *QUIET))
    return {"home": home, "run": home / "runs/a", "files": sorted((home / "hospital").rglob("*.dcm"))}


@pytest.fixture(scope="module")
def plain_predictions(trained) -> dict[str, dict]:
    """``wsr-med predict`` on the folder, by SOPInstanceUID."""
    home = trained["home"]
    ok(run(home, "predict", "--output-dir", "runs/a", "--dataset-dir", "hospital", "--predictions-file", "plain.csv"))
    return {uid_of(home / "hospital" / row["path"]): row for row in rows(home / "plain.csv")}


@pytest.fixture()
def pacs(tmp_path):
    _require_tools()
    with LocalOrthanc(tmp_path / "orthanc") as archive:
        yield archive


def _srs_by_study(pacs: LocalOrthanc) -> dict[str, list[dict]]:
    """The SR (and SC) instances Orthanc holds, by StudyInstanceUID, each with its header and file."""
    out = {}
    for instance in pacs.get("/instances?expand"):
        tags = pacs.get(f"/instances/{instance['ID']}/simplified-tags")
        if NOT_FOR_CLINICAL_USE in tags.get("SeriesDescription", ""):
            out.setdefault(tags["StudyInstanceUID"], []).append({"id": instance["ID"], "tags": tags})
    return out


def _download(pacs: LocalOrthanc, instance_id: str, folder: Path) -> Path:
    import requests

    folder.mkdir(exist_ok=True)
    answer = requests.get(f"{pacs.url}/instances/{instance_id}/file", auth=(pacs.user, pacs.password), timeout=30)
    answer.raise_for_status()
    path = folder / f"{instance_id}.dcm"
    path.write_bytes(answer.content)
    return path


def test_a_dicom_folder_gets_an_sr_per_image_with_predicts_probabilities(trained, plain_predictions):
    home = trained["home"]
    out = ok(run(home, "predict", "--output-dir", "runs/a", "--dataset-dir", "hospital", "--sr-dir", "srs",
                 "--predictions-file", "folder.csv"))
    srs = sorted((home / "srs").rglob("*.dcm"))
    assert len(srs) == len(trained["files"]) == len(plain_predictions)
    classes = json.loads((trained["run"] / "classes.json").read_text())
    identity = ModelIdentity.of_run(RunFolder(trained["run"]))
    for path in srs:
        valid(path)
        sr = pydicom.dcmread(path)
        source = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        expected = plain_predictions[str(source.ReferencedSOPInstanceUID)]
        got = read_sr_probabilities(sr)
        assert sorted(got) == sorted(classes)
        for name in classes:
            assert abs(got[name] - float(expected[f"prob_{name}"])) < 1e-5
        assert NOT_FOR_CLINICAL_USE in sr.SeriesDescription and sr.Modality == "SR"
        assert path.parent.name == sr.StudyInstanceUID  # filed by study
        # what a viewer draws: a point on the source image where the evidence is, and a line to read
        [point] = _content(sr, "SCOORD")
        column, row = point.GraphicData
        assert point.GraphicType == "POINT" and 0 <= column <= 64 and 0 <= row <= 64
        assert point.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.ReferencedSOPInstanceUID
        [comment] = [item.TextValue for item in _content(sr, "TEXT") if item.ConceptNameCodeSequence[0].CodeValue == "121106"]
        called = expected["predicted_class"]
        assert comment.startswith(f"AI finding: {called} (probability {float(expected[f'prob_{called}']):.2f}) - "
                                  f"{NOT_FOR_CLINICAL_USE}")
        # IHE AI Results: who made it, which weights (highdicom adds an item of its own)
        [equipment] = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "wsr_med"]
        assert equipment.DeviceUID == result_uid("device", model=identity) and equipment.SoftwareVersions
        assert equipment.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Equipment"
    table = rows(home / "folder.csv")
    assert {r["sop_instance_uid"] for r in table} == set(plain_predictions)
    assert all(r["evidence_region"].startswith(f"{r['predicted_class']}: ") for r in table)
    assert all(r["predicted_class"] == plain_predictions[r["sop_instance_uid"]]["predicted_class"] for r in table)
    assert "path" not in table[0] and not any(str(home) in v for r in table for v in r.values())  # UIDs, no paths
    again = ok(run(home, "predict", "--output-dir", "runs/a", "--dataset-dir", "hospital", "--sr-dir", "srs",
                   "--predictions-file", "folder.csv"))
    assert f"0 results stored, {len(srs)} already there" in again.stdout and sorted((home / "srs").rglob("*.dcm")) == srs
    assert "results stored" in out.stdout


def test_an_archive_gets_an_sr_in_each_original_study_and_a_rerun_adds_nothing(trained, pacs, real_dicom_dir, tmp_path):
    home = trained["home"]
    pacs.upload(trained["files"][:8] + sorted(real_dicom_dir.glob("*.dcm")))
    before = len(pacs.get("/instances"))
    env = {AUTH_ENV: pacs.auth}
    out = ok(run(home, "predict", "--output-dir", "runs/a", "--dicomweb", pacs.dicomweb, "--query",
                 "StudyDate=19000101-21001231", "--predictions-file", "archive.csv", env=env))
    table = rows(home / "archive.csv")
    # 8 synthetic DX + the real DX; CR/US/MR skipped by modality; the real DX (211 px) is unlike the 64 px training
    # scans: classified, listed, and no result stored
    assert len(table) == 9 and sum(r["sr"] == "stored" for r in table) == 8
    [unlike] = [r for r in table if r["sr"] != "stored"]
    assert unlike["sr"] == "not stored (unlike the training data)" and "training had 64-64 px" in unlike["unlike_training"]
    assert "9 classified (1 unlike the training data), 8 results stored" in out.stdout
    srs = _srs_by_study(pacs)
    by_source = {r["sop_instance_uid"]: r for r in table}
    assert unlike["study_uid"] not in srs
    for row in table:
        assert len(srs.get(row["study_uid"], [])) == (row["sr"] == "stored")  # one SR, in the source's own study
    for study, found in srs.items():
        path = _download(pacs, found[0]["id"], tmp_path / "got")
        valid(path)
        sr = pydicom.dcmread(path)
        assert sr.StudyInstanceUID == study
        referenced = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        row = by_source[str(referenced.ReferencedSOPInstanceUID)]
        assert sr.SOPInstanceUID == row["sr_uid"] and row["study_uid"] == study
        assert sr.PatientID  # the SR carries the patient's identity: it lives in the patient's study
    skipped = rows(home / "archive_skipped.csv")
    reasons = {r["modality"]: r["reason"] for r in skipped}
    assert {"CR", "US", "MR"} <= set(reasons) and all("not in DX" in reasons[m] for m in ("CR", "US", "MR"))
    assert any(r["sop_instance_uid"] == unlike["sop_instance_uid"] and "unlike the training data" in r["reason"]
               for r in skipped)
    assert pacs.auth not in out.stdout + out.stderr and pacs.password not in out.stdout + out.stderr
    assert len(pacs.get("/instances")) == before + 8

    again = ok(run(home, "predict", "--output-dir", "runs/a", "--dicomweb", pacs.dicomweb, "--query",
                   "StudyDate=19000101-21001231", "--predictions-file", "archive.csv", env=env))
    assert len(pacs.get("/instances")) == before + 8 and "0 results stored, 8 already there" in again.stdout
    # the SRs are in the studies now: listed as the tool's own results, never classified
    assert sum(r["reason"].startswith("wsr_med's own result") for r in rows(home / "archive_skipped.csv")) == 8


def test_selection_rules_codes_heatmaps_and_c_store(trained, pacs, real_dicom_dir, tmp_path):
    home = trained["home"]
    siim = next(real_dicom_dir.glob("siim_cr_chest_*.dcm"))
    pacs.upload([siim, real_dicom_dir / "US1_UNCI.dcm", trained["files"][0]])
    study = str(pydicom.dcmread(siim, stop_before_pixels=True).StudyInstanceUID)
    rules = home / "rules.json"
    rules.write_text(json.dumps({"Modality": ["CR", "DX"], "BodyPartExamined": ["CHEST"]}))
    codes = home / "codes.json"
    sct = {"left": ("7771000", "Left"), "right": ("24028007", "Right")}  # both coded: the decided class's code is there
    codes.write_text(json.dumps({c: {"value": v, "scheme": "SCT", "meaning": m} for c, (v, m) in sct.items()}))
    missing = "1.2.826.0.1.3680043.8.498.1"  # a mistyped study: named, and the other study goes on
    # the real CR is unlike the synthetic DX training scans: stored only when asked, and its SR says why
    refused(run(home, "predict", "--output-dir", "runs/a", "--dicomweb", pacs.dicomweb, "--study", study, "--study",
                missing, "--select", str(rules), "--codes", str(codes), "--heatmaps", "--predictions-file",
                "selected.csv", "--store-unlike-training", env={AUTH_ENV: pacs.auth}),
            f"1 of 2 studies not done (study {missing}: not found in the archive): listed in selected_skipped.csv")
    [row] = rows(home / "selected.csv")
    assert row["heatmap_uid"] and row["sr"] == "stored"
    found = _srs_by_study(pacs)[study]
    assert len(found) == 2
    for item in found:
        path = _download(pacs, item["id"], tmp_path / "objects")
        valid(path)
        ds = pydicom.dcmread(path)
        assert NOT_FOR_CLINICAL_USE in ds.SeriesDescription and ds.StudyInstanceUID == study
        if ds.Modality != "SR":  # the Grad-CAM overlay: derived, burned-in legend, its source referenced
            assert ds.BurnedInAnnotation == "YES" and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == row["sop_instance_uid"]
            assert ds.SOPInstanceUID == row["heatmap_uid"] and ds.pixel_array.shape[-1] == 3
        else:
            dumped = subprocess.run(["dsrdump", "+Pl", str(path)], capture_output=True, text=True).stdout
            value, meaning = sct[row["predicted_class"]]
            assert f'CODE:(,,"Finding")=({value},SCT,"{meaning}")' in dumped
            assert "unlike the training data: modality CR never seen in training" in dumped
    # run again: the SR and the Grad-CAM image now in the study are the tool's own, never classified; nothing is added
    before = len(pacs.get("/instances"))
    again = ok(run(home, "predict", "--output-dir", "runs/a", "--dicomweb", pacs.dicomweb, "--study", study, "--select",
                   str(rules), "--codes", str(codes), "--heatmaps", "--predictions-file", "selected.csv",
                   "--store-unlike-training", env={AUTH_ENV: pacs.auth}))
    assert "1 classified (1 unlike the training data), 0 results stored, 1 already there" in again.stdout
    own = [r for r in rows(home / "selected_skipped.csv") if r["reason"].startswith("wsr_med's own result")]
    assert sorted(r["modality"] for r in own) == ["OT", "SR"] and len(pacs.get("/instances")) == before
    # a rule the synthetic DX lacks (BodyPartExamined) skips it, naming the rule
    synthetic_study = str(pydicom.dcmread(trained["files"][0], stop_before_pixels=True).StudyInstanceUID)
    ok(run(home, "predict", "--output-dir", "runs/a", "--dicomweb", pacs.dicomweb, "--study", synthetic_study,
           "--select", str(rules), "--predictions-file", "selected.csv", env={AUTH_ENV: pacs.auth}))
    assert rows(home / "selected.csv") == []
    assert "no BodyPartExamined (rule from rules.json: CHEST)" in rows(home / "selected_skipped.csv")[0]["reason"]

    # C-STORE from a DICOM folder to the archive's AE
    folder = home / "one_study"
    folder.mkdir()
    shutil.copy(trained["files"][1], folder)
    folder_predictions = trained["run"] / "predictions.csv"
    folder_predictions.write_text("a folder's predictions\n")
    sent = ok(run(home, "predict", "--output-dir", "runs/a", "--dataset-dir", "one_study", "--c-store",
                  f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}"))
    # its own predictions file, named in the summary; a folder prediction's file is left alone
    assert "-> runs/a/pacs_predictions.csv, runs/a/pacs_predictions_skipped.csv" in sent.stdout
    assert folder_predictions.read_text() == "a folder's predictions\n"
    sent = rows(trained["run"] / "pacs_predictions.csv")[0]
    assert sent["sr"] == "stored" and len(_srs_by_study(pacs)[sent["study_uid"]]) == 1


def test_an_archive_stopped_mid_run_gives_one_line_and_the_rerun_completes(trained, pacs):
    home = trained["home"]
    pacs.upload(trained["files"])
    n = len(trained["files"])
    env = {AUTH_ENV: pacs.auth}
    args = ["predict", "--output-dir", "runs/a", "--dicomweb", pacs.dicomweb, "--query", "Modality=DX",
            "--predictions-file", "stopped.csv", "--set", "batch_size=2"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WSR_MED_DICOMWEB"))}
    process = subprocess.Popen([str(WSR_MED), *args], cwd=home, env={**base, **env}, stderr=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "results stored for" in line:  # the first results are in the archive: it vanishes (a graceful stop lets
            pacs.stop(graceful=False)  # the whole run finish first: it takes a second)
            break
    rest = process.stderr.read()
    process.wait(120)
    stderr = "".join(lines) + rest
    assert process.returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("wsr-med ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "not done" in errors[0] and "run the same command again" in errors[0]
    done = [r for r in rows(home / "stopped.csv") if r["sr"] == "stored"]
    assert 2 <= len(done) < n
    pacs.start()
    again = ok(run(home, *args, env=env))
    assert f"{n - len(done)} results stored, {len(done)} already there" in again.stdout
    srs = _srs_by_study(pacs)
    assert len(srs) == n and all(len(found) == 1 for found in srs.values())


def test_wrong_credentials_and_no_archive_are_one_line_without_the_secret(trained, pacs):
    home = trained["home"]
    wrong = f"{pacs.user}:not-the-password"
    result = run(home, "predict", "--output-dir", "runs/a", "--dicomweb", pacs.dicomweb, "--query", "Modality=DX",
                 env={AUTH_ENV: wrong})
    refused(result, "HTTP 401", "the archive refused the credentials", AUTH_ENV, "--auth-file")
    assert "not-the-password" not in result.stdout + result.stderr
    secret_file = home / "token.txt"
    secret_file.write_text("Bearer a-token-value\n")
    pacs.stop()
    result = run(home, "predict", "--output-dir", "runs/a", "--dicomweb", pacs.dicomweb, "--study", "1.2.3",
                 "--auth-file", str(secret_file))
    refused(result, "unreachable", "after 3 attempts")
    assert "a-token-value" not in result.stdout + result.stderr
    refused(run(home, "predict", "--output-dir", "runs/a", "--dicomweb", pacs.dicomweb), "--study UID")
    refused(run(home, "predict", "--output-dir", "runs/a", "--dataset-dir", "hospital", "--sr-dir", "x", "--set",
                "max_epochs=3"), "max_epochs: not a setting of predict from or to a PACS")
    assert not (home / "x").exists()


def test_a_multilabel_model_writes_present_or_absent_per_finding(trained, tmp_path):
    """A multi-label model's SR: a probability and a threshold per finding and Present / Absent, valid DICOM."""
    _require_tools()
    home = trained["home"]
    ok(run(home, "synth", "findings", "--multilabel", "--n-per-class", "40", "--image-size", "64"))
    ok(run(home, "train", "--dataset-dir", "findings/chexpert.csv", "--output-dir", "runs/ml", "--set", "image_size=64",
           SMALL, "max_epochs=1", "batch_size=8", *QUIET))
    folder = home / "few"
    folder.mkdir()
    for path in trained["files"][:3]:
        shutil.copy(path, folder)
    ok(run(home, "predict", "--output-dir", "runs/ml", "--dataset-dir", "few", "--predictions-file", "ml_plain.csv"))
    ok(run(home, "predict", "--output-dir", "runs/ml", "--dataset-dir", "few", "--sr-dir", "ml_srs",
           "--predictions-file", "ml.csv"))
    plain = {uid_of(folder / r["path"]): r for r in rows(home / "ml_plain.csv")}
    findings = json.loads((home / "runs/ml/classes.json").read_text())
    for row in rows(home / "ml.csv"):
        assert row["findings"] == plain[row["sop_instance_uid"]]["findings"]
        path = home / "ml_srs" / row["study_uid"] / f"{row['sr_uid']}.dcm"
        valid(path)
        got = read_sr_probabilities(pydicom.dcmread(path))
        assert all(abs(got[f] - float(plain[row["sop_instance_uid"]][f"prob_{f}"])) < 1e-5 for f in findings)
        dumped = subprocess.run(["dsrdump", "+Pl", str(path)], capture_output=True, text=True).stdout
        present = [f for f in row["findings"].split("|") if f != "none"]
        groups = max(1, len(present))  # a region per present finding (the likeliest when none is)
        # the first group codes every finding Present / Absent; each further one its own finding
        assert sum(('"Present"' in line or '"Absent"' in line) for line in dumped.splitlines()) == len(findings) + groups - 1
        assert dumped.count("Decision threshold for") == len(findings)
        assert dumped.count("SCOORD") == groups and dumped.count('"Comment")="AI finding: ') == groups
        assert all(f"AI finding: {f} present" in dumped for f in present)
        assert len(row["evidence_region"].split("; ")) == groups


# --- units ---------------------------------------------------------------------------------------------------
def test_result_uids_depend_on_source_and_model_only():
    model = ModelIdentity("m", "1", "k" * 64)
    assert result_uid("sr", "1.2.3", model=model) == result_uid("sr", "1.2.3", model=model)
    assert result_uid("sr", "1.2.3", model=model) != result_uid("sr", "1.2.4", model=model)
    assert result_uid("sr", "1.2.3", model=model) != result_uid("sr", "1.2.3", model=ModelIdentity("m", "2", "j" * 64))
    uid = result_uid("sr", "1.2.3", model=model)
    assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid


def test_selection_names_the_rule_and_the_value():
    header = pydicom.Dataset()
    header.Rows = header.Columns = 8
    header.Modality, header.ImageType = "CR", ["DERIVED", "PRIMARY"]
    assert Selection({"Modality": ["DX"]}).reason(header) == "Modality CR not in DX (rule from rules)"
    assert "lacks ORIGINAL" in Selection({"ImageType": ["ORIGINAL", "PRIMARY"]}).reason(header)
    assert Selection({"Modality": ["CR"]}).reason(header) == ""
    header.NumberOfFrames = 3
    assert "multi-frame" in Selection({}).reason(header) and Selection({}, spatial_dims=3).reason(header) == ""
    header.Rows = header.Columns = 60000
    assert Selection({}, spatial_dims=3, max_pixels=10**8).reason(header).startswith("too large: 60000 x 60000 x 3")
    del header.Rows
    assert Selection({}).reason(header).startswith("not an image")


def test_bad_rules_and_codes_files_are_refused_naming_the_file(tmp_path):
    from wsr_med.errors import WsrMedError

    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"PatientName": ["X"]}))
    with pytest.raises(WsrMedError, match="rules.json: 'PatientName' is not an attribute"):
        Selection.from_file(rules)
    codes = tmp_path / "codes.json"
    codes.write_text(json.dumps({"pneumonia": {"value": "1"}}))
    with pytest.raises(WsrMedError, match="needs non-empty 'value', 'scheme' and 'meaning'"):
        ClassCodes(["normal", "pneumonia"], codes)
    codes.write_text(json.dumps({"tumour": {"value": "1", "scheme": "SCT", "meaning": "x"}}))
    with pytest.raises(WsrMedError, match="'tumour' is not a class of the model"):
        ClassCodes(["normal", "pneumonia"], codes)


def test_an_sr_of_a_real_radiograph_is_valid_and_copies_identifiers_only(real_dicom_dir, tmp_path):
    _require_tools()
    source = pydicom.dcmread(next(real_dicom_dir.glob("siim_cr_chest_*.dcm")))
    model = ModelIdentity("chest", "7", "a" * 64)
    sr = classification_sr([source], ["normal", "pneumonia"], np.array([0.25, 0.75]), 1, "prob_pneumonia >= 0.4",
                           {"pneumonia": 0.4}, False, model, ClassCodes(["normal", "pneumonia"]))
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    valid(path)
    written = pydicom.dcmread(path)
    assert written.StudyInstanceUID == source.StudyInstanceUID and written.PatientID == source.PatientID
    assert "PatientAge" not in written and "PixelData" not in written  # identifiers to file it, nothing else
    assert read_sr_probabilities(written) == {"normal": 0.25, "pneumonia": 0.75}


def test_the_pacs_benchmark_prints_the_ratio_and_where_the_time_goes(tmp_path):
    _require_tools()
    out = ok(run(tmp_path, "bench", "pacs", "--n-instances", "20", "--image-size", "64", "--model-size", "64",
                 "--repeats", "1")).stdout
    assert "20 DICOM instances" in out and "(20 SRs stored)" in out and "ratio archive / disk:" in out
    stages = out.split("where the archive run's time goes:")[1]
    assert all(stage in stages for stage in ("retrieve", "decode", "network", "SR", "store"))


def _ct_series(folder: Path, n_slices: int = 12, size: int = 24) -> list[Path]:
    """A small CT series (one study, one series, ``n_slices`` axial slices with their geometry)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    paths = []
    for k in range(n_slices):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "PID-3D", "Test^Volume"
        ds.InstanceNumber, ds.ImageType = k + 1, ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 2.0 * k], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = rng.integers(0, 200, (size, size), dtype=np.uint16).tobytes()
        path = folder / f"slice{k:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_a_3d_model_classifies_a_series_into_one_sr(tmp_path):
    _require_tools()
    from test_walkthrough import _volumes

    manifest = _volumes(tmp_path, 8)
    ok(run(tmp_path, "train", "--dataset-dir", str(manifest), "--output-dir", "runs/v", "--set", "spatial_dims=3",
           "image_size=32", "batch_size=3", SMALL, "max_epochs=1", *QUIET))
    slices = _ct_series(tmp_path / "series")
    ok(run(tmp_path, "predict", "--output-dir", "runs/v", "--dataset-dir", "series", "--sr-dir", "srs",
           "--predictions-file", "volumes.csv"))
    [row] = rows(tmp_path / "volumes.csv")
    assert row["sop_instance_uid"] == f"{len(slices)} instances" and row["sr"] == "stored"
    [path] = sorted((tmp_path / "srs").rglob("*.dcm"))
    valid(path)
    sr = pydicom.dcmread(path)
    referenced = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert {str(r.ReferencedSOPInstanceUID) for r in referenced} == {uid_of(p) for p in slices}
    assert sr.SOPInstanceUID == row["sr_uid"] and sorted(read_sr_probabilities(sr)) == ["absent", "present"]
    refused(run(tmp_path, "predict", "--output-dir", "runs/v", "--dataset-dir", "series", "--sr-dir", "srs",
                "--heatmaps"), "--heatmaps draws on 2D images")


def test_results_can_go_to_another_archive(trained, pacs, tmp_path):
    home = trained["home"]
    pacs.upload(trained["files"][:3])
    with LocalOrthanc(tmp_path / "other") as other:  # same test credentials: one WSR_MED_DICOMWEB_AUTH for both
        ok(run(home, "predict", "--output-dir", "runs/a", "--dicomweb", pacs.dicomweb, "--query", "Modality=DX",
               "--store-to", other.dicomweb, "--predictions-file", "other.csv", env={AUTH_ENV: pacs.auth}))
        assert sum(len(found) for found in _srs_by_study(other).values()) == 3
    assert _srs_by_study(pacs) == {} and all(r["sr"] == "stored" for r in rows(home / "other.csv"))


# --- an archive that misbehaves; names kept exactly ------------------------------------------------------------
PEAK_MIB = 1536  # "no answer from any archive takes wsr-med past about 1.5 GiB"


def test_a_hostile_archive_fails_each_study_in_one_line_within_memory_and_time(trained, tmp_path):
    """Every misbehaviour of hostile_archive.py at once: each bad study named in one line with its reason, the good
    ones classified, memory and time bounded, credentials not sent on to another host."""
    home = trained["home"]
    bomb = deflated_bomb_dicom(tmp_path / "bomb.dcm", inflated_gib=0.5)
    with HostileArchive(trained["files"][0], bomb) as archive:
        studies = [arg for mode in MODES for arg in ("--study", archive.study(mode))]
        result, peak, seconds = run_measured(
            home, "predict", "--output-dir", "runs/a", "--dicomweb", archive.url, *studies, "--sr-dir", "hostile_srs",
            "--predictions-file", "hostile.csv", "--archive-timeout", "3", env={AUTH_ENV: "user:secret-pw"})
    failing = ("big_json", "big_multipart", "trickle", "endless", "html", "wrong_media", "cut_multipart", "steering")
    refused(result, f"{len(failing)} of {len(MODES)} studies not done", "listed in hostile_skipped.csv")
    assert peak < PEAK_MIB and seconds < 120, (peak, seconds)
    done = rows(home / "hostile.csv")
    assert sorted(r["study_uid"] for r in done) == sorted(archive.study(m) for m in ("good", "redirect"))
    assert all(r["sr"] == "stored" for r in done) and len(list((home / "hostile_srs").rglob("*.dcm"))) == 2
    reasons = {r["study_uid"]: r["reason"] for r in rows(home / "hostile_skipped.csv")}
    expected = {"bomb": "Deflated DICOM inflating past 255 MiB", "big_json": "the answer passed the 32 MiB allowed",
                "big_multipart": "the answer declares 10240 MiB", "trickle": "no complete answer within 3 s",
                "endless": "more than 1000 series in the study", "html": "answered text/html, not DICOM JSON",
                "wrong_media": "came as application/octet-stream", "cut_multipart": "cut short",
                "steering": "'../../system' is not a DICOM UID"}
    for mode, reason in expected.items():
        assert reason in reasons[archive.study(mode)], (mode, reasons[archive.study(mode)])
    logged = [line for line in result.stderr.splitlines() if "the others go on" in line]
    assert len(logged) == len(failing) and all(any(archive.study(m) in line for line in logged) for m in failing)
    assert "secret-pw" not in result.stdout + result.stderr
    assert not any("system" in path for path in archive.paths)  # an answer never steers a request elsewhere
    sent = dict.fromkeys(host for host, _ in archive.authorized)
    assert {"127.0.0.1", "localhost"} <= set(sent)  # the redirect was followed...
    assert not any(carried for host, carried in archive.authorized if host == "localhost")  # ...without the credentials
    assert all(carried for host, carried in archive.authorized if host == "127.0.0.1")


def test_a_deflated_bomb_in_a_dicom_folder_is_listed_within_memory(trained, tmp_path):
    _require_tools()
    home = trained["home"]
    folder = home / "with_bomb"
    folder.mkdir()
    shutil.copy(trained["files"][0], folder)
    deflated_bomb_dicom(folder / "bomb.dcm", inflated_gib=0.5)
    result, peak, _ = run_measured(home, "predict", "--output-dir", "runs/a", "--dataset-dir", "with_bomb", "--sr-dir",
                                   "bomb_srs", "--predictions-file", "bomb.csv")
    ok(result)
    assert peak < PEAK_MIB, peak
    assert len(rows(home / "bomb.csv")) == 1 and len(list((home / "bomb_srs").rglob("*.dcm"))) == 1
    [listed] = rows(home / "bomb_skipped.csv")
    assert "bomb.dcm" in listed["reason"] and "not a readable DICOM file" in listed["reason"]


def _named(source: Path, target: Path, charset, name: str, patient_id: str) -> Path:
    """A copy of ``source`` whose patient name and ID are written in ``charset``, in a study of its own."""
    ds = pydicom.dcmread(source)
    ds.SpecificCharacterSet = list(charset) if isinstance(charset, tuple) else charset
    ds.PatientName, ds.PatientID = name, patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(target, enforce_file_format=True)
    return target


NAMES = {  # SpecificCharacterSet -> (PatientName, PatientID)
    "ISO_IR 192": ("Müller^Zoë=山田^太郎", "PID-ÄÖÜ-1"),
    "ISO_IR 100": ("Ågård^Søren", "PID-ÆØ-2"),
    ("", "ISO 2022 IR 87"): ("Yamada^Tarou=山田^太郎=やまだ^たろう", "PID-3"),
}


def test_names_are_copied_exactly_into_every_object_written(trained, pacs, real_dicom_dir, tmp_path):
    """Real radiographs (CR JPEG, DX MONOCHROME1) given UTF-8, Latin-1 and ideographic / phonetic names, through an
    archive and through a folder: the SR and the evidence image hold the source's patient attributes equal after
    decoding, in a character set that holds them (dciodvfy)."""
    home = trained["home"]
    folder = home / "names"
    folder.mkdir()
    images = [next(real_dicom_dir.glob("siim_cr_chest_*.dcm")), real_dicom_dir / "highdicom_dx_image.dcm",
              real_dicom_dir / "txv_Fake_MONOCHROME1_cr_chest.dcm"]
    sources = [_named(image, folder / f"named{k}.dcm", charset, name, pid)
               for k, (image, (charset, (name, pid))) in enumerate(zip(images, NAMES.items()))]
    by_study = {str(pydicom.dcmread(p).StudyInstanceUID): pydicom.dcmread(p) for p in sources}
    rules = home / "radiographs.json"
    rules.write_text(json.dumps({"Modality": ["CR", "DX"]}))
    chosen = ["--select", str(rules), "--store-unlike-training"]  # real radiographs, unlike the 64 px training scans
    pacs.upload(sources)
    ok(run(home, "predict", "--output-dir", "runs/a", "--dicomweb", pacs.dicomweb, *[a for s in by_study for a in
           ("--study", s)], "--heatmaps", *chosen, "--predictions-file", "names.csv", env={AUTH_ENV: pacs.auth}))
    ok(run(home, "predict", "--output-dir", "runs/a", "--dataset-dir", "names", "--sr-dir", "names_srs", *chosen,
           "--predictions-file", "names_folder.csv"))
    written = [_download(pacs, item["id"], tmp_path / "named") for found in _srs_by_study(pacs).values()
               for item in found] + sorted((home / "names_srs").rglob("*.dcm"))
    assert len(written) == 3 * 2 + 3  # an SR and an evidence image per source in the archive, an SR per file
    for path in written:
        valid(path)
        ds = pydicom.dcmread(path)
        source = by_study[str(ds.StudyInstanceUID)]
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == str(source.PatientName) and ds.PatientID == source.PatientID
        assert ds.PatientName.components == source.PatientName.components


def test_a_model_that_knows_no_modality_needs_rules_before_it_writes_into_an_archive(tmp_path):
    _require_tools()
    ok(run(tmp_path, "synth", "pictures", "--n-per-class", "10", "--image-size", "64", "--formats", "png"))
    ok(run(tmp_path, "train", "--dataset-dir", "pictures", "--output-dir", "runs/png", "--set", "image_size=64", SMALL,
           "max_epochs=1", "batch_size=8", *QUIET))
    with LocalOrthanc(tmp_path / "orthanc") as archive:
        refused(run(tmp_path, "predict", "--output-dir", "runs/png", "--dicomweb", archive.dicomweb, "--query",
                    "Modality=CR", env={AUTH_ENV: archive.auth}), "trained on files without a DICOM modality",
                "--select RULES.json")
        assert len(archive.get("/instances")) == 0


def test_credentials_in_the_address_are_refused_pointing_to_the_environment(trained):
    home = trained["home"]
    message = refused(run(home, "predict", "--output-dir", "runs/a", "--dicomweb", "http://user:pw@127.0.0.1:9/dicom-web",
                          "--study", "1.2.3"), "credentials do not go in the address", AUTH_ENV)
    assert "pw" not in message.replace(AUTH_ENV, "")
