"""Shared fixtures: tiny random models of every architecture, the real embedded models, WikiText-2."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from outlier_study.models.loader import LoadedModel
from tests.helpers import TINY_MODELS, WIKITEXT, load_named


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared, busy CPU the thread barriers of
    every small op dominate (a 3-layer forward takes ~0.5 s with 2 threads vs ~5 ms with 1). A module
    asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """The GGUF conversion cache (OUTLIER_STUDY_CACHE or ~/.cache/outlier-study), shared with `make run`."""
    root = os.environ.get("OUTLIER_STUDY_CACHE") or str(Path.home() / ".cache" / "outlier-study")
    return Path(root) / "models"


@pytest.fixture(scope="session", params=TINY_MODELS)
def tiny(request: pytest.FixtureRequest, model_cache: Path) -> LoadedModel:
    return load_named(request.param, model_cache)


@pytest.fixture(scope="session")
def smollm2(model_cache: Path) -> LoadedModel:
    return load_named("smollm2-135m", model_cache)


@pytest.fixture()
def token_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture()
def wikitext() -> Iterator[Path]:
    if not WIKITEXT.is_file():
        pytest.skip(f"WikiText-2 test file absent: {WIKITEXT}")
    yield WIKITEXT
