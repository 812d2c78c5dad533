"""Interventions on every tiny architecture, with massive activations planted where the test wants them."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

from outlier_study.errors import ConfigError
from outlier_study.interventions import INTERVENTIONS, Inputs, intervene
from outlier_study.interventions.massive import replace_massive
from outlier_study.interventions.record import Counted
from outlier_study.interventions.residual import remove_residual_mas
from outlier_study.measure.hooks import tap_hooks
from outlier_study.models.loader import LoadedModel
from outlier_study.stats.massive import ma_mask
from outlier_study.validate import check_for_model
from tests.helpers import typed_cfg

MA_ABS, MA_RATIO = 100.0, 1000.0


@functools.cache
def make_cfg(*overrides: str) -> DictConfig:
    """Composing is slow (~0.2 s); every test reads the result only, so one composition per override set.
    The interventions are what experiment=perplexity applies."""
    return typed_cfg("experiment=perplexity", *overrides)


def intervention(lm: LoadedModel, cfg: DictConfig) -> AbstractContextManager[Any]:
    """The configured intervention, checked against the model first as a job does."""
    check_for_model(cfg, lm.arch)
    return intervene(Inputs(lm, cfg.intervention, cfg.threshold))


Pos = tuple[int, int, int]  # (window, token, channel)
Captured = dict[tuple[int, str], torch.Tensor]


def count_hooks(lm: LoadedModel) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())


@contextmanager
def plant(lm: LoadedModel, tap: str, layer: int, adds: dict[Pos, float]) -> Iterator[None]:
    """Add large constants at positions of a module-boundary tap, as a fresh tensor.

    Registered with prepend=True: entered after an intervention, it runs before the intervention's own
    (prepended) hook on the same module, so the intervention sees the planted MA."""
    spec = lm.adapter.taps[tap]
    block = lm.adapter.blocks(lm.model)[layer]
    module = block.get_submodule(spec.module) if spec.module else block

    def edited(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for pos, add in adds.items():
            x[pos] += add
        return x

    if spec.io == "output":

        def out_hook(mod: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if isinstance(output, torch.Tensor):
                return edited(output)
            return (edited(output[0]), *output[1:])

        handle = module.register_forward_hook(out_hook, prepend=True)
    else:

        def in_hook(mod: torch.nn.Module, args: tuple[Any, ...]) -> Any:
            return (edited(args[0]), *args[1:])

        handle = module.register_forward_pre_hook(in_hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


def run(
    lm: LoadedModel,
    ids: torch.Tensor,
    taps: list[str],
    layers: list[int],
    *contexts: AbstractContextManager[Any],
) -> tuple[Captured, torch.Tensor]:
    """Enter `contexts` in order, then capture `taps`; return the captures and the logits."""
    got: Captured = {}

    def sink(layer: int, tap: str, x: torch.Tensor, valid: torch.Tensor | None) -> None:
        got[(layer, tap)] = x.detach().clone()

    with torch.no_grad(), ExitStack() as stack:
        for ctx in contexts:
            stack.enter_context(ctx)
        stack.enter_context(tap_hooks(lm.model, lm.adapter, taps, layers, sink))
        logits = lm.model(ids).logits
    return got, logits


def window_mean(x: torch.Tensor) -> torch.Tensor:
    """Independent reference: float64 mean per window, broadcastable to x."""
    return x.reshape(x.shape[0], -1).double().mean(1).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def branch_tap(lm: LoadedModel, side: str) -> str:
    """The tensor a sublayer adds to the residual stream."""
    return f"{side}.post_norm" if f"{side}.post_norm" in lm.adapter.taps else f"{side}.out"


# (a) ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["zero", "mean"])
@pytest.mark.parametrize("tap", ["mlp.hidden", "mlp.out"])
def test_replace_massive_changes_exactly_the_ma_elements(
    tiny: LoadedModel, token_ids: torch.Tensor, tap: str, value: str
) -> None:
    layer = 1
    adds = {(0, 5, 7): 5000.0, (1, 3, 11): -8000.0}
    downstream = ["resid.mid", "mlp.out", "resid.post"] + (
        ["mlp.post_norm"] if "mlp.post_norm" in tiny.adapter.taps else []
    )
    taps = sorted({tap, *downstream})
    base, base_logits = run(tiny, token_ids, taps, [0, 1], plant(tiny, tap, layer, adds))
    log_box: list[Counted] = []

    @contextmanager
    def edit() -> Iterator[None]:
        with replace_massive(tiny, tap, [layer], value, MA_ABS, MA_RATIO) as log:
            log_box.append(log)
            yield

    got, logits = run(tiny, token_ids, taps, [0, 1], edit(), plant(tiny, tap, layer, adds))

    x = base[(layer, tap)]
    mask = ma_mask(x, MA_ABS, MA_RATIO)
    assert mask.sum() == len(adds) and all(mask[p] for p in adds), "the planted MAs must be the only MAs"
    edited = got[(layer, tap)]
    assert torch.equal(edited[~mask], x[~mask])
    fill = torch.zeros_like(x) if value == "zero" else window_mean(x).expand_as(x)
    torch.testing.assert_close(edited[mask], fill[mask])
    if value == "zero":
        assert torch.equal(edited[mask], torch.zeros(len(adds)))
    assert log_box[0].changed == {layer: len(adds)} and log_box[0].total == len(adds)
    for t in taps:  # layer 0 runs before the edit: untouched
        assert torch.equal(got[(0, t)], base[(0, t)])

    # The edited tensor is what flows downstream.
    block = tiny.adapter.blocks(tiny.model)[layer]
    with torch.no_grad():
        if tap == "mlp.hidden":
            down = block.get_submodule(tiny.adapter.taps["mlp.out"].module)
            assert torch.equal(got[(layer, "mlp.out")], down(edited))
        elif "mlp.post_norm" in tiny.adapter.taps:
            norm = block.get_submodule(tiny.adapter.taps["mlp.post_norm"].module)
            assert torch.equal(got[(layer, "mlp.post_norm")], norm(edited))
        else:
            assert torch.equal(got[(layer, "resid.post")], got[(layer, "resid.mid")] + edited)
    assert not torch.equal(got[(layer, "resid.post")], base[(layer, "resid.post")])
    assert not torch.equal(logits, base_logits)


# (b) ------------------------------------------------------------------------------------------------------


def _contexts(lm: LoadedModel) -> dict[str, Callable[[], AbstractContextManager[Any]]]:
    cfg = make_cfg("intervention=massive", "intervention.tap=y6", "intervention.value=zero")
    return {
        "massive": lambda: replace_massive(lm, "mlp.hidden", None, "mean", MA_ABS, MA_RATIO),
        "residual": lambda: remove_residual_mas(lm, None, "mean", MA_ABS, MA_RATIO),
        "config": lambda: intervention(lm, cfg),
    }


def _planted_everywhere(lm: LoadedModel) -> list[AbstractContextManager[Any]]:
    """An MA at every layer's down-projection input, and one generated by layer 0 and carried onwards."""
    hidden = [plant(lm, "mlp.hidden", i, {(0, 4, 3): 3000.0}) for i in range(lm.n_layers)]
    return [*hidden, plant(lm, branch_tap(lm, "mlp"), 0, {(0, 2, 5): 9000.0})]


