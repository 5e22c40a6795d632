"""Which instances of a study a model classifies, like MONAI Deploy's series selector: rules on DICOM attributes.

A rules file (``--select rules.json``) maps attribute keywords to the values accepted::

    {"Modality": ["CR", "DX"], "ImageType": ["ORIGINAL", "PRIMARY"], "BodyPartExamined": ["CHEST"],
     "ViewPosition": ["PA", "AP"], "SOPClassUID": ["1.2.840.10008.5.1.4.1.1.1.1"]}

A single-valued attribute must be one of its list; a multi-valued one (``ImageType``) must contain every value of
its list; an attribute a rule names and the header lacks fails the rule. Without a file the rule is the training
profile's modalities (``profile.json``). Always, whatever the rules: the instance must be an image (it has rows and
columns) no larger than ``max_pixels`` as its header declares it (checked before it is retrieved), and a 2D model
classifies single-frame images only (a 3D model classifies a series).
Every instance left out gets its reason, and the reasons are listed (``skipped.csv``): nothing is dropped silently.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

from wsr_med.errors import WsrMedError
from wsr_med.files import read_json_object
from wsr_med.settings import default

__all__ = ["Selection", "RULE_KEYWORDS"]

RULE_KEYWORDS = ("Modality", "ImageType", "SOPClassUID", "BodyPartExamined", "ViewPosition", "Laterality",
                 "PhotometricInterpretation", "SeriesDescription")
_MULTI_VALUED = ("ImageType",)


class Selection:
    """Rules on header attributes (see the module docstring).

    Args:
        rules: keyword -> accepted values.
        spatial_dims: the model's: 2 classifies single-frame images, 3 whole series.
        source: where the rules came from, for messages ("rules.json", "the training profile").
    """

    def __init__(self, rules: dict[str, list[str]], spatial_dims: int = 2, source: str = "rules",
                 max_pixels: int = default("max_pixels")) -> None:
        self.rules = {k: [str(v) for v in values] for k, values in rules.items()}
        self.spatial_dims = spatial_dims
        self.source = source
        self.max_pixels = max_pixels

    @classmethod
    def from_file(cls, path: str | Path, spatial_dims: int = 2, max_pixels: int = default("max_pixels")) -> "Selection":
        rules = read_json_object(path, "selection rules",
                                 '{"<attribute>": ["<value>", ...]}, e.g. {"Modality": ["CR", "DX"]}')
        for key, values in rules.items():
            if key not in RULE_KEYWORDS:
                raise WsrMedError(f"{path}: {key!r} is not an attribute rules can name ({', '.join(RULE_KEYWORDS)})")
            if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
                raise WsrMedError(f"{path}: {key!r} needs a non-empty list of strings")
        return cls(rules, spatial_dims, Path(path).name, max_pixels)

    @classmethod
    def from_profile(cls, profile: dict | None, spatial_dims: int = 2,
                     max_pixels: int = default("max_pixels")) -> "Selection":
        """The training profile's modalities; no modality rule when the training scans had none (PNG/JPEG)."""
        modalities = sorted((profile or {}).get("modalities") or {})
        return cls({"Modality": modalities} if modalities else {}, spatial_dims, "the training profile", max_pixels)

    def reason(self, header: pydicom.Dataset) -> str:
        """Why ``header``'s instance is not classified ("" when it is)."""
        if not header.get("Rows") or not header.get("Columns"):
            modality = header.get("Modality") or "?"
            return f"not an image (modality {modality})"
        frames = int(header.get("NumberOfFrames") or 1)
        if self.spatial_dims == 2 and frames > 1:
            return f"multi-frame ({frames} frames) for a 2D model"
        declared = int(header.Rows) * int(header.Columns) * frames
        if declared > self.max_pixels:  # refused on the header, before its bytes are retrieved
            return f"too large: {header.Rows} x {header.Columns} x {frames} frame(s) > max_pixels {self.max_pixels}"
        for key, accepted in self.rules.items():
            value = header.get(key)
            if value is None or value == "":
                return f"no {key} (rule from {self.source}: {', '.join(accepted)})"
            if key in _MULTI_VALUED:
                many = isinstance(value, (list, pydicom.multival.MultiValue))
                values = [str(v) for v in (value if many else [value])]
                missing = [a for a in accepted if a not in values]
                if missing:
                    shown = "\\".join(values)
                    return f"{key} {shown} lacks {', '.join(missing)} (rule from {self.source})"
            elif str(value) not in accepted:
                return f"{key} {value} not in {', '.join(accepted)} (rule from {self.source})"
        return ""
