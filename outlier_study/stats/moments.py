"""Merging streamed moments of two groups without revisiting data: global central moments up to the
fourth (Pébay) and per-channel (count, mean, M2) (Chan et al.)."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Moments = tuple[float, float, float, float, float]  # (n, mean, M2, M3, M4); M_p = sum of (a - mean)^p
EMPTY_MOMENTS: Moments = (0.0, 0.0, 0.0, 0.0, 0.0)
ChannelMoments = tuple[np.ndarray, np.ndarray, np.ndarray]  # per channel (count, mean, M2), float64
Array = TypeVar("Array", np.ndarray, torch.Tensor)  # channel state: numpy, or tensors kept on a device


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Pébay's pairwise update of central moments: stable when the mean is large relative to the std."""
    na, ma, m2a, m3a, m4a = a
    nb, mb, m2b, m3b, m4b = b
    if nb == 0:
        return a
    if na == 0:
        return b
    n = na + nb
    delta = mb - ma
    dn = delta / n
    mean = ma + nb * dn
    m2 = m2a + m2b + delta * dn * na * nb
    m3 = m3a + m3b + delta * dn * dn * na * nb * (na - nb) + 3.0 * dn * (na * m2b - nb * m2a)
    m4 = (
        m4a
        + m4b
        + delta * dn**3 * na * nb * (na * na - na * nb + nb * nb)
        + 6.0 * dn * dn * (na * na * m2b + nb * nb * m2a)
        + 4.0 * dn * (na * m3b - nb * m3a)
    )
    return (n, mean, m2, m3, m4)


def merge_channel_moments(
    a: tuple[Array, Array, Array], b: tuple[Array, Array, Array]
) -> tuple[Array, Array, Array]:
    """Chan et al.'s parallel update per channel; a channel without elements in b keeps a's values. Numpy
    arrays or tensors alike (element-wise operators only), so a device's state stays on the device."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    total = n_a + n_b
    frac = n_b / total.clip(min=1.0)  # counts are whole numbers, so this is n_b / total, or 0 when empty
    delta = mean_b - mean_a
    return total, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac
