"""The paper's claims at laptop scale: every method on the synthetic shapes, one fixed budget, 3 seeds, a verdict each.

    python benchmarks/reproduce.py                 # every case x 3 seeds, 2 runs at a time: ~50-60 min on 2 cores
    python benchmarks/reproduce.py --cases SimLAP SupCon --seeds 0
    python benchmarks/reproduce.py --smoke         # tiny and quick, for CI (the figures mean nothing)

Data. Classes are (shape, colour) pairs, id = 4 x shape + colour. Training sees 12 of the 16 classes, 500 images
each; the 2 x 2 block {red, green} x {circle, square} (ids 0, 1, 4, 5) is held out. Every held-out shape and colour
appears in training, never in these combinations, and telling the 4 held-out classes apart needs both.

Budget, fixed before any result was seen and the same for every case: the demo's recipe of train.py on the seen
classes (convnet, 32 px, batch 256, 20 epochs = 460 steps, AdamW at the paper's base rate 5e-4 per 256, 1 warmup
epoch, projector 2048 -> 256, temperature 0.1), only --method / --pairs / --labels differ. Each run gets one CPU
thread and 2 run side by side (--jobs). The online kNN monitor runs every 2 epochs on 2000 seen test images: its
log.jsonl draws the PNG of kNN against training step.

Cases (train.py flags):
    SimLAP              --method simlap                       the paper's method: arbitrary pairs + feature filter
    SupCon              --method supcon                       Khosla et al.'s L_out (positives = same class)
    SimCLR              --method simclr                       NT-Xent, no labels
    Hydra               --method hydra                        SimCLR + the SimLAP loss (Fig. 7)
    SupCon-arbitrary    --method supcon-arbitrary             arbitrary pairs, no filter (all-ones gates)
    SimLAP N=0, N=1     --method simlap --pairs nearest --nearest-n N                 Fig. 8, with the filter
    SupCon-pairs N=0, N=1  --method supcon-arbitrary --pairs nearest --nearest-n N    Fig. 8, without it
                        (N=1: the classes sharing one attribute, ties included; "N=all" is the arbitrary case)
    SimLAP-MoCo         --method simlap-moco                  the momentum variant (Table 1)
    SimLAP-pseudo       --method simlap --labels F            appendix C: F = 12 k-means clusters (eval.py --kmeans)
                                                              of the same seed's SimCLR backbone, no true label used
    untrained           the seed's network at step 0 (same constructor and seed as train.py), never trained

Measured on backbone features (eval mode) of every run:
    seen     kNN (k = 20, T = 0.07; bank = the 6000 training images) and eval.py's L-BFGS linear probe, on 100
             fresh test images per seen class (12-way, chance 8.3 %)
    unseen   the same for the 4 held-out classes: bank / probe training set 200 images per class, test 100 per
             class (4-way, chance 25 %). No weight ever saw these classes.
    rank     effective rank of the seen-test backbone features (Fig. 3b: higher = less dimensional collapse)
    overlap  eval.py's intra/inter-class cosine-similarity overlap on the seen test set (Fig. 4: lower = better)
    gates    filter methods and untrained: overlap of class pairs sharing an attribute against pairs sharing none
             (Fig. 12), and the mean gate entropy in nats (Fig. 9; 0 = binary gates, 0.693 = all at 0.5)

Verdict rules, written down before the first full run. d = A - B per seed (the same seed gives both the same
initial weights and data order), over the 3 seeds. "A beats B by m": reproduced if d >= m and d > 0 at every seed; not
reproduced if mean d <= 0; else inconclusive. "A matches B" (the claim is "at least as good"): reproduced if
mean d >= -1 point; not reproduced if d < -1 at every seed; else inconclusive.
    1  SimLAP beats SupCon-arbitrary by 5 points, seen kNN (the authors' notes: CIFAR-10 90.86 vs 25.3)
    2  Fig. 8, seen kNN: drop = N=0 minus N=all (arbitrary). Reproduced if the drop of SupCon-pairs is >= 5 at
       every seed and exceeds SimLAP's drop by >= 5 at every seed; not reproduced if SupCon-pairs' mean drop
       is < 2 or SimLAP's mean drop >= SupCon-pairs' mean drop; else inconclusive
    3  Fig. 7: Hydra matches SimCLR, unseen kNN
    4  Tables 1 and 4: SimLAP matches SupCon and matches SimCLR, unseen kNN and unseen probe (4 comparisons):
       reproduced if all 4 are; not reproduced if any is not; else inconclusive
    5a Fig. 3b: SimLAP's backbone effective rank beats SupCon's and SimCLR's by 0 (every seed higher)
    5b Fig. 4: SimLAP's similarity overlap is lower than SupCon's and SimCLR's (the same rule, on -overlap)
    6a Fig. 12: SimLAP's gate overlap, shared minus none, beats 0 by 0.05 (every seed >= 0.05)
    6b Fig. 9: SimLAP's gate entropy beats untrained's (its filter at step 0) by half of untrained's entropy
    7  SimLAP-MoCo matches SimLAP, unseen kNN; SimLAP-pseudo matches SimCLR (its label source), unseen kNN
Reported as mean ± std (n-1) over seeds. Runs go to --runs-dir/<case>-seed<s>/ with a result.json; a finished run
is reused (and train.py resumes an unfinished one), so an interrupted benchmark continues where it stopped.
Delete that folder after changing a flag.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as evaluation  # noqa: E402  (eval.py; renamed: eval is a builtin)
import plot  # noqa: E402
import simlap  # noqa: E402
import train  # noqa: E402
from common import add_output_flags, machine_info, run_child, write_json  # noqa: E402  (benchmarks/common.py)

UNSEEN = (0, 1, 4, 5)  # {red, green} x {circle, square}
SEEN = tuple(i for i in range(16) if i not in UNSEEN)
nearest = lambda method, n: ["--method", method, "--pairs", "nearest", "--nearest-n", str(n)]  # noqa: E731
CASES = {"SimLAP": ["--method", "simlap"], "SupCon": ["--method", "supcon"], "SimCLR": ["--method", "simclr"],
         "Hydra": ["--method", "hydra"], "SupCon-arbitrary": ["--method", "supcon-arbitrary"],
         "SimLAP N=0": nearest("simlap", 0), "SimLAP N=1": nearest("simlap", 1),
         "SupCon-pairs N=0": nearest("supcon-arbitrary", 0), "SupCon-pairs N=1": nearest("supcon-arbitrary", 1),
         "SimLAP-MoCo": ["--method", "simlap-moco"], "SimLAP-pseudo": ["--method", "simlap"]}
PSEUDO_SOURCE = "SimCLR"  # SimLAP-pseudo trains on the k-means clusters of this case's backbone (same seed)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE",
                   help=f"cases to train (default: all: {', '.join(CASES)}); untrained is always measured")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    p.add_argument("--epochs", type=int, default=20, help="default: 20")
    p.add_argument("--per-class", type=int, default=500, help="training images per seen class (default: 500)")
    p.add_argument("--image-size", type=int, default=32, help="default: 32")
    p.add_argument("--eval-per-class", type=int, default=100,
                   help="test images per class, seen and unseen; the unseen bank gets twice as many (default: 100)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side, one CPU thread each; 1 = in this process "
                                                       "with torch's threads (default: 2)")
    p.add_argument("--runs-dir", default=os.path.join(ROOT, "benchmarks", "results", "reproduce"),
                   help="default: benchmarks/results/reproduce (reproduce_smoke with --smoke)")
    p.add_argument("--png", default=None, help="kNN against training step (default: benchmarks/reproduce_knn.png, "
                   "the README's figure, for the full default run; else benchmarks/results/reproduce_knn.png)")
    p.add_argument("--child", nargs=2, metavar=("CASE", "SEED"), help=argparse.SUPPRESS)  # one run, in a subprocess
    add_output_flags(p, "reproduce", "1 seed, 1 epoch, 8 px, 4 images per class, 1 job (for CI)", threads=False)
    args = p.parse_args(argv)
    full = args.cases == list(CASES) and args.seeds == [0, 1, 2] and (args.epochs, args.per_class) == (20, 500)
    args.png = args.png or os.path.join(ROOT, "benchmarks", *([] if full else ["results"]), "reproduce_knn.png")
    args.extra = []  # train.py flags every case gets on top of the demo's defaults
    if args.smoke:
        args.seeds, args.epochs, args.per_class, args.image_size, args.eval_per_class = [0], 1, 8, 8, 10
        args.extra, args.jobs = ["--batch-size", "16", "--proj-hidden", "64", "--proj-dim", "32"], 1
        args.runs_dir = os.path.join(ROOT, "benchmarks", "results", "reproduce_smoke")
        args.png = os.path.join(args.runs_dir, "reproduce_knn.png")
    return args


def train_argv(args, case, seed, out_dir):
    argv = ["--synthetic-classes", ",".join(map(str, SEEN)), "--synthetic-per-class", str(args.per_class),
            "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--knn-every", "2",
            "--knn-samples", "2000", "--workers", "0", "--seed", str(seed), "--output-dir", out_dir,
            *args.extra, *CASES[case]]
    if case == "SimLAP-pseudo":
        argv += ["--labels", pseudo_labels(args, seed)]
    return argv


def pseudo_labels(args, seed):
    """Appendix C: eval.py --kmeans 12 on the backbone of PSEUDO_SOURCE (same seed) -> the label file's path."""
    source = os.path.join(args.runs_dir, f"{PSEUDO_SOURCE}-seed{seed}")
    path = os.path.join(source, f"pseudo_labels_{len(SEEN)}.pt")
    if not os.path.exists(path):
        with contextlib.redirect_stdout(sys.stderr):
            evaluation.main(["--checkpoint", os.path.join(source, "checkpoint.pt"), "--kmeans", str(len(SEEN)),
                             "--kmeans-seed", str(seed), "--workers", "0", "--device", "cpu", "--no-figures"])
    return path


