"""DeviceTapReducer: equal to TapReducer (and to the float64 reference) on CPU tensors, and no host
synchronisation inside `update`, checked structurally on CPU (every way to read a value back raises), on
the meta device (no values exist to read) and under CUDA's sync debug mode where a GPU is present."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from outlier_study.adapters.experts import moe_specs
from outlier_study.adapters.taps import EXPERT_TAPS
from outlier_study.measure.experts import capture_experts
from outlier_study.measure.profiler import Profiler, profile_windows
from outlier_study.stats import device_reducer
from outlier_study.stats.channels import ChannelReducer
from outlier_study.stats.choose import tap_reducer
from outlier_study.stats.device_reducer import DeviceTapReducer
from outlier_study.stats.massive import is_massive
from outlier_study.stats.reducers import TapReducer, TapStats
from tests.helpers import load_named
from tests.test_reducers import Chunk, assert_matches, random_windows, reference, split

Reducer = type[TapReducer] | type[DeviceTapReducer]


@pytest.fixture(params=[None, 1000, 150], ids=["chunk-default", "chunk-1000", "chunk-150"])
def chunk_elements(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also tiny chunks: several windows per chunk, one per chunk, and many chunks per update."""
    if request.param is not None:
        monkeypatch.setattr(device_reducer, "_CHUNK_ELEMENTS", request.param)


def feed(cls: Reducer, chunks: list[Chunk], **kwargs: Any) -> TapStats:
    red = cls(**kwargs)
    for c in chunks:
        red.update(c.x, c.offset, c.valid)
    return red.result()


def assert_same(got: TapStats, ref: TapStats, rtol: float = 1e-6, top_positions: bool = True) -> None:
    """Exact for counts, max, top-k, medians, MA count and channel counts/absmax; moments to `rtol`.
    `top_positions=False` compares only the top |a| (TapReducer breaks ties in any order)."""
    for name in ("n_windows", "n_elements", "nan_count", "inf_count", "ma_count"):
        assert getattr(got, name) == getattr(ref, name), name
    for name in ("max_abs", "window_medians", "median_abs"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
    if top_positions:
        assert got.top == ref.top
    else:
        assert [e.abs for e in got.top] == [e.abs for e in ref.top]
    for name in ("std", "kurtosis"):
        np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=rtol, err_msg=name)
    np.testing.assert_allclose(
        got.mean, ref.mean, rtol=rtol, atol=rtol * np.nan_to_num(ref.std), err_msg="mean"
    )
    for name in ("channel_count", "channel_absmax", "channel_mean", "channel_std"):
        a, b = getattr(got, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if name in ("channel_count", "channel_absmax"):
            np.testing.assert_array_equal(a, b, err_msg=name)
        elif a is not None:
            spread = np.nan_to_num(np.nanmax(ref.channel_std, initial=0.0))  # a mean near 0: against it
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * spread, err_msg=name)


@dataclass
class Case:
    chunks: list[Chunk]
    kwargs: dict[str, Any] = field(default_factory=dict)
    reference: bool = True  # also against the float64 reference of tests/test_reducers.py
    rtol: float = 1e-5


def _float16_nonfinite() -> Case:
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(6, 16, 12, generator=g) * 3.0).half()
    x[0, 1, 2], x[0, 4, 4], x[3, 5, 6], x[1, 2, 3] = math.inf, -math.inf, math.inf, math.nan
    x[5, 0, 0] = 5000.0
    x[4] = math.nan  # a whole window overflowed
    return Case(split(x, [2, 3, 1]), rtol=1e-4)


def _causal_nonfinite(moments: bool = True) -> Case:
    g = torch.Generator().manual_seed(7)
    causal = torch.ones(20, 20, dtype=torch.bool).tril()
    x = (torch.randn(5, 20, 20, generator=g) * 2.0 + 1.0).masked_fill(~causal, -math.inf)
    x[2, 19, 4], x[2, 1, 10], x[3, 6, 2], x[0, 7, 0] = 40.0, 1e3, math.inf, math.nan  # 1e3 is masked out
    x[1, 9, 3] = 4000.0
    return Case(split(x, [2, 3], valid=causal), {"moments": moments})


