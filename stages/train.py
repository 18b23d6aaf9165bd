"""DVC stage: train the GAN; every path it reads or writes comes from dvc.yaml's cmd."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline import stage, tracking
from pipeline.params import load_params

# The fields of pipeline.train.Outputs, one flag each (read here without importing TF).
OUTPUTS = ("generator", "discriminator", "checkpoints", "run_file", "samples", "history", "metrics")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="folder of the MNIST .gz files")
    for name in OUTPUTS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)  # fail on bad params before paying for TensorFlow
    tracking.check_server()  # a wrong MLFLOW_TRACKING_URI fails now, not after training

    from pipeline.train import Outputs, TrainingInterruptedError, train

    try:
        out = Outputs(**{name: getattr(args, name) for name in OUTPUTS})
        metrics = train(params, args.data, out)
    except TrainingInterruptedError as exc:
        logging.getLogger("train").warning("%s", exc)
        sys.exit(128 + exc.signum)
    logging.getLogger("train").info("done: %s", metrics)


if __name__ == "__main__":
    stage.run(main)
