"""Evaluate a SimLAP encoder on frozen features: weighted kNN and a linear probe, k-means pseudo labels, the paper's
analyses (paper/analyses.py: Figs. 3b, 4, 9) and, unless --no-figures, its figures and report.md (paper/figures.py:
Figs. 3b, 4, 5, 6, 9, 12 and the training curves).

    python eval.py --checkpoint runs/x/checkpoint.pt                      # on the checkpoint's own data set
    python eval.py --checkpoint runs/x/checkpoint.pt --dataset cifar10 --data ~/data --download
    python eval.py --backbone runs/x/backbone.pt --dataset stl10 --data ~/data --image-size 96  # arch read off it
    python eval.py --checkpoint runs/x/checkpoint.pt --synthetic-per-class 20 --image-size 16 --device cpu  # smoke
    python eval.py --checkpoint runs/simclr/checkpoint.pt --kmeans 1000     # pseudo labels for train.py --labels
    python eval.py --compare runs/simlap runs/supcon runs/simclr --output-dir runs/compare   # eval outputs side by side
    python eval.py --backbone runs/x/backbone.pt --image-size 224 --data ~/data --transfer table1,table4  # Tables 1, 4

The train split is the kNN bank and the probe's training set; the test split is what is evaluated. Features come
from the backbone only (appendix B keeps f_E alone), in eval mode, extracted once per split (--cache-features keeps
them on disk). --kmeans K clusters the train-split features into K pseudo labels (appendix C) and reports their NMI
and purity against the true labels, as --labels FILE does for a label file. Every number goes to OUTPUT_DIR/eval.json
(default: the folder of the weights); every figure to a PNG beside it, and report.md (--no-figures: eval.json only).
--transfer is paper/transfer.py's evaluation. A bad input (an impossible flag value, missing or corrupt weights,
another arch, missing data, k larger than the bank, ...) prints one line on stderr and exits with status 2, before
anything is written; so does an image file that cannot be decoded, when it is met.
"""
import contextlib
import importlib
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import simlap
from paper.analyses import analyses
from simlap import UserError, nonneg_float, nonneg_int, one_line, positive_float, positive_int

PAPER_K = 10  # Table 3 reports kNN at k = 10: always reported beside --k


# ----------------------------------------------------------------------------------------------- evaluations
PROBE_TOL = 1e-5  # the probe's stopping rule: no entry of its objective's gradient larger than this
GRID_TOL = 1e-4  # the validation fits that pick the l2: 10 x looser, a few times faster, the same choice here
PROBE_ITERS = 5000  # a safeguard only: the probe stops at PROBE_TOL long before (hundreds to ~1000 iterations)


