"""Helpers shared by the tests: the real Hydra config tree and model loading by config name."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from outlier_study.config import CONF_DIR
from outlier_study.config.schema import register_configs
from outlier_study.models.loader import LoadedModel, load_model
from outlier_study.validate import typed_config

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2", "tiny-gemma3")

register_configs()


def make_cfg(*overrides: str) -> DictConfig:
    """Compose the real Hydra config tree with overrides, as the CLI would."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def typed_cfg(*overrides: str) -> DictConfig:
    """The composed config after its schema check, as `run(cfg)` hands it to the code (enums typed)."""
    return typed_config(make_cfg(*overrides))


def load_named(name: str, cache: Path, dtype: str = "float32") -> LoadedModel:
    cfg = make_cfg(f"model={name}")
    return load_model(cfg.model, dtype, "cpu", cache)


def config_error(*overrides: str) -> str:
    """The one line the CLI prints for overrides refused while composing or type-checking the config
    (fails the test when the config is accepted)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from outlier_study.cli import one_line
    from outlier_study.errors import ConfigError

    try:
        typed_cfg(*overrides)
    except ConfigError as err:
        return str(err)
    except (HydraException, OmegaConfBaseException) as err:
        return one_line(err)
    raise AssertionError(f"accepted: {overrides}")


def snapshot(lm: LoadedModel) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, copied: what a restore must give back."""
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def assert_bit_exact(lm: LoadedModel, before: dict[str, torch.Tensor]) -> None:
    """The model's state equals `before` bit for bit (the bits, not the values: -0.0 and nan compare too)."""
    after = lm.model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key].view(torch.uint8), value.view(torch.uint8)), key


def hook_count(lm: LoadedModel) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in lm.model.modules())
