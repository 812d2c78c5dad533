"""Every paper item on a tiny mixture-of-experts model and a tiny parallel-block model, as on the five
paper families; and the items a family's layout cannot support refused in one line before the load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from outlier_study.app import run
from outlier_study.errors import ConfigError
from tests.helpers import make_cfg

SMALL = ("dataset=embedded", "dataset.seq_len=32", "dataset.n_windows=2", "progress=false")
PAPER_ITEMS = (
    "table1",
    "table2",
    "table3",
    "table45",
    "table6",
    "fig4",
    "fig5",
    "fig6",
    "fig7",
    "fig8",
    "fig9",
)
MODELS = ("tiny-mixtral", "tiny-cohere")  # MoE (every layer), parallel attention + MLP with one shared norm


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("item", PAPER_ITEMS)
def test_paper_item_runs(tmp_path: Path, model: str, item: str) -> None:
    job = run(make_cfg(f"experiment={item}", f"model={model}", *SMALL), job_dir=tmp_path / "job")
    status = json.loads((job / "status.json").read_text())
    assert status["status"] == "ok", status
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics


@pytest.mark.parametrize(
    ("model", "item", "field", "says"),
    [
        ("tiny-olmo2", "fig9", "experiment.norm", "no norm before attention or MLP"),
        ("tiny-olmo2", "table3", "experiment.name", "no norm before attention"),
        ("tiny-deepseek-v3", "table3", "experiment.matrices", "unknown matrix 'k'"),
        ("tiny-gpt-neox", "table3", "experiment.matrices", "unknown matrix 'q'"),
    ],
)
def test_items_a_layout_cannot_support_are_refused_before_the_load(
    tmp_path: Path, model: str, item: str, field: str, says: str
) -> None:
    with pytest.raises(ConfigError) as err:
        run(make_cfg(f"experiment={item}", f"model={model}", *SMALL), job_dir=tmp_path / "job")
    assert err.value.field == field and says in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "job" / "metrics.json").exists()
