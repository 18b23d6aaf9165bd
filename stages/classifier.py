"""DVC stage: train the MNIST classifier the evaluate stage measures generators with;
writes models/classifier.keras, models/real_features.npz and reports/classifier.json."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline import stage
from pipeline.params import load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    args = parser.parse_args()
    params = load_params(args.params).classifier  # fail on bad params before importing TF

    from pipeline.classifier import train_classifier

    metrics = train_classifier(args.data, params).save(args.models, args.reports)
    logging.getLogger("classifier").info("done: %s", metrics)


if __name__ == "__main__":
    stage.run(main)
