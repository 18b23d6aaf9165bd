"""DVC stage: the exported generator (models/generator.onnx, what users run) in numbers and
pictures under the pinned yardstick; writes the metrics, the class shares and the plots, and
logs them into the training's MLflow run. Every path comes from dvc.yaml's cmd (no defaults:
dvc.yaml is the one map of files). onnxruntime only: this stage never imports TensorFlow."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.core import stage
from pipeline.core.params import load_params
from pipeline.tracking import runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name, what in [
        ("params", "params.yaml"),
        ("generator", "the exported ONNX generator"),
        ("yardstick", "the pinned classifier (yardstick/classifier.onnx)"),
        ("data", "the folder of verified MNIST files"),
        ("run-file", "the training's MLflow run (models/mlflow_run.json)"),
        ("history", "the training history CSV"),
        ("samples", "the training's sample grids"),
        ("metrics", "metrics JSON to write"),
        ("shares", "class shares CSV to write"),
        ("plots", "folder of plots to write"),
    ]:
        parser.add_argument(f"--{name}", type=Path, required=True, help=what)
    args = parser.parse_args()
    params = load_params(args.params).eval  # fail on bad params before any work
    runs.check_server(runs.resolve_store().uri, run_file=args.run_file)

    from pipeline.evaluation.evaluate import Paths, evaluate

    paths = Paths(
        generator=args.generator,
        yardstick=args.yardstick,
        data=args.data,
        run_file=args.run_file,
        history=args.history,
        samples=args.samples,
        metrics=args.metrics,
        shares=args.shares,
        plots=args.plots,
    )
    metrics = evaluate(paths, params)
    logging.getLogger("evaluate").info(
        "done: fid %.2f (floor %.2f) under yardstick %s",
        metrics["fid"],
        metrics["real"]["fid"],
        metrics["yardstick"],
    )


if __name__ == "__main__":
    stage.run(main)
