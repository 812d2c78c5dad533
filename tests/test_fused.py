"""The fused reducer against the float64 full-tensor reference and against the reference TapReducer, on
the reducer suite's tensors (ties, masks, non-finite values, float16/bfloat16, empty windows, huge values,
mean >> spread) and on windows large enough for several lanes and for every fallback path of the kernel."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from outlier_study.measure.profiler import profile_windows
from outlier_study.stats import choose
from outlier_study.stats.device_reducer import DeviceTapReducer
from outlier_study.stats.fused import FusedReducer, build, load_kernel
from outlier_study.stats.reducers import TapReducer
from outlier_study.stats.tapstats import TapStats
from tests.test_reducers import Chunk, assert_matches, random_windows, reference, split

EXACT = ("n_windows", "n_elements", "nan_count", "inf_count", "ma_count", "max_abs")


@pytest.fixture(scope="module")
def kernel() -> ModuleType:
    module = load_kernel()
    assert module is not None, "the fused kernel did not build (see the warning above)"
    return module


def feed(make: Callable[..., object], chunks: list[Chunk], **kwargs: object) -> TapStats:
    red = make(**kwargs)
    for c in chunks:
        red.update(c.x, c.offset, c.valid)  # type: ignore[attr-defined]
    return red.result()  # type: ignore[attr-defined]


def gaussian(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _ties() -> list[Chunk]:
    """Few distinct values: ties at the median, at the top-k boundary and among whole columns."""
    x = torch.randint(-3, 4, (4, 40, 24), generator=torch.Generator().manual_seed(1)).float()
    x[1, 5:9, 3] = 9.0  # four tied maxima in one column
    x[2, 0, :] = -9.0  # a row of maxima tied with them
    return split(x, [1, 3])


def _causal(seed: int, t: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = gaussian(seed, (w, t, t), 2.0) + 1.0
    return x.masked_fill(~causal, -math.inf), causal


def _causal_with_nonfinite() -> list[Chunk]:
    x, causal = _causal(7, 20, 5)
    x[2, 19, 4], x[2, 1, 10] = 40.0, 1e3  # the second is masked out
    x[3, 6, 2], x[0, 7, 0] = math.inf, math.nan
    return split(x, [2, 3], valid=causal)


def _half_nonfinite(dtype: torch.dtype) -> list[Chunk]:
    x = (gaussian(9, (6, 16, 12), 3.0)).to(dtype)
    x[0, 1, 2], x[0, 4, 4], x[3, 5, 6], x[1, 2, 3] = math.inf, -math.inf, math.inf, math.nan
    x[5, 0, 0] = 5000.0
    x[4] = math.nan  # a whole window overflowed
    return split(x, [2, 3, 1])


def _masks() -> list[Chunk]:
    x = random_windows(8, w=4, t=10, c=6)
    window_mask = torch.tensor([True, False, True, True]).view(4, 1, 1)
    token_mask = (torch.arange(10) % 3 != 0).view(1, 10, 1)
    valid = window_mask & token_mask
    return [Chunk(x[:1], 0, valid[:1]), Chunk(x[1:], 1, valid[1:])]


def _strided_mask() -> list[Chunk]:
    """A mask that is neither contiguous nor broadcast along channels (stride of the channel axis > 1)."""
    x = gaussian(17, (3, 12, 10))
    keep = torch.rand(3, 10, 12, generator=torch.Generator().manual_seed(2)) > 0.3
    return split(x, [3], valid=keep.transpose(1, 2))


def _relu_zeros() -> list[Chunk]:
    shift = torch.tensor([0.0, 0.1, 0.3, -0.2, 1.5, 0.0]).view(6, 1, 1)
    x = torch.relu(gaussian(15, (6, 32, 16)) - shift)
    x[5] = 0.0
    x[5, 3, 3] = 150.0  # an MA against a median of 0
    return split(x, [2, 4], valid=torch.ones(32, 16, dtype=torch.bool).tril())


def _mean_much_larger_than_spread() -> list[Chunk]:
    x = gaussian(4, (6, 64, 8)) + 50.0
    x[..., 0] = 1e4 + gaussian(5, (6, 64))
    x[..., 1] = -3e5 + 0.01 * gaussian(6, (6, 64))
    return split(x, [1, 2, 3])


def _huge() -> list[Chunk]:
    x = random_windows(6, w=3)
    x[0, 0, 0], x[2, 5, 7] = -1e30, 3e9  # fourth powers overflow float32
    return split(x, [1, 2])


def _empty() -> list[Chunk]:
    x = random_windows(3, w=4, t=6, c=5)
    valid = torch.ones(4, 6, 5, dtype=torch.bool)
    valid[2] = False  # a window with no valid element
    return [Chunk(x[:1], 0, valid[:1]), Chunk(x[1:3, :0], 1), Chunk(x[3:], 3, valid[3:])]


def _non_contiguous() -> list[Chunk]:
    x = random_windows(14).double()
    return split(x.transpose(1, 2).contiguous().transpose(1, 2), [2, 5])


def _large_with_misses() -> list[Chunk]:
    """Windows big enough for two lanes, whose medians jump (the bracket from the previous window misses),
    with MAs in two columns (column scan) and in a third of the columns (the counting pass)."""
    x = gaussian(30, (5, 256, 384))
    x[1] *= 50.0
    x[2] *= 0.02
    x[0, 3, 7], x[0, 100, 9] = 3000.0, -2500.0
    x[3, :, :128] = 2000.0 + gaussian(31, (256, 128))  # many MA columns and a median that jumps up
    x[4, 17, 300] = -900.0
    x[1, 10, 10], x[1, 20, 20], x[3, 5, 5] = math.nan, math.inf, -math.inf  # counted once, also on a miss
    return split(x, [2, 3])


def _large_bf16_masked() -> list[Chunk]:
    """A first window with too few valid entries for the median's sample (histogram fallback), then
    masked bfloat16 windows over two lanes."""
    x = gaussian(40, (3, 200, 330), 4.0).bfloat16()
    valid = torch.rand(3, 200, 330, generator=torch.Generator().manual_seed(3)) > 0.5
    valid[0] = False
    valid[0, :3, :5] = True
    x[2, 50, 60] = 1e4
    return split(x, [1, 2], valid=valid)


def _wide() -> list[Chunk]:
    """More channels than one block of the kernel holds (4096): rows are read in several tiles."""
    x = gaussian(60, (3, 24, 4100), 2.0)
    x[1, 3, 4099], x[2, 0, 4096], x[0, 5, 7] = 500.0, -600.0, math.nan
    return split(x, [1, 2], valid=(torch.arange(24) % 5 != 1).view(1, 24, 1))


CASES: dict[str, Callable[[], list[Chunk]]] = {
    "batches": lambda: split(random_windows(0), [2, 1, 3, 1]),
    "out-of-order": lambda: split(random_windows(1), [3, 2, 2])[::-1],
    "ties": _ties,
    "ties-out-of-order": lambda: _ties()[::-1],
    "causal-nonfinite": _causal_with_nonfinite,
    "float16-nonfinite": lambda: _half_nonfinite(torch.float16),
    "bfloat16-nonfinite": lambda: _half_nonfinite(torch.bfloat16),
    "masks": _masks,
    "strided-mask": _strided_mask,
    "relu-zeros-causal": _relu_zeros,
    "mean-much-larger-than-spread": _mean_much_larger_than_spread,
    "huge": _huge,
    "empty-windows": _empty,
    "non-contiguous-float64": _non_contiguous,
    "large-misses": _large_with_misses,
    "large-bfloat16-masked": _large_bf16_masked,
    "wide": _wide,
}
SETTINGS = {
    "default": {},
    "top0-no-channels": {"top_k": 0, "channel_stats": False},
    "no-moments-top5": {"moments": False, "top_k": 5},
    "ma50": {"ma_abs": 50.0, "ma_ratio": 100.0, "top_k": 1},
}


def _ordered(chunks: list[Chunk]) -> list[Chunk]:
    return sorted(chunks, key=lambda c: c.offset)


@pytest.mark.parametrize("setting", SETTINGS, ids=list(SETTINGS))
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_fused_equals_the_float64_reference(kernel: ModuleType, case: str, setting: str) -> None:
    """Exact statistics exactly (top-k positions included, ties broken by window, token, channel), the
    moments to float32 precision: the tolerance the reference reducer is held to (test_reducers)."""
    chunks = CASES[case]()
    kwargs = SETTINGS[setting]
    got = feed(lambda **kw: FusedReducer(kernel, **kw), chunks, **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k in ("top_k", "ma_abs", "ma_ratio")}
    ref = reference(_ordered(chunks), **ref_kwargs)
    if ref["n_elements"] == 0:
        assert got.n_elements == 0 and math.isnan(got.max_abs)
        return
    moments = kwargs.get("moments", True)
    channels = moments and kwargs.get("channel_stats", True)
    assert_matches(got, ref, channels=channels, moments=moments)


@pytest.mark.parametrize("setting", SETTINGS, ids=list(SETTINGS))
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_fused_equals_the_reference_reducer(kernel: ModuleType, case: str, setting: str) -> None:
    """Against TapReducer: every exact statistic equal, the same top-k |a| (of equal |a| the two may keep
    different entries: the reference's within-chunk tie order is torch.topk's), moments to the
    reference's own float32 precision."""
    chunks = CASES[case]()
    kwargs = SETTINGS[setting]
    got = feed(lambda **kw: FusedReducer(kernel, **kw), chunks, **kwargs)
    ref = feed(TapReducer, chunks, **kwargs)
    assert_same(got, ref)