def eval_sets(args):
    """(seen bank, seen test, unseen bank, unseen test) with the eval transform, labels re-indexed per subset."""
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
    out = {"seen_knn": knn(fb, yb, ft, yt), "seen_probe": probe(fb, yb, ft, yt),
           "unseen_knn": knn(ub, uyb, ut, uyt), "unseen_probe": probe(ub, uyb, ut, uyt),
           "rank": evaluation.effective_rank(evaluation.singular_values(ft)),
           "overlap": evaluation.similarity_overlap(ft, yt)["overlap"]}
    if gates:
        attributes = simlap.SyntheticShapes("train", 1, classes=SEEN).attributes
        g = evaluation.gate_analysis(evaluation.class_gates(model.filter), attributes=attributes)
        out.update(gate_shared=g["overlap_shared_attribute"], gate_none=g["overlap_no_shared_attribute"],
                   gate_entropy=g["mean_entropy"], gate_open=g["mean_open_dims"])
    return out


def run(args, case, seed, sets):
    """Train (or reuse) one case at one seed and measure it -> its result dict, also in <run>/result.json."""
    out_dir = os.path.join(args.runs_dir, f"{case.replace(' ', '').replace('=', '')}-seed{seed}")
    done = os.path.join(out_dir, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    tic = time.time()
    if case == "untrained":  # the same constructor and seed as train.py's model, never trained
        torch.manual_seed(seed)
        a = train.parse_args(train_argv(args, "SimLAP", seed, out_dir))
        model = simlap.SimLAP(a.arch, len(SEEN), small_images=a.small_images, image_size=a.image_size,
                              proj_hidden=a.proj_hidden, proj_dim=a.proj_dim)
        gates, curve = True, []  # its filter is SimLAP's at step 0
    else:
        with contextlib.redirect_stdout(sys.stderr):  # train.py's progress goes to stderr, the table to stdout
            train.main(train_argv(args, case, seed, out_dir))  # resumes (or skips) a run already there
        _, model, info = evaluation.load_weights(os.path.join(out_dir, "checkpoint.pt"))
        gates = simlap.METHODS[info["method"]].filter
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            curve = [(r["step"], 100 * r["knn_top1"]) for r in map(json.loads, f) if "knn_top1" in r]
    train_s = time.time() - tic
    res = {"case": case, "seed": seed, "train_s": train_s, "knn_curve": curve, **measure(model, sets, gates)}
    res["eval_s"] = time.time() - tic - train_s
    os.makedirs(out_dir, exist_ok=True)
    with open(done + ".tmp", "w") as f:
        json.dump(res, f)
    os.replace(done + ".tmp", done)
    return res


def run_one(args, case, seed):
    """One run in a fresh process with one CPU thread (so that --jobs runs share the cores evenly)."""
    argv = ["--child", case, str(seed), "--seeds", str(seed), "--epochs", str(args.epochs), "--per-class",
            str(args.per_class), "--image-size", str(args.image_size), "--eval-per-class", str(args.eval_per_class),
            "--runs-dir", args.runs_dir] + (["--smoke"] * args.smoke)
    return run_child(__file__, argv, f"{case} seed {seed}", env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})


