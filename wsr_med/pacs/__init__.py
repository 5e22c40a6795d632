"""From and to a PACS: classify the images of a DICOM archive and store the results back as DICOM.

Code map:

* :mod:`wsr_med.pacs.archive` - DICOMweb (``requests``, every answer bounded), C-STORE (``pynetdicom``) and folders; credentials,
  bounded retries, one-line errors.
* :mod:`wsr_med.pacs.selection` - which instances a model classifies, and why the others are skipped.
* :mod:`wsr_med.pacs.results` - the Comprehensive SR of a classification (``highdicom``, TID 1500), deterministic UIDs.
* :mod:`wsr_med.pacs.heatmaps` - the optional evidence-map Secondary Capture.
* :mod:`wsr_med.pacs.classify` - the loop: studies -> selection -> batches -> model -> SRs -> destination.
* :mod:`wsr_med.pacs.orthanc` - a throw-away local Orthanc archive, for the tests and ``wsr-med bench pacs``.

Networks and data know nothing of archives: this package uses them, not the other way round.
"""

from wsr_med.pacs.archive import (ArchiveError, CStoreDestination, DicomFolder, DicomWebArchive, FolderDestination,
                                  Retry)
from wsr_med.pacs.classify import PacsSummary, classify_studies
from wsr_med.pacs.results import ClassCodes, ModelIdentity, classification_sr, read_sr_probabilities
from wsr_med.pacs.selection import Selection

__all__ = ["ArchiveError", "CStoreDestination", "ClassCodes", "DicomFolder", "DicomWebArchive", "FolderDestination",
           "ModelIdentity", "PacsSummary", "Retry", "Selection", "classification_sr", "classify_studies",
           "read_sr_probabilities"]
