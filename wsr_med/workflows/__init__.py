"""The pieces bundle configs call by ``_target_`` / ``$`` expressions: data preparation, model loading, metric inputs.

Keeping them here keeps the configs data: ``train.json`` wires these together and holds no logic.
The run folder (:mod:`wsr_med.runs`) and MLflow (:mod:`wsr_med.tracking`) have modules of their own.
"""

from wsr_med.workflows.bundle import BUNDLE, config_files, parse_bundle, run_workflow
from wsr_med.workflows.data import PreparedData, check_trainable, class_names, prepare_data, prepare_evaluation, prepare_unlabelled
from wsr_med.workflows.metrics import (ModelSelection, auc_metric, evaluation_metrics, masked_macro_auc, metric_inputs,
                                      per_class_auc_metrics, validation_metrics)
from wsr_med.workflows.model import TrainedModel, amp_dtype, load_model, place_network
