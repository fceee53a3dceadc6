"""Calibration: the inputs each projection sees, block by block, and the statistics drawn from them.

Owns activation capture, the per-projection statistics (norms, Hessians), true-sequential passes inside a block,
and the block context a method works in. May import :mod:`..core` only.
"""
