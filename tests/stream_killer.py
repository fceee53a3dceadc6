"""A Wanda that SIGKILLs its own process on reaching block ``layer``, once (while ``marker`` does not exist): a
streamed CLI run killed mid-way, for tests/test_streaming.py (imported by the run through ``class_path``)."""

from __future__ import annotations

import os
import pathlib
import signal

from mosaic_lightning.methods import Wanda


class KillAtBlock(Wanda):
    def __init__(self, layer: int = 2, marker: str = "killed") -> None:
        self.layer, self.marker = layer, marker

    def prune_block(self, block):
        marker = pathlib.Path(self.marker)
        if block.layer == self.layer and not marker.exists():
            marker.write_text("killed here")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().prune_block(block)
