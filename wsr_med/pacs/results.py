"""A classification as DICOM: a Comprehensive SR (TID 1500) per classified image or series, made with highdicom.

What one SR holds (``dsrdump`` shows it; README "From and to a PACS"):

* an Imaging Measurement Report (TID 1500) with a measurement group for the source that names the algorithm (TID
  4019: the registered model's name and version, wsr_med's version, the decision rule; no path). For a 2D image it is
  a planar ROI group (TID 1410) whose region is a point (SCOORD, selected from the source image) where the decided
  class's evidence is strongest (:class:`wsr_med.networks.HeadEvidence`), with a comment a person reads (the finding,
  its probability, NOT FOR CLINICAL USE): what a viewer such as OHIF draws on the image; a multi-label model adds one
  such group per further present finding. A 3D model's series: a TID 1501 group referencing every slice;
* one numeric measurement per class: its calibrated probability (unit ``{probability}``, UCUM);
* the decision as qualitative evaluations: single-label, ``Finding = <decided class>``; multi-label, one
  ``<finding> = Present / Absent`` per finding, with each finding's threshold as a measurement; binary, the threshold
  on the positive class's probability;
* a Contributing Equipment item (purpose: Processing Equipment) naming wsr_med, the model and its version, with a
  Device UID derived from the weights (it changes when they change), as IHE AI Results asks;
* the source's patient and study attributes (so it files into the same study), exactly as the source holds them
  (``SpecificCharacterSet`` ISO_IR 192, UTF-8, whenever a copied value is not plain ASCII: :func:`character_set`), in a
  series of its own whose SeriesDescription says ``NOT FOR CLINICAL USE``;
* for a source that looks unlike the training data, stored only on the user's request, the reason (an algorithm
  parameter ``unlike the training data: ...``).

UIDs are derived from the source's UIDs and the model's identity (:func:`result_uid`): the same model on the same
source gives the same SR UID, so storing it again adds nothing to an archive.

Class codes: ``--codes codes.json`` maps class names to codes, ``{"pneumonia": {"value": "233604007", "scheme":
"SCT", "meaning": "Pneumonia"}}``; a class without an entry gets a code of the local scheme :data:`LOCAL_SCHEME`
(value: the class name, meaning: the class name).
"""

from __future__ import annotations

import hashlib
import re
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from wsr_med import __version__
from wsr_med.errors import WsrMedError
from wsr_med.files import read_json_object

__all__ = ["LOCAL_SCHEME", "ModelIdentity", "ClassCodes", "classification_sr", "result_uid", "SR_SERIES_NUMBER",
           "SC_SERIES_NUMBER", "NOT_FOR_CLINICAL_USE", "MANUFACTURER", "read_sr_probabilities", "own_result",
           "character_set", "UNLIKE_TRAINING"]

LOCAL_SCHEME = "99WSRMED"  # a private coding scheme ("99" prefix, PS3.16 8.2): wsr_med's class and measurement names
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
SR_SERIES_NUMBER = 9901  # high, so the AI result series sorts after the acquired ones in a viewer
SC_SERIES_NUMBER = 9902  # the evidence-map Secondary Captures (wsr_med.pacs.heatmaps)
MANUFACTURER = "wsr_med"  # every object wsr_med writes names itself so
UNLIKE_TRAINING = "unlike the training data"
UTF8 = "ISO_IR 192"
PROBABILITY_UNIT = hd.sr.CodedConcept("{probability}", "UCUM", "probability")
_PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
_ABSENT = hd.sr.CodedConcept("2667000", "SCT", "Absent")
_FINDING = hd.sr.CodedConcept("121071", "DCM", "Finding")
_IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")
_COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
# the source attributes an SR carries (evidence, patient, study); pixel data never goes into the SR
_EVIDENCE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
             "StudyID", "AccessionNumber", "ReferringPhysicianName", "SeriesInstanceUID", "SOPClassUID",
             "SOPInstanceUID", "Modality")


