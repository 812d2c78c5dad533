"""Corpora and token windows for measurement and perplexity."""

from outlier_study.data.corpus import DATASET_NAMES, load_corpus
from outlier_study.data.windows import (
    Windows,
    build_windows,
    calibration_windows,
    make_windows,
    tokenize_corpus,
)

__all__ = [
    "DATASET_NAMES",
    "Windows",
    "build_windows",
    "calibration_windows",
    "load_corpus",
    "make_windows",
    "tokenize_corpus",
]
