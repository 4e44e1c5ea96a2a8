"""The paper's claims at laptop scale: every method on the synthetic shapes (or on Fashion-MNIST), one fixed budget,
3 seeds, a verdict each.

    python benchmarks/reproduce.py                 # every case x 3 seeds, 2 runs at a time: ~50-60 min on 2 cores
    python benchmarks/reproduce.py --cases SimLAP SupCon --seeds 0
    python benchmarks/reproduce.py --data fashionmnist     # real images (below)
    python benchmarks/reproduce.py --smoke         # tiny and quick, for CI (the figures mean nothing)
    python benchmarks/reproduce.py --data fashionmnist --smoke     # on a fake idx file it writes itself

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

Real images, --data fashionmnist (Xiao et al. 2017; --data-root: the folder of its four idx files, by default where
`apt-get install dataset-fashion-mnist` puts them). The same rules, recipe and measures, fixed before its first full
run, except:
    split    training: the train split of t-shirt/top, trouser, dress, sandal, shirt, ankle boot (6000 images each);
             held out: pullover, coat, sneaker, bag (all but bag have relatives in training, pullover vs coat is hard).
             Seen: bank = the 36000 training images, test = their 6000 test-split images (6-way, chance 16.7 %);
             unseen: bank / probe set = the 24000 train-split images of the 4, test = their 4000 (4-way, chance 25 %)
    budget   the demo's recipe as above for 3 epochs = 420 steps (the synthetic runs: 460); the 28 px images are
             cropped and resized to 32 px (eval: resized); the kNN monitor every epoch
    cases    untrained, SimLAP, SupCon, SimCLR, Hydra, SupCon-arbitrary, SimLAP N=1, SupCon-pairs N=1. N=1 is the
             nearest other class under the natural groups (distance 0 same class, 1 same group, 2 otherwise):
             t-shirt/top <-> shirt, sandal <-> ankle boot; trouser and dress have no relative in training, so theirs
             is any other class (all at distance 2, ties included)
    gates    "shared" = the same natural group (2 of the 15 seen pairs: t-shirt/top & shirt, sandal & ankle boot)
    claim 2  the drop is measured from N=1 to N=all (N=0 is not run), with the same thresholds
Reported as mean ± std (n-1) over seeds. Runs go to --runs-dir/<case>-seed<s>/ with a result.json; a finished run
is reused (and train.py resumes an unfinished one), so an interrupted benchmark continues where it stopped.
Delete that folder after changing a flag.
"""
import argparse
import contextlib
import gzip
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
from paper import analyses, plot  # noqa: E402
import simlap  # noqa: E402
import train  # noqa: E402
from common import add_output_flags, machine_info, run_child, write_json  # noqa: E402  (benchmarks/common.py)

nearest = lambda method, n: ["--method", method, "--pairs", "nearest", "--nearest-n", str(n)]  # noqa: E731
CASES = {"SimLAP": ["--method", "simlap"], "SupCon": ["--method", "supcon"], "SimCLR": ["--method", "simclr"],
         "Hydra": ["--method", "hydra"], "SupCon-arbitrary": ["--method", "supcon-arbitrary"],
         "SimLAP N=0": nearest("simlap", 0), "SimLAP N=1": nearest("simlap", 1),
         "SupCon-pairs N=0": nearest("supcon-arbitrary", 0), "SupCon-pairs N=1": nearest("supcon-arbitrary", 1),
         "SimLAP-MoCo": ["--method", "simlap-moco"], "SimLAP-pseudo": ["--method", "simlap"]}