def _masks() -> Case:
    x = random_windows(8, w=4, t=10, c=6)
    valid = torch.tensor([True, False, True, True]).view(4, 1, 1) & (torch.arange(10) % 3 != 0).view(1, 10, 1)
    return Case(split(x, [1, 3], valid=valid))


def _huge() -> Case:
    x = random_windows(6, w=3)
    x[0, 0, 0] = -1e30  # a finfo.min-like mask value: x^4 overflows float32
    x[2, 1, 3] = 3e38  # near float32's max: the scaled column still fits
    return Case(split(x, [1, 2]))


def _large_means() -> Case:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 64, 8, generator=g) + 50.0
    x[..., 0] = 1e4 + torch.randn(6, 64, generator=g)  # mean 1e4, std 1
    x[..., 1] = 2e8 + 100.0 * torch.randn(6, 64, generator=g)  # above 1e8: a scaled column
    return Case(split(x, [1, 2, 3]))


def _ma_windows(ma_abs: float) -> Case:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32, 16, generator=g)
    x[2] *= 0.01
    x[0, 0, 0], x[1, 5, 3], x[2, 7, 7], x[2, 8, 8] = 2000.0, -500.0, 150.0, -90.0
    return Case(split(x, [1, 3]), {"ma_abs": ma_abs})


def _relu_ties(valid: torch.Tensor | None) -> Case:
    g = torch.Generator().manual_seed(15)
    shift = torch.tensor([0.0, 0.1, 0.3, -0.2, 1.5, 0.0]).view(6, 1, 1)
    x = torch.relu(torch.randn(6, 32, 16, generator=g) - shift)
    x[5] = 0.0
    x[5, 3, 3] = 150.0
    return Case(split(x, [2, 4], valid=valid))


def _strided(dtype: torch.dtype) -> Case:
    x = random_windows(14).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    return Case(split(x, [2, 5]))


def _empty_windows() -> Case:
    """Expert-style updates: a (B, 0, C) batch for an expert that got no token, between real ones."""
    x = random_windows(5, w=4, t=6, c=3)
    chunks = [Chunk(x[:2], 0), Chunk(torch.zeros(2, 0, 3), 2), Chunk(x[2:], 4)]
    return Case(chunks, reference=False)


CASES: dict[str, Callable[[], Case]] = {
    "varying-batches": lambda: Case(split(random_windows(0), [2, 1, 3, 1])),
    "out-of-order": lambda: Case(split(random_windows(1), [3, 2, 2])[::-1]),
    "float64-strided": lambda: _strided(torch.float64),
    "bfloat16-strided": lambda: _strided(torch.bfloat16),
    "float16-nonfinite": _float16_nonfinite,
    "causal-nonfinite": _causal_nonfinite,
    "causal-no-moments": lambda: _causal_nonfinite(moments=False),
    "window-token-masks": _masks,
    "huge-values": _huge,
    "large-means": _large_means,
    "ma-ratio-binds": lambda: _ma_windows(100.0),
    "ma-abs-binds": lambda: _ma_windows(50.0),
    "relu-ties": lambda: _relu_ties(None),
    "relu-ties-masked": lambda: _relu_ties(torch.ones(32, 16, dtype=torch.bool).tril()),
    "top-k-9": lambda: Case(split(random_windows(2, w=3, t=2, c=2), [1, 2]), {"top_k": 9}),
    "top-k-0": lambda: Case(split(random_windows(2, w=3, t=2, c=2), [1, 2]), {"top_k": 0}, reference=False),
    "sparse": lambda: Case([Chunk(torch.tensor([[[math.nan, 0.5], [-2.0, math.inf]]]), 0)], {"top_k": 5}),
    "no-channel-stats": lambda: Case(split(random_windows(10), [4, 3]), {"channel_stats": False}),
    "empty-windows": _empty_windows,
}


