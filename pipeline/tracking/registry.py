"""From "this run won the comparison" to "this is what ships": promote a run's logged ONNX
generator in the MLflow model registry, and roll back.

    python -m pipeline.tracking.registry promote EXP [--force]   # make promote EXP=...
    python -m pipeline.tracking.registry rollback                # make rollback

``EXP`` is a DVC experiment name (the MLflow run's name) or an MLflow run id. Promoting
registers the run's model as a version of ``mlflow.registered_model`` (unless it already is
one), tags it with what it is (preset, params digest, yardstick, headline metrics, commit),
and points the alias ``champion`` at it and ``previous`` at the version it replaces. It
refuses, in one line, a model measured under another yardstick than the champion's (their
FIDs are not comparable), or one with a worse FID unless forced. Rollback swaps the two
aliases. Works on the embedded store and on a tracking server alike (``Store``).
"""

from __future__ import annotations

import argparse
import re

from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.core import stage
from pipeline.core.errors import UserError
from pipeline.core.params import load_params
from pipeline.tracking.runs import Store, experiment_name, fluent_uri, resolve_store

CHAMPION, PREVIOUS = "champion", "previous"
HEADLINE = ("fid", "recall", "precision", "conditional_accuracy")  # copied into version tags
RUN_ID = re.compile(r"[0-9a-f]{32}")
DEFAULT_NAME = "mnist-generator"  # when params' export.registered_model is null


def find_run(client: MlflowClient, experiment: str, target: str) -> Run:
    """The run ``target`` names: an MLflow run id, or the newest finished run of that name
    (a DVC experiment's name is its training run's name)."""
    if RUN_ID.fullmatch(target):
        try:
            return client.get_run(target)
        except MlflowException:
            pass
    found = client.get_experiment_by_name(experiment)
    runs = (
        client.search_runs(
            [found.experiment_id],
            f"attributes.run_name = '{target}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found is not None and "'" not in target
        else []
    )
    if not runs:
        raise UserError(
            f"EXP: got {target!r}; allowed: the name of a finished run (a DVC experiment) or an "
            f"MLflow run id in experiment {experiment!r} (make compare lists them)"
        )
    return runs[0]


def logged_model_uri(client: MlflowClient, run: Run) -> tuple[str, str | None]:
    """(source URI, logged model id) of the generator the export stage logged into ``run``."""
    models = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    if not models:
        raise UserError(
            f"EXP: run {run.info.run_id} has no logged model; run the export stage on it first "
            "(dvc repro)"
        )
    newest = max(models, key=lambda model: model.creation_timestamp)
    return f"models:/{newest.model_id}", newest.model_id


def champion(client: MlflowClient, name: str, alias: str = CHAMPION) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such model or alias yet
        return None


def version_tags(run: Run) -> dict[str, str]:
    tags = {
        "preset": run.data.tags.get("preset", ""),
        "params_digest": run.data.tags.get("params_digest", ""),
        "yardstick": run.data.tags.get("yardstick", ""),
        "git_commit": run.data.tags.get("git_commit", ""),
        "compute_dtype": run.data.tags.get("compute_dtype", ""),
        "cpu_isa": run.data.tags.get("cpu_isa", ""),
    }
    tags |= {key: f"{run.data.metrics[key]:.6g}" for key in HEADLINE if key in run.data.metrics}
    return {key: value for key, value in tags.items() if value}


def promote(store: Store, name: str, experiment: str, target: str, force: bool = False) -> str:
    """Point ``champion`` at ``target``'s model (registered as a version of ``name`` if it is
    not one yet) and ``previous`` at the version it replaces; returns a one-line report."""
    client = MlflowClient(store.uri)
    run = find_run(client, experiment, target)
    yardstick, fid = run.data.tags.get("yardstick"), run.data.metrics.get("fid")
    if yardstick is None or fid is None:
        raise UserError(f"EXP: run {run.info.run_id} has no evaluation yet; run dvc repro first")
    current = champion(client, name)
    if current is not None and current.run_id and current.run_id != run.info.run_id:
        held = client.get_run(current.run_id)
        held_yardstick, held_fid = held.data.tags.get("yardstick"), held.data.metrics.get("fid")
        if held_yardstick != yardstick:
            raise UserError(
                f"EXP: {target} was measured under yardstick {yardstick[:12]}, the champion "
                f"(version {current.version}) under {str(held_yardstick)[:12]}: their FIDs are "
                "not comparable; re-evaluate one of them under the same yardstick"
            )
        if held_fid is not None and fid > held_fid and not force:
            raise UserError(
                f"EXP: {target}'s FID {fid:.4g} is worse than the champion's ({held_fid:.4g}, "
                f"version {current.version}); FORCE=1 promotes it anyway"
            )
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
    if existing:
        version = max(existing, key=lambda v: int(v.version))
    else:
        source, model_id = logged_model_uri(client, run)
        try:
            client.create_registered_model(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        with fluent_uri(store.uri):  # MLflow looks the logged model up through its own
            version = client.create_model_version(
                name, source, run_id=run.info.run_id, tags=version_tags(run), model_id=model_id
            )
    if current is not None and str(current.version) != str(version.version):
        client.set_registered_model_alias(name, PREVIOUS, current.version)
    client.set_registered_model_alias(name, CHAMPION, version.version)
    was = f" (previous: version {current.version})" if current is not None else ""
    return f"{name} version {version.version} (run {run.info.run_id}) is the champion{was}"


def rollback(store: Store, name: str) -> str:
    """Swap ``champion`` and ``previous``: the version before serves again."""
    client = MlflowClient(store.uri)
    current, before = champion(client, name), champion(client, name, PREVIOUS)
    if before is None or current is None:
        raise UserError(f"{name}: no {PREVIOUS!r} version to roll back to (promote twice first)")
    client.set_registered_model_alias(name, CHAMPION, before.version)
    client.set_registered_model_alias(name, PREVIOUS, current.version)
    return f"{name} version {before.version} is the champion again (previous: {current.version})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("promote", help="make EXP's model the champion")
    up.add_argument("exp", help="a DVC experiment name or an MLflow run id")
    up.add_argument("--force", action="store_true", help="promote a worse FID anyway")
    commands.add_parser("rollback", help="the previous champion serves again")
    args = parser.parse_args(argv)
    params = load_params("params.yaml")
    name = params.export.registered_model or DEFAULT_NAME
    store = resolve_store()  # once, passed down
    if args.command == "promote":
        experiment = experiment_name(params.mlflow.experiment, store.uri)  # yours, with accounts
        print(promote(store, name, experiment, args.exp, args.force))
    else:
        print(rollback(store, name))


if __name__ == "__main__":
    stage.run(main)
