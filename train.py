"""Entry point: ``python train.py fit --config recipes/mosaic-50.yaml [--pruning.sparsity 0.7 ...]``."""

from mosaic_lightning.cli import main

if __name__ == "__main__":
    main()
