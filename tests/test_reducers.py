"""TapReducer against a float64 numpy reference computed on the concatenation of all windows."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from outlier_study.stats import reducers, selection
from outlier_study.stats.reducers import TapReducer
from outlier_study.stats.tapstats import TapStats


@pytest.fixture(autouse=True, params=[None, 1000, 150], ids=["chunk-default", "chunk-1000", "chunk-150"])
def chunk_elements(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test also with tiny work chunks, so several windows per chunk, one window per chunk and
    several row blocks per window (each its own moment group) are all merged and checked."""
    if request.param is not None:
        monkeypatch.setattr(reducers, "_CHUNK_ELEMENTS", request.param)


@dataclass
class Chunk:
    x: torch.Tensor
    offset: int
    valid: torch.Tensor | None = None


def split(x: torch.Tensor, sizes: list[int], valid: torch.Tensor | None = None) -> list[Chunk]:
    """Cut (W, T, C) into update calls of the given batch sizes; `valid` is (W, T, C)-broadcastable."""
    assert sum(sizes) == x.shape[0]
    chunks, start = [], 0
    for size in sizes:
        v = None
        if valid is not None:
            v = valid[start : start + size] if valid.dim() == 3 and valid.shape[0] > 1 else valid
        chunks.append(Chunk(x[start : start + size], start, v))
        start += size
    return chunks


def feed(chunks: list[Chunk], **kwargs) -> TapStats:
    red = TapReducer(**kwargs)
    for c in chunks:
        red.update(c.x, c.offset, c.valid)
    return red.result()


