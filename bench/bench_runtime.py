"""The backbone's inference runtimes on the CPU: torch eager, ONNX Runtime, OpenVINO (fp32).

One process, one thread everywhere (torch.set_num_threads(1), each runtime's intra-op threads 1),
the default backbone stages (EfficientNet-Lite0, stages 3 and 4), random normalised inputs.

1. Forward pass per input shape: 256 x 256, 512 x 512 (the issue's), and MTD-like shapes (the
   most common network inputs of MTD's images at input_scale 0.5 and the 0.25 context scale).
   Each runtime in two shape policies: "dynamic" (one session for every shape) and "fixed" (a
   session compiled for the shape). Interleaved: each round runs every variant once, in turn;
   medians over ``--rounds``. Max |difference| to torch's maps.
2. Compile cost of one fixed-shape session (what the "fixed" policy pays once per shape).
3. Batching: 8 equal-size inputs as one batch against one at a time (ONNX Runtime, per image),
   and whether any output differs.
4. MTD images end to end: ``PatchFeatureExtractor.extract`` (PatchCore's default features: two
   backbone passes per image) over ``--images`` MTD test images, ``--passes`` times, per runtime and
   shape policy (compiles included where paid, as on a long-lived worker); and image scores from one model
   (fitted with torch on ``--train`` MTD train images) scored with each runtime: max difference.
   Where a GPU exists (``torch.cuda.is_available()``), torch on CUDA is one more variant of section 4.

:func:`measure` runs the sections and :func:`sections` makes their tables (bench_throughput.py
calls both with smaller sizes).
Usage: python bench/bench_runtime.py [--rounds 7] [--images 50] [--train 30] [--passes 3] [--out bench/results]
"""
from __future__ import annotations

import collections
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import base_parser, command_line, machine_info, report, select_records, utc_now  # noqa: E402

SHAPES = [(256, 256), (512, 512), (144, 64), (160, 256), (128, 304), (72, 32)]


def forward_times(rounds: int, runtimes: list[str]) -> tuple[list[dict], list[dict]]:
    import torch

    from patchwatch.anomaly.backbone import create_backbone
    from patchwatch.anomaly.runtime import OnnxRuntimeStages, OpenVinoStages, TorchStages, exported_onnx

    model = create_backbone("tf_efficientnet_lite0", features_only=True, out_indices=(3, 4))
    path = exported_onnx(model, "tf_efficientnet_lite0", (3, 4), Path(tempfile.mkdtemp(prefix="bench-runtime-")))
    classes = {"onnxruntime": OnnxRuntimeStages, "openvino": OpenVinoStages}
    dynamic = {name: classes[name](path, 1, "dynamic") for name in runtimes}
    reference = TorchStages(model)
    rows, compile_rows = [], []
    for shape in SHAPES:
        inputs = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(0))
        variants = {"torch": reference}
        compile_row = {"input (h x w)": f"{shape[0]} x {shape[1]}"}
        for name in runtimes:
            started = time.perf_counter()
            fixed = dynamic[name]._compile((1, 3, *shape))
            compile_row[f"{name} compile ms"] = (time.perf_counter() - started) * 1000
            variants[f"{name} dynamic"] = lambda x, s=dynamic[name]: s._run(s.dynamic, x.numpy())
            variants[f"{name} fixed"] = lambda x, s=dynamic[name], f=fixed: s._run(f, x.numpy())
        compile_rows.append(compile_row)
        expected = [m.numpy() for m in reference(inputs)]
        error = {}
        for variant, run in variants.items():
            got = run(inputs)
            error[variant] = max(float(np.abs(np.asarray(g) - e).max()) for g, e in zip(got, expected))
        times = collections.defaultdict(list)
        for _ in range(rounds):
            for variant, run in variants.items():
                started = time.perf_counter()
                run(inputs)
                times[variant].append(time.perf_counter() - started)
        torch_ms = float(np.median(times["torch"])) * 1000
        row = {"input (h x w)": f"{shape[0]} x {shape[1]}", "torch ms": torch_ms}
        for variant in variants:
            if variant != "torch":
                row[f"{variant} ms"] = float(np.median(times[variant])) * 1000
        for variant in variants:
            if variant != "torch":
                row[f"torch ÷ {variant}"] = torch_ms / row[f"{variant} ms"]
        row["max |diff| to torch"] = max(error.values())
        rows.append(row)
        print(row, flush=True)
    return rows, compile_rows


