"""Knowledge distillation from the dense model: the recovery objective of Minitron and Sheared LLaMA.

The pruned student is trained to match the dense teacher's next-token distributions:
``T^2 KL(softmax(teacher / T) || softmax(student / T))``, averaged over every token position (``T^2`` keeps the
gradient's scale independent of the temperature, as in Hinton et al.). No Lightning here: the loss is a function
of two logits tensors; :class:`~mosaic_lightning.CausalLM` mixes it with the language-modelling loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Token-mean ``T^2 KL(p_teacher || p_student)`` of ``[..., vocab]`` logits, computed in fp32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "the teacher must be the same model (same vocabulary) before pruning"
        )
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2
