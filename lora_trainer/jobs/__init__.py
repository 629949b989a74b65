"""Training jobs: a SQLite-backed queue run one at a time as trainer subprocesses (survives WebUI restarts)."""
