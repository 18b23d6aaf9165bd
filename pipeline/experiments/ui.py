"""``make ui``: the MLflow UI on 127.0.0.1, opened where the runs are.

``mlflow ui`` alone opens on its GenAI overview, and its Compare page needs the runs ticked
by hand. This runs ``mlflow ui`` on the project's store and, once it answers (``/health``:
it takes seconds to a minute to start), prints the direct links: the training runs of this
project's experiment (``/#/experiments/<id>/runs``) and, after ``make sweep``, the Compare
page of that sweep's runs. Ctrl-C stops it.

    python -m pipeline.experiments.ui [--port 5000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from urllib.parse import quote

from mlflow.tracking import MlflowClient

from pipeline.core.params import load_params
from pipeline.experiments.sweep import LAST_SWEEP
from pipeline.tracking.runs import resolve_store
from pipeline.tracking.services import ServerError, wait_healthy


def sweep_run_ids(client: MlflowClient, experiment_id: str) -> list[str]:
    """The newest MLflow run of each experiment named in the last sweep."""
    if not LAST_SWEEP.is_file():
        return []
    names = json.loads(LAST_SWEEP.read_text())["names"]
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"])
    newest: dict[str, str] = {}
    for run in runs:
        newest.setdefault(run.info.run_name, run.info.run_id)
    return [newest[name] for name in names if name in newest]


def links(base: str, uri: str, experiment: str) -> list[str]:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return [f"{base}/  (no runs in experiment {experiment!r} yet: make repro)"]
    exp_id = found.experiment_id
    lines = [f"runs:    {base}/#/experiments/{exp_id}/runs"]
    if run_ids := sweep_run_ids(client, exp_id):
        query = f"runs={quote(json.dumps(run_ids))}&experiments={quote(json.dumps([exp_id]))}"
        lines.append(f"sweep:   {base}/#/compare-runs?{query}  (tick 'Show diff only')")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    uri = resolve_store().uri
    base = f"http://127.0.0.1:{args.port}"
    command = ["mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1"]
    ui = subprocess.Popen([sys.executable, "-m", *command, "--port", str(args.port)])
    try:
        wait_healthy(ui, base, "mlflow ui")
        for line in links(base, uri, load_params().mlflow.experiment):
            print(line, flush=True)
        sys.exit(ui.wait())
    except ServerError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # the terminal's Ctrl-C reached mlflow ui too
        sys.exit(ui.wait(timeout=30))
    finally:
        if ui.poll() is None:
            ui.terminate()
            ui.wait(timeout=30)


if __name__ == "__main__":
    main()
