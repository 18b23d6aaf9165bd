"""Many runs: presets, sweeps as queued DVC experiments, comparing runs in a terminal,
and the MLflow UI."""
