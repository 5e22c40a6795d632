"""Reading scans, scanning datasets, patient-level splits, caching and synthetic data."""

from wsr_med.data.dataset import (
    CACHE_MODES,
    cache_key,
    default_num_workers,
    scan_dataset,
    scan_loader,
    transform_signature,
)
from wsr_med.data.readers import ScanReadError, read_dicom, read_image, read_scan, read_volume
from wsr_med.data.scan import DatasetScan, hash_id, scan_folder, scan_manifest
from wsr_med.data.split import assign_folds, read_datalist, split_items, write_datalist
from wsr_med.data.findings import LabelFile, is_label_file, read_label_file
from wsr_med.data.synthetic import make_multilabel_folder, make_synthetic_folder, synthetic_dataset, synthetic_image, write_dicom
from wsr_med.data.transforms import LoadScan, LoadScand, scan_transforms
