"""DVC stage: the trained generator in numbers and pictures; writes reports/metrics.json,
reports/class_shares.csv and reports/plots/, and logs them into the training's MLflow run."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline import stage, tracking
from pipeline.params import load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    args = parser.parse_args()
    params = load_params(args.params)  # fail on bad params before importing TF
    tracking.check_server(run_file=args.models / "mlflow_run.json")

    from pipeline.evaluate import evaluate

    metrics = evaluate(params.model, params.eval, args.models, args.reports)
    logging.getLogger("evaluate").info(
        "done: fid %.2f (floor %.2f)", metrics["fid"], metrics["real"]["fid"]
    )


if __name__ == "__main__":
    stage.run(main)