def reference(chunks: list[Chunk], top_k: int = 3, ma_abs: float = 100.0, ma_ratio: float = 1000.0) -> dict:
    """Everything recomputed from the full float64 tensor, indexed by global window (chunks without
    tokens count windows that have no element)."""
    n_windows = max(c.offset + c.x.shape[0] for c in chunks)
    T, C = chunks[0].x.shape[1:]
    X = np.zeros((n_windows, T, C))
    V = np.zeros((n_windows, T, C), dtype=bool)
    for c in chunks:
        b = c.x.shape[0]
        if c.x.numel() == 0:  # windows without tokens: counted, never valid
            continue
        X[c.offset : c.offset + b] = c.x.double().numpy()
        v = np.ones((b, T, C), dtype=bool)
        if c.valid is not None:
            v = np.broadcast_to(c.valid.numpy(), (b, T, C)).copy()
        V[c.offset : c.offset + b] = v
    with np.errstate(invalid="ignore"):
        F = V & np.isfinite(X)
    A = np.abs(X)
    vals = X[F]
    out = {
        "n_windows": n_windows,
        "n_elements": int(F.sum()),
        "nan_count": int((V & np.isnan(X)).sum()),
        "inf_count": int((V & np.isinf(X)).sum()),
    }
    if vals.size:
        m = vals.mean()
        dev = vals - m
        m2, m4 = (dev**2).mean(), (dev**4).mean()
        out.update(max_abs=np.abs(vals).max(), mean=m, std=math.sqrt(m2), kurtosis=m4 / m2**2)
    masked = np.where(F, A, -1.0)
    order = np.argsort(-masked, axis=None, kind="stable")[:top_k]
    out["top"] = [
        (X[w, t, c], A[w, t, c], w, t, c)
        for w, t, c in zip(*np.unravel_index(order, masked.shape), strict=True)
        if F[w, t, c]
    ]
    medians, ma = [], 0
    for w in range(n_windows):
        a = np.sort(A[w][F[w]])
        med = a[(a.size - 1) // 2] if a.size else math.nan
        medians.append(med)
        if a.size:
            ma += int(((a > ma_abs) & (a >= ma_ratio * med)).sum())
    out["window_medians"] = medians
    out["median_abs"] = float(np.nanmean(medians)) if any(not math.isnan(m) for m in medians) else math.nan
    out["ma_count"] = ma
    cnt = F.sum(axis=(0, 1))
    xs = np.where(F, X, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ch_mean = xs.sum(axis=(0, 1)) / cnt
        ch_var = (np.where(F, X - ch_mean, 0.0) ** 2).sum(axis=(0, 1)) / cnt
    out.update(
        channel_count=cnt,
        channel_mean=ch_mean,
        channel_std=np.sqrt(ch_var),
        channel_absmax=np.where(cnt > 0, np.where(F, A, -np.inf).max(axis=(0, 1)), np.nan),
    )
    return out


def assert_matches(
    got: TapStats, ref: dict, rtol: float = 1e-5, channels: bool = True, moments: bool = True
) -> None:
    for name in ("n_windows", "n_elements", "nan_count", "inf_count", "ma_count"):
        assert getattr(got, name) == ref[name], name
    np.testing.assert_allclose(got.max_abs, ref["max_abs"], rtol=rtol, err_msg="max_abs")
    if moments:
        for name in ("std", "kurtosis"):
            np.testing.assert_allclose(getattr(got, name), ref[name], rtol=rtol, err_msg=name)
        # A mean near 0 has no meaningful relative error: measure it against the spread instead.
        np.testing.assert_allclose(got.mean, ref["mean"], rtol=rtol, atol=rtol * ref["std"], err_msg="mean")
    else:
        assert all(math.isnan(v) for v in (got.mean, got.std, got.kurtosis))
    np.testing.assert_array_equal(np.array(got.window_medians), np.array(ref["window_medians"]))
    np.testing.assert_allclose(got.median_abs, ref["median_abs"], rtol=1e-12)
    assert len(got.top) == len(ref["top"])
    for entry, (value, absval, w, t, c) in zip(got.top, ref["top"], strict=True):
        assert (entry.window, entry.token, entry.channel) == (w, t, c)
        assert entry.value == value and entry.abs == absval
    if not channels:
        for name in ("channel_mean", "channel_std", "channel_absmax", "channel_count"):
            assert getattr(got, name) is None
        return
    np.testing.assert_array_equal(got.channel_count, ref["channel_count"])
    np.testing.assert_array_equal(got.channel_absmax, ref["channel_absmax"])
    np.testing.assert_allclose(got.channel_mean, ref["channel_mean"], rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(got.channel_std, ref["channel_std"], rtol=rtol)


def random_windows(seed: int, w: int = 7, t: int = 24, c: int = 16) -> torch.Tensor:
    """Gaussian data with per-channel scale and offset, plus three planted maxima at known positions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(w, t, c, generator=g) * torch.linspace(0.5, 3.0, c) + torch.linspace(-2.0, 2.0, c)
    planted = {(1, 3, 5): -70.0, (4, 0, 2): 60.0, (4, 9, 11): 55.0}
    for (wi, ti, ci), value in planted.items():
        if wi < w and ti < t and ci < c:
            x[wi, ti, ci] = value
    return x


def test_full_reference_match_over_varying_batches() -> None:
    x = random_windows(0)
    chunks = split(x, [2, 1, 3, 1])
    got = feed(chunks)
    ref = reference(chunks)
    assert_matches(got, ref)
    assert [(e.window, e.token, e.channel) for e in got.top] == [(1, 3, 5), (4, 0, 2), (4, 9, 11)]
    assert got.top[0].value == -70.0 and got.top[0].abs == 70.0


def test_out_of_order_updates_keep_global_window_indices() -> None:
    x = random_windows(1)
    chunks = split(x, [3, 2, 2])
    got = feed(chunks[::-1])
    assert_matches(got, reference(chunks))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_non_contiguous_and_other_dtypes(dtype: torch.dtype) -> None:
    x = random_windows(14).to(dtype)
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, channel-major memory
    assert not strided.is_contiguous()
    chunks = split(strided, [2, 5])
    assert_matches(feed(chunks), reference(chunks), rtol=1e-5)


def test_top_k_larger_than_batch_and_zero() -> None:
    x = random_windows(2, w=3, t=2, c=2)
    chunks = split(x, [1, 2])
    assert_matches(feed(chunks, top_k=9), reference(chunks, top_k=9))
    got = feed(chunks, top_k=0)
    assert got.top == [] and got.n_elements == 12
    sparse = torch.tensor([[[math.nan, 0.5], [-2.0, math.inf]]])  # only two finite entries
    got = feed([Chunk(sparse, 0)], top_k=5)
    assert [(e.value, e.token, e.channel) for e in got.top] == [(-2.0, 1, 0), (0.5, 0, 1)]


def test_top_k_search_skipped_only_when_nothing_can_enter() -> None:
    """A chunk whose max does not beat the running k-th |a| is not searched; ties keep the earlier entry."""
    x = torch.zeros(3, 4, 2)
    x[0, 1, 1], x[0, 2, 0] = 5.0, -4.0
    x[1, 3, 1] = 4.0  # ties the k-th (for k=2) of the first update: cannot enter, window 0 is first
    x[2, 0, 0] = 4.5  # beats it: must replace it
    chunks = split(x, [1, 1, 1])
    for k in (1, 2, 3, 4):
        got = feed(chunks, top_k=k)
        assert_matches(got, reference(chunks, top_k=k))
    assert [(e.value, e.window) for e in feed(chunks, top_k=3).top] == [(5.0, 0), (4.5, 2), (-4.0, 0)]


def test_massive_activation_count_uses_each_windows_median() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32, 16, generator=g)
    x[2] *= 0.01  # window 2 has a tiny median, so its ratio threshold is far below ma_abs
    x[0, 0, 0] = 2000.0  # counted: > 100 and >= 1000 * ~0.67
    x[1, 5, 3] = -500.0  # not counted: below 1000 * median
    x[2, 7, 7] = 150.0  # counted: ratio threshold is ~7
    x[2, 8, 8] = -90.0  # not counted: not above ma_abs
    chunks = split(x, [1, 3])
    got = feed(chunks)
    assert got.ma_count == 2
    assert_matches(got, reference(chunks))
    assert feed(chunks, ma_abs=50.0).ma_count == 3


def test_channel_with_large_mean_and_offset_global_moments() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 64, 8, generator=g) + 50.0  # offset global mean
    x[..., 0] = 1e4 + torch.randn(6, 64, generator=g)  # channel mean 1e4, std 1
    chunks = split(x, [1, 2, 3])
    got = feed(chunks)
    ref = reference(chunks)
    assert_matches(got, ref)
    np.testing.assert_allclose(got.channel_std[0], ref["channel_std"][0], rtol=1e-4)
    assert 0.8 < got.channel_std[0] < 1.2


def test_global_moments_offset_and_heavy_tails() -> None:
    g = torch.Generator().manual_seed(5)
    gauss = torch.randn(5, 128, 32, generator=g) + 50.0
    laplace = torch.distributions.Laplace(torch.tensor(-20.0), torch.tensor(2.0)).sample((5, 128, 32))
    for x, kurt in ((gauss, 3.0), (laplace, 6.0)):
        chunks = split(x, [2, 1, 2])
        got = feed(chunks, channel_stats=False)
        ref = reference(chunks)
        for name in ("mean", "std", "kurtosis"):
            np.testing.assert_allclose(getattr(got, name), ref[name], rtol=1e-4, err_msg=name)
        assert abs(got.kurtosis - kurt) < 0.15 * kurt


def test_huge_values_do_not_overflow_fourth_powers() -> None:
    x = random_windows(6, w=3)
    x[0, 0, 0] = -1e30  # like a finfo.min attention mask without a valid mask: x^4 overflows float32
    chunks = split(x, [1, 2])
    assert_matches(feed(chunks), reference(chunks))


def test_causal_valid_mask_on_attention_scores() -> None:
    g = torch.Generator().manual_seed(7)
    w, t = 5, 20
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = torch.randn(w, t, t, generator=g) * 2.0 + 1.0
    x[2, 19, 4] = 40.0
    x = x.masked_fill(~causal, -math.inf)
    x[2, 1, 10] = 1e3  # huge but masked out: must not show up anywhere
    chunks = split(x, [2, 3], valid=causal)
    got = feed(chunks)
    ref = reference(chunks)
    assert_matches(got, ref)
    assert got.inf_count == 0 and got.n_elements == w * t * (t + 1) // 2
    assert got.top[0].abs == 40.0
    assert got.channel_count[0] == w * t and got.channel_count[-1] == w
    # A non-finite value inside the mask is counted; the masked -inf entries still are not.
    x[3, 6, 2] = math.inf
    x[0, 7, 0] = math.nan
    chunks = split(x, [2, 3], valid=causal)
    got = feed(chunks)
    assert (got.inf_count, got.nan_count) == (1, 1)
    assert_matches(got, reference(chunks))


def test_per_window_and_per_token_valid_masks() -> None:
    x = random_windows(8, w=4, t=10, c=6)
    window_mask = torch.tensor([True, False, True, True]).view(4, 1, 1)
    token_mask = (torch.arange(10) % 3 != 0).view(1, 10, 1)
    for valid in (window_mask, token_mask, window_mask & token_mask):
        chunks = [Chunk(x[:1], 0, valid[:1] if valid.shape[0] > 1 else valid)]
        chunks.append(Chunk(x[1:], 1, valid[1:] if valid.shape[0] > 1 else valid))
        got = feed(chunks)
        assert_matches(got, reference(chunks))
    assert math.isnan(got.window_medians[1])


def test_float16_with_inf_nan_and_all_nan_window() -> None:
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(6, 16, 12, generator=g) * 3.0).half()
    x[0, 1, 2] = math.inf
    x[0, 4, 4] = -math.inf
    x[3, 5, 6] = math.inf
    x[1, 2, 3] = math.nan
    x[5, 0, 0] = 5000.0  # massive: > 100 and >= 1000 * the window median (~2)
    x[4] = math.nan  # whole window overflowed
    chunks = split(x, [2, 3, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = feed(chunks)
    ref = reference(chunks)
    assert (got.nan_count, got.inf_count) == (1 + 16 * 12, 3)
    assert got.n_elements == 6 * 16 * 12 - got.nan_count - got.inf_count
    assert math.isnan(got.window_medians[4])
    assert not math.isnan(got.median_abs)
    assert got.ma_count == 1
    assert_matches(got, ref, rtol=1e-4)


def test_rank_selection_is_exact_with_heavy_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    """Few distinct values (ties at and around the target rank) drive every branch of the bracket search."""
    monkeypatch.setattr(selection, "_SELECT_SMALL", 16)
    monkeypatch.setattr(selection, "_SELECT_SAMPLE", 32)
    rng = np.random.default_rng(0)
    probe = np.random.default_rng(1)
    for trial in range(1500):
        pool = rng.standard_normal(int(rng.integers(1, 6))).astype(np.float32)
        v = rng.choice(pool, size=int(rng.integers(17, 400)))
        if trial % 2:
            v = np.concatenate([v, rng.standard_normal(int(rng.integers(1, 300))).astype(np.float32)])
        rank = int(rng.integers(0, v.size))
        assert selection.rank_value(v.copy(), rank, probe) == np.sort(v)[rank]


def test_tie_heavy_windows_relu_zeros_and_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selection, "_SELECT_SMALL", 64)
    monkeypatch.setattr(selection, "_SELECT_SAMPLE", 64)
    g = torch.Generator().manual_seed(15)
    x = torch.relu(
        torch.randn(6, 32, 16, generator=g) - torch.tensor([0.0, 0.1, 0.3, -0.2, 1.5, 0.0]).view(6, 1, 1)
    )
    x[5] = 0.0  # all zeros: median 0, no massive activation despite ratio * 0
    x[5, 3, 3] = 150.0
    causal = torch.ones(32, 16, dtype=torch.bool).tril()
    for valid in (None, causal):
        chunks = split(x, [2, 4], valid=valid)
        got = feed(chunks)
        assert_matches(got, reference(chunks))
        assert got.window_medians[5] == 0.0 and got.ma_count == 1


def test_channel_stats_false_skips_channels_only() -> None:
    x = random_windows(10)
    chunks = split(x, [4, 3])
    got = feed(chunks, channel_stats=False)
    assert_matches(got, reference(chunks), channels=False)


@pytest.mark.parametrize("numpy_select", [True, False])
def test_moments_false_keeps_every_other_statistic(
    monkeypatch: pytest.MonkeyPatch, numpy_select: bool
) -> None:
    """What an MA experiment reads (counts, max, top-k, medians, MA count) with the moments left out, on
    data with non-finite values, a masked-out region and an all-nan window, on both selection paths."""
    if not numpy_select:
        monkeypatch.setattr(reducers, "use_numpy_select", lambda t: False)
    g = torch.Generator().manual_seed(21)
    x = torch.randn(5, 16, 16, generator=g) * 2.0
    x[0, 2, 3], x[1, 1, 1], x[2, 7, 5] = math.inf, math.nan, 4000.0
    x[3] = math.nan
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    for valid in (None, causal):
        chunks = split(x, [2, 3], valid=valid)
        got = feed(chunks, moments=False)
        assert_matches(got, reference(chunks), channels=False, moments=False)
        assert got.ma_count == 1 and math.isnan(got.window_medians[3])


def test_result_midstream_does_not_disturb_updates() -> None:
    x = random_windows(11)
    chunks = split(x, [3, 4])
    red = TapReducer()
    red.update(chunks[0].x, 0)
    first = red.result()
    assert_matches(first, reference(chunks[:1]))
    first.channel_mean[:] = 0.0  # the snapshot must be a copy
    first.top.clear()
    red.update(chunks[1].x, 3)
    assert_matches(red.result(), reference(chunks))


def test_update_keeps_input_untouched_and_unreferenced() -> None:
    x = random_windows(12, w=2)
    before = x.clone()
    red = TapReducer()
    red.update(x, 0)
    assert torch.equal(x, before)
    held = [v for v in vars(red).values() if isinstance(v, torch.Tensor) and v.numel() >= x[0].numel()]
    assert held == []


def test_inference_mode_and_grad_inputs_share_scratch() -> None:
    reducers.release_scratch()
    x = random_windows(16).requires_grad_(True)
    chunks = split(x.detach(), [3, 4])
    red = TapReducer()
    with torch.inference_mode():
        red.update(chunks[0].x.clone(), 0)  # an inference tensor; scratch buffers are first made here
    red.update(x[3:], 3)  # then a grad-requiring input outside it
    assert_matches(red.result(), reference(chunks))


def test_empty_reducer() -> None:
    got = TapReducer().result()
    assert (got.n_windows, got.n_elements, got.nan_count, got.inf_count, got.ma_count) == (0, 0, 0, 0, 0)
    assert got.top == [] and got.window_medians == []
    assert all(math.isnan(v) for v in (got.max_abs, got.mean, got.std, got.kurtosis, got.median_abs))
    assert got.channel_mean is None


def test_device_selection_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch.kthvalue path used on GPUs gives the same answers (exercised here on CPU)."""
    monkeypatch.setattr(reducers, "use_numpy_select", lambda t: False)
    g = torch.Generator().manual_seed(13)
    t = 12
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = torch.randn(4, t, t, generator=g)
    x[1, 4, 2] = 3000.0
    x[2, 6, 1] = math.nan
    chunks = split(x, [1, 3], valid=causal)
    got = feed(chunks)
    assert got.ma_count == 1
    assert_matches(got, reference(chunks))


def test_rejects_bad_input() -> None:
    red = TapReducer()
    with pytest.raises(ValueError):
        red.update(torch.zeros(2, 3), 0)
    with pytest.raises(TypeError):
        red.update(torch.zeros(1, 2, 3, dtype=torch.int32), 0)
    red.update(torch.zeros(1, 2, 3), 0)
    with pytest.raises(ValueError):
        red.update(torch.zeros(1, 2, 4), 1)
