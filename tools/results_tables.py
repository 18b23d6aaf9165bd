"""The measured parts of docs/results.md, read back from the MLflow runs: the at-a-glance
table, one section per preset, and each run's sample grid and loss curves copied to
docs/results/. The verdicts around them are written by hand. From the repo root, after the
runs:

    python -m tools.results_tables default-20261123-164810 seed003-20261123-164821 ...

Each run's reproduce command comes from its logged params: its ``preset``, and every param
that differs from that preset (``make exp PRESET=<preset> SET='<key>=<value> ...'``). A run
of a preset as it stands is labelled with the preset's name, any other with its run name.

Every FID is labelled with the yardstick that measured it (the MLflow tag ``yardstick``: the
pinned classifier's SHA-256, pipeline/evaluation/yardstick.py). Runs from before the pinned
yardstick have no tag: their classifier was trained per machine, so their figures are marked
as such, and a table that mixes yardsticks says so under it, with one real-data floor per
yardstick.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.core.params import load_params
from pipeline.evaluation.yardstick import label
from pipeline.experiments.presets import load_preset, preset_names
from pipeline.tracking.runs import resolve_store

PER_MACHINE = "per-machine"  # runs measured before the yardstick was pinned
UNKNOWN = "not recorded"  # runs from before training recorded its dtype and ISA class

PICTURES = {"samples": "plots/samples.png", "curves": "plots/training_curves.png"}
# (metric, label, format): the evaluate stage's figures, each beside the real-data floor.
METRICS = [
    ("fid", "FID (classifier features) ↓", ".2f"),
    ("classifier_score", "classifier score (max 10) ↑", ".2f"),
    ("precision", "precision ↑", ".2f"),
    ("recall", "recall ↑", ".2f"),
    ("classes_present", "digits present (of 10)", ".0f"),
    ("min_class_share", "rarest digit's share (0.1 = even)", ".3f"),
    ("class_kl", "KL(class shares ‖ uniform) ↓", ".3f"),
]


@dataclass
class Run:
    name: str
    label: str  # the preset, or the run name when it changed the preset
    command: str  # what reproduces it
    run_id: str
    params: dict[str, str]
    metrics: dict[str, float]
    train: dict[str, Any]  # reports/train.json
    pictures: dict[str, Path]
    yardstick: str  # the short hash of the classifier that measured it, or PER_MACHINE
    trained_on: str = UNKNOWN  # "bfloat16 on amx": the run's compute_dtype and cpu_isa tags

    @property
    def length(self) -> str:
        if self.params["train.epochs"] != "None":
            return f"{int(self.params['train.epochs']):,} epochs"
        return f"{int(self.params['train.steps']):,} steps"

    @property
    def minutes(self) -> str:
        return f"{self.train['train_seconds'] / 60:.1f} min"


def load_run(client: MlflowClient, name: str, scratch: Path) -> Run:
    found = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"attributes.run_name = '{name}' and attributes.status = 'FINISHED'",
    )
    if not found:
        raise SystemExit(f"{name}: no finished MLflow run of that name")
    run = found[0]
    preset = run.data.params["preset"]
    if preset not in preset_names():
        raise SystemExit(f"{name}: preset {preset!r} is not in presets/; allowed: {preset_names()}")
    changes = changed_params(preset, run.data.params)
    command = f"make exp PRESET={preset}" + (f" SET='{' '.join(changes)}'" if changes else "")
    files = {}
    for key, path in {**PICTURES, "train": "train.json"}.items():
        files[key] = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path=path, dst_path=str(scratch / name)
            )
        )
    return Run(
        name=name,
        label=name if changes else preset,
        command=command,
        run_id=run.info.run_id,
        params=run.data.params,
        metrics=run.data.metrics,
        train=json.loads(files.pop("train").read_text()),
        pictures=files,
        yardstick=label(run.data.tags["yardstick"])
        if "yardstick" in run.data.tags
        else PER_MACHINE,
        trained_on=trained_on(run.data.tags),
    )


def trained_on(tags: dict[str, str]) -> str:
    """Where a run computed: "bfloat16 on amx", "float32 on avx2" (pipeline.core.cpu)."""
    if "cpu_isa" not in tags:
        return UNKNOWN
    return f"{tags.get('compute_dtype', '?')} on {tags['cpu_isa']}"


def changed_params(preset: str, logged: dict[str, str]) -> list[str]:
    """``key=value`` for each param the run logged that differs from its preset's."""
    expected = load_params("params.yaml", load_preset(preset)).flat()
    changes = []
    for key, value in expected.items():
        if logged.get(key, str(value)) != str(value):
            try:  # MLflow logs str(value): back to the value, then in the form -S reads
                parsed = ast.literal_eval(logged[key])
            except (ValueError, SyntaxError):
                parsed = logged[key]
            # Compact JSON: `make exp SET='...'` splits its value at spaces.
            text = parsed if isinstance(parsed, str) else json.dumps(parsed, separators=(",", ":"))
            changes.append(f"{key}={text}")
    return changes


