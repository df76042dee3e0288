#!/usr/bin/env python
"""Detection quality across kinds of data: data set x configuration -> image AUROC, pixel AUROC,
AUPRO, fit and score time; the default's and ``--auto``'s gap to the best configuration per set.

The data sets are MTD (the paper's split) and the evaluation sets of ``bench/eval_sets.py``:
real nominal material (MTD's free tiles, scikit-image's textures and photos) with synthetic
defects, built from recipes into ``--work`` on first use. Every configuration runs the engine
in one process (``anomaly.engine``: the same features, detectors, tiling and maps as the flows;
no hold-out, so the memory holds every train image); ``--auto`` runs the label-free probe of
``anomaly.selection`` on each set's train images only and is scored by the test metrics of the
configuration it picks.

    python bench/bench_generalisation.py                           # everything (hours on 2 cores: its rows are cached)
    python bench/bench_generalisation.py --sets fine-texture,mtd --configs coarse-context,fine
    python bench/bench_generalisation.py --scale 0.3 --mtd-limit 120 --out /tmp/bench   # a quick check

Each (set, configuration) row is cached in ``--work`` (keyed by the set's recipe, the
configuration and the engine's source), so a rerun recomputes only what changed.
"""
from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

sys.path.insert(0, str(common.REPO))

# the engine code a cached row depends on (configurations are keyed by their full settings, so
# a change of defaults alone does not invalidate rows; nor does the metrics code, whose streaming
# and exact forms agree to 1e-3)
ROW_SOURCES = ("settings", "features", "backbone", "engine", "patchcore", "padim", "spade", "coreset", "maps", "tiling")
AUTO_SOURCES = ROW_SOURCES + ("selection",)
CACHE_VERSION = 2
# image AUROC within this of the best configuration of a set counts as matching it (the bar)
GAP = 0.02


def configurations() -> dict:
    """name -> Candidate: ``--auto``'s candidates (always measured: auto is scored by them) and a
    few more variants that show what each setting does."""
    from patchwatch.anomaly.selection import Candidate, default_candidates
    from patchwatch.anomaly.settings import MIRRORS

    configs = {c.name: c for c in default_candidates()}
    extra = [
        Candidate.make("coarse", "patchcore", {"context_scales": ()}),
        Candidate.make("full-size", "patchcore", {"input_scale": 1.0}),  # a candidate of --auto until 2026-11-30
        Candidate.make("mid", "patchcore", {"layers": (2, 3), "input_scale": 0.5, "context_scales": ()}),
        Candidate.make("fine-context", "patchcore", {"layers": (2, 3), "input_scale": 1.0, "context_scales": (0.25,)},
                       {"coreset_ratio": 0.02}),
        Candidate.make("spade", "spade"),
        # PaDiM's new-fit defaults before OAS shrinkage (the 'padim' candidate until 2026-11-30),
        # and the local PaDiM with it
        Candidate.make("padim-plain", "padim", None, {"shrinkage": "none"}),
        Candidate.make("padim-local-oas", "padim", {"square_side": 256, "context_scales": ()},
                       {"channels": 100, "shrinkage": "oas"}),
        # the default PaDiM also fitted on every train image's three mirror images, on every set
        # (--auto adds them only where the probe finds the images mirror-invariant)
        Candidate.make("padim-mirrored", "padim", {"mirrors": MIRRORS}),
        # the default PaDiM at 512 px instead of 320: does input resolution find faint small defects?
        Candidate.make("padim-512", "padim", {"square_side": 512}),
        # the default PaDiM at a 320 x 320 square: the default until 2026-11-30 (now each set's own
        # size and aspect, resolved per set by for_set)
        Candidate.make("padim-320", "padim", {"square_side": 320}),
        # the default PaDiM on the larger offline backbones: do their features find fainter defects?
        Candidate.make("padim-lite1", "padim", {"backbone": "tf_efficientnet_lite1"}),
        Candidate.make("padim-lite2", "padim", {"backbone": "tf_efficientnet_lite2"}),
        # the default PaDiM with a 10x and 100x larger regulariser (cov + epsilon * I): less
        # weight on the directions the nominal images hardly vary in (lower on each of the four
        # sets measured, 0.1 within noise: results/generalisation-padim-covariance.md)
        Candidate.make("padim-eps-0.1", "padim", None, {"epsilon": 0.1}),
        Candidate.make("padim-eps-1", "padim", None, {"epsilon": 1.0}),
        # wide-strip's tiles (256 x 512) at their own aspect with the short side at 320, as the
        # 320 x 320 square has it: is the square's lead there its taller input or its aspect?
        Candidate.make("padim-320x640", "padim", {"fixed_shape": (320, 640)}),
    ]
    configs.update({c.name: c for c in extra})
    return configs


