"""Defaults of the nightly deployments (no Prefect import: the command line reads them first)."""
DEFAULT_NAME = "patchwatch"
DEFAULT_REFIT_CRON = "0 1 * * *"   # 01:00: absorb the day's new nominal images
DEFAULT_SCORE_CRON = "0 3 * * *"   # 03:00: score the archive with the (re-)fitted model
