"""The fused reducer: a compiled one-pass kernel (`fused.cpp`, built by `build.py`) behind the same
interface as the reference `stats.reducers.TapReducer`; `python -m outlier_study.stats.fused build`
builds it ahead of the first profile."""

from outlier_study.stats.fused.build import kernel_available, load_kernel
from outlier_study.stats.fused.reducer import FusedReducer

__all__ = ["FusedReducer", "kernel_available", "load_kernel"]
