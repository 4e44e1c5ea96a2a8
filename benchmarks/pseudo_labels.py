"""SimLAP without labels (appendix C, Table 4): SimCLR -> k-means pseudo labels -> SimLAP and SupCon, synthetic set.

    python benchmarks/pseudo_labels.py                                   # ResNet-18, 3 epochs, seeds 0 1 2
    python benchmarks/pseudo_labels.py --arch resnet18 --epochs 10 --seeds 0 1 --clusters 32
    python benchmarks/pseudo_labels.py --smoke                           # tiny and quick, for CI

The README's three-step recipe, every step train.py or eval.py itself (called in-process), with one budget for
every training run (--arch, --epochs, --batch-size, AdamW at --lr, --per-class images per class, --image-size):
    1. SimCLR            train.py with METHODS["SimCLR"]: no labels used
    2. cluster           eval.py --checkpoint <SimCLR>/checkpoint.pt --kmeans K: K pseudo labels from its backbone
                         features (train split, eval transform); NMI and purity against the true labels
    3. SimLAP, SupCon    train.py with METHODS[...] --labels <SimCLR>/pseudo_labels_K.pt, from scratch
    reference rows       SimLAP and SupCon on the true labels (--no-true-labels skips them)
Every run is then measured by eval.py on its backbone: kNN top-1 with k = 10 (the paper's Table 4) and k = 20, and
the linear probe, on the synthetic test split with the true labels (bank / probe training set = the training
images). Reported as mean ± std (n-1) over seeds; the paper's Table 4 (ImageNet, 200 epochs) has SimLAP above
SupCon on pseudo labels on all four transfer sets, both below SimCLR's encoder on CIFAR.
Runs go to --runs-dir/<row>-seed<s>/; a finished run is reused (train.py resumes from its checkpoint), so an
interrupted benchmark continues where it stopped. Delete that folder after changing a flag.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as evaluation  # noqa: E402  (eval.py; renamed: eval is a builtin)
import train  # noqa: E402
from common import add_output_flags, machine_info, write_json  # noqa: E402  (benchmarks/common.py)

METHODS = {"SimCLR": ["--method", "simclr"], "SupCon": ["--method", "supcon"], "SimLAP": ["--method", "simlap"]}
ROWS = (("SimCLR", "none"), ("SupCon", "pseudo"), ("SimLAP", "pseudo"), ("SupCon", "true"), ("SimLAP", "true"))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="backbone of every run (default: resnet18)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    p.add_argument("--epochs", type=int, default=3, help="epochs of every training run (default: 3)")
    p.add_argument("--batch-size", type=int, default=64, help="default: 64")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    p.add_argument("--per-class", type=int, default=100, help="training images per synthetic class (default: 100)")
    p.add_argument("--image-size", type=int, default=16, help="default: 16")
    p.add_argument("--proj-hidden", type=int, default=2048, help="default: 2048")
    p.add_argument("--proj-dim", type=int, default=256, help="default: 256")
    p.add_argument("--clusters", type=int, default=16, help="K pseudo classes (default: 16, the true number)")
    p.add_argument("--kmeans-iters", type=int, default=20, help="default: 20")
    p.add_argument("--no-true-labels", action="store_true", help="skip the reference rows on the true labels")
    p.add_argument("--probe-iters", type=int, default=300, help="L-BFGS iterations of eval.py's probe (default: 300)")
    p.add_argument("--workers", type=int, default=2, help="data loader workers (default: 2)")
    p.add_argument("--runs-dir", default=os.path.join(ROOT, "benchmarks", "results", "pseudo_labels"),
                   help="default: benchmarks/results/pseudo_labels (pseudo_labels_smoke with --smoke)")
    add_output_flags(p, "pseudo_labels", "1 seed, 1 epoch, 8 px, 4 images per class, no true-label rows (for CI)",
                     threads=False)
    args = p.parse_args()
    if args.smoke:
        args.seeds, args.epochs, args.batch_size, args.per_class, args.image_size = [0], 1, 16, 4, 8
        args.proj_hidden, args.proj_dim, args.workers, args.probe_iters, args.no_true_labels = 64, 32, 0, 20, True
        args.runs_dir = os.path.join(ROOT, "benchmarks", "results", "pseudo_labels_smoke")
    return args


def train_argv(args, method, seed, out_dir, labels=None):
    return ["--arch", args.arch, "--synthetic-per-class", str(args.per_class), "--image-size", str(args.image_size),
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--optimizer", "adamw",
            "--base-lr", str(args.lr * 256 / args.batch_size),  # train.py scales by batch / 256
            "--proj-hidden", str(args.proj_hidden), "--proj-dim", str(args.proj_dim), "--workers", str(args.workers),
            "--seed", str(seed), "--knn-every", "0", "--output-dir", out_dir, *METHODS[method],
            *(["--labels", labels] if labels else [])]


def run(args, method, labels, seed, label_file=None):
    """Train one row (or reuse it) and evaluate its backbone; the SimCLR row also clusters (step 2)."""
    out_dir = os.path.join(args.runs_dir, f"{method}-{labels}-seed{seed}")
    tic = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # progress to stderr, the table to stdout
        train.main(train_argv(args, method, seed, out_dir, label_file))
        train_s = time.time() - tic
        cluster = ["--kmeans", str(args.clusters), "--kmeans-iters", str(args.kmeans_iters)] if labels == "none" else []
        res = evaluation.main(["--checkpoint", os.path.join(out_dir, "checkpoint.pt"), "--workers", str(args.workers),
                               "--probe-iters", str(args.probe_iters), "--no-figures", *cluster])
    row = {"method": method, "labels": labels, "seed": seed, "train_s": train_s, "eval_s": time.time() - tic - train_s,
           "knn10": res["knn"]["k=10 T=0.07"], "knn20": res["knn"]["k=20 T=0.07"],
           "probe": res["linear_probe"]["test_top1"]}
    if "kmeans" in res:
        row.update(label_file=res["kmeans"]["file"], nmi=res["kmeans"]["nmi"], purity=res["kmeans"]["purity"])
    return row


def summary(rows):
    """One line per (method, labels): mean ± std over seeds."""
    out = {}
    for key in dict.fromkeys((r["method"], r["labels"]) for r in rows):
        mine = [r for r in rows if (r["method"], r["labels"]) == key]
        out[" / ".join(key)] = {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                                for k in ("knn10", "knn20", "probe", "nmi", "purity")
                                if (v := [r[k] for r in mine if k in r])}
    return out


def markdown_table(summ, nmi):
    lines = ["| method | labels | kNN k=10 % | kNN k=20 % | linear probe % |", "|---|---|---|---|---|"]
    pm = lambda s, k: "{:.1f} ± {:.1f}".format(*s[k])  # noqa: E731
    for name, s in summ.items():
        method, labels = name.split(" / ")
        labels = {"none": "none (SimCLR)", "pseudo": f"pseudo, K-means on SimCLR (NMI {nmi})", "true": "true"}[labels]
        lines.append(f"| {method} | {labels} | {pm(s, 'knn10')} | {pm(s, 'knn20')} | {pm(s, 'probe')} |")
    return "\n".join(lines)


def main():
    args = parse_args()
    info = machine_info(torch.device("cpu"))
    print(json.dumps(info), flush=True)
    rows, tic = [], time.time()
    for seed in args.seeds:  # seed-major: a partial run still has every row for the first seeds
        simclr = run(args, "SimCLR", "none", seed)  # steps 1 and 2
        rows.append(simclr)
        print(json.dumps(rows[-1]), flush=True)
        for method, labels in ROWS[1:]:
            if labels == "true" and args.no_true_labels:
                continue
            rows.append(run(args, method, labels, seed, simclr["label_file"] if labels == "pseudo" else None))
            print(json.dumps(rows[-1]), flush=True)
    summ, wall = summary(rows), time.time() - tic
    s = summ["SimCLR / none"]
    nmi = "{:.3f} ± {:.3f}".format(*s["nmi"])
    print(f"\n{info['summary']}, torch {info['torch']}; {args.arch}, {len(args.seeds)} seeds, {args.epochs} epochs, "
          f"batch {args.batch_size}, {args.image_size} px, K = {args.clusters} (purity {s['purity'][0]:.3f}), "
          f"{wall / 60:.1f} min in all\n\n{markdown_table(summ, nmi)}")
    write_json(args, "pseudo_labels", {"machine": info, "args": vars(args), "wall_s": wall, "runs": rows,
                                       "summary": summ})


if __name__ == "__main__":
    main()
