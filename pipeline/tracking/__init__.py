"""MLflow: which store a stage logs to, its runs, logging that outlives a server restart,
and the team tracking server on PostgreSQL."""
