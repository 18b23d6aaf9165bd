"""Mode collapse over time: how many digits the classifier reads in each fixed-noise grid a
training logged. For docs/results.md; from the repo root, after the runs:

    python -m tools.grid_digits seed002-dropout-300ep [more runs, one column each]

Each run's grids come from its MLflow artifacts (``samples/step_*.png``, the same noise
every time), each 28x28 tile is classified by the pinned yardstick
(pipeline/evaluation/yardstick.py), and a Markdown table prints, per grid: digits present,
and the commonest digit with its share of the grid.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.evaluation.plots import step_files
from pipeline.evaluation.yardstick import Yardstick
from pipeline.tracking.runs import resolve_store


def grid_digits(run_name: str, classifier: Yardstick, every: int) -> dict[int, str]:
    client = MlflowClient()
    run = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"attributes.run_name = '{run_name}'",
    )[0]
    images = int(run.data.params.get("data.limit", "None").replace("None", "60000"))
    steps_per_epoch = images // int(run.data.params["train.batch_size"])  # last batch dropped
    with tempfile.TemporaryDirectory() as tmp:
        grids = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path="samples", dst_path=tmp
            )
        )
        cells = {}
        for step, path in step_files(grids)[every - 1 :: every]:
            pixels = np.asarray(Image.open(path).convert("L"), np.float32) / 255.0
            side = pixels.shape[0] // 28
            tiles = pixels.reshape(side, 28, side, 28).transpose(0, 2, 1, 3).reshape(-1, 28, 28, 1)
            counts = np.bincount(classifier.embed(tiles, 1000).probs.argmax(1), minlength=10)
            cells[round(step / steps_per_epoch)] = (
                f"{(counts > 0).sum()} ({counts.argmax()}: {counts.max() / counts.sum():.0%})"
            )
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="MLflow run names (= DVC experiment names)")
    parser.add_argument("--every", type=int, default=5, help="every Nth grid")
    args = parser.parse_args()
    mlflow.set_tracking_uri(resolve_store().uri)  # what the stages log to
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # MLflow reads its env

    classifier = Yardstick()
    columns = {run: grid_digits(run, classifier, args.every) for run in args.runs}
    epochs = sorted({epoch for cells in columns.values() for epoch in cells})
    print("| epoch | " + " | ".join(f"`{run}`" for run in args.runs) + " |")
    print("|---:|" + "---|" * len(args.runs))
    for epoch in epochs:
        print(f"| {epoch} | " + " | ".join(columns[run].get(epoch, "") for run in args.runs) + " |")


if __name__ == "__main__":
    main()