def linear_probe(train_f, train_y, test_f, test_y, num_classes=None, iters=PROBE_ITERS, weight_decay=1e-4,
                 device="cpu", tol=PROBE_TOL, start=None):
    """Multinomial logistic regression on frozen features (N, F) -> {"train_top1", "test_top1"} in % and how the fit
    ended: "objective" (mean cross-entropy + weight_decay / 2 ||W||^2, the bias unpenalised), "grad_max" (the largest
    absolute entry of its gradient), "iters" (L-BFGS iterations run) and "converged" (grad_max <= tol).
    Full-batch L-BFGS with an L2 penalty, SimCLR's transfer protocol (Chen et al. 2020): the problem is convex and
    L-BFGS has no learning rate or schedule to tune, so the number measures the features, not an optimiser. It runs to
    the optimum, in float64, until grad_max <= tol: a fixed number of iterations would stop at an iterate whose accuracy
    moves with the thread count and the device, the optimum's does not. `iters` caps the iterations as a safeguard;
    stopping there is said on stderr and in "converged". Features are standardised with train statistics (a non-affine
    BatchNorm, in effect) so that one grid of weight decays suits every backbone. The test accuracy is the optimum's:
    the test split selects nothing. Full batch: fine up to ~1M x 2048 features on a GPU. start: the "weights" (W, b)
    of another fit to start from (the optimum is the same, only fewer iterations lead there); zeros by default."""
    train_f, test_f = train_f.double(), test_f.double()  # float64: the tolerance is reachable, rounding negligible
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    x, x_test = ((train_f - mean) / std).to(device), ((test_f - mean) / std).to(device)
    y, y_test = train_y.to(device), test_y.to(device)
    C = num_classes or int(max(train_y.max(), test_y.max())) + 1
    linear = nn.Linear(x.shape[1], C).to(device, torch.float64)
    with torch.no_grad():  # convex: a fixed start makes the result deterministic
        for p, init in zip(linear.parameters(), start or (torch.zeros(C, x.shape[1]), torch.zeros(C))):
            p.copy_(init)
    # tolerance_change=0: the gradient rule (or the cap) alone decides when to stop, not a small step or loss change
    opt = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=iters, max_eval=4 * iters, tolerance_grad=tol,
                            tolerance_change=0, history_size=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(x), y) + weight_decay / 2 * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        objective = closure().item()  # and the gradient at the final iterate
    grad_max = max(p.grad.abs().max().item() for p in linear.parameters())
    n_iter = opt.state[linear.weight]["n_iter"]
    if grad_max > tol:
        print(f"eval.py: note: the linear probe (l2 {weight_decay:g}) stopped after {n_iter} L-BFGS iterations with "
              f"gradient {grad_max:.1e} > {tol:g}, short of the optimum; raise --probe-iters", file=sys.stderr)
    with torch.no_grad():
        top1 = lambda a, b: 100 * (linear(a).argmax(1) == b).float().mean().item()  # noqa: E731
        return {"train_top1": top1(x, y), "test_top1": top1(x_test, y_test), "objective": objective,
                "grad_max": grad_max, "iters": n_iter, "converged": grad_max <= tol,
                "weights": (linear.weight.detach().cpu(), linear.bias.detach().cpu())}


PROBE_GRID = tuple(10.0 ** e for e in range(-6, 1))  # --transfer's l2 strengths: the decades from 1e-6 to 1


def tuned_probe(train_f, train_y, test_f, test_y, num_classes=None, iters=PROBE_ITERS, device="cpu", grid=PROBE_GRID):
    """The linear probe of Chen et al. 2020 (SimCLR, appendix B.8), which the paper follows for Table 1: each l2
    strength of `grid` is fitted on the training split less a validation split carved from it (carve_validation) and
    scored on that; the best (highest validation top-1; ties: the strongest) is refitted on the whole training split
    and scored on the test split. Chen et al. try 45 strengths from 1e-6 to 1e5; grid is 7 of them, one a decade. They
    select on a set's official validation split where it has one (Flowers-102); here it is carved for every set.
    eval.py's own probe is this one too, unless --probe-wd fixes the strength.
    -> linear_probe's dict, the chosen "weight_decay" and each strength's "validation_top1"."""
    val, scores, fits = carve_validation(train_y), {}, {}
    for wd in sorted(grid, reverse=True):  # strongest first, each fit starting from the last: a path, far fewer steps
        fits[wd] = linear_probe(train_f[~val], train_y[~val], train_f[val], train_y[val], num_classes, iters, wd,
                                device, GRID_TOL, start=fits[min(fits)]["weights"] if fits else None)
        scores[wd] = fits[wd]["test_top1"]
    best = max(grid, key=lambda wd: (scores[wd], wd))
    probe = linear_probe(train_f, train_y, test_f, test_y, num_classes, iters, best, device, start=fits[best]["weights"])
    probe.pop("weights")
    return {**probe, "weight_decay": best, "max_iters": iters, "tolerance": PROBE_TOL,
            "num_validation": int(val.sum()),
            "validation_top1": {f"{wd:g}": scores[wd] for wd in grid}}


def carve_validation(labels, fraction=0.2, seed=0):
    """A validation split carved from a training split with labels (N,) -> bool mask (N,). Stratified: each class gives
    floor(fraction x its count) samples, at least 1 if it has 2 or more, drawn by a seeded permutation, so every class
    keeps at least one training sample. Empty only if no class has 2 samples."""
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    order = perm[labels[perm].argsort(stable=True)]  # class by class, each in random order
    counts = torch.bincount(labels)
    grouped = labels[order]
    rank = torch.arange(n) - (counts.cumsum(0) - counts)[grouped]  # place within its class
    quota = torch.where(counts >= 2, (counts * fraction).long().clamp_min(1), 0)
    val = torch.zeros(n, dtype=torch.bool)
    val[order] = rank < quota[grouped]
    return val


