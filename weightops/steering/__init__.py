"""Steering vectors: extract from contrastive pairs, apply with hooks, combine, save,
and bake into weights for serving."""

from weightops.steering.hooks import steer
from weightops.steering.layers import SteeringError, find_layers
from weightops.steering.vector import SteeringVector

__all__ = ["SteeringError", "SteeringVector", "find_layers", "steer"]
