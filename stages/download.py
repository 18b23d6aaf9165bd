"""DVC stage: download and verify the four MNIST files into ``data/``."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.core.params import load_params
from pipeline.core.stage import run
from pipeline.data.download import download_mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for the four .gz files")
    parser.add_argument(
        "--partial-dir", type=Path, required=True, help="where downloads resume (outside --out)"
    )
    args = parser.parse_args()
    data = load_params(args.params).data
    download_mnist(
        args.out, [str(url) for url in data.mirrors], args.partial_dir, data.timeout_s, data.retries
    )


if __name__ == "__main__":
    run(main)