@pytest.mark.parametrize("kind", ["massive", "residual", "config"])
def test_model_restored_bit_exactly(tiny: LoadedModel, token_ids: torch.Tensor, kind: str) -> None:
    """After a normal exit and after an exception: same weights and buffers bit for bit, same logits."""
    before_state = {k: v.detach().clone() for k, v in tiny.model.state_dict().items()}
    hooks = count_hooks(tiny)
    with torch.no_grad():
        before = tiny.model(token_ids).logits

    def body(raises: bool) -> None:
        with _contexts(tiny)[kind]() as log:
            assert count_hooks(tiny) > hooks
            run(tiny, token_ids, [], [], *_planted_everywhere(tiny))
            assert log is not None and log.total > 0  # the hooks were live and replaced elements
            if raises:
                raise RuntimeError("boom")

    def assert_restored() -> None:
        assert count_hooks(tiny) == hooks
        after_state = tiny.model.state_dict()
        assert after_state.keys() == before_state.keys()
        for k, v in before_state.items():
            assert after_state[k].dtype == v.dtype and torch.equal(after_state[k], v), k
        with torch.no_grad():
            assert torch.equal(tiny.model(token_ids).logits, before)

    body(raises=False)
    assert_restored()
    with pytest.raises(RuntimeError, match="boom"):
        body(raises=True)
    assert_restored()


