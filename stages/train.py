"""DVC stage: train the GAN; writes models/, reports/train*.{json,csv}, reports/samples/."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline import stage, tracking
from pipeline.params import load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    args = parser.parse_args()
    params = load_params(args.params)  # fail on bad params before paying for TensorFlow
    tracking.check_server()  # a wrong MLFLOW_TRACKING_URI fails now, not after training

    from pipeline.train import TrainingInterruptedError, train

    try:
        metrics = train(params, args.data, args.models, args.reports)
    except TrainingInterruptedError as exc:
        logging.getLogger("train").warning("%s", exc)
        sys.exit(128 + exc.signum)
    logging.getLogger("train").info("done: %s", metrics)


if __name__ == "__main__":
    stage.run(main)