@dataclass(frozen=True)
class ModelIdentity:
    """Who made a result: the registered model's name and version when the run was registered, else the run's name
    and the first 12 hex digits of ``model.pt``'s SHA-256 (``version``). ``key`` (the weights' digest) seeds the
    UIDs."""

    name: str
    version: str
    key: str

    @classmethod
    def of_run(cls, run) -> "ModelIdentity":
        digest = hashlib.sha256(run.model.read_bytes()).hexdigest()
        registered = run.registered_model()
        if registered:
            return cls(registered["name"], str(registered["version"]), digest)
        return cls(str(run.settings().get("run_name") or run.path.name), f"sha256:{digest[:12]}", digest)

    def algorithm(self, rule: str, unlike_training: str = "") -> hd.sr.AlgorithmIdentification:
        notes = [f"{UNLIKE_TRAINING}: {unlike_training}"[:1024]] if unlike_training else []
        return hd.sr.AlgorithmIdentification(name=self.name[:64], version=self.version[:64],
                                             parameters=[f"wsr_med {__version__}", rule[:1024], *notes])


def result_uid(kind: str, *sources: str, model: ModelIdentity) -> str:
    """A UID (``2.25.<n>``) determined by ``kind`` (``sr``, ``sr-series``, ``sc``...), the source UIDs and the model:
    the same inputs always give the same UID, different ones (practically) never do."""
    digest = hashlib.sha256("\n".join(["wsr_med", kind, *sources, model.key]).encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"  # a UUID-derived UID (PS3.5 B.2), by name


def contributing_equipment(model: ModelIdentity) -> hd.ContributingEquipment:
    """The Contributing Equipment item of every object wsr_med writes: wsr_med, the model, their versions, and a Device
    UID derived from the weights."""
    item = hd.ContributingEquipment(MANUFACTURER, codes.DCM.ProcessingEquipment, manufacturer_model_name=model.name[:64],
                                    software_versions=[f"wsr_med {__version__}", model.version[:64]])
    item.DeviceUID = result_uid("device", model=model)
    return item


def finding_comment(name: str, probability: float, present: bool | None, model: ModelIdentity,
                    unlike_training: str = "") -> str:
    """The line a radiologist reads beside the region: ``AI finding: pneumonia (probability 0.87) - NOT FOR CLINICAL
    USE - model 3``; multi-label ``present`` says so."""
    state = "" if present is None else " present"
    text = (f"AI finding: {name}{state} (probability {probability:.2f}) - {NOT_FOR_CLINICAL_USE} - "
            f"{model.name} {model.version}")
    return (text + (f" - {UNLIKE_TRAINING}" if unlike_training else ""))[:1024]


def own_result(header: pydicom.Dataset, model: ModelIdentity) -> str:
    """Why ``header``'s instance is one of wsr_med's own results (an SR or an evidence image, of this model or of any
    other), never to be classified, whatever the selection rules; "" when it is not. Recognised by the series UIDs this
    model derives for the study, the manufacturer wsr_med writes, and its series numbers with its description."""
    study, series = str(header.get("StudyInstanceUID", "")), str(header.get("SeriesInstanceUID", ""))
    if series in {result_uid(kind, study, model=model) for kind in ("sr-series", "sc-series")}:
        return "wsr_med's own result (a series this model derives)"
    if str(header.get("Manufacturer", "")) == MANUFACTURER:
        return f"wsr_med's own result (Manufacturer {MANUFACTURER})"
    number, description = header.get("SeriesNumber"), str(header.get("SeriesDescription", ""))
    if number is not None and str(number) in (str(SR_SERIES_NUMBER), str(SC_SERIES_NUMBER)) \
            and MANUFACTURER in description:
        return f"wsr_med's own result (series {number}, {description[:64]})"
    return ""


def character_set(datasets) -> str | None:
    """The SpecificCharacterSet an object holding the text values of ``datasets`` needs: None while every value is
    plain ASCII (the default repertoire), else ISO_IR 192 (UTF-8), which holds every name exactly as decoded from any
    source character set (Latin-1, ideographic and phonetic components...)."""
    for ds in datasets:
        for element in ds:
            if element.VR in ("PN", "LO", "SH", "ST", "LT", "UT", "UC") and element.value is not None:
                values = element.value if element.VM > 1 else [element.value]
                if any(not str(v).isascii() for v in values):
                    return UTF8
    return None


class ClassCodes:
    """The code of each class name: from a user's JSON file, else the local scheme (see the module docstring)."""

    def __init__(self, classes: list[str], path: str | Path | None = None) -> None:
        given = {}
        if path is not None:
            given = read_json_object(path, "class codes", '{"<class>": {"value": ..., "scheme": ..., "meaning": ...}}')
            unknown = sorted(set(given) - set(classes))
            if unknown:
                raise WsrMedError(f"{path}: {', '.join(map(repr, unknown))} is not a class of the model "
                                  f"({', '.join(classes)})")
        self.codes = {}
        for k, name in enumerate(classes):
            entry = given.get(name)
            if entry is None:
                value = _local_value(name)
                if any(c.value == value and c.scheme_designator == LOCAL_SCHEME for c in self.codes.values()):
                    value = f"{value[:12]}-{k}"  # two names that read alike as code values
                self.codes[name] = hd.sr.CodedConcept(value, LOCAL_SCHEME, name[:64])
                continue
            if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) and entry.get(k)
                                                      for k in ("value", "scheme", "meaning")):
                raise WsrMedError(f"{path}: the code of {name!r} needs non-empty 'value', 'scheme' and 'meaning'")
            self.codes[name] = hd.sr.CodedConcept(entry["value"], entry["scheme"], entry["meaning"][:64])

    def __getitem__(self, name: str) -> hd.sr.CodedConcept:
        return self.codes[name]


