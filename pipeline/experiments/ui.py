"""``make ui``: the MLflow UI on 127.0.0.1, opened where the runs are.

``mlflow ui`` alone opens on its GenAI overview, and its Compare page needs the runs ticked
by hand. This runs ``mlflow ui`` on the project's store and, once it answers (``/health``:
it takes seconds to a minute to start), prints the direct links: the training runs of this
project's experiment (``/#/experiments/<id>/runs``) and, after ``make sweep``, the Compare
page of that sweep's runs. Ctrl-C or SIGTERM stops it, with every process ``mlflow ui``
started (it runs in a process group of its own).

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
from pipeline.tracking.services import GroupProcess, run_foreground, wait_healthy


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


class MlflowUI(GroupProcess):
    """``mlflow ui`` on ``uri``'s store at 127.0.0.1:``port``, in a process group of its own."""

    def __init__(self, uri: str, port: int) -> None:
        self.uri, self.port = uri, port
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = ["mlflow", "ui", "--backend-store-uri", self.uri, "--host", "127.0.0.1"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *command, "--port", str(self.port)], start_new_session=True
        )
        try:
            wait_healthy(self.proc, self.base, "mlflow ui")
        except BaseException:
            self.stop()
            raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    uri = resolve_store().uri
    ui = MlflowUI(uri, args.port)
    # Printed once the UI answers: a link that is shown works.
    banner = "\n".join(links(ui.base, uri, load_params().mlflow.experiment))
    run_foreground(ui, "mlflow ui", banner, exited="mlflow ui exited")


if __name__ == "__main__":
    main()
