"""Screenshot of MLflow's runs-side-by-side chart view for docs/results.md.

Starts `mlflow ui` on loopback over the repo's store, opens the experiment's chart view (one
bar per run for each evaluate metric, one curve per run for each training loss) in Debian's
headless chromium (`apt-get install chromium`), and writes the PNG. From the repo root:

    python docs/mlflow_screenshot.py docs/mlflow_compare.png
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

PORT = 5055  # not 5000, so a UI the user already runs is left alone


def experiment_id(uri: str, name: str) -> str:
    found = MlflowClient(uri).get_experiment_by_name(name)
    if found is None:
        sys.exit(f"{uri}: no experiment {name!r}; run `make exp PRESET=...` first")
    return found.experiment_id


def wait_until_up(url: str, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:  # the UI takes 8-15 s to answer, more on a busy machine
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    sys.exit(f"{url}: no answer within {limit_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--store", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    parser.add_argument("--experiment", default="mnist-gan")
    parser.add_argument("--size", default="2200,3600", help="window width,height in pixels")
    args = parser.parse_args()

    page = f"#/experiments/{experiment_id(args.store, args.experiment)}/runs?compareRunsMode=CHART"
    base = f"http://127.0.0.1:{PORT}"
    ui = subprocess.Popen(
        ["mlflow", "ui", "--backend-store-uri", args.store, "--host", "127.0.0.1",
         "--port", str(PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_until_up(f"{base}/health")
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--disable-background-networking", "--no-first-run", f"--window-size={args.size}",
             "--virtual-time-budget=120000", "--run-all-compositor-stages-before-draw",
             f"--screenshot={args.out.resolve()}", f"{base}/{page}"],
            check=True, timeout=180, capture_output=True,
        )  # fmt: skip
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # the UI's server workers too
        ui.wait(timeout=30)
    print(f"{args.out}: {base}/{page}")


if __name__ == "__main__":
    main()
