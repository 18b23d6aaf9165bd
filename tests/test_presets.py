"""Every preset validates, matches its recipe, and `make exp` reproduces it through DVC."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

from pipeline.core.params import ParamsError, apply_overrides, load_params, parse_params
from pipeline.experiments.presets import exp_run_args, load_preset, parse_assignments, preset_names

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", preset_names())
def test_preset_validates(raw_params: dict[str, Any], name: str) -> None:
    params = parse_params(apply_overrides(raw_params, load_preset(name)), name)
    assert params.preset == name


# The recipes the seed presets reproduce (the table).
RECIPES = {
    "seed000": {
        "model.g_hidden": [128], "model.d_hidden": [128], "model.activation": "relu",
        "model.output": "sigmoid", "model.noise": "normal", "loss.kind": "minimax",
        "train.lr_g": 1e-3, "train.beta1": 0.9, "train.beta2": 0.999, "train.batch_size": 32,
        "train.steps": 100_000, "train.sample_every": 1000, "model.init": "truncated_normal",
        "model.init_stddev": 0.01,
    },
    "seed001": {
        "model.g_hidden": [128], "model.activation": "leaky_relu", "model.leaky_alpha": 0.01,
        "model.output": "tanh", "model.noise": "uniform", "loss.kind": "non_saturating",
        "loss.label_smoothing": 0.1, "train.lr_g": 2e-3, "train.batch_size": 100,
        "train.epochs": 500, "train.sample_grid": 4,
    },
    "seed002": {
        "model.g_hidden": [256, 512], "model.d_hidden": [512, 256], "model.activation": "relu",
        "model.output": "tanh", "model.noise": "uniform", "loss.kind": "non_saturating",
        "loss.d_steps": 1, "train.lr_g": 1e-4, "train.batch_size": 128, "train.epochs": 1000,
        "train.sample_every": 10,
    },
    "seed003": {
        "model.g_hidden": [128, 128], "model.d_hidden": [128, 128], "model.leaky_alpha": 0.01,
        "model.output": "tanh", "model.noise": "uniform", "loss.kind": "non_saturating",
        "loss.label_smoothing": 0.1, "train.lr_g": 1e-3, "train.batch_size": 100,
        "train.epochs": 100, "train.sample_every": 1,
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_seed_preset_matches_recipe(raw_params: dict[str, Any], name: str) -> None:
    flat = parse_params(apply_overrides(raw_params, load_preset(name))).flat()
    assert {key: flat[key] for key in RECIPES[name]} == RECIPES[name]
    assert flat["model.conditional"] is False and flat["model.latent_dim"] == 100
    assert flat["train.ema_decay"] == 0.0  # the recipes predate weight averaging
    assert flat["train.mixed_precision"] is False  # and computed in float32


@pytest.mark.parametrize("name", preset_names())
def test_exp_args_reproduce_preset_through_dvc(
    raw_params: dict[str, Any], tmp_path: Path, name: str
) -> None:
    """The `-S` pairs `make exp` passes, applied by DVC's own parser, give the preset."""
    params_file = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_file)
    args = exp_run_args(name, params_file)
    assert args[::2] == ["-S"] * len(load_preset(name))
    dvc_apply_overrides(params_file, args[1::2])
    expected = parse_params(apply_overrides(raw_params, load_preset(name)))
    assert load_params(params_file) == expected


def test_exp_args_refuse_an_invalid_preset(tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["lr_g"] = -1.0
    params_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"train.lr_g: got -1.0"):
        exp_run_args("smoke", params_file)
    with pytest.raises(ParamsError, match=r"preset: got 'seed999'; allowed: \[.*'default'"):
        exp_run_args("seed999", params_file)


def test_exp_args_put_changes_on_top_of_a_preset(
    raw_params: dict[str, Any], tmp_path: Path
) -> None:
    """`make exp PRESET=seed002 SET='train.epochs=300 ...'`: each key once, the change wins."""
    params_file = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_file)
    extra = parse_assignments(["train.epochs=300", "model.g_hidden=[64, 32]"])
    assert extra == {"train.epochs": 300, "model.g_hidden": [64, 32]}
    args = exp_run_args("seed002", params_file, extra)
    assert args[1::2].count("train.epochs=300") == 1
    assert not any(arg.startswith("train.epochs=1000") for arg in args)
    dvc_apply_overrides(params_file, args[1::2])
    expected = parse_params(apply_overrides(raw_params, {**load_preset("seed002"), **extra}))
    assert load_params(params_file) == expected


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["train.epochs"], r"override: got 'train.epochs'; expected KEY=VALUE"),
        (["=3"], r"override: got '=3'; expected KEY=VALUE"),
        (["train.epochs=0"], r"train.epochs: got 0; Input should be greater than 0"),
        (["train.epoch=3"], r"train.epoch: unknown key"),
    ],
)
def test_exp_args_refuse_a_bad_change(pairs: list[str], message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        exp_run_args("seed002", REPO / "params.yaml", parse_assignments(pairs))


# A variant differs from its base in what it names here and nowhere else.
VARIANTS = {
    "seed000-ns": ("seed000", {"loss.kind": "non_saturating"}),
    "seed000-adam": ("seed000", {"train.lr_g": 2e-4, "train.lr_d": 2e-4, "train.beta1": 0.5}),
    "seed000-tanh": ("seed000", {"model.output": "tanh"}),
    "seed000-leaky": ("seed000", {"model.activation": "leaky_relu"}),
    "seed002-leaky": ("seed002", {"model.activation": "leaky_relu"}),
    "seed002-dropout": ("seed002", {"model.d_dropout": 0.3}),
    "default-float32": ("default", {"train.mixed_precision": False, "train.shards": 1}),
    "best": (  # the default before 2026-12-05 (pinned), with its own five changes
        "default",
        {
            "model.latent_dim": 100,
            "model.g_hidden": [256, 512],
            "model.d_hidden": [1024, 512],
            "model.d_projection": False,
            "model.d_minibatch_std": 8,
            "loss.r1": 0.0,
            "train.batch_size": 128,
            "train.epochs": 60,
            "train.lr_g": 8e-4,
            "train.lr_d": 2.4e-3,
            "train.beta1": 0.5,
        },
    ),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_is_its_base_plus_its_fix(raw_params: dict[str, Any], name: str) -> None:
    base, fix = VARIANTS[name]
    variant = parse_params(apply_overrides(raw_params, load_preset(name))).flat()
    original = parse_params(apply_overrides(raw_params, load_preset(base))).flat()
    changed = {key: value for key, value in variant.items() if original[key] != value}
    assert changed == {"preset": name, **fix}


def test_a_preset_that_is_its_own_base_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "a.yaml").write_text("base: b\npreset: a\n")
    (tmp_path / "b.yaml").write_text("base: a\npreset: b\n")
    monkeypatch.setattr("pipeline.experiments.presets.PRESETS_DIR", tmp_path)
    with pytest.raises(ParamsError, match=r"base: preset 'a' is its own base \(a -> b\)"):
        load_preset("a")