def cluster_agreement(pred, true):
    """How well clusters pred (N,) agree with the true labels (N,), from the contingency table n_ij:
    NMI = I(P; T) / ((H(P) + H(T)) / 2) (arithmetic normalisation, scikit-learn's default; 1 when both are a
    single cluster), and purity = the accuracy of naming each cluster after its majority class."""
    T = int(true.max()) + 1
    n = torch.bincount(pred.long() * T + true.long(), minlength=(int(pred.max()) + 1) * T).view(-1, T).double()
    p = n / n.sum()
    entropy = lambda q: -torch.xlogy(q, q).sum().item()  # noqa: E731  (0 log 0 = 0)
    h_pred, h_true = entropy(p.sum(1)), entropy(p.sum(0))
    mi = h_pred + h_true - entropy(p)  # I(P; T) = H(P) + H(T) - H(P, T)
    h = h_pred + h_true
    return {"nmi": 1.0 if h == 0 else 2 * mi / h, "purity": (n.amax(1).sum() / n.sum()).item()}


def kmeans(x, k, iters=20, seed=0, chunk=8192, init=None):
    """Spherical k-means (Lloyd's algorithm with cosine similarity) of the rows of x (N, F), on x's device ->
    labels (N,) long, centroids (K, F) with unit rows. Appendix C clusters SimCLR features into pseudo labels.
    x is never copied: rows are L2-normalised chunk by chunk, so beyond x memory is O(chunk x (K + F) + K x F)
    plus a few rows of N (2 + ln K of them while initialising), never an (N, K) matrix.
    Initialisation: greedy k-means++ (Arthur & Vassilvitskii 2007; scikit-learn's default): each centroid is the
    best of 2 + ln K rows drawn with probability ∝ squared distance (2 - 2 cos) to the nearest centroid so far,
    drawn from torch.Generator(seed); or the rows of init. Each of the `iters` iterations assigns every row to
    its most similar centroid. A cluster left empty takes the row farthest from its centroid (lowest similarity
    first, never a cluster's last row), so every returned cluster is non-empty; centroids are then the
    normalised means of their clusters. Deterministic for a seed on the CPU (on CUDA, index_add_'s atomic adds
    may change the last bits)."""
    N, dev = len(x), x.device
    if not 1 <= k <= N or iters < 1:
        raise ValueError(f"k-means needs 1 <= k <= N samples and iters >= 1 (got k={k}, N={N}, iters={iters})")
    inv = torch.cat([rows.float().norm(dim=1).clamp_min(1e-12).reciprocal() for rows in x.split(chunk)])  # (N,)
    units = lambda: (rows.float() * s[:, None] for rows, s in zip(x.split(chunk), inv.split(chunk)))  # noqa: E731
    if init is not None:
        centroids = F.normalize(init.to(dev, torch.float32), dim=1)
    else:
        gen, trials = torch.Generator(dev).manual_seed(seed), 2 + int(math.log(k))
        centroids = torch.empty(k, x.shape[1], device=dev)
        d2 = torch.full((N,), 4.0, device=dev)  # squared distance to the nearest centroid so far (4 = antipodal)
        for j in range(k):  # greedy k-means++: of `trials` rows drawn with P ∝ d2, keep the one lowering Σ d2 most
            pick = torch.multinomial(d2.clamp_min(1e-12), 1 if j == 0 else trials, True, generator=gen)
            cand = x[pick].float() * inv[pick, None]  # (trials, F)
            d2_cand = torch.minimum(d2, 2 - 2 * (x @ cand.T.to(x.dtype)).float().T * inv)  # (trials, N)
            keep = d2_cand.sum(1).argmin()
            centroids[j], d2 = cand[keep], d2_cand[keep]
    for _ in range(iters):
        sums, labels, best = torch.zeros_like(centroids), [], []
        for u in units():  # (chunk, F) unit rows
            sim, lab = (u @ centroids.T).max(1)  # (chunk, K) -> (chunk,): the only K-wide tensor
            sums.index_add_(0, lab, u)
            labels.append(lab), best.append(sim)
        labels, best = torch.cat(labels), torch.cat(best)
        counts = torch.bincount(labels, minlength=k)
        empty = (counts == 0).nonzero().squeeze(1)
        if len(empty):  # re-seed: move the farthest rows there, each cluster keeping at least its nearest row
            order = best.argsort(stable=True)  # farthest first
            lab = labels[order]
            grouped = lab.argsort(stable=True)  # positions in `order`, cluster by cluster, farthest first
            rank = torch.empty_like(order)
            rank[grouped] = torch.arange(N, device=dev) - (counts.cumsum(0) - counts)[lab[grouped]]
            moved = order[rank < counts[lab] - 1][: len(empty)]
            u = x[moved].float() * inv[moved, None]
            sums.index_add_(0, labels[moved], -u).index_add_(0, empty, u)
            labels[moved] = empty
        centroids = F.normalize(sums, dim=1)
    return labels, centroids



