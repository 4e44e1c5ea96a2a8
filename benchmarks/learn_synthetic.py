"""Does it learn, and does it transfer? SimLAP against SupCon and SimCLR on the synthetic shapes, on a CPU budget.

    python benchmarks/learn_synthetic.py                          # 4 methods x 3 seeds + untrained, ~35 min on 2 cores
    python benchmarks/learn_synthetic.py --seeds 0 --methods SimLAP SupCon
    python benchmarks/learn_synthetic.py --smoke                  # tiny and quick, for CI

Classes are (shape, colour) pairs, id = 4 x shape + colour. Training sees 12 of the 16 classes; the 2 x 2 block
{red, green} x {circle, square} (ids 0, 1, 4, 5) is held out. Every held-out shape and colour appears in training,
only never in these combinations, and telling the 4 held-out classes apart needs both shape and colour.

Every method is train.py itself (called in-process), with the same flags except --method:
    SimLAP             --method simlap             the paper's method (arbitrary pairs, feature filter)
    SupCon             --method supcon             Khosla et al.'s L_out: positives = same class
    SimCLR             --method simclr             NT-Xent: positives = the other view
    SupCon-arbitrary   --method supcon-arbitrary   arbitrary pairs without the filter (the paper: this breaks)
    Hydra              --method hydra              NT-Xent + the SimLAP loss (not run by default)
    untrained          no training: the randomly initialised network of that seed (the floor)
Budget: ResNet-18 (small stem), 16 px, batch 64, 3 epochs over 100 images per seen class (54 steps), AdamW at
lr 1e-3. Deviation from Table 5a, on purpose: at the paper's LARS rate 54 steps barely move the weights (see the
README's demo), so this budget uses AdamW (the paper's Table 3a option), fixed before any result was seen.

Measured on backbone features (eval mode) of every run:
    seen      kNN (k=20, T=0.07; bank = the 1200 training images) and the linear probe of eval.py (L-BFGS), on
              50 fresh test images per seen class (12-way, chance 8.3 %)
    unseen    the same kNN and probe for the 4 held-out classes: bank / probe training set = 100 images per class,
              test = 50 per class (4-way, chance 25 %). No network weight ever saw these classes.
    rank      effective rank (eval.py) of the seen-test embeddings, backbone (of 512) and projector (of --proj-dim)
    gates     SimLAP, Hydra and untrained (its filter at step 0): eval.py's gate overlap for seen class pairs
              sharing an attribute against pairs sharing none
Reported as mean ± std (n-1) over seeds. Runs go to benchmarks/results/learn_synthetic/<method>-seed<s>/; a finished
run is reused (train.py resumes from its checkpoint), so an interrupted benchmark continues where it stopped.
Delete that folder to start over after changing a flag.
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
import simlap  # noqa: E402
import train  # noqa: E402
from common import add_output_flags, machine_info, write_json  # noqa: E402  (benchmarks/common.py)

UNSEEN = (0, 1, 4, 5)  # {red, green} x {circle, square}
SEEN = tuple(i for i in range(16) if i not in UNSEEN)
METHODS = {"SimLAP": "simlap", "SupCon": "supcon", "SimCLR": "simclr", "SupCon-arbitrary": "supcon-arbitrary",
           "Hydra": "hydra"}  # name -> train.py --method
DEFAULT_METHODS = ["SimLAP", "SupCon", "SimCLR", "SupCon-arbitrary"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS),
                   help=f"methods to train (default: {' '.join(DEFAULT_METHODS)}); the untrained floor is always "
                        "measured")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    p.add_argument("--epochs", type=int, default=3, help="default: 3")
    p.add_argument("--batch-size", type=int, default=64, help="default: 64")
    p.add_argument("--per-class", type=int, default=100, help="training images per seen class (default: 100)")
    p.add_argument("--image-size", type=int, default=16, help="default: 16")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    p.add_argument("--proj-hidden", type=int, default=2048, help="default: 2048")
    p.add_argument("--proj-dim", type=int, default=256, help="default: 256")
    p.add_argument("--eval-per-class", type=int, default=50,
                   help="test images per class, seen and unseen; the unseen bank gets twice as many (default: 50)")
    p.add_argument("--workers", type=int, default=2, help="data loader workers (default: 2)")
    p.add_argument("--runs-dir", default=os.path.join(ROOT, "benchmarks", "results", "learn_synthetic"),
                   help="default: benchmarks/results/learn_synthetic (learn_synthetic_smoke with --smoke)")
    add_output_flags(p, "learn_synthetic", "1 seed, 1 epoch, 8 px, 4 images per class (for CI)", threads=False)
    args = p.parse_args()
    results = os.path.join(ROOT, "benchmarks", "results")
    if args.smoke:
        args.seeds, args.epochs, args.batch_size, args.per_class, args.image_size = [0], 1, 16, 4, 8
        args.proj_hidden, args.proj_dim, args.eval_per_class, args.workers = 64, 32, 10, 0
        args.runs_dir = os.path.join(results, "learn_synthetic_smoke")
    return args


def train_argv(args, method, seed, out_dir):
    return ["--synthetic-classes", ",".join(map(str, SEEN)), "--synthetic-per-class", str(args.per_class),
            "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--optimizer", "adamw", "--base-lr", str(args.lr * 256 / args.batch_size),  # train.py scales by batch
            "--proj-hidden", str(args.proj_hidden), "--proj-dim", str(args.proj_dim), "--workers", str(args.workers),
            "--seed", str(seed), "--knn-every", "0", "--output-dir", out_dir, "--method", METHODS[method]]


def eval_sets(args):
    """(seen bank, seen test, unseen bank, unseen test), eval transform, labels re-indexed within each subset."""
    t = simlap.eval_transform(args.image_size)
    shapes = lambda split, n, classes: simlap.SyntheticShapes(split, n, classes=classes, transform=t)  # noqa: E731
    return (simlap.build_dataset("synthetic", None, "train", t, synthetic_per_class=args.per_class,
                                 synthetic_classes=list(SEEN)),  # exactly the images train.py trained on
            shapes("test", args.eval_per_class, SEEN), shapes("train", 2 * args.eval_per_class, UNSEEN),
            shapes("test", args.eval_per_class, UNSEEN))


def measure(model, sets, gates):
    """Every number of one run, from the backbone features of the four eval sets."""
    loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=256)  # noqa: E731
    cpu = torch.device("cpu")
    (fb, yb), (ft, yt), (ub, uyb), (ut, uyt) = [simlap.extract_features(model.backbone, loader(ds), cpu) for ds in sets]
    knn = lambda bank, bank_y, q, y: 100 * (simlap.knn_classify(bank, bank_y, q, 20, 0.07) == y).float().mean().item()  # noqa: E731
    probe = lambda *f: evaluation.linear_probe(*f)["test_top1"]  # noqa: E731
    with torch.no_grad():
        proj = model.projector.eval()(ft)
    out = {"seen_knn": knn(fb, yb, ft, yt), "seen_probe": probe(fb, yb, ft, yt),
           "unseen_knn": knn(ub, uyb, ut, uyt), "unseen_probe": probe(ub, uyb, ut, uyt),
           "rank_backbone": evaluation.effective_rank(evaluation.singular_values(ft)),
           "rank_projector": evaluation.effective_rank(evaluation.singular_values(proj))}
    if gates:
        attributes = simlap.SyntheticShapes("train", 1, classes=SEEN).attributes
        g = evaluation.gate_analysis(evaluation.class_gates(model.filter), attributes=attributes)
        out.update(gate_overlap_shared=g["overlap_shared_attribute"], gate_overlap_none=g["overlap_no_shared_attribute"],
                   gate_open=g["mean_open_dims"])
    return out


def run(args, method, seed, sets):
    out_dir = os.path.join(args.runs_dir, f"{method}-seed{seed}")
    tic = time.time()
    if method == "untrained":  # the same constructor and seed as train.py's model, never trained
        torch.manual_seed(seed)
        model = simlap.SimLAP("resnet18", len(SEEN), True, args.image_size, args.proj_hidden, args.proj_dim)
        gates = True  # its filter is SimLAP's at step 0 (the baselines build the same weights and leave them unused)
    else:
        with contextlib.redirect_stdout(sys.stderr):  # train.py's progress goes to stderr, the table to stdout
            train.main(train_argv(args, method, seed, out_dir))  # resumes (or skips) a run already there
        _, model, info = evaluation.load_weights(os.path.join(out_dir, "checkpoint.pt"))
        gates = info["method"] in simlap.FILTER_METHODS
    train_s = time.time() - tic
    res = {"method": method, "seed": seed, "train_s": train_s, **measure(model, sets, gates)}
    res["eval_s"] = time.time() - tic - train_s
    return res


def summary(rows):
    """One line per method: mean ± std over seeds of every metric."""
    keys = ("seen_knn", "seen_probe", "unseen_knn", "unseen_probe", "rank_backbone", "rank_projector",
            "gate_overlap_shared", "gate_overlap_none")
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        out[method] = {"seeds": len(mine)}
        for k in keys:
            v = [r[k] for r in mine if k in r]
            if v:
                out[method][k] = (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
    return out


def markdown_table(summ):
    lines = ["| method | seen kNN % | seen probe % | unseen kNN % | unseen probe % | eff. rank backbone | "
             "eff. rank projector | gate overlap shared / none |", "|---|---|---|---|---|---|---|---|"]
    pm = lambda s, k, f="{:.1f}": (f + " ± " + f).format(*s[k]) if k in s else "–"  # noqa: E731
    for method, s in summ.items():
        gates = (f"{pm(s, 'gate_overlap_shared', '{:.3f}')} / {pm(s, 'gate_overlap_none', '{:.3f}')}"
                 if "gate_overlap_shared" in s else "–")
        lines.append(f"| {method} | {pm(s, 'seen_knn')} | {pm(s, 'seen_probe')} | {pm(s, 'unseen_knn')} | "
                     f"{pm(s, 'unseen_probe')} | {pm(s, 'rank_backbone')} | {pm(s, 'rank_projector')} | {gates} |")
    return "\n".join(lines)


def main():
    args = parse_args()
    info = machine_info(torch.device("cpu"))
    print(json.dumps(info), flush=True)
    sets, rows, tic = eval_sets(args), [], time.time()
    for seed in args.seeds:  # seed-major: a partial run still has every method for the first seeds
        for method in ["untrained", *args.methods]:
            rows.append(run(args, method, seed, sets))
            print(json.dumps(rows[-1]), flush=True)
    summ = summary(rows)
    table = markdown_table(summ)
    wall = time.time() - tic
    print(f"\n{info['summary']}, torch {info['torch']}; {len(args.seeds)} seeds, {args.epochs} epochs, batch "
          f"{args.batch_size}, {args.image_size} px, {wall / 60:.1f} min in all\n\n{table}")
    write_json(args, "learn_synthetic", {"machine": info, "args": vars(args), "seen": SEEN, "unseen": UNSEEN,
                                         "wall_s": wall, "runs": rows, "summary": summ})


if __name__ == "__main__":
    main()
