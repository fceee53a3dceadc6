"""Core: what is pruned and how it is recorded; no Lightning, no calibration.

Owns the model adapters (*where*: which modules are projections, per family), the structure of removable units,
the sparsity patterns (*what shape*), the one mask store, the pruning report, numeric option checks, the component
registry (shorthands and ``class_path``), DeepSpeed ZeRO parameter access, block residency, a consolidated plain
copy of a masked or sharded model, and model/text loading. Imports nothing else of the package.
"""