# ----------------------------------------------------------------------------------------------- loading
# One entry per arch: a state_dict key and its shape that only this arch's backbone has (for any image size), so a
# weights file can say which arch it holds. Add a row with every new arch (a test checks that each is recognised).
ARCH_SIGNATURES = {"convnet": ("0.weight", (32, 3, 3, 3)),  # the stride-2 stem
                   "resnet18": ("layer1.0.conv1.weight", (64, 64, 3, 3)),  # basic blocks: 3x3 first conv
                   "resnet50": ("layer1.0.conv1.weight", (64, 64, 1, 1)),  # bottlenecks: 1x1 first conv
                   "vit_tiny": ("class_token", (1, 1, 192)), "vit_small": ("class_token", (1, 1, 384)),
                   "vit_base": ("class_token", (1, 1, 768))}


def arch_of(state):
    """The arch whose backbone state_dict `state` is, by ARCH_SIGNATURES; None if it is none of them."""
    for arch, (key, shape) in ARCH_SIGNATURES.items():
        if isinstance(state, dict) and tuple(getattr(state.get(key), "shape", ())) == shape:
            return arch
    return None


def read(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{what} {path}: no such file")
    try:
        return simlap.load_tensors(path)
    except ValueError as e:
        raise UserError(f"{what} {path} {e}") from None


def load_strict(module, state, path):
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:  # missing/unexpected keys or other shapes: another arch or another model
        raise UserError(f"{path} does not fit the model (wrong --arch?): {one_line(e, 300)}") from None


def load_weights(checkpoint=None, backbone=None, arch=None):
    """-> (backbone, SimLAP or None, info). info holds arch, small_images and image_size, and with a checkpoint
    every train flag. A bare backbone.pt carries no flags, so its arch (simlap.arch_of) and geometry are read off
    its weights: a 3x3 ResNet conv1 is the small-image stem (7x7 otherwise); a ViT's patch is its conv_proj kernel
    (4 = small images) and its image size follows from the number of position embeddings, (size / patch)^2 + 1."""
    if checkpoint:
        ckpt = read(checkpoint, "--checkpoint")
        if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and isinstance(ckpt.get("args"), dict)):
            held = arch_of(ckpt)
            raise UserError(f"--checkpoint {checkpoint} is not a SimLAP checkpoint (a dict with 'model' and 'args')"
                            + (f"; it holds a bare {held} backbone: pass it as --backbone" if held else ""))
        a = ckpt["args"]
        missing = {"arch", "num_classes", "small_images", "image_size", "proj_hidden", "proj_dim"} - a.keys()
        if missing:
            raise UserError(f"--checkpoint {checkpoint}: its args lack {', '.join(sorted(missing))}")
        if arch and arch != a["arch"]:
            raise UserError(f"--arch {arch} does not match the checkpoint, which is a {a['arch']}")
        model = simlap.SimLAP(arch=a["arch"], num_classes=a["num_classes"], small_images=a["small_images"],
                              image_size=a["image_size"], proj_hidden=a["proj_hidden"], proj_dim=a["proj_dim"],
                              method=a.get("method", "simlap"))  # simlap-moco's heads differ
        load_strict(model, ckpt["model"], checkpoint)
        return model.backbone, model, dict(a)
    state = read(backbone, "--backbone")
    held = arch_of(state)  # read off its keys and shapes
    if arch and held and arch != held:
        raise UserError(f"--backbone {backbone} holds a {held} backbone, but --arch {arch} was asked for; "
                        f"pass --arch {held}")
    if isinstance(state, dict) and {"model", "args"} <= state.keys():
        raise UserError(f"--backbone {backbone} is a train.py checkpoint: pass it as --checkpoint")
    arch = arch or held
    if not arch:
        raise UserError(f"--backbone {backbone} is not a backbone state_dict of a known arch "
                        f"({', '.join(simlap.ARCHS)}); pass --arch if it is one")
    try:
        if arch == "convnet":  # any image size; 32 px by default
            small, size = True, None
        elif arch.startswith("resnet"):
            small, size = state["conv1.weight"].shape[-1] == 3, None
        else:
            patch, seq = state["conv_proj.weight"].shape[-1], state["encoder.pos_embedding"].shape[1]
            small, size = patch == 4, patch * math.isqrt(seq - 1)
    except (KeyError, TypeError, IndexError) as e:  # not a state_dict, or one without this arch's stem
        raise UserError(f"--backbone {backbone} does not look like a {arch} state_dict "
                        f"({type(e).__name__}: {one_line(e)}); wrong --arch?") from None
    net, _ = simlap.build_backbone(arch, small, size)
    load_strict(net, state, backbone)
    return net, None, {"arch": arch, "small_images": small, "image_size": size}


