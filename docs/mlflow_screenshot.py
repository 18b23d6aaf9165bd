"""Screenshot of MLflow's run comparison view for docs/results.md.

Starts `mlflow ui` on loopback over the repo's store, opens the compare-runs page for the
newest finished run of each preset in Debian's headless chromium (`apt-get install
chromium`), and writes the PNG. Run from the repo root:

    python docs/mlflow_screenshot.py docs/mlflow_compare.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

PORT = 5055  # not 5000, so a UI the user already runs is left alone


def newest_run_per_preset(uri: str, experiment: str) -> tuple[str, list[str]]:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        sys.exit(f"{uri}: no experiment {experiment!r}; run `make exp PRESET=...` first")
    runs = client.search_runs(
        [found.experiment_id], "attributes.status = 'FINISHED'", order_by=["start_time DESC"]
    )
    newest: dict[str, str] = {}
    for run in runs:
        newest.setdefault(run.data.tags.get("preset", "?"), run.info.run_id)
    return found.experiment_id, [newest[preset] for preset in sorted(newest)]


def wait_until_up(url: str, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:  # the UI takes 8-15 s to answer
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
    parser.add_argument("--size", default="1600,1400", help="window width,height in pixels")
    args = parser.parse_args()

    experiment_id, run_ids = newest_run_per_preset(args.store, args.experiment)
    query = urllib.parse.urlencode(
        {"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])}
    )
    base = f"http://127.0.0.1:{PORT}"
    ui = subprocess.Popen(
        ["mlflow", "ui", "--backend-store-uri", args.store, "--host", "127.0.0.1",
         "--port", str(PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until_up(f"{base}/health")
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--disable-background-networking", "--no-first-run", f"--window-size={args.size}",
             "--virtual-time-budget=30000", f"--screenshot={args.out.resolve()}",
             f"{base}/#/compare-runs?{query}"],
            check=True, timeout=180, capture_output=True,
        )  # fmt: skip
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    print(f"{args.out}: {len(run_ids)} runs compared")


if __name__ == "__main__":
    main()
