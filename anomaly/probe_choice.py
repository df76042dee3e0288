"""The rule ``--auto`` follows once the probe has measured every candidate.

The probe ranks candidates by how well they tell nominal images from their synthetic-defect
twins. When even the best of them cannot be told from chance (the pasted defects are invisible to
every candidate at this data's scale, e.g. faint blotches on a busy texture), its ranking is
noise and the first-in-order tie-break would pick at random. Then the candidate that was most
robust across the quality benchmark is kept: on ``bench/bench_generalisation.py``'s seven sets
``padim-local`` was within 0.03 image AUROC of the best everywhere (README, "Quality on data it
was not tuned on").
"""
from __future__ import annotations

import math

from .selection import PROBE_IMAGES, ProbeResult, choose

ROBUST_FALLBACK = "padim-local"


def chance_auroc(probes: int = PROBE_IMAGES) -> float:
    """The image AUROC that ``probes`` clean and ``probes`` defective images reach by chance two
    standard errors in twenty (Mann-Whitney under no separation: sd = sqrt((2n + 1) / (12 n^2)))."""
    probes = max(1, int(probes))
    return 0.5 + 2 * math.sqrt((2 * probes + 1) / (12 * probes ** 2))


def choose_candidate(results: list[ProbeResult], probes: int = PROBE_IMAGES,
                     fallback: str = ROBUST_FALLBACK) -> tuple[ProbeResult, str]:
    """:func:`anomaly.selection.choose`, unless no candidate beat chance on the probe: then the
    benchmark's most robust candidate (``fallback``), if it could model the images."""
    usable = [r for r in results if math.isfinite(r.image_auroc)]
    level = chance_auroc(probes)
    robust = next((r for r in usable if r.name == fallback), None)
    if usable and robust is not None and max(r.image_auroc for r in usable) < level:
        others = ", ".join(f"{r.name} {r.image_auroc:.3f}" for r in usable if r is not robust)
        return robust, (f"no candidate told the {probes} probe images from their synthetic-defect twins better than "
                        f"chance (best image AUROC below {level:.3f}: {robust.name} {robust.image_auroc:.3f}, {others}): "
                        f"kept {fallback}, the most robust configuration across the quality benchmark")
    return choose(results)