# (c) ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["zero", "mean"])
def test_residual_removal_keeps_only_mas_generated_in_the_layer(
    tiny: LoadedModel, token_ids: torch.Tensor, value: str
) -> None:
    p, q = (0, 5, 7), (1, 9, 20)  # p generated by layer 0's MLP, q by layer 1's MLP
    mlp_b, attn_b = branch_tap(tiny, "mlp"), branch_tap(tiny, "attn")
    taps = sorted({"resid.pre", "attn.norm", "resid.post", mlp_b, attn_b})
    layers = list(range(tiny.n_layers))
    assert tiny.n_layers == 3

    def planted() -> list[AbstractContextManager[Any]]:
        return [plant(tiny, mlp_b, 0, {p: 1e4}), plant(tiny, mlp_b, 1, {q: -2e4})]

    base, _ = run(tiny, token_ids, taps, layers, *planted())
    log_box: list[Counted] = []

    @contextmanager
    def edit() -> Iterator[None]:
        with remove_residual_mas(tiny, None, value, MA_ABS, MA_RATIO) as log:
            log_box.append(log)
            yield

    got, _ = run(tiny, token_ids, taps, layers, edit(), *planted())

    def mas(x: torch.Tensor) -> set[Pos]:
        return {tuple(i) for i in ma_mask(x, MA_ABS, MA_RATIO).nonzero().tolist()}  # type: ignore[misc]

    # Without the intervention the residual carries p into layers 1 and 2 and q into layer 2 (FMA).
    assert mas(base[(0, "resid.post")]) == {p}
    assert mas(base[(1, "resid.post")]) == {p, q}
    assert mas(base[(2, "resid.post")]) == {p, q}
    # Layer 0 generated p (TMA) and had nothing to remove: identical output.
    assert torch.equal(got[(0, "resid.post")], base[(0, "resid.post")])
    # Layer 1's sublayers saw the original input, MA included.
    for t in ("resid.pre", "attn.norm", attn_b, mlp_b):
        assert torch.equal(got[(1, t)], base[(1, t)]), t
    # Layer 1's output holds only the MA it generated; at p the residual carried the fill instead of x.
    out1, x1 = got[(1, "resid.post")], base[(1, "resid.pre")]
    assert mas(out1) == {q}
    mask = torch.zeros_like(x1, dtype=torch.bool)
    mask[p] = True
    assert torch.equal(out1[~mask], base[(1, "resid.post")][~mask])
    a, m = base[(1, attn_b)][p], base[(1, mlp_b)][p]
    if value == "zero":
        assert torch.equal(out1[p], (0 + a) + m)
    else:
        torch.testing.assert_close(out1[p], (window_mean(x1)[p[0]].squeeze() + a) + m)
    # What flows on is the edited output; layer 2 then drops q, which it did not generate.
    assert torch.equal(got[(2, "resid.pre")], out1)
    assert mas(got[(2, "resid.post")]) == set()
    assert log_box[0].changed == {0: 0, 1: 1, 2: 1}


def test_residual_only_on_chosen_layers(tiny: LoadedModel, token_ids: torch.Tensor) -> None:
    mlp_b = branch_tap(tiny, "mlp")
    p = (0, 5, 7)
    layers = list(range(tiny.n_layers))
    base, _ = run(tiny, token_ids, ["resid.post"], layers, plant(tiny, mlp_b, 0, {p: 1e4}))
    with remove_residual_mas(tiny, [2], "zero", MA_ABS, MA_RATIO) as log:
        got, _ = run(tiny, token_ids, ["resid.post"], layers, plant(tiny, mlp_b, 0, {p: 1e4}))
    assert torch.equal(got[(1, "resid.post")], base[(1, "resid.post")])  # layer 1 not chosen: p carried
    assert not ma_mask(got[(2, "resid.post")], MA_ABS, MA_RATIO).any()
    assert log.changed == {2: 1}


