"""Every causal-LM family of the installed transformers: in scope or refused with a reason; each in-scope
family as a tiny random model saved to a folder and run as a user would (`experiment=profile model=local
model.path=DIR`), after its tap identities and bit-identical hooked logits are checked.

docs/coverage.md records which families are covered; a covered family that stops passing fails here.
`OUTLIER_WRITE_COVERAGE=1 pytest tests/test_coverage.py` (`make coverage`) rewrites the table.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from outlier_study.adapters import adapter_for_config
from outlier_study.adapters.scope import out_of_scope
from outlier_study.app import run
from outlier_study.errors import ConfigError
from outlier_study.measure.verify import verify
from outlier_study.models.tiny import byte_tokenizer, tiny_config
from tests.helpers import REPO, make_cfg

DOC = REPO / "docs" / "coverage.md"
FAMILIES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
IN_SCOPE = [f for f in FAMILIES if out_of_scope(f, None) is None]
SMALL = ("dataset=embedded", "dataset.seq_len=16", "dataset.n_windows=2", "progress=false")
RESULTS: dict[str, tuple[str, str]] = {}  # family -> (status, detail), filled by test_family


def recorded_covered() -> set[str]:
    """The families docs/coverage.md says are covered."""
    if not DOC.exists():
        return set()
    return set(re.findall(r"^\| `([^`]+)` \| covered \|", DOC.read_text(), flags=re.M))


def check_family(family: str, folder: Path) -> tuple[str, str]:
    """(status, detail): covered with the taps that do not apply, or why not."""
    try:
        config = tiny_config(family)
    except Exception as err:  # the family's own default config does not shrink to a tiny model
        return "not built", " ".join(f"{type(err).__name__}: {err}".split())[:160]
    try:
        adapter = adapter_for_config(config)
    except ConfigError as err:
        return "refused", str(err).removeprefix("model: ")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    try:
        problems = verify(model, adapter, ids)
    except Exception as err:
        problems = [" ".join(f"{type(err).__name__}: {err}".split())[:160]]
    if problems:
        return "failing", "; ".join(problems)[:200]
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    job = run(
        make_cfg(
            "experiment=profile",
            "model=local",
            f"model.path={folder}",
            "model.attn_implementation=eager",
            "experiment.figures=false",  # plotting is the same code for every family, tested elsewhere
            *SMALL,
        ),
        job_dir=folder / "job",
    )
    status = json.loads((job / "status.json").read_text())
    if status["status"] != "ok":
        return "failing", f"profile: {status.get('error', '')}"[:200]
    absent = ", ".join(f"{t} ({why})" for t, why in adapter.absent.items() if not t.endswith("_std"))
    return "covered", absent or "—"


@pytest.mark.parametrize("family", IN_SCOPE)
def test_family(family: str, tmp_path: Path) -> None:
    RESULTS[family] = result = check_family(family, tmp_path / family)
    if family in recorded_covered():
        assert result[0] == "covered", f"{family} regressed: {result[1]}"


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in IN_SCOPE])
def test_out_of_scope_family_is_refused_with_its_reason(family: str) -> None:
    with pytest.raises(ConfigError, match=rf"model: model_type '{re.escape(family)}' is not measured here: "):
        adapter_for_config(_Named(family))


class _Named:
    """A config stand-in carrying only the model_type: the refusal must come before anything is built."""

    def __init__(self, model_type: str) -> None:
        self.model_type = model_type


def test_coverage_table_is_current() -> None:
    """Runs last in this file: the measured statuses against the recorded ones (or rewrites the table)."""
    if len(RESULTS) < len(IN_SCOPE):
        pytest.skip("needs every test_family of this file in the same session")
    table = coverage_markdown(RESULTS)
    if os.environ.get("OUTLIER_WRITE_COVERAGE") == "1":
        DOC.write_text(table)
    if not DOC.exists():
        pytest.skip("docs/coverage.md has not been generated yet: run `make coverage`")
    covered = {f for f, (s, _) in RESULTS.items() if s == "covered"}
    assert recorded_covered() <= covered
    assert DOC.read_text() == table, "docs/coverage.md is stale: run `make coverage`"


def coverage_markdown(results: dict[str, tuple[str, str]]) -> str:
    covered = sum(s == "covered" for s, _ in results.values())
    lines = [
        "# Architecture coverage",
        "",
        "Generated by `make coverage` (tests/test_coverage.py) from the installed transformers: every "
        "family of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`; a tiny random model of each in-scope one, built from "
        "its own default config by one generic shrink (`models/tiny.py`), has its tap identities and "
        "bit-identical hooked logits checked (`measure/verify.py`), is saved to a folder and run as "
        "`experiment=profile model=local model.path=DIR`.",
        "",
        f"**{covered} of {len(results)} in-scope families covered ({100 * covered / len(results):.0f} %)**; "
        f"{len(FAMILIES) - len(results)} families out of scope (listed at the end).",
        "",
        "| family | status | taps that do not apply (why) / what fails |",
        "|---|---|---|",
    ]
    lines += [f"| `{f}` | {s} | {d.replace('|', '/')} |" for f, (s, d) in sorted(results.items())]
    lines += ["", "## Out of scope", "", "| family | why |", "|---|---|"]
    lines += [f"| `{f}` | {out_of_scope(f, None)} |" for f in FAMILIES if f not in results]
    return "\n".join(lines) + "\n"
