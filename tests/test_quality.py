"""Quality on data the defaults were not tuned on: a fine texture with a 4-pixel defect.

The half-size coarse grid that suits MTD averages a 4-pixel defect away on a fine texture; what
``--auto`` chooses from the nominal images alone must find it (map peak on the defect, every
defective image ranked above every clean one).
"""
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from patchwatch.anomaly.engine import extract_views, fit_detector, score_features
from patchwatch.anomaly.features import PatchFeatureExtractor
from patchwatch.anomaly.probe_choice import choose_candidate
from patchwatch.anomaly.selection import default_candidates, make_probe_set, probe_candidate

torch.set_num_threads(1)

SIDE = 256
PERIOD = 6          # px: a texture finer than one feature cell of the half-size default
DEFECT = 4          # px: side of the square defect
DEPTH = 0.25        # how much darker the defect is than its surroundings (texture amplitude 0.15)


def fine_texture(rng: np.random.Generator) -> np.ndarray:
    """A fine checker-like grey texture with a random phase and mild sensor noise, in [0, 1]."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 2)
    texture = 0.5 + 0.15 * np.sin(2 * np.pi * xx / PERIOD + phase[0]) * np.sin(2 * np.pi * yy / PERIOD + phase[1])
    texture += gaussian_filter(rng.normal(0, 0.05, (SIDE, SIDE)), 0.7)
    return np.clip(texture, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def fine_case():
    rng = np.random.default_rng(0)
    nominal = [fine_texture(rng) for _ in range(30)]
    clean = [fine_texture(rng) for _ in range(8)]
    defective, centres = [], []
    for _ in range(8):
        image = fine_texture(rng)
        top, left = rng.integers(40, SIDE - 40, 2)
        image[top:top + DEFECT, left:left + DEFECT] -= DEPTH
        defective.append(np.clip(image, 0, 1))
        centres.append((top + DEFECT / 2, left + DEFECT / 2))
    return nominal, clean, defective, centres


def fit_and_score(candidate, nominal, images):
    candidate = candidate.for_images([image.shape[:2] for image in nominal])  # as a fit sets PaDiM's input size
    extractor = PatchFeatureExtractor(candidate.features)
    features = [f for image in nominal for _, f in extract_views(extractor, image, None)]
    detector = fit_detector(candidate.detector, candidate.settings, features)
    return [score_features(detector, extract_views(extractor, image, None), image.shape[:2], None) for image in images]


def found(scored_clean, scored_defective, centres) -> tuple[bool, int]:
    """(every defective image above every clean one, how many maps peak within 8 px of the defect)"""
    ranked = min(s.score for s in scored_defective) > max(s.score for s in scored_clean)
    peaks = [np.unravel_index(s.map.argmax(), s.map.shape) for s in scored_defective]
    on_defect = sum(np.hypot(py - cy, px - cx) <= 8 for (py, px), (cy, cx) in zip(peaks, centres))
    return ranked, on_defect


def test_auto_finds_a_four_pixel_defect_on_a_fine_texture_that_the_coarse_default_misses(fine_case):
    nominal, clean, defective, centres = fine_case
    candidates = {c.name: c for c in default_candidates()}
    # the probe sees only the nominal images
    probe = make_probe_set(nominal, probe_images=8)
    results = [probe_candidate(c, probe) for c in candidates.values()]
    chosen, reason = choose_candidate(results, len(probe.clean))  # the rule a fit applies (flows/choice.py)
    assert chosen.name != "coarse-context", reason

    scored = fit_and_score(candidates[chosen.name], nominal, clean + defective)
    ranked, on_defect = found(scored[:len(clean)], scored[len(clean):], centres)
    assert ranked and on_defect == len(defective), (chosen.name, on_defect)

    # the coarse half-size default is what --auto saves the user from here
    coarse = fit_and_score(candidates["coarse-context"], nominal, clean + defective)
    coarse_ranked, coarse_on_defect = found(coarse[:len(clean)], coarse[len(clean):], centres)
    assert not (coarse_ranked and coarse_on_defect == len(defective))
