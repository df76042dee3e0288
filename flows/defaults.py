"""Defaults of the nightly operations (no Prefect import: the command line reads them first)."""
DEFAULT_NAME = "patchwatch"
DEFAULT_REFIT_CRON = "0 1 * * *"   # 01:00: absorb the day's new nominal images
DEFAULT_SCORE_CRON = "0 3 * * *"   # 03:00: score the archive with the (re-)fitted model

HOLDOUT_FRACTION = 0.1  # nominal images kept out of the memory to calibrate the threshold
# The threshold is this quantile of the held-out images' scores: a false-alarm budget of 5 %.
# With ~80 held-out images (MTD) a 0.99 quantile is set by the one or two most unusual nominal
# images: on MTD's test split (single-scale model) it flagged 0 % of nominal and 14 % of
# defective images, 0.95 flagged 4.8 % and 66 % (README, "Nightly operations")
THRESHOLD_QUANTILE = 0.95
