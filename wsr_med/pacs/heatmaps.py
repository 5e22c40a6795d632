"""``--heatmaps``: where the model found its evidence, as a derived DICOM Secondary Capture in the source's study.

The head's own contribution map (:class:`wsr_med.networks.HeadEvidence`, the same map that places the SR's region)
for the decided class (multi-label: the most probable finding), its positive part, over the image as the model saw it
(resized, padded), scaled up to at least :data:`MIN_SIDE` pixels so that the burned-in legend reads: "NOT FOR
DIAGNOSTIC USE", the model, the class. The image is RGB, ``BurnedInAnnotation`` YES, ``ImageType``
DERIVED\\SECONDARY, references its source image, carries wsr_med's Contributing Equipment item, and lives in a series of
its own whose description says NOT FOR CLINICAL USE. 2D models only.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from wsr_med.pacs.results import (MANUFACTURER, NOT_FOR_CLINICAL_USE, SC_SERIES_NUMBER, ModelIdentity, character_set,
                                  contributing_equipment, copied_as_held, evidence_of, result_uid)

__all__ = ["evidence_image", "MIN_SIDE", "LEGEND"]

MIN_SIDE = 512
LEGEND = "NOT FOR DIAGNOSTIC USE"


def evidence_image(source: pydicom.Dataset, image: np.ndarray, contribution: torch.Tensor, label: str,
                   model: ModelIdentity) -> hd.sc.SCImage:
    """The evidence map of ``label`` over ``image`` (``(C, H, W)``, as the model saw it) with the legend, as an SC image.

    Args:
        contribution: the class's contribution map ``(h, w)`` (:meth:`wsr_med.networks.HeadEvidence.maps`): its
            positive part (evidence for the class), scaled to its maximum, is interpolated to the image.
    """
    positive = contribution.clamp_min(0).float()
    positive = positive / positive.max().clamp_min(1e-12)
    cam = torch.nn.functional.interpolate(positive[None, None], size=image.shape[-2:], mode="bilinear",
                                          align_corners=False)[0, 0].cpu().numpy()
    gray = image.mean(0) if image.ndim == 3 else image
    gray = (gray - gray.min()) / max(float(gray.max() - gray.min()), 1e-6)
    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3]
    rgb = (0.6 * np.repeat(gray[..., None], 3, axis=2) + 0.4 * heat) * 255
    picture = Image.fromarray(rgb.astype(np.uint8))
    scale = max(1, int(np.ceil(MIN_SIDE / max(picture.size))))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(12, picture.width // 28))
    lines = [LEGEND, f"{model.name} {model.version}"[:48], f"evidence for: {label}"[:48]]
    y = 4
    for line in lines:
        box = draw.textbbox((6, y), line, font=font)
        draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
        draw.text((6, y), line, fill=(255, 255, 0), font=font)
        y = box[3] + 6
    header = evidence_of(source)
    with copied_as_held():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=header, pixel_array=np.asarray(picture), photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=result_uid("sc-series", str(source.StudyInstanceUID), model=model),
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=result_uid("sc", str(source.SOPInstanceUID), model=model),
            instance_number=int(source.get("InstanceNumber") or 1), manufacturer=MANUFACTURER,
            specific_character_set=character_set([header]), contributing_equipment=[contributing_equipment(model)],
            patient_orientation=("L", "F"), transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian)
    # the preprocessing keeps the orientation (no flips): the source's, or empty (type 2C) when it has none;
    # highdicom wants a value for a patient-based image, so it is given a placeholder and then the truth
    sc.PatientOrientation = source.get("PatientOrientation") or ""
    sc.Laterality = source.get("Laterality") or ""  # type 2C: empty when the source does not say
    sc.SeriesDescription = f"{NOT_FOR_CLINICAL_USE} - wsr_med evidence {model.name} {model.version}"[:64]
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = f"Evidence map (the head's contribution by position) of {model.name} {model.version} for {label}"[:1024]
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    return sc
