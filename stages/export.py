"""DVC stage: models/generator.keras -> checked models/generator.onnx, reports/export.json,
and the ONNX model logged into the training's MLflow run."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.core import stage
from pipeline.core.params import load_params
from pipeline.tracking import runs
from pipeline.training.export import export_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--keras", type=Path, default=Path("models/generator.keras"))
    parser.add_argument("--run-file", type=Path, default=Path("models/mlflow_run.json"))
    parser.add_argument("--out", type=Path, default=Path("models/generator.onnx"))
    parser.add_argument("--report", type=Path, default=Path("reports/export.json"))
    args = parser.parse_args()
    params = load_params(args.params)
    runs.check_server(runs.resolve_store().uri, run_file=args.run_file)
    export_generator(args.keras, args.out, args.report, params, args.run_file)


if __name__ == "__main__":
    stage.run(main)
