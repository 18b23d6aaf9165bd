"""Screenshots of the MLflow UI comparing every run, for docs/results.md.

Starts `mlflow ui` on loopback over the repo's store and drives Debian's headless chromium
(`apt-get install chromium`) over its DevTools pipe, so nothing beyond the standard library
is needed. Two pictures of experiment ``mnist-gan``:

- ``mlflow_compare.png``: the "Compare runs" page, one column per run: params, final losses
  and every evaluate metric side by side;
- ``mlflow_charts.png``: the runs page's chart view, one curve or bar per run for each metric.

From the repo root, after the runs: ``python tools/mlflow_screenshot.py docs``
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from pipeline.tracking.runs import resolve_store

PORT = 5055  # not 5000, so a UI the user already runs is left alone
WIDTH = 1920
# The UI opens its assistant chat panel (a third of the window) on a first visit; close it.
CLOSE_ASSISTANT = (
    "document.querySelector('button[data-component-id=\"mlflow.assistant.chat_panel.close\"]')"
    "?.click() ?? true"
)
DIFF_ONLY = "document.querySelector('[role=switch]').click();"  # the first: params
# The Compare page shows its params in a box of its own that scrolls: let it grow instead.
UNSCROLL = """[...document.querySelectorAll('main *, table *')].forEach(e => {
  const style = getComputedStyle(e);
  if (/(auto|scroll)/.test(style.overflowY) && e.scrollHeight > e.clientHeight + 4) {
    e.style.maxHeight = 'none'; e.style.height = 'auto'; e.style.overflowY = 'visible';
  }
}); true"""
# The runs page's chart view keeps its layout in a saved state (this key): the first 10 runs
# only, and a chart for every metric. Show 20 runs, and only the charts that compare them.
SAVED_STATE = "MLflowLocalStorage-1.1-ExperimentPage-{ids}-ReactComponentState"
CHARTS = ["d_loss", "g_loss", "d_real", "d_fake", "fid", "classifier_score", "precision",
          "recall", "min_class_share", "classes_present", "conditional_accuracy"]  # fmt: skip
CHART_STATE = """(() => {
  const key = %s, keep = %s;
  const state = JSON.parse(localStorage.getItem(key) || '{}');
  const charts = (state.compareRunCharts || []).map(chart => ({
    ...chart, deleted: !keep.includes(chart.metricKey), runsCountToCompare: 20}));
  localStorage.setItem(key, JSON.stringify(
    {...state, runsHiddenMode: 'FIRST_20_RUNS', compareRunCharts: charts}));
  return charts.length;
})()"""


class Chromium:
    """Headless chromium spoken to in the DevTools protocol over ``--remote-debugging-pipe``:
    JSON messages ending in a NUL byte, ours on its fd 3 and its replies on its fd 4."""

    def __init__(self, timeout_s: float = 120) -> None:
        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()
        # Out of the way of 3 and 4, which the child's copies must take.
        to_child, from_child = (
            fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_child, from_child)
        )

        def wire_pipe() -> None:
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.process = subprocess.Popen(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--disable-background-networking", "--no-first-run", "--remote-debugging-pipe",
             "about:blank"],
            preexec_fn=wire_pipe, close_fds=False,  # fds 3 and 4 must reach chromium
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_child)
        os.close(from_child)
        self.timeout_s = timeout_s
        self._pending = b""
        self._last_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._last_id += 1
        message: dict[str, Any] = {"id": self._last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:  # events arrive in between: skip them until our reply
            reply = self._read(deadline)
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.call(method, self.session, **params)

    def evaluate(self, expression: str) -> Any:
        return self.page("Runtime.evaluate", expression=expression, returnByValue=True)[
            "result"
        ].get("value")

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._pending:
            if not select.select([self._in], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError(f"chromium: no reply within {self.timeout_s:.0f} s")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            self._pending += chunk
        message, self._pending = self._pending.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)
        os.close(self._in)
        os.close(self._out)


def wait_for(check: Any, what: str, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:  # the UI takes 8-15 s to answer, more on a busy machine
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(1)
    sys.exit(f"{what}: not within {limit_s:.0f} s")


def ui_is_up(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


def open_page(browser: Chromium, url: str, ready_js: str) -> None:
    """Load ``url`` afresh (a hash change alone would keep the old page) and wait until
    ``ready_js`` is true."""
    browser.page("Page.navigate", url="about:blank")
    browser.page("Page.navigate", url=url)
    wait_for(lambda: browser.evaluate(ready_js), f"{url}: ready")
    browser.evaluate(CLOSE_ASSISTANT)


def wait_until_settled(browser: Chromium, what: str) -> None:
    """Until the page has not changed for 3 s: charts and tables fill in after the first
    rows appear."""
    last = {"size": -1, "since": time.monotonic()}

    def settled() -> bool:
        size = browser.evaluate("document.body.innerHTML.length")
        if size != last["size"]:
            last.update(size=size, since=time.monotonic())
        return time.monotonic() - last["since"] >= 3

    wait_for(settled, f"{what}: settled")


def screenshot(
    browser: Chromium, url: str, ready_js: str, bottom_js: str, out: Path, setup_js: str = ""
) -> None:
    """Open ``url`` in a tall window, wait until ``ready_js`` is true and the page has
    settled, run ``setup_js`` (and let it settle again), and save the page down to
    ``bottom_js`` (a y in CSS pixels)."""
    browser.page(
        "Emulation.setDeviceMetricsOverride",
        width=WIDTH,
        height=6000,
        deviceScaleFactor=1,
        mobile=False,
    )
    open_page(browser, url, ready_js)
    wait_until_settled(browser, url)
    if setup_js:
        browser.evaluate(setup_js)
        wait_until_settled(browser, url)
    height = min(6000, int(browser.evaluate(bottom_js)) + 24)
    clip = {"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1}
    shot = browser.page("Page.captureScreenshot", format="png", clip=clip)
    out.write_bytes(base64.b64decode(shot["data"]))
    print(f"{out}: {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--store", default=resolve_store().uri)
    parser.add_argument("--experiment", default="mnist-gan")
    parser.add_argument(
        "--compare", nargs="+", metavar="RUN",
        help="run names for the Compare page (about 7 fit its width); default: every run",
    )  # fmt: skip
    args = parser.parse_args()

    client = MlflowClient(args.store)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        sys.exit(
            f"{args.store}: no experiment {args.experiment!r}; run `make exp PRESET=...` first"
        )
    runs = list(
        client.search_runs(
            [experiment.experiment_id],
            "attributes.status = 'FINISHED'",
            order_by=["attributes.start_time ASC"],
        )
    )
    if not runs:
        sys.exit(f"{args.store}: experiment {args.experiment!r} has no finished run")
    if args.compare:
        by_name = {run.info.run_name: run for run in runs}
        if missing := sorted(set(args.compare) - set(by_name)):
            sys.exit(f"--compare: no finished run named {missing}; allowed: {sorted(by_name)}")
        runs = [by_name[name] for name in args.compare]
    ids = json.dumps([run.info.run_id for run in runs])
    base = f"http://127.0.0.1:{PORT}/#/"
    compare = f"{base}compare-runs?" + urllib.parse.urlencode(
        {"runs": ids, "experiments": json.dumps([experiment.experiment_id])}
    )
    charts = f"{base}experiments/{experiment.experiment_id}/runs?compareRunsMode=CHART"

    ui = subprocess.Popen(
        ["mlflow", "ui", "--backend-store-uri", args.store, "--host", "127.0.0.1",
         "--port", str(PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    browser = None
    try:
        wait_for(lambda: ui_is_up(f"http://127.0.0.1:{PORT}/health"), "mlflow ui")
        browser = Chromium()
        # What each run ran with: the params that differ. Its metrics table is a fixed box
        # that renders only the rows in view, so the picture stops above it (the chart view
        # shows the metrics).
        screenshot(browser, compare,
                   "document.querySelectorAll('table td').length > 0",
                   "document.evaluate(\"//*[normalize-space(text())='Metrics']\", document, "
                   "null, XPathResult.FIRST_ORDERED_NODE_TYPE).singleNodeValue"
                   ".getBoundingClientRect().top - 16",
                   args.out_dir / "mlflow_compare.png",
                   DIFF_ONLY + UNSCROLL)  # fmt: skip
        charts_ready = "document.querySelectorAll('.js-plotly-plot').length > 0"
        open_page(browser, charts, charts_ready)
        key = SAVED_STATE.format(ids=json.dumps([experiment.experiment_id]))
        browser.evaluate(CHART_STATE % (json.dumps(key), json.dumps(CHARTS)))
        screenshot(browser, charts, charts_ready,
                   "Math.max(...[...document.querySelectorAll('.js-plotly-plot')].map("
                   "p => p.getBoundingClientRect().bottom)) + 40",
                   args.out_dir / "mlflow_charts.png")  # fmt: skip
    finally:
        if browser is not None:
            browser.close()
        os.killpg(ui.pid, signal.SIGTERM)  # the UI's server workers too
        ui.wait(timeout=30)


if __name__ == "__main__":
    main()