def load_split(name, root, split, size, per_class=None, download=False, classes=None):
    if not root and name != "synthetic":
        raise UserError(f"--dataset {name} needs --data ROOT (the checkpoint names none)")
    try:
        return simlap.build_dataset(name, root, split, simlap.eval_transform(size), download, per_class, classes)
    except (FileNotFoundError, ValueError) as e:  # build_dataset's messages name the path and the fix
        raise UserError(str(e)) from None


def all_features(backbone, splits, args, device, source):
    """{split: (feats (N, F) float32 CPU, labels (N,))}, from --cache-features when it was made from `source`."""
    if args.cache_features and os.path.exists(args.cache_features):
        cache = read(args.cache_features, "--cache-features")
        if not isinstance(cache, dict) or cache.get("source") != source:
            raise UserError(f"--cache-features {args.cache_features} holds features of other weights, data or "
                            "image size; delete it or pick another file")
        return cache["feats"]
    feats = {}
    for split, ds in splits.items():
        loader = torch.utils.data.DataLoader(ds, args.batch_size, num_workers=args.workers,
                                             pin_memory=device.type == "cuda")
        feats[split] = simlap.extract_features(backbone, loader, device, desc=f"features ({split})")
    if args.cache_features:
        simlap.save_atomic({"source": source, "feats": feats}, args.cache_features)
    return feats


def check_labels(args, dataset, splits):
    """--labels FILE: its pseudo labels (N,), refused unless they label exactly this train split, in its order."""
    try:
        return simlap.load_labels(args.labels, dataset, splits["train"])[0]
    except ValueError as e:
        raise UserError(str(e)) from None


def pseudo_labels(args, feats, true, train_set, source, out_dir, device):
    """--kmeans K (appendix C): spherical k-means of the train-split features -> OUTPUT_DIR/pseudo_labels_K.pt with
    one label per training sample in the data set's index order, the centroids, and what train.py --labels
    checks (data set, size, fingerprint); returns the clusters' agreement with the true labels."""
    tic = time.time()
    labels, centroids = kmeans(feats.to(device), args.kmeans, args.kmeans_iters, args.kmeans_seed)
    res = {"clusters": args.kmeans, "iters": args.kmeans_iters, "seed": args.kmeans_seed,
           "seconds": time.time() - tic, **cluster_agreement(labels.cpu(), true)}
    path = os.path.join(out_dir, f"pseudo_labels_{args.kmeans}.pt")
    simlap.save_atomic({"labels": labels.cpu(), "centroids": centroids.cpu(), "num_clusters": args.kmeans,
                        "dataset": source["dataset"], "num_samples": len(labels),
                        "fingerprint": simlap.fingerprint(train_set), "source": source, **res}, path)
    return {"file": path, **res}


