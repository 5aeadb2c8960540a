"""Every recipe in configs/ is accepted by the command line and by its method."""
from pathlib import Path

import pytest

from dfkd.api import DistillConfig
from dfkd.config import ConfigError, load_yaml, merge_config, parse_overrides
from generators import synthesizer_class

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_there_are_recipes_for_each_dataset_and_method():
    names = {(p.parent.name, p.stem) for p in RECIPES}
    for dataset in ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100"):
        for method in ("dafl", "deepinversion", "zskt", "dfad", "fast", "cmi", "zskd", "kegnet", "dfnd", "mosaickd",
                       "lopes"):
            assert (dataset, method) in names, f"no recipe configs/{dataset}/{method}.yaml"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_validates(path):
    cfg = merge_config(DistillConfig.defaults(), load_yaml(path))
    synthesizer_class(cfg["method"]).resolve_options(cfg["options"])
    DistillConfig.from_layers(load_yaml(path)).validate()  # its numbers are in range too


def test_validate_refuses_nonsense_numbers_and_keeps_zeros():
    config = DistillConfig.from_layers({"steps": 10}, {"seed": 0, "eval_every": 0, "student_ema": 0.0,
                                                       "options": {"bn_weight": 0}})
    assert config.validate() is config and (config.seed, config.options["bn_weight"]) == (0, 0)
    for layer, phrase in (({"steps": 0}, "steps must be at least 1, got 0"),
                          ({"checkpoint_seconds": -1}, "checkpoint_seconds must be 0 or more"),
                          ({"student_ema": 1.0}, r"student_ema must be in \[0, 1\)"),
                          ({"student_momentum": 1.5}, r"student_momentum must be in \[0, 1\)"),
                          ({"options": {"ngf": 0}}, "options.ngf must be at least 1"),
                          ({"options": {"oh_weight": -0.5}}, "options.oh_weight must be 0 or more"),
                          ({"student_lr": float("nan")}, "student_lr must be above 0")):
        with pytest.raises(ConfigError, match=phrase):
            DistillConfig.from_layers(layer).validate()


def test_overrides_parse_types_and_nesting():
    assert parse_overrides(["steps=10", "options.lr=1e-3", "no_eval=true", "method=dfad"]) == {
        "steps": 10, "options": {"lr": 0.001}, "no_eval": True, "method": "dfad"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["steps"])
    with pytest.raises(ConfigError, match="unknown config key 'nope'.*steps"):
        merge_config(DistillConfig.defaults(), {"nope": 1})
    with pytest.raises(ConfigError, match="must be an integer"):
        merge_config(DistillConfig.defaults(), {"steps": 1.5})
