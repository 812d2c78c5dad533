"""outlier-study: trace massive activations and channel-wise outliers to the operator that makes them."""

__version__ = "0.1.0"
