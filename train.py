"""``python train.py ...`` is the ``mosaic-lightning`` command run from a checkout (same subcommands and flags):
``python train.py fit --config mosaic-50 [--pruning.sparsity 0.7 ...]``."""

from mosaic_lightning.cli import main

if __name__ == "__main__":
    main()