def _check(case: Case, got: TapStats) -> None:
    assert_same(got, feed(TapReducer, case.chunks, **case.kwargs))
    if case.reference:
        ref_kwargs = {k: v for k, v in case.kwargs.items() if k in ("top_k", "ma_abs", "ma_ratio")}
        assert_matches(
            got,
            reference(case.chunks, **ref_kwargs),
            rtol=case.rtol,
            channels=case.kwargs.get("channel_stats", True) and case.kwargs.get("moments", True),
            moments=case.kwargs.get("moments", True),
        )


@pytest.mark.usefixtures("chunk_elements")
@pytest.mark.parametrize("name", list(CASES))
def test_equals_tap_reducer_and_the_reference(name: str) -> None:
    case = CASES[name]()
    _check(case, feed(DeviceTapReducer, case.chunks, **case.kwargs))


@pytest.mark.usefixtures("chunk_elements")
def test_top_k_ties_break_by_position_whatever_the_chunking_or_update_order() -> None:
    x = torch.zeros(4, 6, 5)
    x[3, 0, 0], x[1, 5, 4], x[1, 2, 3], x[0, 4, 1], x[2, 0, 0], x[0, 0, 0] = 7.0, -7.0, 7.0, 7.0, -7.0, 9.0
    first = [(0, 0, 0), (0, 4, 1), (1, 2, 3), (1, 5, 4), (2, 0, 0), (3, 0, 0)]
    for sizes in ([4], [1, 1, 1, 1], [3, 1]):
        chunks = split(x, sizes)
        for order in (chunks, chunks[::-1]):
            for k in (4, 9):  # 9: zeros tie beyond the planted values
                got = feed(DeviceTapReducer, order, top_k=k)
                assert [(e.window, e.token, e.channel) for e in got.top][:6] == first[:k]
                assert_matches(got, reference(chunks, top_k=k))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_ma_count_is_the_rule_at_its_boundaries(dtype: torch.dtype) -> None:
    """Values just below, at and just above ma_ratio × median and ma_abs, as the data's dtype can hold
    them: the count is `stats.massive.is_massive` applied element by element in float64."""
    g = torch.Generator().manual_seed(17)
    x = (torch.rand(5, 32, 8, generator=g) * 0.4 + 0.05).to(dtype)
    x[:, 0, :3] = x[:, 1, :3] = 1e3  # placeholders above the median: it does not move when they are set
    a = x.abs().double().reshape(5, -1)
    median = a.sort(dim=1).values[:, (a.shape[1] - 1) // 2]
    for ma_abs, ma_ratio in ((100.0, 1000.0), (400.0, 1000.0), (100.0, 999.7)):
        for b in range(5):
            for row, at in ((0, ma_ratio * float(median[b])), (1, ma_abs)):
                v = torch.tensor(at, dtype=torch.float64).to(dtype)
                near = [torch.nextafter(v, torch.tensor(-math.inf, dtype=dtype)), v]
                near.append(torch.nextafter(v, torch.tensor(math.inf, dtype=dtype)))
                x[b, row, :3] = torch.stack(near) * (-1) ** b
        expected = int(is_massive(x.abs().double(), median.view(5, 1, 1), ma_abs, ma_ratio).sum())
        assert 0 < expected < 5 * 6
        for cls in (DeviceTapReducer, TapReducer):
            got = feed(cls, [Chunk(x, 0)], ma_abs=ma_abs, ma_ratio=ma_ratio)
            assert got.ma_count == expected, cls.__name__


def test_state_works_in_and_out_of_inference_mode() -> None:
    x = random_windows(16).requires_grad_(True)
    chunks = split(x.detach(), [2, 3, 2])
    red = DeviceTapReducer()
    with torch.inference_mode():
        red.update(chunks[0].x.clone(), 0)  # the state is made here
    red.update(x[2:5], 2)  # a grad-requiring input outside it
    with torch.inference_mode():
        red.update(chunks[2].x.clone(), 5)
    assert_same(red.result(), feed(TapReducer, chunks))


def test_result_midstream_input_untouched_and_unreferenced() -> None:
    x = random_windows(11)
    before = x.clone()
    chunks = split(x, [3, 4])
    red = DeviceTapReducer()
    red.update(chunks[0].x, 0)
    first = red.result()
    assert_same(first, feed(TapReducer, chunks[:1]))
    first.channel_mean[:] = 0.0  # a snapshot: a copy
    first.top.clear()
    red.update(chunks[1].x, 3)
    assert_same(red.result(), feed(TapReducer, chunks))
    assert torch.equal(x, before)
    held = [t for t in vars(red._state).values() if t.numel() >= x[0].numel()]
    assert held == []


def test_empty_reducer_and_bad_input() -> None:
    assert_same(DeviceTapReducer().result(), TapReducer().result())
    red = DeviceTapReducer()
    with pytest.raises(ValueError):
        red.update(torch.zeros(2, 3), 0)
    with pytest.raises(TypeError):
        red.update(torch.zeros(1, 2, 3, dtype=torch.int32), 0)
    red.update(torch.zeros(1, 2, 3), 0)
    with pytest.raises(ValueError):
        red.update(torch.zeros(1, 2, 4), 1)
    with pytest.raises(ValueError):
        DeviceTapReducer(top_k=-1)


# ---------------------------------------------------------------- no host synchronisation


@contextmanager
def host_reads_forbidden() -> Iterator[None]:
    """Every way a tensor's value reaches Python raises (on CUDA each would wait for the device): item,
    tolist, numpy, cpu, bool/float/int/index conversions, and data-dependent shapes (nonzero, unique,
    masked_select, boolean-mask indexing)."""

    def refuse(name: str) -> Callable[..., Any]:
        def fail(*_args: Any, **_kwargs: Any) -> Any:
            raise AssertionError(f"host read: {name}")

        return fail

    def no_bool_index(original: Callable[..., Any]) -> Callable[..., Any]:
        def index(self: torch.Tensor, key: Any, *rest: Any) -> Any:
            keys = key if isinstance(key, tuple) else (key,)
            if any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys):
                raise AssertionError("host read: boolean-mask indexing")
            return original(self, key, *rest)

        return index

    with pytest.MonkeyPatch.context() as mp:
        for name in ("item", "tolist", "numpy", "cpu", "nonzero", "unique", "masked_select", "argwhere"):
            mp.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        for name in ("__bool__", "__float__", "__int__", "__index__"):
            mp.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        for name in ("nonzero", "unique", "masked_select", "argwhere"):
            mp.setattr(torch, name, refuse(f"torch.{name}"))
        mp.setattr(torch.Tensor, "__getitem__", no_bool_index(torch.Tensor.__getitem__))
        mp.setattr(torch.Tensor, "__setitem__", no_bool_index(torch.Tensor.__setitem__))
        yield


