"""MONAI/ignite handlers for wsr_med workflows."""

from wsr_med.handlers.constraint_handler import ConstraintHandler