def glance_table(runs: list[Run]) -> list[str]:
    """One row per run, its yardstick beside its FID; one floor row per yardstick, and a note
    under the table when the FIDs in one column come from different yardsticks."""
    lines = [
        "| preset | length | train time | trained on | FID ↓ | yardstick | classifier score ↑ "
        "| precision ↑ | recall ↑ | rarest digit ↑ |",
        "|---|---|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        name = f"[`{run.label}`](#{run.label})"
        m = run.metrics
        lines.append(
            f"| {name} | {run.length} | {run.minutes} | {run.trained_on} | {m['fid']:.1f} "
            f"| `{run.yardstick}` | "
            f"{m['classifier_score']:.2f} | {m['precision']:.2f} | {m['recall']:.2f} | "
            f"{m['min_class_share']:.3f} |"
        )
    floors = {run.yardstick: run.metrics for run in reversed(runs)}  # the first run's wins
    for yardstick, m in floors.items():
        lines.append(
            f"| real data (floor) | | | | {m['real.fid']:.2f} | `{yardstick}` | "
            f"{m['real.classifier_score']:.2f} | {m['real.precision']:.2f} | "
            f"{m['real.recall']:.2f} | {m['real.min_class_share']:.3f} |"
        )
    if len(floors) > 1:
        lines += [
            "",
            f"**Mixed yardsticks:** FIDs measured by different classifiers ({len(floors)}: "
            + ", ".join(f"`{y}`" for y in floors)
            + ") are not comparable across them; compare each row with its own yardstick's "
            f"floor. `{PER_MACHINE}`: a classifier trained on the machine of that run.",
        ]
    machines = sorted({run.trained_on for run in runs})
    if len(machines) > 1:
        lines += [
            "",
            f"**Mixed machines:** these runs trained on {', '.join(machines)}: one recipe's "
            "numbers move a little between dtypes and CPUs (docs/results.md, float32 and "
            "bfloat16 machines).",
        ]
    return lines


def section(run: Run, hardware: str) -> list[str]:
    m, t = run.metrics, run.train
    epochs = f"{t['epochs']:g}"
    lines = [
        f"### `{run.label}`",
        "",
        f"Reproduce: `{run.command}`  ",
        f"Run `{run.name}` (MLflow `{run.run_id[:8]}`): {t['steps']:,} steps ({epochs} epochs) "
        f"in {run.minutes} on {hardware} ({run.trained_on}); measured under yardstick "
        f"`{run.yardstick}`.  ",
        f"Final epoch: D loss {m['d_loss']:.3f}, G loss {m['g_loss']:.3f}, "
        f"D(x) {m['d_real']:.2f}, D(G(z)) {m['d_fake']:.2f}.",
        "",
        f"| metric | `{run.label}` | real data |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {label} | {m[key]:{fmt}} | {m['real.' + key]:{fmt}} |" for key, label, fmt in METRICS
    ]
    if "conditional_accuracy" in m:
        lines.append(f"| asked-for digit read back | {m['conditional_accuracy']:.2f} | – |")
    lines += [
        "",
        f'<img src="results/{run.label}_samples.png" width="36%" alt="{run.label}: 64 samples"> '
        f'<img src="results/{run.label}_curves.png" width="60%" '
        f'alt="{run.label}: losses and D outputs per epoch">',
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="MLflow run names (= DVC experiment names)")
    parser.add_argument("--pictures", type=Path, default=Path("docs/results"))
    parser.add_argument("--hardware", default="the 2-core CPU")
    args = parser.parse_args()
    mlflow.set_tracking_uri(resolve_store().uri)  # what the stages log to
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # MLflow reads its env

    with tempfile.TemporaryDirectory() as scratch:
        runs = [load_run(MlflowClient(), name, Path(scratch)) for name in args.runs]
        args.pictures.mkdir(parents=True, exist_ok=True)
        for run in runs:
            for key, path in run.pictures.items():
                shutil.copyfile(path, args.pictures / f"{run.label}_{key}.png")
    lines = [*glance_table(runs), ""]
    for run in runs:
        lines += section(run, args.hardware)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