def assert_same(got: TapStats, ref: TapStats, rtol: float = 1e-4) -> None:
    for name in EXACT:
        a, b = getattr(got, name), getattr(ref, name)
        assert a == b or (math.isnan(a) and math.isnan(b)), name
    np.testing.assert_array_equal(np.array(got.window_medians), np.array(ref.window_medians))
    assert [e.abs for e in got.top] == [e.abs for e in ref.top]  # positions: against the float64 reference
    for name in ("mean", "std", "kurtosis"):
        np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=rtol, atol=rtol * ref.std)
    for name in ("channel_count", "channel_absmax"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name))
    if ref.channel_mean is not None:
        np.testing.assert_allclose(got.channel_mean, ref.channel_mean, rtol=rtol, atol=1e-5)
        np.testing.assert_allclose(got.channel_std, ref.channel_std, rtol=rtol, atol=1e-6)


def test_the_kernel_takes_its_fallback_paths(kernel: ModuleType) -> None:
    """Jumping medians miss the bracket from the previous window (a sampled bracket then holds them), a
    window too sparse to sample goes to the histogram; steady windows take neither path."""
    red = FusedReducer(kernel)
    for chunk in _large_with_misses():
        red.update(chunk.x, chunk.offset, chunk.valid)
    assert red.misses >= 2
    sparse = FusedReducer(kernel)
    for chunk in _large_bf16_masked():
        sparse.update(chunk.x, chunk.offset, chunk.valid)
    assert sparse.fallbacks >= 1
    steady = FusedReducer(kernel)
    steady.update(gaussian(50, (4, 256, 384)), 0)
    assert steady.misses == steady.fallbacks == 0


