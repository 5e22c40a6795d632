"""MONAI/ignite handlers for wsr_med workflows."""

from wsr_med.handlers.best_model import BestModelSaver, atomic_save
from wsr_med.handlers.optimizer_hooks import BatchNormWarmStart, ConstraintHandler
from wsr_med.handlers.finetune import FreezeBackbone
from wsr_med.handlers.finite_loss import FiniteLossCheck
from wsr_med.handlers.mlflow_tracker import MLflowTracker
from wsr_med.handlers.monitors import CalibrationFitter, CollapseMonitor
from wsr_med.handlers.reports import EvaluationReporter, PredictionWriter, evaluation_provenance
from wsr_med.handlers.training_checkpoint import TrainingCheckpoint
