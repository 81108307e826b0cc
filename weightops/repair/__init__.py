"""Repairing alignment after a fine-tune: harmful-weight pruning (Antidote), alignment
restoration from the aligned model, their calibration data, and their evaluation."""

from weightops.repair.data import (
    DataError,
    DataLineError,
    Example,
    RepairError,
    batches,
    load_examples,
    render,
)
from weightops.repair.evaluate import evaluate, harmful_rate, refuses, task_score
from weightops.repair.prune import PruneResult, prune
from weightops.repair.restore import RestoreError, RestoreResult, restore, restore_model

__all__ = [
    "DataError",
    "DataLineError",
    "Example",
    "PruneResult",
    "RepairError",
    "RestoreError",
    "RestoreResult",
    "batches",
    "evaluate",
    "harmful_rate",
    "load_examples",
    "prune",
    "refuses",
    "render",
    "restore",
    "restore_model",
    "task_score",
]
