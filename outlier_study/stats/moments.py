"""Streaming global moments: merging (count, mean, M2, M3, M4) of two groups without revisiting data."""

from __future__ import annotations

Moments = tuple[float, float, float, float, float]  # (n, mean, M2, M3, M4); M_p = sum of (a - mean)^p
EMPTY_MOMENTS: Moments = (0.0, 0.0, 0.0, 0.0, 0.0)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Pebay's pairwise update of central moments: stable when the mean is large relative to the std."""
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