def test_massive_count_at_the_float16_boundary(kernel: ModuleType) -> None:
    """1000 × median = 200.56 lies just above the float16 value 200.5, which must not count."""
    x = torch.full((1, 64, 8), 0.2005615234375, dtype=torch.float16)
    x[0, 3, 1], x[0, 5, 2] = 200.5, 201.0
    red = FusedReducer(kernel, ma_abs=50, ma_ratio=1000)
    red.update(x, 0)
    assert red.result().ma_count == 1


def test_update_keeps_input_untouched_and_rejects_bad_input(kernel: ModuleType) -> None:
    x = random_windows(12, w=2)
    before = x.clone()
    red = FusedReducer(kernel)
    red.update(x, 0)
    assert torch.equal(x, before)
    with pytest.raises(ValueError):
        red.update(torch.zeros(2, 3), 0)
    with pytest.raises(TypeError):
        red.update(torch.zeros(1, 2, 16, dtype=torch.int32), 0)
    with pytest.raises(ValueError):
        red.update(torch.zeros(1, 2, 4), 1)


def test_a_failed_build_falls_back_with_one_warning_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def broken(_verbose: bool) -> ModuleType:
        raise RuntimeError("Error building extension 'outlier_study_fused'\nc++: not found")

    monkeypatch.setenv("OUTLIER_STUDY_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_compile", broken)
    assert choose.tap_reducer("auto", True) is TapReducer
    assert choose.tap_reducer("fused", True) is TapReducer
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: the fused reducer could not be built")
    assert choose.tap_reducer("reference", True) is TapReducer


