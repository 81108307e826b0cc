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

__all__ = [
    "DataError",
    "DataLineError",
    "Example",
    "PruneResult",
    "RepairError",
    "batches",
    "evaluate",
    "harmful_rate",
    "load_examples",
    "prune",
    "refuses",
    "render",
    "task_score",
]
