"""PatchCore, PaDiM and SPADE side by side on one split, in one run.

Runs ``patchwatch evaluate SPLIT --detector D`` for each detector (defaults otherwise) one after
the other and tabulates image AUROC, pixel AUROC, AUPRO, fit time, score time per image and the
model's size on disk. Usage: python bench/bench_detectors.py [--split CSV] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_OUT, DEFAULT_SPLIT, command_line, machine_info, report, utc_now  # noqa: E402

DETECTORS = ("patchcore", "padim", "spade")


def folder_size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", default=str(DEFAULT_SPLIT))
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    args = parser.parse_args()
    started, machine, rows = time.perf_counter(), machine_info(), []
    with tempfile.TemporaryDirectory(prefix="bench-detectors-") as tmp:
        for detector in args.detectors.split(","):
            out = Path(tmp) / detector
            subprocess.run([sys.executable, "-m", "patchwatch.cli", "evaluate", args.split, "--out", str(out),
                            "--detector", detector], check=True, stdout=subprocess.DEVNULL)
            metrics = json.loads((out / "results" / "metrics.json").read_text())
            timings, counts = metrics["timings"], metrics["counts"]
            rows.append({"detector": detector, "image AUROC": metrics["image_auroc"],
                         "pixel AUROC": metrics["pixel_auroc"], "AUPRO": metrics["aupro"],
                         "F1-max": metrics["f1_max"],
                         "nominal flagged": metrics["nominal_threshold"].get("nominal_flagged_rate"),
                         "defects flagged": metrics["nominal_threshold"].get("recall"), "fit s": timings["fit_s"],
                         "score s/image": timings["score_s"] / max(counts["test_images"], 1),
                         "model MiB": folder_size_mib(out / "model")})
    title = "Detectors side by side (patchwatch evaluate, defaults)"
    meta = {"command": command_line(), "date": utc_now(), "machine": machine,
            "wall_s": time.perf_counter() - started, "parameters": {"split": args.split}}
    notes = ["fit s: the fit flow end to end (listing, features on Dask, coreset or Gaussian fit, index)",
             "score s/image: the score flow end to end divided by the test images (maps written to Zarr)",
             "nominal / defects flagged: share of the test split's nominal / defective images above the "
             "threshold set from held-out nominal training images only (no labels)",
             "model MiB: the model root on disk, feature bank (Zarr) included"]
    report(args.out, "detectors", title, meta, [{"title": "MTD", "rows": rows, "notes": notes}])


if __name__ == "__main__":
    main()