# ----------------------------------------------------------------------------------------------- summary
METRICS = ("seen_knn", "seen_probe", "unseen_knn", "unseen_probe", "rank", "overlap", "gate_shared", "gate_none",
           "gate_entropy", "train_s")


def summary(rows):
    """case -> metric -> (mean, std over seeds), and 'values' -> metric -> [per seed, in seed order]."""
    out = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = sorted((r for r in rows if r["case"] == case), key=lambda r: r["seed"])
        out[case] = {"seeds": [r["seed"] for r in mine], "values": {}}
        for k in METRICS:
            v = [r[k] for r in mine if k in r]
            if v:
                out[case][k] = (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                out[case]["values"][k] = v
    return out


def beats(a, b, margin):
    """Per-seed differences a - b (lists in seed order) -> the 'A beats B by margin' verdict."""
    d = [x - y for x, y in zip(a, b)]
    return ("reproduced" if min(d) >= margin and min(d) > 0 else "not reproduced" if statistics.mean(d) <= 0
            else "inconclusive")


def matches(a, b, tol=1.0):
    d = [x - y for x, y in zip(a, b)]
    return "reproduced" if statistics.mean(d) >= -tol else "not reproduced" if max(d) < -tol else "inconclusive"


def all_of(verdicts):
    return ("reproduced" if all(v == "reproduced" for v in verdicts) else
            "not reproduced" if "not reproduced" in verdicts else "inconclusive")


def verdicts(s):
    """The rules of the docstring, applied to summary() -> [(claim, the measurement in words, verdict)]."""
    v = lambda case, k: s[case]["values"][k] if case in s and k in s[case]["values"] else None  # noqa: E731
    fmt = lambda case, k, f="{:.1f}": (f + " ± " + f).format(*s[case][k])  # noqa: E731
    out = []

    def claim(name, cases, text, rule):
        if all(case in s for case in cases) and len({len(s[c]["seeds"]) for c in cases}) == 1:
            out.append((name, text(), rule()))

    claim("1 SupCon with arbitrary pairs falls far below SimLAP", ("SimLAP", "SupCon-arbitrary"),
          lambda: f"seen kNN {fmt('SimLAP', 'seen_knn')} vs {fmt('SupCon-arbitrary', 'seen_knn')}",
          lambda: beats(v("SimLAP", "seen_knn"), v("SupCon-arbitrary", "seen_knn"), 5))

    def drop(n0, arbitrary):
        return [x - y for x, y in zip(v(n0, "seen_knn"), v(arbitrary, "seen_knn"))]

    def fig8():
        sup, sim = drop("SupCon-pairs N=0", "SupCon-arbitrary"), drop("SimLAP N=0", "SimLAP")
        if min(sup) >= 5 and min(x - y for x, y in zip(sup, sim)) >= 5:
            return "reproduced"
        return "not reproduced" if statistics.mean(sup) < 2 or statistics.mean(sim) >= statistics.mean(sup) \
            else "inconclusive"

    claim("2 Fig. 8: SupCon degrades as positives get farther, SimLAP holds",
          ("SupCon-pairs N=0", "SupCon-arbitrary", "SimLAP N=0", "SimLAP"),
          lambda: "seen-kNN drop from N=0 to N=all: SupCon-pairs {:.1f}, SimLAP {:.1f} (mean)".format(
              statistics.mean(drop("SupCon-pairs N=0", "SupCon-arbitrary")), statistics.mean(drop("SimLAP N=0", "SimLAP"))),
          fig8)
    claim("3 Fig. 7: Hydra at least matches SimCLR", ("Hydra", "SimCLR"),
          lambda: f"unseen kNN {fmt('Hydra', 'unseen_knn')} vs {fmt('SimCLR', 'unseen_knn')}",
          lambda: matches(v("Hydra", "unseen_knn"), v("SimCLR", "unseen_knn")))
    claim("4 Tables 1, 4: SimLAP transfers at least as well as SupCon and SimCLR", ("SimLAP", "SupCon", "SimCLR"),
          lambda: "unseen kNN {} vs {} / {}; unseen probe {} vs {} / {}".format(
              *(fmt(c, k) for k in ("unseen_knn", "unseen_probe") for c in ("SimLAP", "SupCon", "SimCLR"))),
          lambda: all_of([matches(v("SimLAP", k), v(b, k)) for k in ("unseen_knn", "unseen_probe")
                          for b in ("SupCon", "SimCLR")]))
    claim("5a Fig. 3b: SimLAP collapses less (higher effective rank)", ("SimLAP", "SupCon", "SimCLR"),
          lambda: "backbone effective rank {} vs {} / {}".format(*(fmt(c, "rank") for c in ("SimLAP", "SupCon", "SimCLR"))),
          lambda: all_of([beats(v("SimLAP", "rank"), v(b, "rank"), 0) for b in ("SupCon", "SimCLR")]))
    neg = lambda case: [-x for x in v(case, "overlap")]  # noqa: E731
    claim("5b Fig. 4: SimLAP's classes overlap less", ("SimLAP", "SupCon", "SimCLR"),
          lambda: "intra/inter similarity overlap {} vs {} / {}".format(
              *(fmt(c, "overlap", "{:.3f}") for c in ("SimLAP", "SupCon", "SimCLR"))),
          lambda: all_of([beats(neg("SimLAP"), neg(b), 0) for b in ("SupCon", "SimCLR")]))
    claim("6a Fig. 12: gates of classes sharing an attribute overlap more", ("SimLAP",),
          lambda: f"gate overlap shared {fmt('SimLAP', 'gate_shared', '{:.3f}')} vs none {fmt('SimLAP', 'gate_none', '{:.3f}')}",
          lambda: beats(v("SimLAP", "gate_shared"), v("SimLAP", "gate_none"), 0.05))
    claim("6b Fig. 9: the gates become binary", ("SimLAP", "untrained"),
          lambda: f"gate entropy {fmt('SimLAP', 'gate_entropy', '{:.3f}')} vs untrained "
                  f"{fmt('untrained', 'gate_entropy', '{:.3f}')} nats",
          lambda: beats([-x for x in v("SimLAP", "gate_entropy")], [-x for x in v("untrained", "gate_entropy")],
                        statistics.mean(v("untrained", "gate_entropy")) / 2))
    claim("7 SimLAP-MoCo at least matches SimLAP", ("SimLAP-MoCo", "SimLAP"),
          lambda: f"unseen kNN {fmt('SimLAP-MoCo', 'unseen_knn')} vs {fmt('SimLAP', 'unseen_knn')}",
          lambda: matches(v("SimLAP-MoCo", "unseen_knn"), v("SimLAP", "unseen_knn")))
    claim("7 SimLAP on pseudo labels at least matches SimCLR, its label source", ("SimLAP-pseudo", "SimCLR"),
          lambda: f"unseen kNN {fmt('SimLAP-pseudo', 'unseen_knn')} vs {fmt('SimCLR', 'unseen_knn')}",
          lambda: matches(v("SimLAP-pseudo", "unseen_knn"), v("SimCLR", "unseen_knn")))
    return out


def markdown(summ, claims):
    pm = lambda s, k, f="{:.1f}": (f + " ± " + f).format(*s[k]) if k in s else "–"  # noqa: E731
    lines = ["| case | seen kNN % | seen probe % | unseen kNN % | unseen probe % | eff. rank | sim. overlap | "
             "gate overlap shared / none | gate entropy | train s |", "|---|" * 1 + "---|" * 9]
    for case, s in summ.items():
        gates = f"{pm(s, 'gate_shared', '{:.3f}')} / {pm(s, 'gate_none', '{:.3f}')}" if "gate_shared" in s else "–"
        lines.append(f"| {case} | {pm(s, 'seen_knn')} | {pm(s, 'seen_probe')} | {pm(s, 'unseen_knn')} | "
                     f"{pm(s, 'unseen_probe')} | {pm(s, 'rank')} | {pm(s, 'overlap', '{:.3f}')} | {gates} | "
                     f"{pm(s, 'gate_entropy', '{:.3f}')} | {pm(s, 'train_s', '{:.0f}')} |")
    lines += ["", "| claim | measured (mean ± std over seeds) | verdict |", "|---|---|---|"]
    lines += [f"| {name} | {text} | **{verdict}** |" for name, text, verdict in claims]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- figure
def draw_curves(rows, png, cases):
    """kNN (mean over seeds) against training step, one line per case (plot.py, the drawing eval.py uses too)."""
    curves = {}
    for case in cases:
        runs = [r["knn_curve"] for r in rows if r["case"] == case and r["knn_curve"]]
        if runs and all(len(c) == len(runs[0]) for c in runs):
            curves[case] = [(c[0][0], statistics.mean(x[1] for x in c)) for c in zip(*runs)]
    if not curves:
        return None
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    return plot.save(plot.lines([(case, [s for s, _ in c], [a for _, a in c]) for case, c in curves.items()],
                                "seen-class kNN top-1 (train.py's monitor, mean over seeds)", "training step",
                                "kNN top-1 %", size=(580, 440)), png)


def main(argv=None):
    args = parse_args(argv)
    if args.child:  # one run in this process: its result is the last line on stdout
        torch.set_num_threads(1)
        print(json.dumps(run(args, args.child[0], int(args.child[1]), eval_sets(args))), flush=True)
        return
    info = machine_info(torch.device("cpu"))
    print(json.dumps(info), flush=True)
    tic, sets = time.time(), eval_sets(args) if args.jobs == 1 else None
    # seed-major (a partial benchmark has every case for the first seeds); pseudo labels need their SimCLR run first
    todo = [(c, s) for s in args.seeds for c in ["untrained", *args.cases] if c != "SimLAP-pseudo"]
    todo += [("SimLAP-pseudo", s) for s in args.seeds if "SimLAP-pseudo" in args.cases]
    if "SimLAP-pseudo" in args.cases and PSEUDO_SOURCE not in args.cases:
        todo += [(PSEUDO_SOURCE, s) for s in args.seeds]
        todo.sort(key=lambda t: t[0] == "SimLAP-pseudo")
    rows = []
    with ThreadPoolExecutor(max(args.jobs, 1)) as pool:
        futures = {}
        for case, seed in todo:
            if args.jobs == 1:
                rows.append(run(args, case, seed, sets))
            else:
                wait = futures.get((PSEUDO_SOURCE, seed)) if case == "SimLAP-pseudo" else None
                futures[case, seed] = pool.submit(lambda c, s, w: (w and w.result(), run_one(args, c, s))[1],
                                                  case, seed, wait)
                continue
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "knn_curve"}), flush=True)
        for (case, seed), f in futures.items():
            rows.append(f.result())
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "knn_curve"}), flush=True)
    summ, wall = summary(rows), time.time() - tic
    claims = verdicts(summ)
    png = draw_curves(rows, args.png, [c for c in CASES if c in args.cases and "N=" not in c])
    print(f"\n{info['summary']}, torch {info['torch']}; seeds {args.seeds}, {args.epochs} epochs, {args.jobs} "
          f"job(s), {wall / 60:.1f} min in all; figure: {png}\n\n{markdown(summ, claims)}")
    write_json(args, "reproduce", {"machine": info, "args": vars(args), "seen": SEEN, "unseen": UNSEEN,
                                   "wall_s": wall, "runs": rows, "summary": summ, "verdicts": claims})


if __name__ == "__main__":
    main()
