"""The GPU check: on a machine with one NVIDIA GPU, one command measures what has been measured on the CPU only, in
about 8 minutes, and writes a markdown table and a JSON.

    python benchmarks/gpu_check.py               # one NVIDIA GPU: the parts below, each within its time limit
    python benchmarks/gpu_check.py --cpu-smoke   # the same code path on the CPU at toy sizes (CI; figures mean nothing)

Each part runs in its own process, through the script that measures it (common.run_child), one after the other:
  demo    torchrun --standalone --nproc-per-node 1 train.py --precision auto --compile: the demo's recipe (synthetic
          shapes, convnet, 620 steps). Reported: images/s (median of log.jsonl's img_per_s after the first epoch,
          which holds the compilation), peak GPU memory (torch.cuda.max_memory_allocated), the kNN top-1 untrained ->
          trained, the wall time, and the precision train.py chose.
  step    bench_step.py: ResNet-50 at 224 px, batch 256 (two views each), bf16, channels_last: SimLAP, SimCLR, SupCon,
          SimLAP-MoCo and the bare backbone's forward + backward; step times, their ratios to SimCLR, SimLAP's step
          over the backbone's.
  fp16    bench_step.py again, SimLAP only, --amp fp16 (with GradScaler, as train.py --precision fp16): its step
          time over the bf16 step of `step` (two processes, one after the other).
  loss    bench_loss.py: B = 4096, D = 256 and 2048: SimLAP's loss and InfoNCE, time and memory.
  kmeans  bench_kmeans.py: 1 281 167 x 2048 features (ImageNet's training set), K = 1000, 20 iterations, chunk 8192.
A part that fails or outlasts its limit is reported as such and the others still run; the exit code is then 1.
Writes benchmarks/results/gpu_check.json and .md (gpu_check_smoke.* with --cpu-smoke; --out names the JSON).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import machine_info, run_child, write_json  # noqa: E402  (benchmarks/common.py)

TRAIN = os.path.join(os.path.dirname(HERE), "train.py")
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1")
METHODS = ["SimLAP", "SimCLR", "SupCon", "SimLAP-MoCo", "Backbone"]
STEP = ["--arch", "resnet50", "--image-size", "224", "--batch-size", "256", "--channels-last", "--no-augment",
        "--rounds", "5", "--steps", "5", "--warmup", "3"]
# seconds each part may take on the GPU (about 8 minutes in all); the CPU smoke run gets 10 times as long
LIMITS = {"demo": 180, "step": 90, "fp16": 45, "loss": 75, "kmeans": 60}


def demo(args, tmp):
    out = os.path.join(tmp, "demo")
    argv = ["--precision", "auto", "--compile", args.backend, "--output-dir", out, "--workers", str(args.workers)]
    if args.cpu_smoke:  # 3 epochs of 4 steps at 16 px; aot_eager: inductor's CPU code generation takes minutes
        argv += ["--synthetic-per-class", "8", "--batch-size", "32", "--image-size", "16", "--epochs", "3",
                 "--proj-hidden", "64", "--proj-dim", "32", "--knn-samples", "20", "--log-every", "2"]
    tic = time.perf_counter()
    stdout = run_child(TRAIN, argv, "the demo", launcher=TORCHRUN, result=lambda text: text,
                       timeout=args.limit("demo"))
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    knn = [r["knn_top1"] for r in log if "knn_top1" in r]
    return {"wall_s": time.perf_counter() - tic,
            "images_per_s": statistics.median(r["img_per_s"] for r in log if "img_per_s" in r and r["epoch"] >= 1),
            "peak_gib": max((r.get("peak_gib", 0.0) for r in log), default=0.0) if not args.cpu_smoke else None,
            "knn_untrained": knn[0], "knn_trained": knn[-1],
            "precision": next(line.split("precision ", 1)[1].split(", resuming")[0]
                              for line in stdout.splitlines() if ", precision " in line)}


def step(args, tmp, amp="bf16", modes=METHODS, name="step"):
    out = os.path.join(tmp, f"{name}.json")
    smoke = ["--smoke", "--device", "cpu"] if args.cpu_smoke else ["--device", "cuda"]
    run_child(os.path.join(HERE, "bench_step.py"), [*STEP, *smoke, "--amp", amp, "--modes", *modes, "--out", out],
              f"bench_step.py --amp {amp}", result=lambda _: None, timeout=args.limit(name))
    with open(out) as f:
        record = json.load(f)
    return {"results": {mode: {k: r[k] for k in ("ms_per_step", "images_per_s", "ratio_to_simclr", "peak_gib")}
                        for mode, r in record["results"].items()}, "ratios": record["ratios"],
            **{k: record["args"][k] for k in ("arch", "image_size", "batch_size")}}


def fp16(args, tmp):
    return step(args, tmp, amp="fp16", modes=["SimLAP"], name="fp16")


def loss(args, tmp):
    out = os.path.join(tmp, "loss.json")
    sizes = ["--smoke", "--device", "cpu"] if args.cpu_smoke else ["--device", "cuda", "--batch-sizes", "4096",
                                                                   "--dims", "256", "2048", "--rounds", "10"]
    run_child(os.path.join(HERE, "bench_loss.py"), [*sizes, "--max-naive-gib", "0", "--out", out], "bench_loss.py",
              result=lambda _: None, timeout=args.limit("loss"))
    with open(out) as f:
        keys = ("B", "D", "simlap_ms", "infonce_ms", "simlap_over_infonce", "simlap_mib", "infonce_mib")
        return {"rows": [{k: r[k] for k in keys} for r in json.load(f)["results"]]}


def kmeans(args, tmp):
    out = os.path.join(tmp, "kmeans.json")
    sizes = ["--smoke", "--device", "cpu"] if args.cpu_smoke else ["--device", "cuda", "--n", "1281167", "--dim",
                                                                   "2048", "--clusters", "1000", "--chunks", "8192"]
    run_child(os.path.join(HERE, "bench_kmeans.py"), [*sizes, "--out", out], "bench_kmeans.py",
              result=lambda _: None, timeout=args.limit("kmeans"))
    with open(out) as f:
        record = json.load(f)
    return {k: record["args"][k] for k in ("n", "dim", "clusters", "iters")} | {"rows": record["results"]}


PARTS = {"demo": demo, "step": step, "fp16": fp16, "loss": loss, "kmeans": kmeans}


def markdown(info, parts, smoke):
    """The tables of benchmarks/README.md, from the parts' results (a failed part: its error)."""
    out = [f"{info['summary']}, torch {info['torch']}, {info['date']}" + (", CPU smoke run: no figure" * smoke)]
    gib = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    d = parts["demo"]
    if "error" not in d:
        out += ["", "| demo (`torchrun --standalone --nproc-per-node 1 train.py --precision auto --compile`) | |",
                "|---|---|", f"| precision chosen | {d['precision']} |",
                f"| images/s (median after the first epoch) | {d['images_per_s']:.0f} |",
                f"| peak GPU memory, GiB | {gib(d['peak_gib'])} |", "| kNN top-1, untrained → trained | "
                f"{100 * d['knn_untrained']:.1f} % → {100 * d['knn_trained']:.1f} % |",
                f"| wall time, compilation and kNN monitor included | {d['wall_s']:.0f} s |"]
    s, f16 = parts["step"], parts["fp16"]
    if "error" not in s:
        out += ["", f"| step, {s['arch']} at {s['image_size']} px, batch {s['batch_size']}, bf16, channels_last | "
                "ms/step | images/s | time / SimCLR | peak GiB |", "|---|---|---|---|---|"]
        for mode, r in s["results"].items():
            ratio = "–" if r["ratio_to_simclr"] is None else f"{r['ratio_to_simclr']:.3f}"
            out.append(f"| {mode} | {r['ms_per_step']:.1f} | {r['images_per_s']:.0f} | {ratio} | "
                       f"{gib(r['peak_gib'])} |")
        out += [""] + [f"- {what}: {r:.3f}" for what, r in s["ratios"].items()]
        if "error" not in f16:
            ratio = f16["results"]["SimLAP"]["ms_per_step"] / s["results"]["SimLAP"]["ms_per_step"]
            out.append(f"- SimLAP step, fp16 with GradScaler / bf16: {ratio:.3f}")
    if "error" not in parts["loss"]:
        out += ["", "| loss, B | D | SimLAP ms | InfoNCE ms | SimLAP / InfoNCE time | SimLAP MiB | InfoNCE MiB |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['B']} | {r['D']} | {r['simlap_ms']:.2f} | {r['infonce_ms']:.2f} | "
                f"{r['simlap_over_infonce']:.2f} | {r['simlap_mib']:.0f} | {r['infonce_mib']:.0f} |"
                for r in parts["loss"]["rows"]]
    k = parts["kmeans"]
    if "error" not in k:
        out += ["", f"| k-means, N = {k['n']}, F = {k['dim']}, K = {k['clusters']}, {k['iters']} iterations: "
                "chunk | total s | iterations s | extra memory GiB | bound GiB | NMI |", "|---|---|---|---|---|---|"]
        out += [f"| {r['chunk']} | {r['total_s']:.1f} | {r['iterations_s']:.1f} | {r['extra_bytes'] / 2 ** 30:.2f} | "
                f"{r['bound_bytes'] / 2 ** 30:.2f} | {r['nmi']:.3f} |" for r in k["rows"]]
    out += [f"\n{name}: {r['error']}" for name, r in parts.items() if "error" in r]
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="the same code path on the CPU at toy sizes (for CI)")
    p.add_argument("--workers", type=int, default=None, help="the demo's loader workers (default: 8 on the GPU, 0)")
    p.add_argument("--out", default=None, help="JSON output (default: benchmarks/results/gpu_check.json, "
                   "gpu_check_smoke.json with --cpu-smoke); the markdown goes beside it (.md)")
    args = p.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        p.exit(2, "gpu_check.py: error: no CUDA GPU here; --cpu-smoke runs the same code path on the CPU\n")
    args.smoke, args.workers = args.cpu_smoke, args.workers if args.workers is not None else 0 if args.cpu_smoke else 8
    args.backend = "aot_eager" if args.cpu_smoke else "inductor"
    args.limit = lambda part: LIMITS[part] * (10 if args.cpu_smoke else 1)
    info = machine_info(torch.device("cpu" if args.cpu_smoke else "cuda"))
    parts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, part in PARTS.items():
            tic = time.perf_counter()
            try:
                parts[name] = part(args, tmp)
            except (RuntimeError, OSError, ValueError, KeyError, StopIteration) as e:
                parts[name] = {"error": " ".join(str(e).split())[-600:] or type(e).__name__}
            print(f"{name}: {time.perf_counter() - tic:.0f} s" + (" FAILED" if "error" in parts[name] else ""),
                  flush=True)
    text = markdown(info, parts, args.cpu_smoke)
    print("\n" + text)
    record = {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "limit"}, "parts": parts}
    path = write_json(args, "gpu_check", record)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(text)
    sys.exit(1 if any("error" in r for r in parts.values()) else 0)


if __name__ == "__main__":
    main()