def test_the_guard_catches_a_host_read() -> None:
    """The guard can fail: TapReducer's CPU path reads window maxima back, by design."""
    with host_reads_forbidden(), pytest.raises(AssertionError, match="host read"):
        TapReducer().update(random_windows(0), 0)
    with host_reads_forbidden(), pytest.raises(AssertionError, match="boolean-mask"):
        torch.zeros(3)[torch.ones(3, dtype=torch.bool)]


@pytest.mark.usefixtures("chunk_elements")
@pytest.mark.parametrize("name", list(CASES))
def test_update_never_reads_a_value_back(name: str) -> None:
    case = CASES[name]()
    red = DeviceTapReducer(**case.kwargs)
    with host_reads_forbidden():
        for c in case.chunks:
            red.update(c.x, c.offset, c.valid)
    _check(case, red.result())


def test_update_runs_on_the_meta_device() -> None:
    """Meta tensors have shapes and no values: an update that completes on them read none."""
    x = torch.empty(3, 8, 4, device="meta")
    red = DeviceTapReducer(top_k=5)
    red.update(x, 0, torch.empty(8, 4, dtype=torch.bool, device="meta"))
    red.update(x.half(), 3)
    red.update(x[:, :0], 6)
    assert red._state is not None and red._state.sums.device.type == "meta"


