"""The rule ``--auto`` follows once the probe has measured every candidate.

The probe ranks candidates by how well they tell nominal images from their synthetic-defect
twins, over a few dozen probes: an image AUROC's standard error there is ~0.07, as large as the
differences between the better candidates, and the probe's defects are not the user's. So the
first candidate, the configuration most robust across the quality benchmark's sets (PaDiM with
OAS-shrunk covariances: README, "Quality on data it was not tuned on"), is kept unless another
beats it on the probe by more than two standard errors of a probe AUROC (0.146 at 32 probes):
evidence that the data needs what that one has (a fine grid for defects of a few pixels on a
fine texture, say), not noise. Picking the probe's best outright chose `fine` on the benchmark's
brick wall (0.767 on the real defects) over PaDiM (0.888).
"""
from __future__ import annotations

import math

from .selection import PROBE_IMAGES, ProbeResult, choose
from .settings import MIRRORS


def probe_noise(probes: int = PROBE_IMAGES) -> float:
    """Two standard errors of an image AUROC over ``probes`` clean and ``probes`` defective images
    under no separation (Mann-Whitney: sd = sqrt((2n + 1) / (12 n^2)))."""
    probes = max(1, int(probes))
    return 2 * math.sqrt((2 * probes + 1) / (12 * probes ** 2))


def chance_auroc(probes: int = PROBE_IMAGES) -> float:
    """The image AUROC that ``probes`` clean and ``probes`` defective images reach by chance two
    standard errors in twenty."""
    return 0.5 + probe_noise(probes)


def choose_candidate(results: list[ProbeResult], probes: int = PROBE_IMAGES) -> tuple[ProbeResult, str]:
    """The first candidate (the preferred one), unless another beat it on the probe by more than
    :func:`probe_noise`; then :func:`anomaly.selection.choose` among those that did."""
    usable = [r for r in results if math.isfinite(r.image_auroc)]
    if not usable:
        return choose(results)  # raises, naming why each failed
    preferred, margin = results[0], probe_noise(probes)
    if not math.isfinite(preferred.image_auroc):
        return choose(results)
    clearly_better = [r for r in usable if r.image_auroc > preferred.image_auroc + margin]
    if clearly_better:
        chosen, _ = choose(clearly_better)
        others = ", ".join(f"{r.name} {r.image_auroc:.3f}" for r in usable if r is not chosen)
        return chosen, (f"{chosen.name} told the {probes} probe images from their synthetic-defect twins better than "
                        f"{preferred.name} by more than the probe's noise ({chosen.image_auroc:.3f} against "
                        f"{preferred.image_auroc:.3f}, margin {margin:.3f}; {others})")
    best = max(usable, key=lambda r: r.image_auroc)
    others = ", ".join(f"{r.name} {r.image_auroc:.3f}" if not r.failed else f"{r.name} failed"
                       for r in results if r is not preferred)
    reason = (f"kept {preferred.name}, the most robust configuration across the quality benchmark: no "
              f"candidate beat its probe image AUROC ({preferred.image_auroc:.3f}) by more than the probe's "
              f"noise ({margin:.3f} at {probes} probes; best {best.name} {best.image_auroc:.3f}; {others})")
    chance = chance_auroc(probes)
    if best.image_auroc <= chance:
        # on a busy texture the pasted defects can hide in the images' own variation (the benchmark's
        # wide-strip: 0.50-0.56 for every candidate, while its real defects were found at 0.84)
        reason += (f"; every candidate told the probes from their synthetic-defect twins no better than chance "
                   f"(up to {chance:.3f}): the probe could not rank them on these images, so the "
                   f"choice rests on the benchmark alone; measure it on images with real defects "
                   f"(patchwatch evaluate)")
    return preferred, reason


def choose_with_mirrors(results: list[ProbeResult], probes: int = PROBE_IMAGES
                        ) -> tuple[ProbeResult, tuple[str, ...], str]:
    """--auto's whole rule: the candidate (:func:`choose_candidate`), the mirror images it adds
    (:func:`mirror_choice`) and the reason for both."""
    chosen, reason = choose_candidate(results, probes)
    mirrors, mirror_reason = mirror_choice(chosen, probes)
    return chosen, mirrors, f"{reason}; {mirror_reason}"


def mirror_choice(result: ProbeResult, probes: int = PROBE_IMAGES) -> tuple[tuple[str, ...], str]:
    """The mirror images a fit of ``result``'s candidate adds to each nominal image, and why: each
    mirror whose defect-free mirrored probes its probe model could not tell from the probes as they
    are, within one standard error of chance (half of :func:`probe_noise`). One, not two: a wrong
    mirror costs more than a right one gains. On the quality benchmark (README, "Quality on data
    it was not tuned on") MTD's probes mirrored left-right scored 0.624 against themselves at 28
    probes (within two standard errors, 0.656), and PaDiM learning them lost 0.012 image AUROC on
    MTD's test split (0.033 with every mirror); an aligned part's mirrored probes score 1.0."""
    if not result.mirror_aurocs:
        return (), "no mirror images (the probe measured none)"
    limit = 0.5 + probe_noise(probes) / 2
    kept = tuple(m for m in MIRRORS if result.mirror_aurocs.get(m, 1.0) <= limit)
    measured = ", ".join(f"{m} {result.mirror_aurocs[m]:.3f}" for m in MIRRORS if m in result.mirror_aurocs)
    if kept:
        return kept, (f"nominal images look the same mirrored ({measured}; up to {limit:.3f} counts as alike): "
                      f"each is also learnt mirrored ({', '.join(kept)})")
    return (), f"no mirror images: mirrored nominal images look different ({measured}; up to {limit:.3f} counts as alike)"
