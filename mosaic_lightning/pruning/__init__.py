"""Pruning: the options of one run (:class:`PruningConfig`) and the layer-streamed engine that applies them.

The engine profiles the model, asks the allocation *how much* each projection loses, asks the method *which
weights* go, block by block, and commits every block's masks at the end (or as each block is written, when
streaming). May import core, calibration, evaluation, methods and allocation.
"""
