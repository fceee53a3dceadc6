"""A training loader that resumes mid-epoch exactly where a checkpoint left it.

Lightning saves and restores the state of a train loader that has ``state_dict``/``load_state_dict``; a plain
``DataLoader`` has none, so a run resumed mid-epoch restarts the epoch's order from its first batch (and a
shuffling generator from its seed), and the resumed run trains on other batches than the uninterrupted one.
Here each epoch's order is a pure function of ``(seed, epoch)`` and the loader's state is the number of
windows of that epoch already handed out.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class EpochShuffle(Sampler[int]):
    """A fresh permutation per epoch, seeded by ``seed + epoch`` (as ``DistributedSampler``), that can resume.

    Lightning calls ``set_epoch`` at every epoch start; iterating again after a whole epoch without it moves on
    to the next epoch, so plain loops outside Lightning see new orders too.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed = size, seed
        self.epoch = 0
        self.position = 0  # indices of this epoch already handed out

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[int]:
        if self.position >= self.size:  # the last epoch was handed out whole: this is the next one
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        while self.position < self.size:
            self.position += 1
            yield int(order[self.position - 1])

    def state_dict(self) -> dict[str, int]:
        return {"size": self.size, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Refuse a state recorded for other data: the resumed order would silently differ."""
        if (state.get("size"), state.get("seed")) != (self.size, self.seed):
            raise ValueError(
                f"the checkpoint's training order covers {state.get('size')} windows with data.seed="
                f"{state.get('seed')}, this run has {self.size} windows with data.seed={self.seed}; resume with "
                "the same data (train_files, seq_len) and seed"
            )
        self.epoch, self.position = state["epoch"], state["position"]


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose position travels in Lightning checkpoints (through its :class:`EpochShuffle`).

    Exact on one process with ``num_workers=0`` (the sampler then runs exactly as far as the batches consumed;
    Lightning does not prefetch from a loader with a length). Under DDP Lightning wraps the sampler in its
    distributed one and the position is not kept: resume from an end-of-epoch checkpoint there.
    """

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()} if isinstance(self.sampler, EpochShuffle) else {}

    def load_state_dict(self, state: dict) -> None:
        if "sampler" in state and isinstance(self.sampler, EpochShuffle):
            self.sampler.load_state_dict(state["sampler"])