def _local_value(name: str) -> str:
    """A class name as a code value: upper-case letters, digits and ``-`` (16 characters at most, so a CodeValue)."""
    return (re.sub(r"[^A-Z0-9]+", "-", name.upper()).strip("-") or "CLASS")[:16]


def _local(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(_local_value(value), LOCAL_SCHEME, meaning[:64])


def evidence_of(source: pydicom.Dataset) -> pydicom.Dataset:
    """What an SR takes from its source: the identifiers that file it into the patient's study and reference the
    image (:data:`_EVIDENCE`), nothing else of the header and no pixel data."""
    header = pydicom.Dataset()
    for keyword in _EVIDENCE:
        if keyword in source:
            header.add(source[keyword])
        elif keyword not in ("SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"):
            setattr(header, keyword, "")  # type 2 in the SR's patient and study modules: present, empty when unknown
    return header


@contextmanager
def copied_as_held():
    """highdicom warns about a one-part PatientName ("PID-0002"): an SR copies the name as the archive holds it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        yield


def classification_sr(sources: list[pydicom.Dataset], classes: list[str], probabilities: np.ndarray, decided,
                      rule: str, thresholds: dict[str, float], multilabel: bool, model: ModelIdentity,
                      class_codes: ClassCodes, unlike_training: str = "",
                      regions: dict[str, tuple[float, float]] | None = None) -> hd.sr.ComprehensiveSR:
    """The SR of one classified image (``sources`` = [its header]) or series (its slices' headers).

    Args:
        sources: the classified instances' headers (pixel data, if present, is not copied).
        classes: the model's class (finding) names.
        probabilities: ``(len(classes),)`` calibrated probabilities.
        decided: the decided class index (single-label) or a boolean per finding (multi-label).
        rule: the decision rule in words (``prob_pneumonia >= 0.43``), recorded with the algorithm.
        thresholds: per class, the threshold its probability was compared with (binary and multi-label).
        multilabel: the model's task.
        model: the result's author and the seed of its UIDs.
        class_codes: the code of each class.
        unlike_training: why the source looks unlike the training data ("" when it does not), recorded in the SR.
        regions: class (finding) name -> (column, row) in the source image's pixels where its evidence is strongest:
            the decided class, or each present finding (the first one's group carries everything above); None for a
            3D series (no region).
    """
    first = sources[0]
    source_uids = sorted(str(s.SOPInstanceUID) for s in sources)
    evidence = [evidence_of(s) for s in sources]
    # measurement names are numbered (class names may differ only in what a code value cannot hold)
    def probability(k: int) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=_local(f"PROB-{k}", f"Probability of {classes[k]}"), value=float(probabilities[k]),
                                 unit=PROBABILITY_UNIT)

    measurements = [probability(k) for k in range(len(classes))]
    measurements += [hd.sr.Measurement(name=_local(f"THRESHOLD-{classes.index(c)}", f"Decision threshold for {c}"),
                                       value=float(t), unit=PROBABILITY_UNIT) for c, t in thresholds.items()]
    if multilabel:
        evaluations = [hd.sr.QualitativeEvaluation(class_codes[c], _PRESENT if v else _ABSENT)
                       for c, v in zip(classes, decided)]
    else:
        evaluations = [hd.sr.QualitativeEvaluation(_FINDING, class_codes[classes[int(decided)]])]
    tracking = hd.sr.TrackingIdentifier(uid=result_uid("tracking", *source_uids, model=model),
                                        identifier="wsr_med classification")
    if not regions:  # a series: the group references every slice
        groups = [hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, algorithm_id=model.algorithm(rule, unlike_training),
            source_images=[hd.sr.SourceImageForMeasurementGroup(str(s.SOPClassUID), str(s.SOPInstanceUID))
                           for s in sources],
            measurements=measurements, qualitative_evaluations=evaluations)]
    else:
        groups = []
        for n, (name, (column, row)) in enumerate(regions.items()):
            k = classes.index(name)
            group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking if n == 0 else hd.sr.TrackingIdentifier(
                    uid=result_uid("tracking", *source_uids, name, model=model), identifier=f"wsr_med {name}"[:64]),
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POINT, graphic_data=np.array([[column, row]], dtype=float),
                    source_image=hd.sr.SourceImageForRegion(str(first.SOPClassUID), str(first.SOPInstanceUID))),
                algorithm_id=model.algorithm(rule, unlike_training),
                # the first group holds every probability and decision; a further present finding's, its own
                measurements=measurements if n == 0 else [probability(k)],
                qualitative_evaluations=evaluations if n == 0 else [
                    hd.sr.QualitativeEvaluation(class_codes[name], _PRESENT)])
            group[0].ContentSequence.append(hd.sr.TextContentItem(
                _COMMENT, finding_comment(name, float(probabilities[k]), True if multilabel else None, model,
                                          unlike_training), hd.sr.RelationshipTypeValues.CONTAINS))
            groups.append(group)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid("device", model=model), name="wsr_med", model_name=model.name[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    series_uid = result_uid("sr-series", str(first.StudyInstanceUID), model=model)
    with copied_as_held():
        return hd.sr.ComprehensiveSR(
            evidence=evidence,
            content=report,
            series_instance_uid=series_uid,
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=result_uid("sr", *source_uids, model=model),
            instance_number=int(first.get("InstanceNumber") or 1),
            manufacturer=MANUFACTURER,
            specific_character_set=character_set(evidence),
            contributing_equipment=[contributing_equipment(model)],
            # the warning first: the 64 characters never cut it
            series_description=f"{NOT_FOR_CLINICAL_USE} - wsr_med {model.name} {model.version}"[:64],
            is_complete=True,
        )


def read_sr_probabilities(sr: pydicom.Dataset) -> dict[str, float]:
    """The class probabilities an SR made by :func:`classification_sr` holds, by class name, read with highdicom."""
    report = (sr if isinstance(sr, hd.sr.ComprehensiveSR) else hd.sr.ComprehensiveSR.from_dataset(sr)).content
    out = {}
    for group in [*report.get_image_measurement_groups(), *report.get_planar_roi_measurement_groups()]:
        for measurement in group.get_measurements():
            meaning = measurement.name.meaning
            if meaning.startswith("Probability of "):
                out.setdefault(meaning[len("Probability of "):], float(measurement.value))
    return out
