"""DVC stage: train the GAN; every path it reads or writes comes from dvc.yaml's cmd."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.core import stage
from pipeline.core.params import load_params
from pipeline.tracking import runs

# The fields of pipeline.training.train.Outputs, one flag each (read here without importing TF).
OUTPUTS = ("generator", "discriminator", "checkpoints", "run_file", "samples", "history", "metrics")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="folder of the MNIST .gz files")
    for name in OUTPUTS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)  # fail on bad params before paying for TensorFlow
    store = runs.resolve_store()  # once: every MLflow call below gets it as a value
    runs.check_server(store.uri)  # a wrong MLFLOW_TRACKING_URI fails now, not after training

    from pipeline.training.train import Outputs, TrainingInterruptedError, train

    try:
        out = Outputs(**{name: getattr(args, name) for name in OUTPUTS})
        metrics = train(params, args.data, out, store)
    except TrainingInterruptedError as exc:
        logging.getLogger("train").warning("%s", exc)
        sys.exit(128 + exc.signum)
    logging.getLogger("train").info("done: %s", metrics)


if __name__ == "__main__":
    stage.run(main)
