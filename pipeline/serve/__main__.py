"""``python -m pipeline.serve``: the service's command line (pipeline.serve.app.main)."""

from pipeline.serve.app import main

main()