def batching(rounds: int) -> list[dict]:
    import torch

    from patchwatch.anomaly.backbone import create_backbone
    from patchwatch.anomaly.runtime import OnnxRuntimeStages, exported_onnx

    model = create_backbone("tf_efficientnet_lite0", features_only=True, out_indices=(3, 4))
    path = exported_onnx(model, "tf_efficientnet_lite0", (3, 4), Path(tempfile.mkdtemp(prefix="bench-runtime-")))
    stages = OnnxRuntimeStages(path, 1, "fixed")
    rows = []
    for shape in [(144, 64), (256, 256)]:
        batch = torch.randn(8, 3, *shape, generator=torch.Generator().manual_seed(1)).numpy()
        single_session = stages._compile((1, 3, *shape))
        batch_session = stages._compile((8, 3, *shape))
        one_by_one = lambda: [stages._run(single_session, batch[i:i + 1]) for i in range(8)]  # noqa: E731
        together = lambda: stages._run(batch_session, batch)  # noqa: E731
        singles, batched = one_by_one(), together()
        differs = max(float(np.abs(singles[i][j][0] - batched[j][i]).max()) for i in range(8) for j in range(2))
        times = collections.defaultdict(list)
        for _ in range(rounds):
            for name, run in (("one at a time", one_by_one), ("batch of 8", together)):
                started = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - started) / 8)
        single_ms, batch_ms = (float(np.median(times[n])) * 1000 for n in ("one at a time", "batch of 8"))
        rows.append({"input (h x w)": f"{shape[0]} x {shape[1]}", "one at a time ms/image": single_ms,
                     "batch of 8 ms/image": batch_ms, "batch ÷ one at a time": batch_ms / single_ms,
                     "max |diff| batch vs one at a time": differs})
        print(rows[-1], flush=True)
    return rows


def mtd_end_to_end(split: str, images: int, train: int, passes: int, runtimes: list[str]) -> tuple[list[dict], dict]:
    from patchwatch.anomaly.detectors import default_features, detector_config
    from patchwatch.anomaly.engine import fit_detector, score_image
    from patchwatch.anomaly.features import PatchFeatureExtractor
    from sklearn.metrics import roc_auc_score

    from patchwatch.storage.images import read_image

    config = default_features("patchcore")
    records = select_records(split, "test", images or None)
    test = [read_image(r.uri) for r in records]
    defective = np.array([r.label != "good" for r in records])
    nominal = [read_image(r.uri) for r in select_records(split, "train", train)]
    extractors = {"torch": PatchFeatureExtractor(config, runtime="torch")}
    for name in runtimes:
        for shapes in ("dynamic", "fixed"):
            extractors[f"{name} {shapes}"] = PatchFeatureExtractor(config, runtime=name, shapes=shapes)
    if gpu_name():
        extractors["torch cuda"] = PatchFeatureExtractor(config, device="cuda", runtime="torch")
    seconds = collections.defaultdict(list)
    for _ in range(passes):  # interleaved: every variant once per pass
        for name, extractor in extractors.items():
            started = time.perf_counter()
            extractor.extract(test)
            seconds[name].append(time.perf_counter() - started)
    detector = fit_detector("patchcore", detector_config("patchcore"), extractors["torch"].extract(nominal))
    scores = {name: np.array([score_image(e, detector, image, None).score for image in test])
              for name, e in extractors.items()}
    per_image = {name: float(np.sum(times)) / (passes * len(test)) * 1000 for name, times in seconds.items()}
    rows = []
    for name, extractor in extractors.items():
        difference = np.abs(scores[name] - scores["torch"])
        fixed = getattr(extractor.stages, "fixed", {})
        rows.append({"runtime": name, "first pass ms/image": seconds[name][0] / len(test) * 1000,
                     "all passes ms/image": per_image[name], "torch ÷ runtime (all passes)": per_image["torch"] / per_image[name],
                     "fixed-shape sessions": len(fixed),
                     "max |score diff| to torch": float(difference.max()),
                     "max relative score diff": float((difference / np.abs(scores["torch"])).max()),
                     "image AUROC": roc_auc_score(defective, scores[name]) if 0 < defective.sum() < len(test) else None})
        print(rows[-1], flush=True)
    shapes = collections.Counter(extractors["torch"].input_shape(*image.shape[:2]) for image in test)
    return rows, {"test images": len(test), "train images (model of the score check)": len(nominal),
                  "GPU": gpu_name() or "none (torch.cuda.is_available() is False): torch on CUDA not measured",
                  "passes over the test images": passes,
                  "distinct primary input shapes": len(shapes), "most common shape's images": max(shapes.values()),
                  "score range (torch)": [round(float(scores["torch"].min()), 3), round(float(scores["torch"].max()), 3)]}


