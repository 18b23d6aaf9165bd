"""The params schema refuses every class of bad input up front, naming field, value and rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.core.params import ParamsError, apply_overrides, load_params, parse_params
from pipeline.experiments.presets import load_preset

from helpers import stage_args

REPO = Path(__file__).resolve().parent.parent


def refuse(raw: dict[str, Any], overrides: dict[str, Any]) -> str:
    with pytest.raises(ParamsError) as caught:
        parse_params(apply_overrides(raw, overrides))
    return str(caught.value)


def test_committed_params_validate() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.preset == "default"
    assert params.flat()["train.lr_g"] == params.train.lr_g


def test_overrides_are_set_before_validation(raw_params: dict[str, Any]) -> None:
    params = load_params(REPO / "params.yaml", load_preset("seed001"))
    assert params == parse_params(apply_overrides(raw_params, load_preset("seed001")))
    with pytest.raises(ParamsError, match=r"^preset x is invalid:\n  train.epochs: got 0"):
        load_params(REPO / "params.yaml", {"train.epochs": 0}, source="preset x")


def test_unknown_key_is_named(raw_params: dict[str, Any]) -> None:
    raw = apply_overrides(raw_params, {})
    raw["train"]["learning_rate"] = 0.1
    with pytest.raises(ParamsError, match=r"train\.learning_rate: unknown key"):
        parse_params(raw)


def test_wrong_type_names_field_and_value(raw_params: dict[str, Any]) -> None:
    message = refuse(raw_params, {"train.batch_size": "lots"})
    assert "train.batch_size: got 'lots'" in message
    assert "integer" in message


def test_out_of_range_names_the_bound(raw_params: dict[str, Any]) -> None:
    message = refuse(raw_params, {"train.lr_g": -0.001})
    assert "train.lr_g: got -0.001" in message
    assert "greater than 0" in message


def test_ema_decay_of_one_is_refused(raw_params: dict[str, Any]) -> None:
    # decay 1 would never move the average off G's initial weights: an untrained model.
    message = refuse(raw_params, {"train.ema_decay": 1.0})
    assert "train.ema_decay: got 1.0" in message and "less than 1" in message


def test_bad_choice_lists_what_is_allowed(raw_params: dict[str, Any]) -> None:
    message = refuse(raw_params, {"loss.kind": "wasserstein"})
    assert "loss.kind: got 'wasserstein'" in message
    assert "'minimax'" in message and "'hinge'" in message


def test_missing_key_is_named(raw_params: dict[str, Any]) -> None:
    raw = apply_overrides(raw_params, {})
    del raw["eval"]["knn_k"]
    with pytest.raises(ParamsError, match=r"eval\.knn_k: missing"):
        parse_params(raw)


def test_cross_field_rule(raw_params: dict[str, Any]) -> None:
    message = refuse(raw_params, {"train.steps": 1000})  # epochs is set too
    assert "exactly one of epochs or steps" in message
    assert "epochs=30" in message or "epochs=" in message


def test_bad_mirror_url(raw_params: dict[str, Any]) -> None:
    message = refuse(raw_params, {"data.mirrors": ["ftp//nowhere"]})
    assert "data.mirrors.0: got 'ftp//nowhere'" in message


def test_every_error_is_reported_at_once(raw_params: dict[str, Any]) -> None:
    message = refuse(raw_params, {"seed": -1, "eval.num_samples": 5})
    assert "seed: got -1" in message and "eval.num_samples: got 5" in message


def test_overrides_refuse_unknown_keys(raw_params: dict[str, Any]) -> None:
    with pytest.raises(ParamsError, match=r"train\.nope: unknown key"):
        apply_overrides(raw_params, {"train.nope": 1})
    with pytest.raises(ParamsError, match="no such section 'nope'"):
        apply_overrides(raw_params, {"nope.x": 1})
    with pytest.raises(ParamsError, match="preset: got 'seed999'"):
        load_preset("seed999")


def test_digest_tracks_only_the_named_sections(raw_params: dict[str, Any]) -> None:
    base = parse_params(raw_params)
    changed = parse_params(apply_overrides(raw_params, {"eval.num_samples": 2000}))
    assert base.digest("model", "train") == changed.digest("model", "train")
    assert base.digest() != changed.digest()


def test_stage_exits_nonzero_before_any_work(tmp_path: Path, raw_params: dict[str, Any]) -> None:
    bad = apply_overrides(raw_params, {"data.retries": 99})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(bad))
    out = tmp_path / "data"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.download",
            *stage_args("download", tmp_path, params=params_file),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "data.retries: got 99" in result.stderr
    assert "less than or equal to 10" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_shards_that_do_not_divide_the_batch_are_refused(raw_params: dict[str, Any]) -> None:
    message = refuse(raw_params, {"train.shards": 3, "train.batch_size": 128})
    assert "shards: got 3; must divide batch_size (128)" in message