# (d) ------------------------------------------------------------------------------------------------------


def _field(err: pytest.ExceptionInfo[ConfigError]) -> str:
    return err.value.field


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["intervention=massive", "intervention.tap=nope"], "intervention.tap"),
        (["intervention=massive", "intervention.tap=resid.mid"], "intervention.tap"),
        (["intervention=massive", "intervention.tap=y1"], "intervention.tap"),
        (["intervention=massive", "intervention.tap=mlp.in"], "intervention.tap"),
        (["intervention=massive", "intervention.tap=attn.norm_std"], "intervention.tap"),
        (["intervention=massive", "intervention.tap=attn.scores"], "intervention.tap"),
        (["intervention=massive", "intervention.tap=x7"], "intervention.tap"),
        (["intervention=massive", "intervention.value=half"], "intervention.value"),
        (["intervention=residual", "intervention.value=half"], "intervention.value"),
        (["intervention=massive", "intervention.layers=[3]"], "intervention.layers"),
        (["intervention=massive", "intervention.layers=[-4]"], "intervention.layers"),
        (["intervention=residual", "intervention.layers=[0,99]"], "intervention.layers"),
        (["intervention=residual", "intervention.layers=[]"], "intervention.layers"),
        (["intervention=massive", "intervention.name=bogus"], "intervention.name"),
        (["intervention=massive", "threshold.ma_abs=-1"], "threshold.ma_abs"),
        (["intervention=residual", "threshold.ma_ratio=-1"], "threshold.ma_ratio"),
    ],
)
def test_bad_config_is_a_config_error_naming_the_field(
    tiny: LoadedModel, overrides: list[str], field: str
) -> None:
    hooks = count_hooks(tiny)
    with pytest.raises(ConfigError) as err:
        with intervention(tiny, make_cfg(*overrides)):
            pytest.fail("entered the block despite bad input")
    assert _field(err) == field
    assert count_hooks(tiny) == hooks


def test_editable_taps_per_architecture(tiny: LoadedModel) -> None:
    allowed = tiny.adapter.editable_taps()
    assert "resid.mid" not in allowed and "attn.scores" not in allowed and "attn.norm_std" not in allowed
    assert {"resid.pre", "attn.norm", "attn.out", "mlp.hidden", "mlp.out", "resid.post"} <= set(allowed)
    assert ("attn.q" in allowed) == (tiny.adapter.family != "gpt2")  # GPT-2's q is a third of c_attn
    for tap in tiny.adapter.available():
        if tap in allowed:
            with replace_massive(tiny, tap, [0], "zero", MA_ABS, MA_RATIO):
                pass
        else:
            with pytest.raises(ConfigError) as err, replace_massive(tiny, tap, [0], "zero", MA_ABS, MA_RATIO):
                pass
            assert _field(err) == "intervention.tap"
            assert tap in str(err.value) and "allowed:" in str(err.value)


def test_every_editable_tap_edits_what_flows(tiny: LoadedModel, token_ids: torch.Tensor) -> None:
    """A planted MA at every editable tap at once (one forward pass): each is replaced at its own tap."""
    taps = tiny.adapter.editable_taps()
    pos = (0, 6, 2)
    base, base_logits = run(tiny, token_ids, taps, [1], *[plant(tiny, t, 1, {pos: 4000.0}) for t in taps])
    with ExitStack() as stack:
        logs = {t: stack.enter_context(replace_massive(tiny, t, [1], "zero", MA_ABS, MA_RATIO)) for t in taps}
        # planted after entering the interventions, so each plant runs just before its tap's edit
        got, logits = run(tiny, token_ids, taps, [1], *[plant(tiny, t, 1, {pos: 4000.0}) for t in taps])
    for t in taps:
        assert base[(1, t)][pos].abs() > 1000, t
        assert logs[t].changed == {1: 1}, t
        assert got[(1, t)][pos] == 0, t
    assert not torch.equal(logits, base_logits)