PSEUDO_SOURCE = "SimCLR"  # SimLAP-pseudo trains on the k-means clusters of this case's backbone (same seed)
# Per --data: the classes held out, the cases, the budget, and what "shared" means for the gates (the docstring).
SETUPS = {"synthetic": dict(num_classes=16, unseen=(0, 1, 4, 5), cases=tuple(CASES), epochs=20, knn_every=2,
                            shared="sharing an attribute"),  # unseen: {red, green} x {circle, square}
          "fashionmnist": dict(num_classes=10, unseen=(2, 4, 7, 8), epochs=3, knn_every=1,  # pullover, coat, ...
                               cases=("SimLAP", "SupCon", "SimCLR", "Hydra", "SupCon-arbitrary", "SimLAP N=1",
                                      "SupCon-pairs N=1"), shared="in one natural group")}
FASHION_ROOT = "/usr/share/datasets/fashion-mnist"  # where the package dataset-fashion-mnist puts the idx files


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="synthetic", choices=list(SETUPS), help="data set (default: synthetic)")
    p.add_argument("--data-root", default=FASHION_ROOT, help=f"fashionmnist: its idx files (default: {FASHION_ROOT})")
    p.add_argument("--cases", nargs="+", default=None, choices=list(CASES), metavar="CASE",
                   help=f"cases to train (default: all of the data set's: {', '.join(CASES)} on synthetic); "
                   "untrained is always measured")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    p.add_argument("--epochs", type=int, default=None, help="default: 20 synthetic, 3 fashionmnist")
    p.add_argument("--per-class", type=int, default=500, help="synthetic: training images per seen class "
                   "(default: 500; fashionmnist trains on all of its 6000)")
    p.add_argument("--image-size", type=int, default=32, help="default: 32")
    p.add_argument("--eval-per-class", type=int, default=100, help="synthetic: test images per class, seen and "
                   "unseen; the unseen bank gets twice as many (default: 100; fashionmnist: its whole splits)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side, one CPU thread each; 1 = in this process "
                                                       "with torch's threads (default: 2)")
    p.add_argument("--runs-dir", default=None, help="default: benchmarks/results/reproduce[_fashionmnist] "
                   "(reproduce[_fashionmnist]_smoke with --smoke)")
    p.add_argument("--png", default=None, help="kNN against training step (default: benchmarks/reproduce[_fashionmnist]"
                   "_knn.png, the README's figure, for the full default run; else under benchmarks/results/); the "
                   "gate overlap goes beside it, *_gates.png")
    p.add_argument("--child", nargs=2, metavar=("CASE", "SEED"), help=argparse.SUPPRESS)  # one run, in a subprocess
    add_output_flags(p, "reproduce[_fashionmnist]", "1 seed, 1 epoch, 8 px, 8 images per class, 1 job (for CI); "
                     "fashionmnist: on a fake idx file it writes", threads=False)
    args = p.parse_args(argv)
    setup = SETUPS[args.data]
    args.name = "reproduce" + ("" if args.data == "synthetic" else f"_{args.data}")
    args.unseen = setup["unseen"]
    args.seen = tuple(i for i in range(setup["num_classes"]) if i not in args.unseen)
    args.cases, args.epochs = args.cases or list(setup["cases"]), args.epochs or setup["epochs"]
    full = (args.cases == list(setup["cases"]) and args.seeds == [0, 1, 2] and args.epochs == setup["epochs"]
            and (args.per_class == 500 or args.data != "synthetic"))
    args.runs_dir = args.runs_dir or os.path.join(ROOT, "benchmarks", "results", args.name)
    args.png = args.png or os.path.join(ROOT, "benchmarks", *([] if full else ["results"]), f"{args.name}_knn.png")
    args.extra = []  # train.py flags every case gets on top of the demo's defaults
    if args.smoke:
        args.seeds, args.epochs, args.per_class, args.image_size, args.eval_per_class = [0], 1, 8, 8, 10
        args.extra, args.jobs = ["--batch-size", "16", "--proj-hidden", "64", "--proj-dim", "32"], 1
        args.runs_dir = os.path.join(ROOT, "benchmarks", "results", f"{args.name}_smoke")
        args.png = os.path.join(args.runs_dir, f"{args.name}_knn.png")
        if args.data == "fashionmnist":
            args.data_root = os.path.join(args.runs_dir, "fake-data")
    return args


