"""DVC stage: download and verify the four MNIST files into ``data/``."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.download import download_mnist
from pipeline.params import load_params
from pipeline.stage import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--partial-dir", type=Path, default=Path(".cache/downloads"))
    args = parser.parse_args()
    data = load_params(args.params).data
    download_mnist(
        args.out, [str(url) for url in data.mirrors], args.partial_dir, data.timeout_s, data.retries
    )


if __name__ == "__main__":
    run(main)
