"""Quantization under outlier handling: fake quantization, SmoothQuant, Hadamard rotation, method registry."""

from outlier_study.quant.fake import QuantSpec, fake_quant, quantize, spec_from_config
from outlier_study.quant.methods import METHODS, Method, MethodInputs, get_method
from outlier_study.quant.rotation import rotate
from outlier_study.quant.smoothquant import calibrate, smooth

__all__ = [
    "METHODS",
    "Method",
    "MethodInputs",
    "QuantSpec",
    "calibrate",
    "fake_quant",
    "get_method",
    "quantize",
    "rotate",
    "smooth",
    "spec_from_config",
]