def train_argv(args, case, seed, out_dir):
    if args.data == "synthetic":  # train.py's defaults there are the demo's recipe
        data = ["--synthetic-per-class", str(args.per_class)]
    else:  # the same recipe, given explicitly
        recipe = [f for k, v in train.DEMO.items() if k != "epochs" for f in (f"--{k.replace('_', '-')}", str(v))]
        data = ["--dataset", args.data, "--data", args.data_root, *recipe]
    argv = ["--classes", ",".join(map(str, args.seen)), *data,
            "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--knn-every",
            str(SETUPS[args.data]["knn_every"]), "--knn-samples", "2000", "--workers", "0", "--seed", str(seed),
            "--output-dir", out_dir, *args.extra, *CASES[case]]
    if case == "SimLAP-pseudo":
        argv += ["--labels", pseudo_labels(args, seed)]
    return argv


def pseudo_labels(args, seed):
    """Appendix C: eval.py --kmeans K (K = the seen classes) on the backbone of PSEUDO_SOURCE (same seed) -> the
    label file's path."""
    source, K = os.path.join(args.runs_dir, f"{PSEUDO_SOURCE}-seed{seed}"), len(args.seen)
    path = os.path.join(source, f"pseudo_labels_{K}.pt")
    if not os.path.exists(path):
        with contextlib.redirect_stdout(sys.stderr):
            evaluation.main(["--checkpoint", os.path.join(source, "checkpoint.pt"), "--kmeans", str(K),
                             "--kmeans-seed", str(seed), "--workers", "0", "--device", "cpu", "--no-figures"])
    return path


def eval_sets(args):
    """(seen bank, seen test, unseen bank, unseen test) with the eval transform, labels re-indexed per subset. The
    seen bank is exactly the training set of train.py."""
    t = simlap.eval_transform(args.image_size)
    if args.data == "fashionmnist":  # the whole train and test splits of each group of classes
        split = lambda s, classes: simlap.build_dataset(args.data, args.data_root, s, t, classes=classes)  # noqa: E731
        return split("train", args.seen), split("test", args.seen), split("train", args.unseen), split("test",
                                                                                                      args.unseen)
    shapes = lambda split, n, classes: simlap.SyntheticShapes(split, n, classes=classes, transform=t)  # noqa: E731
    return (simlap.build_dataset("synthetic", None, "train", t, synthetic_per_class=args.per_class,
                                 classes=list(args.seen)),
            shapes("test", args.eval_per_class, args.seen), shapes("train", 2 * args.eval_per_class, args.unseen),
            shapes("test", args.eval_per_class, args.unseen))


def fake_fashion_mnist(folder, train_per_class=8, test_per_class=4):
    """--smoke: the four gzipped idx files of a tiny fake Fashion-MNIST (noise, brighter for higher labels)."""
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", train_per_class), ("t10k", test_per_class)):
        labels = torch.arange(10).repeat(n).to(torch.uint8)
        images = (torch.rand(len(labels), 28, 28, generator=gen) * 100 + labels[:, None, None] * 15).to(torch.uint8)
        for kind, t in (("images-idx3", images), ("labels-idx1", labels)):  # header: 0, 0, 8 (uint8), ndim, dims
            header = bytes([0, 0, 8, t.ndim]) + b"".join(d.to_bytes(4, "big") for d in t.shape)
            with gzip.open(os.path.join(folder, f"{split}-{kind}-ubyte.gz"), "wb") as f:
                f.write(header + t.numpy().tobytes())