def for_set(candidate, data: "DataSet", tiling):
    """``candidate`` as fitted on ``data``: with the input size its detector needs set from the
    set's train images (or their tiles), as a fit sets it (anomaly.settings.with_input_size)."""
    return candidate.for_images([image.shape[:2] for image in data.train], tiling)


def default_configuration(configs: dict) -> str:
    """The name of the configuration that ``--no-auto`` (PatchCore's fixed defaults) amounts to."""
    from patchwatch.anomaly.selection import Candidate

    default = Candidate.make("default", "patchcore").describe()
    return next(name for name, c in configs.items()
                if {**c.describe(), "name": "default"} == default)


def source_digest(modules: tuple[str, ...]) -> str:
    digest = hashlib.sha1()
    for module in modules:
        digest.update((common.REPO / "anomaly" / f"{module}.py").read_bytes())
    return digest.hexdigest()[:12]


def file_digest(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12]


def content_digests(records) -> list[list[str]]:
    """Each image's (and mask's) location and file digest: a cached row is keyed by the pixels it
    was measured on, so a set rebuilt from a changed recipe under the same file names is measured
    anew (keyed by names alone, such a set's rows came back from the cache)."""
    return [[r.uri, file_digest(r.uri), file_digest(r.mask_uri) if r.mask_uri else ""] for r in records]


# ---- data ------------------------------------------------------------------------------------------
class DataSet:
    def __init__(self, name: str, split_csv: Path, train_limit: int | None = None, test_limit: int | None = None):
        from patchwatch.storage.images import list_images, read_image, read_mask

        self.name, self.split_csv = name, split_csv
        records = list_images(str(split_csv))
        train = [r for r in records if r.split == "train" and r.label == "good"]
        test = [r for r in records if r.split == "test"]
        train, test = common.spread(train, train_limit), common.spread(test, test_limit)
        self.train_records = train
        self.train = [read_image(r.uri) for r in train]
        self.test = [read_image(r.uri) for r in test]
        self.masks = [read_mask(r.mask_uri, image.shape[:2]) if r.mask_uri else np.zeros(image.shape[:2], bool)
                      for r, image in zip(test, self.test)]
        self.labels = np.array([r.label == "defect" for r in test])
        self.types = np.array([r.defect_type or ("good" if r.label == "good" else "?") for r in test])
        shapes = sorted({image.shape[:2] for image in self.train + self.test})
        self.size = (f"{shapes[0][0]}x{shapes[0][1]}" if len(shapes) == 1
                     else f"{shapes[0][0]}x{shapes[0][1]}..{shapes[-1][0]}x{shapes[-1][1]}")
        self.key = hashlib.sha1(json.dumps([file_digest(split_csv), content_digests(train), content_digests(test)])
                                .encode()).hexdigest()[:12]


def load_sets(names: list[str], work: Path, scale: float, mtd_limit: int | None) -> list[DataSet]:
    import eval_sets

    sets = []
    for name in names:
        started = time.perf_counter()
        csv = eval_sets.build(name, work, scale=scale)
        limit = mtd_limit if name == "mtd" else None
        data = DataSet(name, Path(csv), limit, limit)
        print(f"{name}: {len(data.train)} train, {len(data.test)} test ({int(data.labels.sum())} defective), "
              f"{data.size}, ready in {time.perf_counter() - started:.0f} s", flush=True)
        sets.append(data)
    return sets