def image_size(args, backbone, info):
    """--image-size, else the size the weights were trained at; a ViT takes only the size its position embedding
    fits."""
    size = args.image_size or info.get("image_size") or (32 if info["small_images"] else 224)
    if getattr(backbone, "image_size", size) != size:
        raise UserError(f"--image-size {size}: this ViT was built for {backbone.image_size} px images")
    return size


def check_bank(args, n_train, what=""):
    """The kNN at --k and at the paper's k = 10 needs at least that many training samples in its bank."""
    if max(args.k, PAPER_K) > n_train:
        raise UserError(f"{what}k={max(args.k, PAPER_K)} is larger than the kNN bank ({n_train} train samples)")


@contextlib.contextmanager
def unchanged(backbone):
    """Raises (a bug, not a bad input: with a traceback) if the backbone's weights change within the block."""
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    yield
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v, frozen[k])]
    if changed:
        raise RuntimeError(f"the backbone changed during evaluation ({', '.join(changed[:3])}, ...)")


# ----------------------------------------------------------------------------------------------- main
def build_parser():
    """Every numeric flag takes a simlap.ranged type (positive_int, ...): impossible values fail at parsing."""
    p = simlap.Parser(description="kNN, linear probe and the paper's analyses of a SimLAP encoder.")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="checkpoint.pt from train.py (model and train args)")
    weights.add_argument("--backbone", help="backbone.pt from train.py (a bare state_dict)")
    weights.add_argument("--compare", nargs="+", metavar="DIR", help="no weights: the eval.json of these eval.py "
                         "outputs side by side, with overlay figures, into --output-dir")
    p.add_argument("--arch", choices=simlap.ARCHS, help="backbone arch, checked against the weights (default: the "
                   "arch the weights hold)")
    p.add_argument("--dataset", choices=simlap.DATASETS,
                   help="evaluation data set (default: the checkpoint's, else synthetic)")
    p.add_argument("--data", help="data set root (default: the checkpoint's)")
    p.add_argument("--download", action="store_true", help="download the data set if missing (default: off)")
    p.add_argument("--synthetic-per-class", type=positive_int, help="synthetic train images per class, the test split "
                   "gets a quarter, at least 10 (default: the checkpoint's, else 500 train and 100 test)")
    p.add_argument("--classes", type=simlap.class_ids, help="evaluate on these class ids only, comma-separated, e.g. "
                   "the classes a run held out (default: the checkpoint's --classes on its own data set, else all)")
    p.add_argument("--image-size", type=positive_int,
                   help="eval image size (default: the checkpoint's; for a bare backbone 32 with the small-image "
                        "stem, else 224; a ViT's own size)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="feature extraction batch (default: 256)")
    p.add_argument("--workers", type=nonneg_int, default=min(4, len(os.sched_getaffinity(0))),
                   help="data loader workers (default: 4, or the number of CPUs if fewer)")
    p.add_argument("--k", type=positive_int, default=simlap.KNN_K,
                   help=f"kNN neighbours; k={PAPER_K} is always reported too (default: {simlap.KNN_K})")
    p.add_argument("--temperature", type=positive_float, default=simlap.KNN_T,
                   help=f"kNN vote temperature T (default: {simlap.KNN_T})")
    p.add_argument("--probe-iters", type=positive_int, default=PROBE_ITERS,
                   help=f"most L-BFGS iterations of each probe fit, a safeguard: a fit stops once its gradient's "
                        f"largest entry is below {PROBE_TOL:g}, and says so if it stops here (default: {PROBE_ITERS})")
    p.add_argument("--probe-wd", type=nonneg_float, help="L2 strength of the probe (default: picked among "
                   "1e-6, 1e-5, ..., 1 on a validation split carved from the training split, as --transfer does)")
    p.add_argument("--output-dir", help="where eval.json and the gate pictures go (default: the folder of the "
                   "weights)")
    p.add_argument("--cache-features", metavar="FILE", help="reuse features from FILE, or save them there "
                                                            "(default: kept in memory only)")
    p.add_argument("--kmeans", type=simlap.ranged(int, 2), metavar="K",
                   help="also cluster the train-split features into K pseudo labels "
                   "(spherical k-means, appendix C), saved to OUTPUT_DIR/pseudo_labels_K.pt for train.py --labels")
    p.add_argument("--kmeans-iters", type=positive_int, default=20, help="k-means iterations (default: 20)")
    p.add_argument("--kmeans-seed", type=nonneg_int, default=0, help="k-means++ seed (default: 0)")
    p.add_argument("--labels", metavar="FILE", help="also report how well the pseudo labels in FILE (eval.py "
                   "--kmeans) agree with the true train labels: NMI and purity (default: none)")
    p.add_argument("--transfer", metavar="SETS", help="instead, the paper's transfer evaluation on each of SETS under "
                   "--data (comma-separated; table1 = cars,cifar10,cifar100,flowers102,pets,stl10, table4 = cifar10,"
                   "cifar100,cars,food101): kNN and a linear probe with its l2 tuned on a validation split, to "
                   "OUTPUT_DIR/transfer.json and transfer.md in the layouts of Tables 1 and 4 (default: off)")
    p.add_argument("--no-figures", action="store_true", help="numbers only: no t-SNE, CLAM, figures or report.md "
                   "(default: all of them)")
    p.add_argument("--groups", nargs=2, metavar=("A", "B"), help="Fig. 5's two groups of classes, each a comma-"
                   "separated list of class names or ids (default on the synthetic set: red square, triangle, cross "
                   "against green, blue, yellow circle; else classes 0-4 against 5-9)")
    p.add_argument("--pair", nargs=2, metavar=("Y1", "Y2"), help="Fig. 5's pair, Y1 of the first group and Y2 of the "
                   "second, whose subspace g(Y1, Y2) is shown (default: the first class of each group)")
    p.add_argument("--clam-pairs", nargs="+", metavar="Y1,Y2", help="Fig. 6's class pairs (default on the synthetic "
                   "set: 6 pairs sharing a shape, a colour or nothing; else 0,1 2,3 4,5 6,7)")
    p.add_argument("--clam-views", type=positive_int, default=16, help="augmented views per anchor in CLAM "
                   "(default: 16)")
    p.add_argument("--tsne-points", type=simlap.ranged(int, 10), default=2000, help="samples in Fig. 5's t-SNE at "
                   "most; a seeded subset beyond (default: 2000)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device (default: cuda if available, else cpu)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        raise UserError(f"--device {args.device}: {one_line(e)}") from None
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available here; pass --device cpu")
    if args.transfer is not None:
        from paper.transfer import check_args
        check_args(args)  # args.transfer becomes the list of its sets
    for name in args.transfer or [args.dataset]:  # a package the data sets need, before anything else runs
        if simlap.missing_package(name):
            raise UserError(simlap.missing_package(name))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        from paper.figures import compare
        return compare(args.compare, args.output_dir)
    backbone, model, info = load_weights(args.checkpoint, args.backbone, args.arch)
    if args.transfer:
        from paper.transfer import transfer
        return transfer(args, backbone, info)
    setting, splits, given = load_eval_data(args, backbone, info)  # user errors surface here, before any write
    figures = None if args.no_figures else importlib.import_module("paper.figures")  # drawing code only if drawn
    plan = figures and figures.figure_plan(args, splits["test"], model, info, setting["dataset"])
    backbone.to(args.device)
    out_dir = args.output_dir or os.path.dirname(setting["weights"])
    with unchanged(backbone):  # nothing below trains it
        feats = all_features(backbone, splits, args, args.device, setting)
        (train_f, train_y), (test_f, test_y) = feats["train"], feats["test"]
        os.makedirs(out_dir, exist_ok=True)
        res = {"checkpoint": args.checkpoint, "backbone": args.backbone, "arch": info["arch"],
               "method": info.get("method"), "trained_on": info.get("dataset"), "dataset": setting["dataset"],
               "data": setting["data"], "image_size": setting["image_size"], "num_train": len(train_y),
               "num_test": len(test_y), "feature_dim": train_f.shape[1]}
        if given is not None:
            res["labels"] = {"file": args.labels, **cluster_agreement(given, train_y)}
        if args.kmeans:
            res["kmeans"] = pseudo_labels(args, train_f, train_y, splits["train"], setting, out_dir, args.device)
        res.update(classify(args, feats))
    res.update(analyses(model, info, test_f, test_y, args.device))
    if plan:
        res.update(figures.paper_figures(args, model, backbone, info, splits["test"], feats["test"], res, plan,
                                         out_dir))
    path = os.path.join(out_dir, "eval.json")
    simlap.save_atomic(res, path, save=simlap.save_json)
    print_table(res)
    print(f"wrote {path}" + (f", {figures.run_report(res, out_dir)} and {len(res['figures'])} figures" if plan
                             else ""))
    return res


def load_eval_data(args, backbone, info):
    """-> (the setting the features come from, the {"train", "test"} splits, the --labels file's labels or None),
    refusing what cannot be evaluated."""
    dataset, data = args.dataset or info.get("dataset") or "synthetic", args.data or info.get("data")
    size = image_size(args, backbone, info)
    per_class = args.synthetic_per_class or info.get("synthetic_per_class")
    # a checkpoint trained on some classes (train.py --classes) is evaluated on those by default
    classes = args.classes or (info.get("classes") if dataset == info.get("dataset") else None)
    splits = {s: load_split(dataset, data, s, size, per_class, args.download, classes) for s in ("train", "test")}
    n_train = len(splits["train"])
    check_bank(args, n_train)
    if args.kmeans is not None and not (2 <= args.kmeans <= n_train and args.kmeans_iters >= 1):
        raise UserError(f"--kmeans {args.kmeans} --kmeans-iters {args.kmeans_iters}: give 2 to {n_train} "
                        "(the train samples) clusters and at least 1 iteration")
    weights = args.checkpoint or args.backbone
    setting = {"weights": os.path.abspath(weights), "mtime_ns": os.stat(weights).st_mtime_ns, "dataset": dataset,
               "data": data, "image_size": size, "synthetic_per_class": per_class, "classes": classes}
    return setting, splits, check_labels(args, dataset, splits) if args.labels else None


def classify(args, feats):
    """Weighted kNN at --k and at the paper's k = 10, and the linear probe, on the test split's features: its l2 picked
    on a validation split (tuned_probe), or --probe-wd's."""
    (train_f, train_y), (test_f, test_y) = feats["train"], feats["test"]
    if args.probe_wd is None:
        probe = tuned_probe(train_f, train_y, test_f, test_y, iters=args.probe_iters, device=args.device)
    else:
        probe = {**linear_probe(train_f, train_y, test_f, test_y, iters=args.probe_iters,
                                weight_decay=args.probe_wd, device=args.device),
                 "weight_decay": args.probe_wd, "max_iters": args.probe_iters, "tolerance": PROBE_TOL}
    probe.pop("weights", None)  # the fitted layer: not a number for eval.json
    return {"knn": knn_accuracy(args, feats), "linear_probe": probe}


def knn_accuracy(args, feats):
    """Weighted kNN top-1 % on the test split's features, at --k and at the paper's k = 10 -> {"k=K T=T": %}."""
    (train_f, train_y), (test_f, test_y) = feats["train"], feats["test"]
    bank, bank_y, queries, knn = train_f.to(args.device), train_y.to(args.device), test_f.to(args.device), {}
    for k in sorted({args.k, PAPER_K}, key=lambda k: k != args.k):  # --k first
        pred = simlap.knn_classify(bank, bank_y, queries, k, args.temperature).cpu()
        knn[knn_key(k, args.temperature)] = 100 * (pred == test_y).float().mean().item()
    return knn


def knn_key(k, T):
    return f"k={k} T={T:g}"


def print_table(res, prefix=""):
    """Every scalar of eval.json, one a line; the lists (spectra, histograms, K x K matrices) stay in the file."""
    for key, value in res.items():
        if isinstance(value, dict):
            print_table(value, f"{prefix}{key}/")
        elif not isinstance(value, list):
            print(f"  {prefix + key:<44}{f'{value:.4f}' if isinstance(value, float) else value}")



def cli(argv=None):
    simlap.cli(main, "eval.py", argv)


if __name__ == "__main__":
    cli()
