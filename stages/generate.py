"""DVC stage: a sample grid (reports/generated.png) from models/generator.onnx, with
onnxruntime only: the same path users deploy."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.core import stage
from pipeline.core.errors import UserError
from pipeline.core.params import load_params
from pipeline.inference.generate import write_samples
from pipeline.inference.generator import InputError, ModelError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", type=Path, default=Path("models/generator.onnx"))
    parser.add_argument("--out", type=Path, default=Path("reports/generated.png"))
    args = parser.parse_args()
    params = load_params(args.params).generate
    try:
        write_samples(args.model, args.out, params.n, seed=params.seed, digit=params.digit)
    except (InputError, ModelError) as exc:
        raise UserError(f"generate: {exc}") from None


if __name__ == "__main__":
    stage.run(main)