# ---- one (set, configuration) --------------------------------------------------------------------------
def run_config(data: DataSet, candidate, tiling) -> dict:
    import torch

    from patchwatch.anomaly.engine import extract_views, fit_detector, score_features, training_views
    from patchwatch.anomaly.features import PatchFeatureExtractor
    from patchwatch.anomaly.metrics import evaluate_detection

    torch.set_num_threads(1)
    extractor = PatchFeatureExtractor(candidate.features)
    started = time.perf_counter()
    features = [f for image in data.train for _, f in training_views(extractor, image, tiling)]
    detector = fit_detector(candidate.detector, candidate.settings, features)
    fit_s = time.perf_counter() - started
    bank_rows = sum(len(f.vectors) for f in features)
    del features
    started = time.perf_counter()
    scores, maps = [], []
    for image in data.test:
        scored = score_features(detector, extract_views(extractor, image, tiling), image.shape[:2], tiling)
        scores.append(scored.score)
        maps.append(scored.map)
    score_s = time.perf_counter() - started
    metrics = evaluate_detection(data.labels, np.array(scores), data.masks, maps, data.types)
    nominal = [m for m, label in zip(maps, data.labels) if not label]
    per_type = {t: round(v["image_auroc"], 4) for t, v in metrics.get("per_defect_type", {}).items()
                if v.get("image_auroc") == v.get("image_auroc")}
    return {"image_auroc": metrics["image_auroc"], "pixel_auroc": metrics.get("pixel_auroc"),
            "aupro": metrics.get("aupro"), "fit_s": fit_s, "score_s_per_image": score_s / max(1, len(data.test)),
            "bank_rows": bank_rows, "per_type_image_auroc": per_type,
            # per test image, in the set's order: the bootstrap intervals of the tables resample them
            "scores": [float(s) for s in scores],
            "border_ratio": float(np.mean([border_ratio(m) for m in nominal])) if nominal else None}