def measure(args, model, sets, gates):
    """Every number of one run, from the backbone features of the four eval sets."""
    loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=256)  # noqa: E731
    cpu = torch.device("cpu")
    (fb, yb), (ft, yt), (ub, uyb), (ut, uyt) = [simlap.extract_features(model.backbone, loader(ds), cpu) for ds in sets]
    knn = lambda bank, bank_y, q, y: 100 * (simlap.knn_classify(bank, bank_y, q, 20, 0.07) == y).float().mean().item()  # noqa: E731
    probe = lambda *f: evaluation.linear_probe(*f)["test_top1"]  # noqa: E731
    out = {"seen_knn": knn(fb, yb, ft, yt), "seen_probe": probe(fb, yb, ft, yt),
           "unseen_knn": knn(ub, uyb, ut, uyt), "unseen_probe": probe(ub, uyb, ut, uyt),
           "rank": analyses.effective_rank(analyses.singular_values(ft)),
           "overlap": analyses.similarity_overlap(ft, yt)["overlap"]}
    if gates:
        attributes = simlap.class_attributes(args.data, args.seen)  # synthetic: shape, colour; fashion: group
        g = analyses.gate_analysis(analyses.class_gates(model.filter), attributes=attributes)
        out.update(gate_shared=g["overlap_shared_attribute"], gate_none=g["overlap_no_shared_attribute"],
                   gate_entropy=g["mean_entropy"], gate_open=g["mean_open_dims"], gate_matrix=g["gate_overlap"])
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
        model = simlap.SimLAP(a.arch, len(args.seen), small_images=a.small_images, image_size=a.image_size,
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
    res = {"case": case, "seed": seed, "train_s": train_s, "knn_curve": curve, **measure(args, model, sets, gates)}
    res["eval_s"] = time.time() - tic - train_s
    os.makedirs(out_dir, exist_ok=True)
    with open(done + ".tmp", "w") as f:
        json.dump(res, f)
    os.replace(done + ".tmp", done)
    return res


def run_one(args, case, seed):
    """One run in a fresh process with one CPU thread (so that --jobs runs share the cores evenly)."""
    argv = ["--child", case, str(seed), "--data", args.data, "--data-root", args.data_root, "--seeds", str(seed),
            "--epochs", str(args.epochs), "--per-class", str(args.per_class), "--image-size", str(args.image_size),
            "--eval-per-class", str(args.eval_per_class), "--runs-dir", args.runs_dir] + (["--smoke"] * args.smoke)
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


def verdicts(s, shared="sharing an attribute"):
    """The rules of the docstring, applied to summary() -> [(claim, the measurement in words, verdict)]. shared: what
    relates two classes whose gates claim 6a compares."""
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

    near = "N=0" if "SupCon-pairs N=0" in s else "N=1"  # fashionmnist runs N=1 only (the docstring)

    def fig8():
        sup, sim = drop(f"SupCon-pairs {near}", "SupCon-arbitrary"), drop(f"SimLAP {near}", "SimLAP")
        if min(sup) >= 5 and min(x - y for x, y in zip(sup, sim)) >= 5:
            return "reproduced"
        return "not reproduced" if statistics.mean(sup) < 2 or statistics.mean(sim) >= statistics.mean(sup) \
            else "inconclusive"

    claim("2 Fig. 8: SupCon degrades as positives get farther, SimLAP holds",
          (f"SupCon-pairs {near}", "SupCon-arbitrary", f"SimLAP {near}", "SimLAP"),
          lambda: "seen-kNN drop from {} to N=all: SupCon-pairs {:.1f}, SimLAP {:.1f} (mean)".format(
              near, statistics.mean(drop(f"SupCon-pairs {near}", "SupCon-arbitrary")),
              statistics.mean(drop(f"SimLAP {near}", "SimLAP"))),
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
    claim(f"6a Fig. 12: gates of classes {shared} overlap more", ("SimLAP",),
          lambda: f"gate overlap shared {fmt('SimLAP', 'gate_shared', '{:.3f}')} vs none {fmt('SimLAP', 'gate_none', '{:.3f}')}",
          lambda: beats(v("SimLAP", "gate_shared"), v("SimLAP", "gate_none"), 0.05))
    claim("6b Fig. 9: the gates become binary", ("SimLAP", "untrained"),
          lambda: f"gate entropy {fmt('SimLAP', 'gate_entropy', '{:.3f}')} vs untrained "
                  f"{fmt('untrained', 'gate_entropy', '{:.3f}')} nats",
          lambda: beats([-x for x in v("SimLAP", "gate_entropy")], [-x for x in v("untrained", "gate_entropy")],
                        statistics.mean(v("untrained", "gate_entropy")) / 2))
    claim("7a SimLAP-MoCo at least matches SimLAP", ("SimLAP-MoCo", "SimLAP"),
          lambda: f"unseen kNN {fmt('SimLAP-MoCo', 'unseen_knn')} vs {fmt('SimLAP', 'unseen_knn')}",
          lambda: matches(v("SimLAP-MoCo", "unseen_knn"), v("SimLAP", "unseen_knn")))
    claim("7b SimLAP on pseudo labels at least matches SimCLR, its label source", ("SimLAP-pseudo", "SimCLR"),
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
    """kNN (mean over seeds) against training step, one line per case (paper/plot.py, as eval.py draws)."""
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


def draw_gate_overlap(rows, png, cases, names, per_row=3):
    """The seen classes' K x K gate overlap (eval.py's, Fig. 12: the cosine of two classes' binarised gates), mean
    over seeds, one labelled panel per case that has gates."""
    panels = []
    for case in cases:
        mats = [torch.tensor(r["gate_matrix"]) for r in rows if r["case"] == case and "gate_matrix" in r]
        if mats:
            panels.append(plot.heatmap(torch.stack(mats).mean(0), f"{case}: mean of {len(mats)} seed(s)", names,
                                       names, lo=0, hi=1, cell=(30, 30)))
    if not panels:
        return None
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    return plot.save(plot.panels(panels, "gate overlap: cosine of two classes' binarised gates (1 = the same open "
                                 "dimensions, 0 = none shared)", columns=per_row), png)


def class_names(args, classes):
    if args.data == "fashionmnist":
        return [simlap.FashionMNIST.classes[c] for c in classes]
    return simlap.SyntheticShapes("train", 1, classes=classes).classes


def main(argv=None):
    args = parse_args(argv)
    if args.child:  # one run in this process: its result is the last line on stdout
        torch.set_num_threads(1)
        print(json.dumps(run(args, args.child[0], int(args.child[1]), eval_sets(args))), flush=True)
        return
    if args.data == "fashionmnist":  # before any run: is the data there?
        if args.smoke:
            fake_fashion_mnist(args.data_root)
        try:
            simlap.build_dataset(args.data, args.data_root, "test")
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"reproduce.py: error: {e}")
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
            print(json.dumps(scalars(rows[-1])), flush=True)
        for (case, seed), f in futures.items():
            rows.append(f.result())
            print(json.dumps(scalars(rows[-1])), flush=True)
    summ, wall = summary(rows), time.time() - tic
    claims = verdicts(summ, SETUPS[args.data]["shared"])
    png = draw_curves(rows, args.png, [c for c in CASES if c in args.cases and "N=" not in c])
    gates = draw_gate_overlap(rows, args.png.replace("_knn.png", "_gates.png"), args.cases,
                              class_names(args, args.seen))
    print(f"\n{info['summary']}, torch {info['torch']}; {args.data}, seeds {args.seeds}, {args.epochs} epochs, "
          f"{args.jobs} job(s), {wall / 60:.1f} min in all; figures: {png}, {gates}\n\n{markdown(summ, claims)}")
    write_json(args, args.name, {"machine": info, "args": vars(args), "seen": args.seen, "unseen": args.unseen,
                                 "wall_s": wall, "runs": rows, "summary": summ, "verdicts": claims})


def scalars(row):  # a run's result without its curve and matrix, for the progress lines
    return {k: v for k, v in row.items() if k not in ("knn_curve", "gate_matrix")}


if __name__ == "__main__":
    main()
