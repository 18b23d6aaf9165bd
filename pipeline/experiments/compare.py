"""Experiments side by side in a terminal: ``make compare``
(``python -m pipeline.experiments.compare``).

``dvc exp show`` prints every param and metric (~330 columns here), cuts the widest table
from the right (where the swept params are) and rounds only in ``--csv``. This reads its
``--json`` instead and prints, to fit the terminal (120 columns when not a terminal): the
experiment's name, the params that differ between the experiments shown, then the headline
metrics. ``--wide`` prints every differing param and every metric. Extra arguments go to
``dvc exp show`` (``-A``: experiments made on earlier commits too).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The numbers a comparison starts from (metric files: reports/metrics.json, train.json).
HEADLINE = ("fid", "yardstick", "recall", "precision", "train_seconds")
# Columns of `--width` kept free beyond the headline: one more metric fits without retuning.
SPARE = 10
NAME_WIDTH = 28


def exp_show_json(args: list[str]) -> list[dict[str, Any]]:
    """What ``dvc exp show --json`` says (run by this Python: no PATH needed)."""
    command = [sys.executable, "-m", "dvc", "exp", "show", "--json", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"error: `dvc exp show --json` failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _merged(files: dict[str, Any] | None) -> dict[str, Any]:
    """{file: {"data": {...}}} of one kind (params or metrics) as one flat mapping."""
    merged: dict[str, Any] = {}
    for result in (files or {}).values():
        merged |= flatten(result.get("data") or {})
    return merged


def experiments(shown: list[dict[str, Any]]) -> Iterator[tuple[str, dict, dict]]:
    """(name, params, metrics) of the workspace, each baseline commit and each finished
    experiment on it; queued, running and failed ones are left out."""
    for baseline in shown:
        states = [baseline]
        for exp_range in baseline.get("experiments") or []:
            executor = exp_range.get("executor") or {}
            if executor.get("state", "success") == "success":
                states += exp_range["revs"][:1]
        for state in states:
            data = state.get("data") or {}
            rev = state["rev"]  # "workspace", or a commit's sha
            name = state.get("name") or (rev if rev == "workspace" else rev[:7])
            yield name, _merged(data.get("params")), _merged(data.get("metrics"))


def differing(rows: list[dict[str, Any]]) -> list[str]:
    """Keys whose values are not the same in every row, in first-seen order."""
    keys = dict.fromkeys(key for row in rows for key in row)
    return [key for key in keys if len({json.dumps(row.get(key)) for row in rows}) > 1]


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def short_names(keys: list[str]) -> dict[str, str]:
    """`train.lr_g` -> `lr_g` where that last part is unique among ``keys``."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: end if last.count(end) == 1 else key for key, end in zip(keys, last, strict=True)}


Column = tuple[str, list[str]]  # heading, one cell per row


def column(heading: str, values: list[Any]) -> tuple[Column, int]:
    cells = [cell(value) for value in values]
    return (heading, cells), max(len(heading), *map(len, cells))


def table(shown: list[dict[str, Any]], width: int | None, wide: bool = False) -> str:
    """The comparison as text; ``width`` None = no limit."""
    every = list(experiments(shown))
    rows = [row for row in every if row[2]]
    if not rows:
        return "no experiment has metrics yet: run `make repro` or `make exp PRESET=...`"
    metric_keys = list(HEADLINE)
    if wide:  # then every other metric, in the order the metric files list them
        metric_keys = list(dict.fromkeys([*HEADLINE, *(key for row in rows for key in row[2])]))
    names = [name[:NAME_WIDTH] for name, _, _ in rows]
    metrics = [column(key, [row[2].get(key) for row in rows]) for key in metric_keys]
    # What is left for the params once the name, the metrics and the spare are placed.
    left = None if width is None else width - max(10, *map(len, names)) - SPARE
    left = None if left is None else left - sum(size + 2 for _, size in metrics)
    params: list[Column] = []
    hidden: list[str] = []
    param_keys = differing([row[1] for row in rows])
    for key, heading in short_names(param_keys).items():
        col, size = column(heading, [row[1].get(key) for row in rows])
        if left is not None and size + 2 > left:
            hidden.append(key)
            continue
        left = None if left is None else left - size - 2
        params.append(col)
    columns = [("Experiment", names), *params, *(col for col, _ in metrics)]
    widths = [max(len(heading), *map(len, cells)) for heading, cells in columns]
    heads = [h.rjust(w) for (h, _), w in zip(columns[1:], widths[1:], strict=True)]
    lines = ["  ".join(["Experiment".ljust(widths[0]), *heads])]
    for i in range(len(rows)):
        first = columns[0][1][i].ljust(widths[0])
        rest = [cells[i].rjust(w) for (_, cells), w in zip(columns[1:], widths[1:], strict=True)]
        lines.append("  ".join([first, *rest]))
    notes = []
    if hidden:
        notes.append(f"(make compare WIDE=1 shows {len(hidden)} more: {', '.join(hidden)})")
    if missing := [name for name, _, metric in every if not metric]:
        notes.append(f"no metrics here (not run, or not in this DVC cache): {', '.join(missing)}")
    if width is not None:
        notes = [note if len(note) <= width else note[: width - 1] + "…" for note in notes]
    return "\n".join(lines + notes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--wide", action="store_true", help="every differing param and metric")
    parser.add_argument("--width", type=int, help="columns (default: the terminal's, else 120)")
    parser.add_argument("--json", type=Path, help="read this `dvc exp show --json` output")
    args, dvc_args = parser.parse_known_args(argv)
    shown = json.loads(args.json.read_text()) if args.json else exp_show_json(dvc_args)
    width = args.width or shutil.get_terminal_size((120, 24)).columns
    print(table(shown, None if args.wide else width, wide=args.wide))


if __name__ == "__main__":
    main()