def border_mask(shape: tuple[int, int]) -> np.ndarray:
    """The band along a map's border that border/inner (and the sensitivity benchmark's border
    maxima) look at: 1/16 of the shorter side wide, at least 4 px."""
    band = max(4, min(shape) // 16)
    mask = np.ones(shape, bool)
    mask[band:-band, band:-band] = False
    return mask


def border_ratio(amap: np.ndarray) -> float:
    """Mean map value in a band along the image's border over the mean inside it, on a nominal
    image: well above 1 means the map is hot at the borders (not the CNN's zero padding alone:
    README, "PatchCore's maps peak on the image border"), which raises every image's maximum and
    hides small defects."""
    border = border_mask(amap.shape)
    return float(amap[border].mean() / max(float(amap[~border].mean()), 1e-12))


def run_auto(data: DataSet, candidates: list, tiling) -> dict:
    import torch

    from patchwatch.anomaly.selection import make_probe_set, probe_candidate
    from patchwatch.flows.choice import PROBE_SEED, probe_sample

    torch.set_num_threads(1)
    started = time.perf_counter()
    # the images a fit's probe takes (flows.choice): the same sample, so the same choice
    row_of = {r.uri: i for i, r in enumerate(data.train_records)}
    images = [data.train[row_of[uri]] for uri in probe_sample(data.train_records)]
    probe = make_probe_set(images, seed=PROBE_SEED, tiling=tiling)
    results = [probe_candidate(candidate, probe) for candidate in candidates]
    # the choice itself is made by with_choice, from these measurements, cached or not
    return {"seconds": time.perf_counter() - started, "probe_images": len(probe.clean),
            "probe": [r.row() for r in results]}


def with_choice(auto: dict, data: DataSet) -> dict:
    """The cached probe measurements with --auto's choice rule applied (anomaly.probe_choice): the
    rule is applied here, so changing it needs no new probe."""
    from patchwatch.anomaly.probe_choice import choose_with_mirrors
    from patchwatch.anomaly.selection import PROBE_IMAGES, ProbeResult

    def number(value):
        return float("nan") if value is None else float(value)

    results = [ProbeResult(r["candidate"], number(r["image_auroc"]), number(r["pixel_auroc"]), r["seconds"],
                           {k.removeprefix("auroc_"): v for k, v in r.items() if k.startswith("auroc_")}, r.get("failed"),
                           {k.removeprefix("mirror_"): v for k, v in r.items() if k.startswith("mirror_")})
               for r in auto["probe"]]
    probes = auto.get("probe_images") or min(PROBE_IMAGES, max(2, len(data.train) // 4))
    chosen, mirrors, reason = choose_with_mirrors(results, probes)
    return {**auto, "picked": chosen.name, "mirrors": list(mirrors), "chosen": mirrored_name(chosen.name, mirrors),
            "reason": reason}


def mirrored_name(name: str, mirrors) -> str:
    """The configuration name of candidate ``name`` fitted with ``mirrors`` too."""
    from patchwatch.anomaly.settings import MIRRORS

    if not mirrors:
        return name
    return f"{name}-mirrored" if tuple(mirrors) == MIRRORS else f"{name}-mirrored-{'+'.join(mirrors)}"


def cached(work: Path, key_parts: list, compute) -> dict:
    key = hashlib.sha1(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = work / "results" / f"{key}.json"
    if path.exists():
        return {**json.loads(path.read_text()), "cached": True}
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value, default=float))
    os.replace(partial, path)
    return {**value, "cached": False}


def measured_row(work: Path, data: DataSet, candidate, tiling, digest: str) -> dict:
    """:func:`run_config`'s row of ``candidate`` on ``data``, from the cache when measured before: keyed
    by the set's files, the configuration's full settings, the tiling and the engine's source."""
    return cached(work, [CACHE_VERSION, data.key, candidate.describe(), tiling.to_dict(), digest],
                  lambda: run_config(data, candidate, tiling))


# ---- how sure: bootstrap over the test images ----------------------------------------------------------
BOOTSTRAP_DRAWS = 2000


def bootstrap_rows(labels: np.ndarray, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> np.ndarray:
    """(draws, n) indices into the test images: each draw resamples the good and the defective
    images separately (stratified), so every draw has both classes in the set's proportions."""
    rng = np.random.default_rng(seed)
    good, bad = np.flatnonzero(~labels), np.flatnonzero(labels)
    return np.concatenate([rng.choice(good, (draws, len(good))), rng.choice(bad, (draws, len(bad)))], axis=1)


def aurocs(labels: np.ndarray, scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Image AUROC of each bootstrap draw (Mann-Whitney from mid-ranks, ties counted half)."""
    from scipy.stats import rankdata

    drawn, truth = scores[rows], labels[rows]
    ranks = rankdata(drawn, axis=1)
    positives = truth.sum(axis=1)
    negatives = truth.shape[1] - positives
    return ((ranks * truth).sum(axis=1) - positives * (positives + 1) / 2) / (positives * negatives)


def interval(values: np.ndarray) -> list[float]:
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def auroc_interval(labels: np.ndarray, row: dict, rows: np.ndarray) -> list[float] | None:
    """95 % bootstrap interval of a (set, configuration) row's image AUROC; None for a row cached
    before the rows kept their scores."""
    return interval(aurocs(labels, np.asarray(row["scores"]), rows)) if "scores" in row else None


def gap_interval(labels: np.ndarray, best: dict, other: dict, rows: np.ndarray) -> list[float] | None:
    """95 % paired-bootstrap interval of best's image AUROC minus other's: both scored on the same
    resampled test images, so what the two share (which images are hard) cancels."""
    if "scores" not in best or "scores" not in other:
        return None
    return interval(aurocs(labels, np.asarray(best["scores"]), rows) - aurocs(labels, np.asarray(other["scores"]), rows))


def verdict(gap: float, gap_ci: list[float] | None) -> str:
    """Within the bar, or not; and whether the test set could tell (the interval reaches the bar)."""
    if gap <= GAP:
        return "yes"
    if gap_ci is not None and gap_ci[0] <= GAP:
        return "no, within noise"
    return "no"


def ci_text(ci: list[float] | None) -> str | None:
    return None if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


# ---- tables ------------------------------------------------------------------------------------------
def summarise(sets: list[DataSet], rows: dict, autos: dict, default_name: str) -> list[dict]:
    sections = []
    grid = []
    draws = {data.name: bootstrap_rows(data.labels) for data in sets}
    for data in sets:
        for name, row in rows[data.name].items():
            grid.append({"set": data.name, "config": name, "image AUROC": row["image_auroc"],
                         "95% interval": ci_text(auroc_interval(data.labels, row, draws[data.name])),
                         "pixel AUROC": row["pixel_auroc"], "AUPRO": row["aupro"], "fit s": row["fit_s"],
                         "score s/image": row["score_s_per_image"], "bank rows": row["bank_rows"],
                         "border/inner": row.get("border_ratio")})
    sections.append({"title": "Data set x configuration (test split)", "rows": grid,
                     "notes": ["image / pixel AUROC and AUPRO (to FPR 0.3) on each set's test split; fit s = "
                               "features of every train image + the detector's fit; one process, torch 1 thread",
                               "border/inner: on the nominal test images, the map's mean in a band along the "
                               "border (1/16 of the shorter side) over its mean inside",
                               f"95% interval: of the image AUROC, {BOOTSTRAP_DRAWS} stratified bootstrap draws of "
                               "the test images"]})
    verdicts = []
    for data in sets:
        results = rows[data.name]
        best = max(results, key=lambda n: results[n]["image_auroc"])
        line = {"set": data.name, "size": data.size, "train": len(data.train), "test": len(data.test),
                "best config": best, "best": results[best]["image_auroc"],
                "--no-auto": results[default_name]["image_auroc"],
                "--no-auto gap": results[best]["image_auroc"] - results[default_name]["image_auroc"]}
        if data.name in autos:
            auto = autos[data.name]
            picked = results[auto["chosen"]]
            gap = results[best]["image_auroc"] - picked["image_auroc"]
            gap_ci = gap_interval(data.labels, results[best], picked, draws[data.name])
            line.update({"auto picks": auto["chosen"], "auto": picked["image_auroc"], "auto gap": gap,
                         "gap 95% interval": ci_text(gap_ci), f"auto within {GAP}": verdict(gap, gap_ci),
                         "auto s": auto["seconds"]})
        verdicts.append(line)
    sections.append({"title": f"Per set: best configuration, --auto (the default) and --no-auto ({default_name})",
                     "rows": verdicts,
                     "notes": [f"gap = best image AUROC - this one's; the bar is {GAP}",
                               "gap 95% interval: paired bootstrap (the same resampled test images for both); "
                               f"'no, within noise': above {GAP}, but the interval reaches {GAP}: this test set "
                               "cannot tell the pick from the best",
                               "auto s: the probe's time (fits and scores each candidate on up to 80 train images "
                               "and 32 probes with their synthetic-defect twins), on top of the chosen fit"]})
    def over_sets(label: str, picks: dict) -> dict:
        """How the configuration picked on each set (``picks``: set name -> config name) fared."""
        values, gaps, set_verdicts = [], [], []
        for d in sets:
            results = rows[d.name]
            best = max(results, key=lambda n: results[n]["image_auroc"])
            picked = results[picks[d.name]]
            gap = results[best]["image_auroc"] - picked["image_auroc"]
            values.append(picked["image_auroc"])
            gaps.append(gap)
            set_verdicts.append(verdict(gap, gap_interval(d.labels, results[best], picked, draws[d.name])))
        return {"config": label, "worst image AUROC": min(values), "mean": float(np.mean(values)),
                "worst gap": max(gaps), "sets within gap": set_verdicts.count("yes"),
                "sets within gap or noise": set_verdicts.count("yes") + set_verdicts.count("no, within noise")}

    everywhere = [name for name in rows[sets[0].name] if all(name in rows[d.name] for d in sets)]
    worst = [over_sets(name, {d.name: name for d in sets}) for name in everywhere]
    if autos and len(autos) == len(sets):
        worst.append(over_sets("--auto (default)", {d.name: autos[d.name]["chosen"] for d in sets}))
    sections.append({"title": "Each configuration over all sets (chosen by the worst set, not the mean)",
                     "rows": sorted(worst, key=lambda r: r["worst gap"]),
                     "notes": [f"within gap or noise: within {GAP} of the set's best, or the paired-bootstrap "
                               f"interval of the gap reaches {GAP}"]})
    probes = [{"set": name, **row, "chosen": row["candidate"] == auto["picked"]}
              for name, auto in autos.items() for row in auto["probe"]]
    if probes:
        sections.append({"title": "--auto's probe (synthetic defects on held-out train images; no labels)",
                         "rows": probes})
    return sections


def main() -> None:
    import eval_sets
    from patchwatch.anomaly.selection import default_candidates
    from patchwatch.anomaly.tiling import TilingConfig

    parser = common.base_parser(__doc__, "generalisation")
    parser.add_argument("--work", default="/tmp/evalsets", help="where the sets and the row cache live")
    parser.add_argument("--sets", default=",".join(eval_sets.SETS), help="comma-separated (default: all)")
    parser.add_argument("--configs", default=None, help="comma-separated configuration names (default: all)")
    parser.add_argument("--scale", type=float, default=1.0, help="image counts of the built sets x this")
    parser.add_argument("--mtd-limit", type=int, default=None, help="MTD: N train and N test images (default all)")
    parser.add_argument("--no-auto", action="store_true", help="skip --auto's probe")
    parser.add_argument("--probe-extra", default=None, metavar="CONFIG[,CONFIG]",
                        help="configurations the probe also compares, after --auto's own candidates (what --auto "
                             "would pick if they were candidates; the product's candidates are unchanged)")
    parser.add_argument("--probe-only", action="store_true",
                        help="only --auto's probe and its picks (no test rows): writes NAME-probe.md")
    args = parser.parse_args()
    started = time.perf_counter()
    work = Path(args.work)
    configs = configurations()
    default_name = default_configuration(configs)
    wanted = args.configs.split(",") if args.configs else list(configs)
    # --auto is scored by the test metrics of the candidate it picks: all candidates are measured
    required = [default_name] + ([] if args.no_auto else [c.name for c in default_candidates()])
    wanted = [] if args.probe_only else list(dict.fromkeys([*required, *wanted]))
    extra_probe = [name for name in (args.probe_extra.split(",") if args.probe_extra else [])
                   if name not in {c.name for c in default_candidates()}]
    unknown = [name for name in extra_probe if name not in configs]
    if unknown:
        raise SystemExit(f"--probe-extra: unknown configuration(s) {', '.join(unknown)}; known: {', '.join(configs)}")
    tiling = TilingConfig()
    sets = load_sets(args.sets.split(","), work, args.scale, args.mtd_limit)
    digest, auto_digest = source_digest(ROW_SOURCES), source_digest(AUTO_SOURCES)
    rows, autos, native_shapes = {}, {}, {}
    for data in sets:
        rows[data.name] = {}
        for name in wanted:
            candidate = for_set(configs[name], data, tiling)
            if candidate.features.fixed_shape:
                native_shapes.setdefault(name, {})[data.name] = "x".join(map(str, candidate.features.fixed_shape))
            row = measured_row(work, data, candidate, tiling, digest)
            rows[data.name][name] = row
            print(f"  {data.name} / {name}: image {row['image_auroc']:.3f} pixel {row['pixel_auroc']:.3f} "
                  f"AUPRO {row['aupro']:.3f} fit {row['fit_s']:.0f} s{' (cached)' if row['cached'] else ''}",
                  flush=True)
        if not args.no_auto:
            # --probe-extra: more configurations after --auto's own, to see what the probe makes of them
            candidates = default_candidates() + [configs[name] for name in extra_probe]
            autos[data.name] = cached(work, [CACHE_VERSION, "auto", "fit's sample", data.key, [c.describe() for c in candidates],
                                             tiling.to_dict(), auto_digest],
                                      lambda: run_auto(data, candidates, tiling))
            autos[data.name] = with_choice(autos[data.name], data)
            chosen = autos[data.name]["chosen"]
            if chosen not in rows[data.name]:  # the pick with mirror images: measured as any configuration
                picked = autos[data.name]["picked"]
                candidate = for_set(configs[picked].with_mirrors(autos[data.name]["mirrors"], chosen), data, tiling)
                rows[data.name][chosen] = measured_row(work, data, candidate, tiling, digest)
            print(f"  {data.name} / --auto picks {chosen} ({autos[data.name]['seconds']:.0f} s)", flush=True)
    meta = {"command": common.command_line(), "date": common.utc_now(), "machine": common.machine_info(),
            "wall_s": time.perf_counter() - started, "measures_memory": False,
            "parameters": {"sets": [d.name for d in sets], "scale": args.scale, "mtd_limit": args.mtd_limit,
                           "configs": {n: configs[n].describe() for n in wanted},
                           "input size per set (set from its train images)": native_shapes}}
    if args.probe_only:
        picks = [{"set": name, "picks": auto["chosen"], "reason": auto["reason"], "probe images": auto["probe_images"],
                  "probe s": auto["seconds"]} for name, auto in autos.items()]
        probes = [{"set": name, **row} for name, auto in autos.items() for row in auto["probe"]]
        common.report(args.out, f"{args.name}-probe", "--auto's probe and its picks (no test rows)", meta,
                      [{"title": "--auto's pick per set", "rows": picks}, {"title": "Probe per candidate", "rows": probes}])
        return
    common.report(args.out, args.name, "Detection quality across kinds of data", meta,
                  summarise(sets, rows, autos, default_name))


if __name__ == "__main__":
    main()
