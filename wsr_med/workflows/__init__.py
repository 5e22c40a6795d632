"""The pieces bundle configs call by ``_target_`` / ``$`` expressions: data preparation, model loading, resume, tracking checks.

Keeping them here keeps the configs data: ``train.json`` wires these together and holds no logic.
"""

from wsr_med.workflows.bundle import BUNDLE, parse_bundle, run_workflow
from wsr_med.workflows.data import PreparedData, class_names, prepare_data, prepare_evaluation, prepare_unlabelled
from wsr_med.workflows.model import load_classes, load_model
from wsr_med.workflows.runs import (
    check_tracking_uri,
    metric_inputs,
    per_class_auc_metrics,
    resume_checkpoint,
    save_run_info,
    sqlite_uri,
)
