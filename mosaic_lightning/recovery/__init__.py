"""Recovery: the training-time numerics of pruning, free of Lightning.

Owns the distillation loss (winning quality back after pruning) and the ADMM solver (training the weights into
the sparse set). The Lightning side (schedules, LoRA recovery, the training module) decides when they run and
imports from here. May import :mod:`..core` only.
"""
