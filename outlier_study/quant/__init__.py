"""Quantization under outlier handling: fake quantization, its error, SmoothQuant, rotation, the methods."""
