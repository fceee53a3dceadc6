"""Pruning schedules (*when*). A new schedule is a new file here subclassing :class:`Schedule`."""

from .base import Schedule
from .gradual import Gradual, cubic_sparsity
from .oneshot import OneShot

__all__ = ["Gradual", "OneShot", "Schedule", "cubic_sparsity"]