def test_edit_is_measured_whichever_context_was_entered_first(
    tiny: LoadedModel, token_ids: torch.Tensor
) -> None:
    """Intervention hooks run before measurement hooks on the same module: taps report the edited tensor."""
    got: Captured = {}

    def sink(layer: int, tap: str, x: torch.Tensor, valid: torch.Tensor | None) -> None:
        got[(layer, tap)] = x.clone()

    taps = ["mlp.hidden", "resid.post"]
    pos = (0, 6, 2)
    with torch.no_grad(), tap_hooks(tiny.model, tiny.adapter, taps, [1], sink):
        with (
            replace_massive(tiny, "mlp.hidden", [1], "zero", MA_ABS, MA_RATIO),
            remove_residual_mas(tiny, [1], "zero", MA_ABS, MA_RATIO) as log,
        ):
            with plant(tiny, "mlp.hidden", 1, {pos: 4000.0}), plant(tiny, "resid.pre", 1, {pos: 4000.0}):
                tiny.model(token_ids)
    assert got[(1, "mlp.hidden")][pos] == 0
    assert log.changed == {1: 1}
    assert got[(1, "resid.post")][pos].abs() < 100


# (e) and the dispatcher --------------------------------------------------------------------------------


def test_none_changes_nothing(tiny: LoadedModel, token_ids: torch.Tensor) -> None:
    cfg = make_cfg("intervention=none")
    assert "none" in INTERVENTIONS
    hooks = count_hooks(tiny)
    adds = {(0, 5, 7): 5000.0}
    base, base_logits = run(
        tiny, token_ids, ["mlp.hidden", "resid.post"], [0, 1, 2], plant(tiny, "mlp.hidden", 1, adds)
    )
    with intervention(tiny, cfg) as log:
        assert log.total == 0 and log.summary("intervention") == {"intervention.name": "none"}
        assert count_hooks(tiny) == hooks
        got, logits = run(
            tiny, token_ids, ["mlp.hidden", "resid.post"], [0, 1, 2], plant(tiny, "mlp.hidden", 1, adds)
        )
    assert torch.equal(logits, base_logits)
    assert got.keys() == base.keys() and all(torch.equal(got[k], base[k]) for k in base)


@pytest.mark.parametrize(
    ("alias", "canonical"), [("y6", "mlp.hidden"), ("y7", "mlp.out"), ("x1", "resid.pre")]
)
def test_config_dispatch_resolves_aliases_and_layers(
    tiny: LoadedModel, token_ids: torch.Tensor, alias: str, canonical: str
) -> None:
    cfg = make_cfg("intervention=massive", f"intervention.tap={alias}", "intervention.layers=[-2]")
    adds = {(1, 2, 3): -6000.0}
    with intervention(tiny, cfg) as log:
        assert isinstance(log, Counted)
        got, _ = run(tiny, token_ids, [canonical], [1], plant(tiny, canonical, 1, adds))
    assert log.tap == canonical and log.layers == [1] and log.value == "mean"
    assert log.changed == {1: 1}
    x = got[(1, canonical)]
    assert x[1, 2, 3].abs() < 100
    summary = log.summary("intervention")
    assert summary["intervention.changed_total"] == 1 and summary["intervention.tap"] == canonical

    cfg = make_cfg("intervention=residual")
    with intervention(tiny, cfg) as log:
        assert log is not None and log.name == "residual" and log.value == "zero"
        assert log.layers == list(range(tiny.n_layers))


def test_residual_refuses_train_mode_dropout_silently_breaking_exactness(
    tiny: LoadedModel, token_ids: torch.Tensor
) -> None:
    """In train mode with dropout the layer output is no longer x + branches as captured: loud error."""
    if tiny.adapter.family != "gpt2":
        pytest.skip("only GPT-2 has dropout between its branch taps and the residual add")
    mlp_b = branch_tap(tiny, "mlp")
    dropout = tiny.model.config.resid_pdrop
    assert dropout > 0
    tiny.model.train()
    try:
        with (
            pytest.raises(RuntimeError, match="eval mode"),
            remove_residual_mas(tiny, None, "zero", MA_ABS, MA_RATIO),
        ):
            run(tiny, token_ids, [], [], plant(tiny, mlp_b, 0, {(0, 5, 7): 1e4}))
    finally:
        tiny.model.eval()
