"""Recovery: the numerics of winning quality back after pruning, free of Lightning.

Owns the distillation loss. The Lightning side (schedules, LoRA recovery, the training module) imports from
here. May import :mod:`..core` only.
"""
