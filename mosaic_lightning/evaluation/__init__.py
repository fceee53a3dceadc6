"""Evaluation: held-out perplexity (torchmetrics) and zero-shot accuracy (lm-eval) of an in-memory model.

Plain functions, no Lightning; the Lightning callback for zero-shot accuracy lives in :mod:`..callbacks`. May
import :mod:`..core` only.
"""