@pytest.mark.parametrize("masked", [False, True])
def test_channel_reducer_update_never_reads_a_value_back(masked: bool) -> None:
    x = random_windows(3)
    keep = (torch.arange(24) % 4 != 0).view(1, 24, 1).expand(7, 24, 1)
    red = ChannelReducer()
    with host_reads_forbidden():
        red.update(x[:3], 0, keep[:3] if masked else None)
        red.update(x[3:], 3, keep[3:] if masked else None)
    full = x.double().reshape(-1, x.shape[2])[keep.reshape(-1) if masked else slice(None)]
    np.testing.assert_allclose(red.result().mean, full.mean(0).numpy(), rtol=1e-6, atol=1e-6)
    meta = ChannelReducer(absolute=True)
    meta.update(torch.empty(2, 4, 3, device="meta"), 0, torch.empty(2, 4, 1, dtype=torch.bool, device="meta"))
    meta.update(torch.empty(2, 4, 3, device="meta"), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_no_sync_under_cuda_sync_debug_mode() -> None:
    case = _causal_nonfinite()
    red = DeviceTapReducer()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for c in case.chunks:
            red.update(c.x.cuda(non_blocking=True), c.offset, c.valid.cuda(non_blocking=True))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _check(case, red.result())


# ---------------------------------------------------------------- selection and the profiler


def test_reducer_by_device() -> None:
    assert tap_reducer("auto", False) is DeviceTapReducer  # tensors off the CPU
    assert tap_reducer("device", True) is DeviceTapReducer
    assert tap_reducer("reference", False) is TapReducer


def test_profile_with_the_device_reducer_equals_the_cpu_one(
    model_cache: Path, token_ids: torch.Tensor
) -> None:
    """Real hooked activations, attention maps with their causal masks included."""
    lm = load_named("tiny-llama", model_cache)
    taps = ["resid.pre", "attn.scores", "attn.probs", "mlp.hidden", "mlp.out"]
    ref = profile_windows(lm, token_ids, taps, [0, 2], progress=False, reducer="reference")
    got = profile_windows(lm, token_ids, taps, [0, 2], progress=False, reducer="device")
    assert got.stats.keys() == ref.stats.keys()
    for key, stats in ref.stats.items():
        # A repeated token gives equal rows at layer 0 and a softmax row of one key an exact 1.0: ties,
        # which TapReducer breaks in any order.
        assert_same(got.stats[key], stats, top_positions=False)


def test_moe_capture_with_the_device_reducer_equals_the_cpu_one() -> None:
    """Pooled and per-expert keys (empty updates, routed-token masks) and the routing load."""
    from tests.test_experts import ids, logits, tiny_moe

    model = tiny_moe("mixtral")
    specs = moe_specs(model.model.layers)
    results = []
    for cls in (TapReducer, DeviceTapReducer):
        prof = Profiler(list(EXPERT_TAPS), list(specs), lambda _t, c=cls: c(3, 100.0, 1000.0), experts=True)
        with capture_experts(model, specs, prof.sink, EXPERT_TAPS, model.model.layers):
            logits(model, ids(seed=3))
        results.append(prof.result())
    assert results[1].keys() == results[0].keys()
    for key, stats in results[0].items():
        assert_same(results[1][key], stats, top_positions=False)  # repeated tokens: ties
