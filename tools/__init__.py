"""Scripts that make the docs' figures and tables from real runs (python -m tools.<name>)."""
