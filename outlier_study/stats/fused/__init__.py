"""The fused reducers: a compiled one-pass kernel (`fused.cpp`, built by `build.py`) behind the interfaces
of the reference `stats.reducers.TapReducer` (full statistics) and `stats.channels.ChannelReducer`
(per-channel moments); `python -m outlier_study.stats.fused build` builds it ahead of the first profile."""

from outlier_study.stats.fused.build import kernel_available, load_kernel
from outlier_study.stats.fused.channels import FusedChannelReducer
from outlier_study.stats.fused.reducer import FusedReducer

__all__ = ["FusedChannelReducer", "FusedReducer", "kernel_available", "load_kernel"]
