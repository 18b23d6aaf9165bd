"""One thin entry script per DVC stage, run as ``python -m stages.<name>`` (dvc.yaml).

Importing this package runs first, before any stage module and its imports (TensorFlow
among them): the one place to restart under the project's Python and quiet TensorFlow's
start-up. It does nothing in any other process (tests, tools that import a stage).
"""

from pipeline.core.stage import prepare_process

prepare_process()