def test_a_built_library_loads_without_the_build_tool(
    kernel: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A library in the key's folder is imported as it is (another `ninja` on PATH would rebuild it); one
    that cannot be loaded there (a build cut short) is built again."""

    def no_build(_verbose: bool) -> ModuleType:
        raise AssertionError("the build tool ran")

    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_compile", no_build)
    assert build.load_kernel().update is not None  # type: ignore[union-attr]  # the session's build

    monkeypatch.setenv("OUTLIER_STUDY_CACHE", str(tmp_path))
    broken = build.build_dir() / Path(kernel.__file__).name  # type: ignore[arg-type]
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a library")
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_compile", lambda _verbose: kernel)
    assert build.load_kernel() is kernel


def test_reducer_choice(kernel: ModuleType) -> None:
    assert choose.tap_reducer("auto", False) is DeviceTapReducer  # tensors off the CPU
    assert choose.tap_reducer("auto", True).func is FusedReducer  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="CPU"):
        choose.tap_reducer("fused", False)


def test_profile_windows_same_statistics_with_either_reducer(
    kernel: ModuleType, model_cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiny model end to end, attention maps (causal masks) included; the fused run really is fused."""
    from tests.helpers import load_named

    lm = load_named("tiny-llama", model_cache)
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    taps = [*lm.arch.taps(None), "attn.scores", "attn.probs"]
    layers = list(range(lm.n_layers))
    calls: list[int] = []
    update = FusedReducer.update
    monkeypatch.setattr(FusedReducer, "update", lambda self, *a: calls.append(1) or update(self, *a))
    kw = {"progress": False, "batch_size": 2, "ma_abs": 0.5, "ma_ratio": 2.0}
    fused = profile_windows(lm, ids, taps, layers, reducer="fused", **kw)
    assert calls
    ref = profile_windows(lm, ids, taps, layers, reducer="reference", **kw)
    assert fused.stats.keys() == ref.stats.keys()
    assert sum(s.ma_count for s in ref.stats.values()) > 0  # the MA rule is exercised
    for key, stats in ref.stats.items():
        assert_same(fused.stats[key], stats)


# ------------------------------------------------------------------------------ per-channel moments alone


def _channel_cases() -> dict[str, tuple[list[tuple[torch.Tensor, torch.Tensor | None]], bool]]:
    """name -> ([(x, valid)], absolute): the updates one tap's channel reducer sees."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(2, 300, 40, generator=g)
    big[..., 5] += 1e4  # a channel whose mean dwarfs its spread
    big[0, 7, 9] = 3e5  # an MA inside another channel
    mask = torch.rand(2, 300, 40, generator=g) > 0.3
    mask[:, :, 11] = False  # a channel with no entry
    strided = torch.randn(40, 300, 2, generator=g).permute(2, 1, 0)  # channels not contiguous
    half = (torch.randn(3, 64, 24, generator=g) * 50).to(torch.float16)
    return {
        "several-updates": ([(big[:1], None), (big[1:], None), (big[:, :17], None)], False),
        "absolute": ([(big, None), (-big[:, :50], None)], True),
        "masked": ([(big, mask), (big[:1], mask[:1, :, :1])], False),
        "strided": ([(strided, None), (strided[:, :7], None)], False),
        "float16": ([(half, None), (half[:1], None)], True),
        "bfloat16-and-float64": ([(half.to(torch.bfloat16), None), (big[..., :24].double(), None)], False),
        "few-rows": ([(big[:1, :3], None), (big[:1, :1], None)], False),
    }


@pytest.mark.parametrize("case", list(_channel_cases()))
def test_fused_channel_moments_equal_the_reference_reducer(kernel: ModuleType, case: str) -> None:
    from outlier_study.stats.channels import ChannelReducer
    from outlier_study.stats.fused import FusedChannelReducer

    updates, absolute = _channel_cases()[case]
    fused, ref = FusedChannelReducer(kernel, absolute), ChannelReducer(absolute)
    for x, valid in updates:
        before = x.clone()
        fused.update(x, 0, valid)
        ref.update(x, 0, valid)
        assert torch.equal(x, before)
    got, want = fused.result(), ref.result()
    np.testing.assert_array_equal(got.count, want.count)
    # The reference sums in float64 without a mask, but in the input's float32 under one; and its float64
    # sum(a^2) - sum(a)^2 / n loses ~1e-8 of M2 where the mean is 1e4 and the spread 1. The kernel sums
    # shifted values in float64 in both cases, so the tolerance is the reference's precision.
    masked = any(valid is not None for _, valid in updates)
    rtol, atol = (1e-4, 1e-4) if masked else (1e-12, 1e-12)
    np.testing.assert_allclose(got.mean, want.mean, rtol=rtol, atol=atol)
    np.testing.assert_allclose(got.std, want.std, rtol=max(rtol, 1e-6), atol=max(atol, 1e-9))
    assert got.tensor_mean == pytest.approx(want.tensor_mean, rel=max(rtol, 1e-12))
    assert got.tensor_std == pytest.approx(want.tensor_std, rel=max(rtol, 1e-9))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the inf channel's moments
def test_fused_channel_moments_against_float64_and_bad_input(kernel: ModuleType) -> None:
    from outlier_study.stats.fused import FusedChannelReducer

    x = torch.randn(3, 200, 16, generator=torch.Generator().manual_seed(5)) * 3 + 1e3
    red = FusedChannelReducer(kernel)
    for w in range(3):
        red.update(x[w : w + 1], w)
    got, flat = red.result(), x.double().reshape(-1, 16)
    np.testing.assert_allclose(got.mean, flat.mean(0).numpy(), rtol=1e-13)
    np.testing.assert_allclose(got.std, flat.std(0, unbiased=False).numpy(), rtol=1e-9)
    with pytest.raises(ValueError, match="channel count"):
        red.update(torch.zeros(1, 2, 8), 3)
    nonfinite = x[:1].clone()
    nonfinite[0, 4, 2] = math.inf
    red2 = FusedChannelReducer(kernel)
    red2.update(nonfinite, 0)
    assert not np.isfinite(red2.result().std[2]) and np.isfinite(red2.result().std[3])


def test_profile_channels_same_summaries_with_either_reducer(kernel: ModuleType, model_cache) -> None:
    from outlier_study.measure.profiler import profile_channels
    from tests.helpers import load_named

    lm = load_named("tiny-llama", model_cache)
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    taps, layers = lm.arch.taps(None), list(range(lm.n_layers))
    kw = {"progress": False, "batch_size": 2, "without_ma": ("resid.mid",), "ma_rule": (0.5, 2.0)}
    assert choose.channel_reducer("auto", True).func.__name__ == "FusedChannelReducer"  # type: ignore[attr-defined]
    fused = profile_channels(lm, ids, taps, layers, reducer="fused", **kw)
    ref = profile_channels(lm, ids, taps, layers, reducer="reference", **kw)
    assert fused.keys() == ref.keys()
    for key, want in ref.items():  # the NO_MA variants are masked: float32 sums in the reference
        got = fused[key]
        np.testing.assert_array_equal(got.count, want.count)
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got.std, want.std, rtol=1e-4, atol=1e-6)


# --- the MA scan of the intervention hooks ----------------------------------------------------------------


def ma_cases(dtype: torch.dtype) -> list[torch.Tensor]:
    """Tensors for the MA rule in `dtype`: planted MAs, elements exactly at and one step below ratio × median
    (the real product, not one rounded to the dtype), MAs in one window only, ties, 2-D and 4-D shapes."""
    g = torch.Generator().manual_seed(11)
    planted = torch.randn(3, 64, 48, generator=g)
    planted[0, 5, 7], planted[2, 0, 1], planted[2, 63, 47] = 2000.0, -3500.0, 150.0
    planted = planted.to(dtype)
    boundary = torch.randn(2, 33, 16, generator=g).to(dtype)
    for b in range(2):
        median = float(boundary[b].abs().reshape(-1).median())
        at = torch.tensor(1000.0 * median, dtype=torch.float64)
        up = at.to(dtype)  # the product rounded to the dtype, up: massive
        if float(up) < float(at):
            up = torch.nextafter(up, torch.tensor(math.inf, dtype=dtype))
        below = torch.nextafter(up, torch.tensor(0.0, dtype=dtype))  # under the real product: not massive
        # Entries already above the median, so the median stays where it was.
        (t0, c0), (t1, c1), (t2, c2) = (boundary[b].abs() > median).nonzero()[:3].tolist()
        boundary[b, t0, c0], boundary[b, t1, c1], boundary[b, t2, c2] = 10 * up, -up, below
    one_window = torch.randn(4, 16, 32, generator=g).to(dtype)
    one_window[3, 8, 8] = 1e4
    ties = torch.zeros(2, 40, 20, dtype=dtype)
    ties[0, 0, 0], ties[1, :20] = 500.0, 1.0
    return [planted, boundary, one_window, ties, planted.reshape(3, -1), planted.reshape(3, 8, 8, 48)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_ma_scan_gives_the_reference_medians_count_and_mask(kernel: ModuleType, dtype: torch.dtype) -> None:
    """The kernel's medians and MA count are the reference's, and `masked` (which uses them) gives the MA
    rule's mask: per element, |a| > ma_abs and |a| >= ratio × median in float64, as on Python floats."""
    from outlier_study.stats.fused.scan import fused_ma_scan
    from outlier_study.stats.massive import is_massive, masked, window_medians

    for i, x in enumerate(ma_cases(dtype)):
        scan = fused_ma_scan(x, 100.0, 1000.0)
        assert scan is not None, i
        medians = window_medians(x.abs()).double()
        torch.testing.assert_close(scan.medians, medians, rtol=0, atol=0)
        flat = x.abs().double().reshape(x.shape[0], -1)
        rule = torch.stack(
            [
                torch.tensor([bool(is_massive(float(v), float(m), 100.0, 1000.0)) for v in row])
                for row, m in zip(flat, medians, strict=True)
            ]
        ).view(x.shape)
        assert scan.ma_count == int(rule.sum()), i
        got = masked(x, 100.0, 1000.0)
        assert torch.equal(got if got is not None else torch.zeros_like(rule), rule), i
    boundary = ma_cases(dtype)[1]
    assert int(masked(boundary, 100.0, 1000.0).sum()) == 4  # the two planted per window, not the one below


def test_ma_scan_leaves_non_finite_and_unread_inputs_to_the_reference(kernel: ModuleType) -> None:
    from outlier_study.stats.fused.scan import fused_ma_scan
    from outlier_study.stats.massive import ma_mask, masked

    x = torch.randn(2, 16, 8)
    x[0, 1, 1] = 5000.0
    for bad in (float("inf"), float("nan")):
        y = x.clone()
        y[1, 2, 2] = bad
        assert fused_ma_scan(y, 100.0, 1000.0) is None
        got, reference = masked(y, 100.0, 1000.0), ma_mask(y, 100.0, 1000.0)
        assert got is None or torch.equal(got, reference)
    assert fused_ma_scan(x.to(torch.int32), 100.0, 1000.0) is None
    assert fused_ma_scan(torch.zeros(2, 0, 8), 100.0, 1000.0) is None
    assert fused_ma_scan(x, 100.0, 1000.0) is not None


def test_two_checkouts_keep_a_build_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's build file names the source's path, so one build folder shared by two checkouts would be
    rebuilt on every switch between them: the path is part of the key, as the source's bytes are."""
    key = build.build_key()
    copy = tmp_path / "fused.cpp"
    copy.write_bytes(build.SOURCE.read_bytes())
    monkeypatch.setattr(build, "SOURCE", copy)
    moved = build.build_key()
    assert moved != key
    copy.write_bytes(build.SOURCE.read_bytes() + b"\n// edited\n")
    assert build.build_key() not in (key, moved)


def test_the_portable_loops_give_the_same_statistics() -> None:
    """On a CPU with AVX-512 the hot loops are AVX-512 code; OUTLIER_STUDY_FUSED_PORTABLE makes the kernel
    run its portable loops (what other CPUs run), held here to the references by the same tests."""
    if os.environ.get("OUTLIER_STUDY_FUSED_PORTABLE"):
        pytest.skip("this process already runs the portable loops")
    env = {**os.environ, "OUTLIER_STUDY_FUSED_PORTABLE": "1"}
    tests = "equals_the or fallback_paths or float16_boundary or ma_scan_gives"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
