"""A team across machines, for real: network namespaces made by the test stand for a server
host (PostgreSQL, the MLflow server with accounts over TLS, the S3 object store) and teammate
hosts, each with its own clone and account; every packet stays between them.

Needs root (``ip netns``); skips with one line where namespaces are not permitted."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import requests
import yaml
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

from pipeline.core.errors import UserError
from pipeline.core.params import Params, apply_overrides
from pipeline.experiments.presets import load_preset
from pipeline.tracking import credentials, runs, tls
from pipeline.tracking.object_store import ObjectStore
from pipeline.tracking.server import PG_BIN
from pipeline.tracking.team import AUTH_DATABASE, TeamServer
from pipeline.tracking.team_remote import switch
from pipeline.training.multiworker import cluster_config
from pipeline.training.train import train

from helpers import GIT, REPO, copy_repo, stage_args, train_outputs
from netns import Network

# One network and one server for the module: every test here on the same xdist worker.
pytestmark = pytest.mark.xdist_group("team")

ADMIN_PASSWORD = "admin-pw-never-logged-7c1f"  # what the test greps every log for
KEYS = ("team-access-key", "team-secret-key-5d9e")
PORT, S3_PORT, TF_PORT = 5443, 9000, 23456  # each host has its own port space
USERS = {"alice": "alice-password-1", "bob": "bob-password-22"}
HOST_OF = {"alice": "a", "bob": "b"}
WAIT_S = 900  # a queued sweep on a shared 2-core machine


@dataclass
class Team:
    net: Network
    state: Path
    server: TeamServer
    store: ObjectStore
    cert: Path

    def env(self, user: str | None = None, **extra: str) -> dict[str, str]:
        """A teammate's environment: the server, its certificate, the store's keys, an
        account (``user``), and no proxy or CA bundle of this machine's."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.lower().endswith("_proxy") and not key.startswith(("MLFLOW_", "AWS_"))
        }
        env.update(
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2",
            MLFLOW_TRACKING_URI=self.server.uri,
            MLFLOW_TRACKING_SERVER_CERT_PATH=str(self.cert),
            AWS_ACCESS_KEY_ID=KEYS[0], AWS_SECRET_ACCESS_KEY=KEYS[1],
        )  # fmt: skip
        if user:
            env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=USERS[user])
        return {**env, **extra}

    def run(
        self, host: str, command: list[str], env: dict[str, str], cwd: Path = REPO
    ) -> subprocess.CompletedProcess[str]:
        """``command`` on ``host``, bounded in time; asserts it succeeded."""
        done = subprocess.run(
            [*self.net.on(host), *command], cwd=cwd, env=env, capture_output=True, text=True,
            timeout=WAIT_S, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        return done


@pytest.fixture(scope="module")
def team() -> Iterator[Team]:
    """The hosts srv, a, b, c; on srv the object store and the team server; accounts alice
    and bob made with the documented one line."""
    if not (PG_BIN / "initdb").is_file():
        pytest.skip(f"PostgreSQL 15 missing in {PG_BIN} (scripts/install_postgres.sh)")
    net = Network(["srv", "a", "b", "c"], tag=f"mg{os.getpid()}")
    try:
        net.up()
    except OSError as error:
        net.down()
        pytest.skip(f"network namespaces not permitted here: {error}")
    state = Path(tempfile.mkdtemp(prefix="mnist-gan-team-"))  # reachable by postgres
    state.chmod(0o755)
    host = net.addresses["srv"]
    cert = tls.make_certificate(host, state / "tls")
    store = ObjectStore(state / "objects", KEYS, host, S3_PORT, cert)
    secrets = {
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret-for-the-test",
    }
    server = TeamServer(state / "tracking", host, PORT, secrets, (store.endpoint, KEYS), cert, 1)
    team = Team(net, state, server, store, cert[0])
    try:
        with net.inside("srv"):
            store.start()
            server.start()
        admin = team.env("alice", MLFLOW_TRACKING_USERNAME="admin")
        admin.pop("MLFLOW_TRACKING_PASSWORD")
        (state / "admin.txt").write_text(ADMIN_PASSWORD + "\n")
        admin["MLFLOW_TRACKING_PASSWORD_FILE"] = str(state / "admin.txt")
        for user, password in USERS.items():
            (state / f"{user}.txt").write_text(password)
            command = ["pipeline.tracking.accounts", "add", user, "--password-file"]
            command.append(str(state / f"{user}.txt"))
            added = team.run("srv", [sys.executable, "-m", *command], admin)
            assert f"account '{user}' created" in added.stdout
        yield team
    finally:
        server.stop()
        store.stop()
        net.down()
        shutil.rmtree(state, ignore_errors=True)


def test_team_server_refuses_stock_or_missing_secrets_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "MLFLOW_FLASK_SERVER_SECRET_KEY": "x"}  # fmt: skip
    command = [sys.executable, "-m", "pipeline.tracking.team", "run", "--state", str(tmp_path)]
    for change, line in (
        ({"MLFLOW_AUTH_ADMIN_PASSWORD": "password1234"},
         "MLFLOW_AUTH_ADMIN_PASSWORD: MLflow's stock admin password is publicly known; choose "
         "another (at least 12 characters)"),
        ({"MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-enough-one", "MLFLOW_FLASK_SERVER_SECRET_KEY": ""},
         "MLFLOW_FLASK_SERVER_SECRET_KEY: not set (nor MLFLOW_FLASK_SERVER_SECRET_KEY_FILE); "
         "set one of them to a long random string (e.g. `openssl rand -hex 32`)"),
    ):  # fmt: skip
        done = subprocess.run(
            command, env={**env, **change}, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 1 and done.stderr.strip().endswith(line), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert change["MLFLOW_AUTH_ADMIN_PASSWORD"] not in done.stdout + done.stderr
    wildcard = subprocess.run(
        [*command, "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120,
        env={**env, "MLFLOW_AUTH_ADMIN_PASSWORD": "long-enough-pw"},
    )  # fmt: skip
    assert wildcard.stderr.strip().endswith(
        "TRACKING_HOST: got '0.0.0.0'; name the address teammates reach (it goes into the "
        "certificate and the Host names the server allows)"
    ), wildcard.stderr
    assert not (tmp_path / "pg").exists()  # refused before anything started


def test_secrets_come_from_the_environment_or_a_named_file(tmp_path: Path) -> None:
    secret = tmp_path / "admin.pw"
    secret.write_text("from-a-file-123\n")
    name = credentials.ADMIN_PASSWORD
    assert credentials.read_secret(name, {name: "from-env-1234"}) == "from-env-1234"
    assert credentials.read_secret(name, {f"{name}_FILE": str(secret)}) == "from-a-file-123"
    assert credentials.read_secret(name, {}) is None
    with pytest.raises(UserError, match=rf"^{name}_FILE: cannot read '/nope' \(No such file"):
        credentials.read_secret(name, {f"{name}_FILE": "/nope"})
    with pytest.raises(UserError, match=rf"^{name}: 5 characters; MLflow accounts need at least"):
        credentials.check_password(name, "short")
    env = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD_FILE": str(secret)}
    assert credentials.tracking_auth(env) == ("alice", "from-a-file-123")
    assert credentials.tracking_verify({}) is True


def test_certificates_made_or_named(tmp_path: Path) -> None:
    """A made certificate names the host's IP (what clients verify); an operator's pair must
    be complete and exist, else one line."""
    from cryptography import x509

    cert, key = tls.make_certificate("198.18.0.1", tmp_path / "tls")
    names = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert {str(ip) for ip in names.value.get_values_for_type(x509.IPAddress)} >= {"198.18.0.1"}
    assert key.stat().st_mode & 0o077 == 0  # the key: its owner's only
    operator = {"TRACKING_CERT": str(cert), "TRACKING_KEY": str(key)}
    assert tls.server_certificate("h", tmp_path, operator) == (cert, key)
    with pytest.raises(UserError, match=r"^TRACKING_KEY: got None; set TRACKING_CERT and"):
        tls.server_certificate("h", tmp_path, {"TRACKING_CERT": str(cert)})
    with pytest.raises(UserError, match=r"^ENDPOINT: got 'ftp://x'; use https://HOST:PORT"):
        switch(tmp_path, "ftp://x", None)


def test_accounts_over_tls_between_hosts(team: Team, monkeypatch: pytest.MonkeyPatch) -> None:
    """From teammate host a: the right account passes the early check; none, a wrong
    password and an untrusted certificate each fail in one line naming the variable to set;
    plain HTTP to the TLS port gets no answer; the auth tables are in PostgreSQL."""
    uri = team.server.uri
    for key, value in team.env("alice").items():
        monkeypatch.setenv(key, value)
    with team.net.inside("a"):
        runs.check_server(uri)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(UserError, match=r"^MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
                           r": .* answered 401 Unauthorized \(none set\); set them"):  # fmt: skip
            runs.check_server(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-alices-password")
        with pytest.raises(UserError, match=r"401 Unauthorized \(user 'alice': wrong password\)"):
            runs.check_server(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USERS["alice"])
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", "/etc/ssl/certs/ca-certificates.crt")
        with pytest.raises(UserError, match=r"^MLFLOW_TRACKING_SERVER_CERT_PATH: the certificate"
                           r" of https://198\.18\.0\.1:5443 is not trusted"):  # fmt: skip
            runs.check_server(uri)
        plain = uri.replace("https://", "http://")
        with pytest.raises(requests.ConnectionError):  # TLS only: no HTTP answer at all
            requests.get(f"{plain}/health", timeout=10)
        with pytest.raises(UserError, match=r"no MLflow server answers at http://198\.18\.0\.1"):
            runs.check_server(plain)
    query = ["-d", AUTH_DATABASE, "-Atc", "SELECT username FROM users ORDER BY 1"]
    users = team.server._as_pg(PG_BIN / "psql", "-h", team.server.pg_dir, *query).stdout.split()
    assert users == ["admin", "alice", "bob"]
    assert not list(team.state.rglob("*.db"))  # no SQLite file beside the server


@pytest.mark.slow
@pytest.mark.timeout(2 * WAIT_S)
def test_teammates_share_experiments_through_s3_and_one_server(
    team: Team, shared_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alice (host a) and Bob (host b) each run a smoke sweep (one point: its queue, worker and
    logging are what is shared) into the team server and `dvc exp push` to the S3 remote; a
    third clone on host c pulls both and compares them;
    every run is its user's, and Bob may read Alice's runs but not delete or rename them."""
    origin = tmp_path / "team.git"  # the team's git host (a bare repo; DVC data goes to S3)
    base = copy_repo(tmp_path / "base")
    subprocess.run([*GIT, "clone", "-q", "--bare", str(base), str(origin)], check=True)
    sweeps = {"alice": "seed=1", "bob": "seed=3"}
    names = {"alice": ["smoke-seed-1"], "bob": ["smoke-seed-3"]}
    clones: dict[str, Path] = {}
    for user in (*sweeps, "carol"):
        clone = clones[user] = tmp_path / user
        subprocess.run([*GIT, "clone", "-q", str(origin), str(clone)], check=True)
        switch(clone, team.store.endpoint, team.cert)  # the documented one command
    started = []
    for user, grid in sweeps.items():
        env = team.env(user, MNIST_MIRROR=str(shared_mnist))
        team.run(HOST_OF[user], [sys.executable, "-m", "pipeline.experiments.sweep", "smoke",
                                 grid], env, clones[user])  # fmt: skip
        # into a file: the queue's worker keeps its output open, and a pipe would make this
        # wait until the worker ends, running the two teammates' sweeps one after the other
        with (tmp_path / f"queue-{user}.log").open("w") as log:
            started.append(user)
            subprocess.run([*team.net.on(HOST_OF[user]), "dvc", "queue", "start", "-j", "1"],
                           cwd=clones[user], env=env, stdout=log, stderr=subprocess.STDOUT,
                           timeout=300, check=True)  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT_S
        for user in sweeps:
            env = team.env(user)
            while True:
                status = team.run(HOST_OF[user], ["dvc", "queue", "status"], env, clones[user])
                if "Queued" not in status.stdout and "Running" not in status.stdout:
                    break
                assert time.monotonic() < deadline, status.stdout
                time.sleep(5)
            assert status.stdout.count("Success") == len(names[user]), status.stdout
    finally:
        for user in started:
            subprocess.run([*team.net.on(HOST_OF[user]), "dvc", "queue", "stop", "--kill"],
                           cwd=clones[user], env=team.env(user), capture_output=True,
                           timeout=120, check=False)  # fmt: skip
    for user in sweeps:
        team.run(HOST_OF[user], ["dvc", "exp", "push", "origin", *names[user]], team.env(user),
                 clones[user])  # fmt: skip
    pushed = team.state / "objects" / "data" / "dvc" / "mnist-gan" / "files" / "md5"
    assert pushed.is_dir()  # DVC's objects in the S3 store's folder

    carol = team.env(None)  # no account needed to pull: DVC speaks S3 only
    all_names = [*names["alice"], *names["bob"]]
    team.run("c", ["dvc", "exp", "pull", "origin", *all_names], carol, clones["carol"])
    shown = team.run("c", [sys.executable, "-m", "pipeline.experiments.compare"], carol,
                     clones["carol"]).stdout  # fmt: skip
    listed = {line.split()[0] for line in shown.splitlines()[1:] if line.strip()}
    assert set(all_names) <= listed, shown
    applied = team.run("c", ["dvc", "exp", "apply", "smoke-seed-3"], carol, clones["carol"])
    assert applied.returncode == 0
    assert (clones["carol"] / "models" / "generator.onnx").is_file()  # its files, from S3

    with team.net.inside("c"):
        admin = _client(team, monkeypatch, "admin", ADMIN_PASSWORD)
        owned = {}
        for user in sweeps:
            experiment = admin.get_experiment_by_name(f"mnist-gan/{user}")
            found = admin.search_runs([experiment.experiment_id])
            owned[user] = {run.info.run_name: run for run in found}
            assert all(run.data.tags["mlflow.user"] == user for run in found)
            assert all(run.info.status == "FINISHED" for run in found)
            auth = get_app_client("basic-auth", tracking_uri=team.server.uri)
            permission = auth.get_user_permission(user, "experiment", experiment.experiment_id)
            assert permission.permission == "MANAGE"
        assert {user: sorted(found) for user, found in owned.items()} == names
        artifacts = list((team.state / "objects" / "data" / "mlflow").rglob("samples.png"))
        assert len(artifacts) == len(all_names)  # through the server's proxy into S3

        alices = owned["alice"]["smoke-seed-1"].info.run_id
        bob = ("bob", USERS["bob"])
        api = f"{team.server.uri}/api/2.0/mlflow/runs"
        read = requests.get(f"{api}/get", params={"run_id": alices}, auth=bob,
                            verify=str(team.cert), timeout=30)  # fmt: skip
        assert read.status_code == 200  # everyone reads everything
        for action, body in (("delete", {}), ("update", {"run_name": "bob-was-here"})):
            refused = requests.post(f"{api}/{action}", json={"run_id": alices, **body},
                                    auth=bob, verify=str(team.cert), timeout=30)  # fmt: skip
            assert refused.status_code == 403, (action, refused.text)
        assert admin.get_run(alices).info.run_name == "smoke-seed-1"
        assert admin.get_run(alices).info.lifecycle_stage == "active"
        # the early check words such a refusal as one line naming the account variable
        with pytest.raises(UserError, match=r"^MLFLOW_TRACKING_USERNAME: .* 403 Forbidden to "
                           r"user 'bob': no permission"):  # fmt: skip
            runs._check_answer(refused, team.server.uri, "MLFLOW_TRACKING_URI", bob)
        nobody = requests.post(f"{api}/delete", json={"run_id": alices}, verify=str(team.cert),
                               timeout=30)  # fmt: skip
        assert nobody.status_code == 401
    _assert_no_secret_in_logs(team)


def _client(team: Team, monkeypatch: pytest.MonkeyPatch, user: str, password: str) -> MlflowClient:
    """An MLflow client as ``user`` (MLflow reads its credentials from the environment)."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(team.cert))
    return MlflowClient(team.server.uri)


def _assert_no_secret_in_logs(team: Team) -> None:
    for path in team.state.rglob("*"):
        if path.is_file() and path.suffix in {".log", ".ini", ""}:
            text = path.read_bytes()
            assert ADMIN_PASSWORD.encode() not in text, path
            assert KEYS[1].encode() not in text, path


def _smoke(raw_params: dict[str, Any], path: Path, **train: Any) -> Path:
    """params.yaml on the smoke preset with some ``train.*`` keys changed, at ``path``."""
    changes = {**load_preset("smoke"), **{f"train.{k}": v for k, v in train.items()}}
    path.write_text(yaml.safe_dump(apply_overrides(raw_params, changes)))
    return path


@pytest.mark.slow
@pytest.mark.timeout(WAIT_S)
def test_alices_cluster_on_two_hosts_outlives_a_server_restart_and_matches_one_worker(
    team: Team, raw_params: dict[str, Any], smoke_params: Params, mnist_dir: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Alice's training as a cluster: worker 0 on host a (her account; it logs the run),
    worker 1 on host b (TF_CONFIG with their addresses). The server host's MLflow is killed
    (SIGKILL) once her first epoch arrives, and started again on its existing auth database
    (MLflow issue #10052, trouble upgrading it on PostgreSQL, is not hit). Training buffers;
    the run ends FINISHED with every epoch and sample grid, still hers; and the generator
    matches a one-worker run within 1e-5 (tests/test_multiworker.py says why not exactly)."""
    epochs = 10  # enough for the kill to land mid-training: ~1 s an epoch over the bridge
    update = {"epochs": epochs, "mixed_precision": False}
    params = _smoke(raw_params, tmp_path / "params.yaml", strategy="multi_worker", **update)
    raw = yaml.safe_load(params.read_text())
    raw["mlflow"]["experiment"] = experiment = f"cluster-{time.time_ns()}"
    params.write_text(yaml.safe_dump(raw))
    cluster = tmp_path / "cluster"
    args = stage_args("train", cluster, params=params, data=mnist_dir)
    addresses = [f"{team.net.addresses[host]}:{TF_PORT}" for host in ("a", "b")]
    workers = []
    for index, user in enumerate(("alice", "bob")):
        env = team.env(user, TF_CONFIG=cluster_config(addresses, index), DVC_ROOT=str(cluster),
                       MNIST_GAN_TRACKING_WAIT_S="400")  # fmt: skip
        with (tmp_path / f"worker{index}.log").open("w") as log:
            workers.append(subprocess.Popen(
                [*team.net.on(HOST_OF[user]), sys.executable, "-m", "stages.train", *args],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            ))  # fmt: skip

    def logs() -> str:
        return "\n".join((tmp_path / f"worker{i}.log").read_text() for i in range(2))

    try:
        with team.net.inside("a"):
            client = _client(team, monkeypatch, "alice", USERS["alice"])
            deadline = time.monotonic() + WAIT_S / 2
            while not _first_epoch_logged(client, f"{experiment}/alice"):
                assert all(worker.poll() is None for worker in workers), logs()
                assert time.monotonic() < deadline, logs()
                time.sleep(0.5)
        assert team.server.mlflow_proc is not None
        os.killpg(team.server.mlflow_proc.pid, signal.SIGKILL)
        team.server.mlflow_proc.wait(timeout=30)
        team.server.mlflow_proc = None
        time.sleep(2)
        with team.net.inside("srv"):
            team.server.start_mlflow()
        codes = [worker.wait(timeout=WAIT_S / 2) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    assert codes == [0, 0], logs()
    chief = (tmp_path / "worker0.log").read_text()
    assert re.search(r"unreachable \(\w+\); buffering", chief), chief  # killed mid-training

    run_id = json.loads((cluster / "models" / "mlflow_run.json").read_text())["run_id"]
    with team.net.inside("a"):
        run = client.get_run(run_id)
        steps = [m.step for m in client.get_metric_history(run_id, "d_loss")]
        samples = client.list_artifacts(run_id, "samples")
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.user"] == "alice"
    assert sorted(steps) == list(range(1, epochs + 1))
    assert len(samples) == epochs

    reference = tmp_path / "reference"
    one = smoke_params.model_copy(
        update={"train": smoke_params.train.model_copy(update={"strategy": "default", **update})}
    )
    expected = train(one, mnist_dir, train_outputs(reference),
                     runs.Store(f"sqlite:///{reference / 'mlflow.db'}", reference))  # fmt: skip
    actual = json.loads((cluster / "reports" / "train.json").read_text())
    assert actual["steps"] == expected["steps"] == 8 * epochs
    for key in ("d_loss", "g_loss"):
        assert actual[key] == pytest.approx(expected[key], abs=1e-5), key
    want = keras.models.load_model(reference / "models" / "generator.keras").get_weights()
    got = keras.models.load_model(cluster / "models" / "generator.keras").get_weights()
    worst = max(float(np.abs(a - b).max()) for a, b in zip(got, want, strict=True))
    assert worst < 1e-5, worst
    _assert_no_secret_in_logs(team)


def _first_epoch_logged(client: MlflowClient, experiment: str) -> bool:
    found = client.get_experiment_by_name(experiment)
    logged = client.search_runs([found.experiment_id]) if found else []
    return bool(logged and "d_loss" in logged[0].data.metrics)
