"""``fit --auto``: compare candidate configurations on the user's own nominal images, keep one."""
from __future__ import annotations

import time

from prefect.artifacts import create_markdown_artifact

from patchwatch.anomaly.probe_choice import choose_with_mirrors
from patchwatch.anomaly.selection import PROBE_IMAGES, PROBE_TRAIN_IMAGES, default_candidates
from patchwatch.anomaly.tiling import TilingConfig
from patchwatch.storage.images import ImageRecord
from patchwatch.tasks.listing import spread_sample
from patchwatch.tasks.selection import probe_candidate_task

from .report import markdown_rows
from .runner import gather

PROBE_SEED = 0


def probe_sample(records: list[ImageRecord]) -> list[str]:
    """The images the probe uses: evenly spread over the listing (tasks.listing.spread_sample)."""
    return spread_sample(records, PROBE_TRAIN_IMAGES + PROBE_IMAGES)


def choose_configuration(records: list[ImageRecord], tiling: TilingConfig, logger, root: str):
    """(chosen Candidate, the record for the manifest): every candidate probed on a Dask worker."""
    started = time.perf_counter()
    candidates = default_candidates()
    uris = probe_sample(records)
    logger.info("--auto: comparing %d configurations (%s) on %d of the %d nominal images with synthetic "
                "defects pasted in", len(candidates), ", ".join(c.name for c in candidates), len(uris), len(records))
    outcomes = gather([probe_candidate_task.submit(c, uris, PROBE_SEED, tiling) for c in candidates],
                      "configuration probe")
    results = [o["result"] for o in outcomes]
    chosen_result, mirrors, reason = choose_with_mirrors(results, outcomes[0]["probe_images"])
    chosen = next(c for c in candidates if c.name == chosen_result.name).with_mirrors(mirrors)
    rows = [r.row() for r in results]
    record = {"chosen": chosen.name, "reason": reason, "seconds": round(time.perf_counter() - started, 1),
              "sample_images": len(uris), "train_images": outcomes[0]["train_images"],
              "probe_images": outcomes[0]["probe_images"], "seed": PROBE_SEED, "candidates": rows,
              "mirrors": list(mirrors), "configurations": {c.name: c.describe() for c in candidates}}
    logger.info("--auto chose %s: %s", chosen.name, reason)
    create_markdown_artifact(
        key="configuration-choice",
        markdown=(f"# Configuration chosen: {chosen.name}\n\n{reason}.\n\n"
                  f"Probe: {record['train_images']} nominal images fitted, {record['probe_images']} scored as they "
                  f"are and with one synthetic defect each (image AUROC: how well each configuration tells "
                  f"them apart; pixel AUROC: how well its maps find the defects), {record['seconds']} s.\n\n"
                  + markdown_rows(rows)),
        description=f"fit --auto of {root}")
    return chosen, record