def gpu_name() -> str | None:
    """The GPU torch would use, or None where ``torch.cuda.is_available()`` is False."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def measure(split: str, rounds: int = 7, images: int = 50, train: int = 30, passes: int = 3,
            batch: bool = True) -> dict:
    """Sections 1-4 (3 only with ``batch``), one thread everywhere: their rows and facts."""
    import torch

    torch.set_num_threads(1)  # as on the Dask workers
    runtimes = [r for r in ("onnxruntime", "openvino") if importlib.util.find_spec(r)]
    forward, compiles = forward_times(rounds, runtimes)
    batch_rows = batching(rounds) if batch else None
    mtd_rows, mtd_facts = mtd_end_to_end(split, images, train, passes, runtimes)
    return {"forward": forward, "compiles": compiles, "batching": batch_rows, "mtd": mtd_rows, "facts": mtd_facts,
            "parameters": {"rounds": rounds, "threads": 1, "backbone": "tf_efficientnet_lite0, stages (3, 4)",
                           "runtime versions": {name: __import__(name).__version__ for name in runtimes},
                           **mtd_facts}}


def sections(result: dict) -> list[dict]:
    """The tables of :func:`measure`'s result, with their notes."""
    facts = result["facts"]
    batch = [] if result["batching"] is None else [
        {"title": "Batching equal-size inputs (ONNX Runtime, fixed shapes)", "rows": result["batching"],
         "notes": ["per image; one at a time = a batch-1 session, batch of 8 = a batch-8 session"]}]
    return [
        {"title": "Forward pass per input, 1 thread (median ms; ratios: torch's time ÷ the runtime's)",
         "rows": result["forward"],
         "notes": ["interleaved: each round runs every variant once; batch 1; random N(0, 1) inputs",
                   "dynamic: one session for every shape; fixed: a session compiled for this shape (from the "
                   "same exported file: ONNX Runtime free-dimension overrides, OpenVINO reshape)",
                   "OpenVINO with INFERENCE_PRECISION_HINT f32 (its CPU default may be bf16)",
                   "max |diff| to torch: over both stage maps and every variant (maps reach ~20)"]},
        {"title": "Compile time of one fixed-shape session", "rows": result["compiles"],
         "notes": ["paid once per input shape by the 'fixed' policy (at a shape's COMPILE_AFTER-th call, for at most "
                   "patchwatch.anomaly.runtime.FIXED_SHAPES shapes per process)"]},
        *batch,
        {"title": f"MTD test images end to end ({facts['test images']} images, PatchCore's default features)",
         "rows": result["mtd"],
         "notes": ["ms/image: PatchFeatureExtractor.extract over the images (resize, normalise, two backbone "
                   "passes, patch pooling), --passes times, every variant in turn each pass; "
                   "each variant's extractor (and its compiled sessions) kept from pass to pass, as on a worker",
                   "fixed: a shape gets its own session at its COMPILE_AFTER-th call (compile time included in "
                   "the pass that paid it); dynamic: one session",
                   "scores: one PatchCore model fitted on torch features of the train images, each test image "
                   "scored (score_image) with each runtime's extractor",
                   f"GPU: {facts['GPU']}"]},
    ]


def main() -> None:
    parser = base_parser(__doc__, "runtime")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=50, help="MTD test images for section 4, spread over the test rows (0: all)")
    parser.add_argument("--train", type=int, default=30, help="MTD train images the section 4 model is fitted on")
    parser.add_argument("--passes", type=int, default=3, help="passes over the section 4 test images")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # before machine_info, which records it
    started, machine = time.perf_counter(), machine_info()
    result = measure(args.split, args.rounds, args.images, args.train, args.passes)
    meta = {"command": command_line(), "date": utc_now(), "machine": machine, "measures_memory": False,
            "wall_s": time.perf_counter() - started, "parameters": result["parameters"]}
    report(args.out, args.name, "Backbone runtimes on the CPU: torch eager, ONNX Runtime, OpenVINO fp32", meta,
           sections(result))


if __name__ == "__main__":
    main()
