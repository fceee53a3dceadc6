"""Mosaic POD: the projection outlier distribution; every projection (q,k,v,o,gate,up,down) gets its own value."""

from __future__ import annotations

from .base import OutlierWeighted


class MosaicPOD(OutlierWeighted):
    name = "mosaic"
