"""The `weights` intervention: named weights, rows and columns zeroed or scaled on every tiny architecture,
restored bit-exactly also when the evaluation raises; its job records; coordinates swept as lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser

from outlier_study.app import run
from outlier_study.errors import ConfigError
from outlier_study.interventions.weights import Target, edit_weights
from outlier_study.measure.perplexity import evaluate_perplexity
from outlier_study.models.loader import LoadedModel
from tests.helpers import assert_bit_exact, hook_count, load_named, make_cfg, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.mark.parametrize("mode", ["zero", "scale"])
def test_edit_weights_changes_only_the_targets_and_restores_bit_exactly_after_an_error(
    tiny: LoadedModel, token_ids: torch.Tensor, mode: str
) -> None:
    before, hooks = snapshot(tiny), hook_count(tiny)
    with torch.no_grad():
        reference = tiny.model(token_ids).logits
    block = tiny.adapter.blocks(tiny.model)[1]
    targets = [
        Target(1, "down", 2, 3),
        Target(1, "q", row=4),
        Target(1, "up" if "up" in tiny.adapter.weights else "o", col=5),
    ]
    originals = [tiny.adapter.weight_view(block, t.matrix).detach().clone() for t in targets]
    with pytest.raises(RuntimeError, match="evaluation failed"):
        with edit_weights(tiny, targets, mode, factor=-3.0) as log:
            for target, old in zip(targets, originals, strict=True):
                new = tiny.adapter.weight_view(block, target.matrix).detach()
                changed = (new != old).nonzero().tolist()
                rows = range(old.shape[0]) if target.row is None else [target.row]
                cols = range(old.shape[1]) if target.col is None else [target.col]
                expected = [[r, c] for r in rows for c in cols if old[r, c] != 0]
                assert changed == expected, target
                scaled = old[list(rows)][:, list(cols)] * (0.0 if mode == "zero" else -3.0)
                assert torch.equal(new[list(rows)][:, list(cols)], scaled)
            evaluate_perplexity(tiny, token_ids, progress=False)
            assert log.total == 1 + originals[1].shape[1] + originals[2].shape[0]
            raise RuntimeError("evaluation failed")
    assert_bit_exact(tiny, before)
    assert hook_count(tiny) == hooks
    with torch.no_grad():
        assert torch.equal(tiny.model(token_ids).logits, reference)


def test_weights_intervention_job_records_what_it_changed(tmp_path: Path) -> None:
    common = (
        "experiment=perplexity",
        "model=tiny-llama",
        "dataset.seq_len=24",
        "dataset.n_windows=2",
        "progress=false",
    )
    plain = json.loads((run(make_cfg(*common), tmp_path / "plain") / "metrics.json").read_text())
    job = run(
        make_cfg(
            *common,
            "intervention=weights",
            "intervention.weights=[{layer:1,matrix:down,row:3},{layer:-1,matrix:q,row:0,col:2}]",
            "intervention.mode=scale",
            "intervention.factor=10",
        ),
        tmp_path / "edited",
    )
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["intervention.name"] == "weights" and metrics["intervention.value"] == "scale ×10"
    down = load_named("tiny-llama", Path(make_cfg().paths.model_cache)).model.model.layers[1].mlp.down_proj
    assert metrics["intervention.changed.down"] == down.in_features  # one whole output row
    assert (
        metrics["intervention.changed.q"] == 1
        and metrics["intervention.changed_total"] == down.in_features + 1
    )
    assert metrics["ppl"] != plain["ppl"]
    [evaluation] = json.loads((job / "perplexity.json").read_text())["evaluations"]
    assert evaluation["changed"] == metrics["intervention.changed_total"]


def test_published_coordinates_sweep_as_lists() -> None:
    """One list per job: `-m intervention.weights=[...],[...]` sweeps two sets of coordinates."""
    [override] = OverridesParser.create().parse_overrides(
        ["intervention.weights=[{layer:2,matrix:down,row:3968,col:7003}],[{layer:1,matrix:down,row:1}]"]
    )
    values = list(override.sweep_iterator())
    assert values == [
        [{"layer": 2, "matrix": "down", "row": 3968, "col": 7003}],
        [{"layer": 1, "matrix": "down", "row": 1}],
    ]


def test_an_experts_matrix_is_edited_through_the_adapters_expert_view(model_cache: Path) -> None:
    """MoE models: `expert` names the expert whose matrix is edited; without it an MLP matrix is refused."""
    from outlier_study.adapters.base import Adapter

    if not hasattr(Adapter, "weight_view_expert"):
        pytest.skip("the adapters have no per-expert weight views")
    lm = load_named("tiny-mixtral", model_cache)
    block = lm.adapter.blocks(lm.model)[0]
    before = snapshot(lm)
    with edit_weights(lm, [Target(0, "down", row=1, expert=2)], "zero") as log:
        assert bool((lm.adapter.weight_view_expert(block, "down", 2)[1] == 0).all())
        assert bool((lm.adapter.weight_view_expert(block, "down", 1)[1] != 0).any())
    assert log.summary("intervention")["intervention.changed.down.expert2"] == log.total > 0
    assert_bit_exact(lm, before)
    with pytest.raises(ConfigError) as err:
        with edit_weights(lm, [Target(0, "down", row=1)], "zero"):
            pass
    assert err.value.field == "intervention.weights[0].expert"
