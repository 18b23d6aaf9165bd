"""A grid sweep as queued DVC experiments with names that say what they are:
``make sweep PRESET=default SET='train.lr_g=1e-4,4e-4 seed=1,2'`` queues four experiments,
``default-lr_g-1e-4-seed-1`` ... ``default-lr_g-4e-4-seed-2``, and MLflow names its runs the
same (the train stage takes the run name from DVC).

    python -m pipeline.experiments.sweep PRESET KEY=V1,V2 [KEY=V ...]   # then `dvc queue start`

DVC's own grid (``dvc exp run --queue -S 'train.lr_g=1e-4,4e-4'``) names runs at random.
Every point is checked against the schema before anything is queued, and the data is
downloaded once, before the runs, not by each of them at once. The names queued last
are kept in ``.dvc/tmp/last-sweep.json`` for ``make ui``'s compare link.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

from pipeline.core.params import ParamsError
from pipeline.experiments.presets import exp_run_args, parse_assignments

LAST_SWEEP = Path(".dvc/tmp/last-sweep.json")


def grid(pairs: list[str]) -> list[list[str]]:
    """``["a.x=1,2", "b=3"]`` -> ``[["a.x=1", "b=3"], ["a.x=2", "b=3"]]``: every combination,
    values as typed (a list value such as ``[1,2]`` is not split)."""
    axes = []
    for pair in pairs:
        key, sep, values = pair.partition("=")
        if not sep or not key or not values:
            raise ParamsError(f"sweep: got {pair!r}; expected KEY=V1,V2,..., e.g. seed=1,2")
        split = [values] if values.startswith("[") else values.split(",")
        axes.append([f"{key}={value}" for value in split])
    return [list(point) for point in itertools.product(*axes)]


def run_name(preset: str, point: list[str], swept: set[str]) -> str:
    """``default-lr_g-1e-4-seed-1``: the preset, then each swept key's last part and value;
    only characters git allows in a ref name."""
    parts = [preset]
    for pair in point:
        key, _, value = pair.partition("=")
        if key in swept:
            parts += [key.rsplit(".", 1)[-1], value]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts)).strip(".")


def queue_commands(preset: str, pairs: list[str]) -> list[list[str]]:
    """One ``dvc exp run --queue -n NAME ...`` per grid point, each point validated first."""
    points = grid(pairs)
    swept = {pair.partition("=")[0] for pair in pairs if "," in pair.partition("=")[2]}
    swept = swept or {pair.partition("=")[0] for pair in pairs}
    commands = []
    for point in points:
        args = exp_run_args(preset, extra=parse_assignments(point))
        name = run_name(preset, point, swept)
        commands.append(["dvc", "exp", "run", "--queue", "-n", name, *args])
    names = [command[5] for command in commands]
    if len(set(names)) != len(names):
        raise ParamsError(f"sweep: two grid points get the same name: {names}")
    return commands


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m pipeline.experiments.sweep PRESET KEY=V1,V2 [KEY=V ...]")
    try:
        commands = queue_commands(argv[0], argv[1:])
    except ParamsError as exc:
        sys.exit(f"error: {exc}")
    # The data first, into the DVC cache: the queued runs then check it out and skip the
    # download stage. Otherwise each downloads and commits the same files into the shared
    # cache at once, and DVC can refuse to replace a file another run is still committing
    # ("unable to remove ... without a confirmation"): one run of a fresh clone's sweep failed.
    if subprocess.run([sys.executable, "-m", "dvc", "repro", "download"]).returncode != 0:
        sys.exit("error: the download stage failed (see above); nothing was queued")
    for command in commands:
        print("queue:", command[5], flush=True)
        queued = subprocess.run([sys.executable, "-m", *command], stdout=subprocess.DEVNULL)
        if queued.returncode != 0:  # DVC said why on stderr (a name taken: `dvc exp remove NAME`)
            sys.exit(f"error: could not queue {command[5]}")
    LAST_SWEEP.parent.mkdir(parents=True, exist_ok=True)
    LAST_SWEEP.write_text(json.dumps({"names": [command[5] for command in commands]}))
    print(f"queued {len(commands)}; run them: dvc queue start -j 2; then make compare / make ui")


if __name__ == "__main__":
    main(sys.argv[1:])
