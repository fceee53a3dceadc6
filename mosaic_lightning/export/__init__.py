"""Export: writing a pruned model that plain ``transformers`` loads, and reading it back.

Owns ``save_pruned`` (safetensors, model card, report), the compressed-tensors bitmask format, physical compaction
of removed structure, and checks of checkpoints given to resume from. May import core, evaluation and pruning.
"""
