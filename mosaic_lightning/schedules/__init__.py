"""Pruning schedules (*when*). A new schedule is a new file here subclassing :class:`Schedule`."""

from .admm import ADMM, sparse_projection
from .base import Schedule
from .gradual import Gradual, cubic_sparsity
from .oneshot import OneShot

__all__ = ["ADMM", "Gradual", "OneShot", "Schedule", "cubic_sparsity", "sparse_projection"]
