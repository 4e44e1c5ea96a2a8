"""Evaluate a SimLAP encoder on frozen features: weighted kNN and a linear probe, plus the paper's analyses of
the class gates (Fig. 9, 12), of dimensional collapse (Fig. 3b) and of the similarity distributions (Fig. 4).

    python eval.py --checkpoint runs/x/checkpoint.pt                      # on the checkpoint's own data set
    python eval.py --checkpoint runs/x/checkpoint.pt --dataset cifar10 --data ~/data --download
    python eval.py --backbone runs/x/backbone.pt --dataset stl10 --data ~/data --image-size 96  # arch read off it
    python eval.py --checkpoint runs/x/checkpoint.pt --synthetic-per-class 20 --image-size 16 --device cpu  # smoke
    python eval.py --checkpoint runs/simclr/checkpoint.pt --kmeans 1000     # pseudo labels for train.py --labels
The paper's transfer evaluation (Table 1: linear probe on 6 sets; Table 4: kNN, k = 10, on 4), every set under --data:
    python eval.py --backbone runs/x/backbone.pt --image-size 224 --data ~/data --transfer table1,table4

The train split is the kNN bank and the probe's training set; the test split is what is evaluated. Features come
from the backbone only (appendix B keeps f_E alone), in eval mode; they are extracted once per split and reused by
every evaluation (--cache-features also keeps them on disk). --kmeans K clusters the train-split features into K
pseudo labels (appendix C) and reports their NMI and purity against the true labels; --labels FILE reports those of
an existing label file. Everything else uses the true labels. Every number goes to OUTPUT_DIR/eval.json (default:
the folder of the weights), the K x D class gates to gates.png and their K x K overlap to gates_overlap.png. A
bad input (an impossible flag value, missing or corrupt weights, weights carrying pickled code, another arch, missing
data or split, a package a data set needs, k larger than the bank) prints one line on stderr and exits with status 2,
before anything is written; so does an image file that cannot be decoded, when it is met.

--transfer SETS evaluates one backbone on each set's official train/test split (README: the splits and sizes) by the
protocol of Chen et al. 2020 (SimCLR, appendix B.8), which the paper cites: every image resized to --image-size on its
shorter side (bicubic) and center-cropped, ImageNet normalisation, features extracted once per set; weighted kNN at
k = 10 (Table 4) and --k; an L-BFGS logistic-regression probe whose l2 strength is chosen on a validation split carved
from the training split (a seeded, stratified 20 %) among 1e-6, 1e-5, ..., 1 (Chen et al.: 45 values from 1e-6 to
1e5), then refitted on the whole training split and scored on test (tuned_probe). Results go to transfer.json and
transfer.md, one row per set and the layouts of Tables 1 and 4 with the paper's rows beside; a set missing under
--data is reported as missing, with how to get it, and the others still run. What each set is read from under --data
(as torchvision's downloads unpack; Stanford Cars can no longer be downloaded):
    cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}    cifar-100-python/{train,test,meta}
    stl10_binary/{train_X,train_y,test_X,test_y,unlabeled_X}.bin      flowers-102/{jpg/,imagelabels.mat,setid.mat}
    oxford-iiit-pet/{images/,annotations/trainval.txt,test.txt}      food-101/{images/<class>/,meta/{train,test}.json}
    stanford_cars/{devkit/{cars_meta,cars_train_annos}.mat,cars_train/,cars_test/,cars_test_annos_withlabels.mat}
    imagefolder: train/<class>/* and val/<class>/*, val's classes matched to train's by folder name
"""
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

import simlap
from simlap import UserError, nonneg_float, nonneg_int, one_line, positive_float, positive_int

PAPER_K = 10  # Table 3 reports kNN at k = 10: always reported beside --k


# ----------------------------------------------------------------------------------------------- evaluations
def linear_probe(train_f, train_y, test_f, test_y, num_classes=None, iters=300, weight_decay=1e-4, device="cpu"):
    """Multinomial logistic regression on frozen features (N, F) -> {"train_top1", "test_top1"} in %.
    Full-batch L-BFGS with an L2 penalty, SimCLR's transfer protocol (Chen et al. 2020): the problem is convex and
    L-BFGS has no learning rate or schedule to tune, so the number measures the features, not an optimiser, and is
    deterministic. Features are standardised with train statistics (a non-affine BatchNorm, in effect) so that one
    weight decay suits every backbone (SimCLR tunes it on a validation split; here it is a flag). The test accuracy
    is the final iterate's: the test split selects nothing. Full batch: fine up to ~1M x 2048 features on a GPU."""
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    x, x_test = ((train_f - mean) / std).to(device), ((test_f - mean) / std).to(device)
    y, y_test = train_y.to(device), test_y.to(device)
    C = num_classes or int(max(train_y.max(), test_y.max())) + 1
    linear = nn.Linear(x.shape[1], C).to(device)
    nn.init.zeros_(linear.weight)  # convex: a fixed start makes the result deterministic
    nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=iters, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(x), y) + weight_decay / 2 * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)  # runs up to `iters` iterations, or stops earlier once converged
    with torch.no_grad():
        top1 = lambda a, b: 100 * (linear(a).argmax(1) == b).float().mean().item()  # noqa: E731
        return {"train_top1": top1(x, y), "test_top1": top1(x_test, y_test)}


PROBE_GRID = tuple(10.0 ** e for e in range(-6, 1))  # --transfer's l2 strengths: the decades from 1e-6 to 1


def tuned_probe(train_f, train_y, test_f, test_y, num_classes=None, iters=300, device="cpu", grid=PROBE_GRID):
    """The linear probe of Chen et al. 2020 (SimCLR, appendix B.8), which the paper follows for Table 1: each l2
    strength of `grid` is fitted on the training split less a validation split carved from it (carve_validation) and
    scored on that; the best (highest validation top-1; ties: the strongest) is refitted on the whole training split
    and scored on the test split. Chen et al. try 45 strengths from 1e-6 to 1e5; grid is 7 of them, one a decade. They
    select on a set's official validation split where it has one (Flowers-102); here it is carved for every set.
    -> linear_probe's dict, the chosen "weight_decay" and each strength's "validation_top1"."""
    val = carve_validation(train_y)
    scores = {wd: linear_probe(train_f[~val], train_y[~val], train_f[val], train_y[val], num_classes, iters, wd,
                               device)["test_top1"] for wd in grid}
    best = max(grid, key=lambda wd: (scores[wd], wd))
    probe = linear_probe(train_f, train_y, test_f, test_y, num_classes, iters, best, device)
    return {**probe, "weight_decay": best, "iters": iters, "num_validation": int(val.sum()),
            "validation_top1": {f"{wd:g}": top1 for wd, top1 in scores.items()}}


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


def singular_values(feats):
    """Singular values, descending, of the embeddings (N, F) after centring -> (min(N, F),) float64. Centring
    keeps the mean direction from adding one large value unrelated to collapse. (Jing et al. 2022 plot the
    eigenvalues of the covariance, i.e. these values squared / N, on a log scale.)"""
    x = feats.double()
    return torch.linalg.svdvals(x - x.mean(0))


def effective_rank(s):
    """Roy & Vetterli (2007): exp of the Shannon entropy of the singular values s normalised to sum 1 (L1,
    p_k = s_k / sum s). r equal non-zero values give exactly r; one dominant direction gives ~1."""
    p = s.double() / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


@torch.no_grad()
def similarity_overlap(feats, labels, bins=100, max_samples=10_000, chunk=1024, seed=0):
    """Fig. 4: cosine similarity of all pairs i < j, as histograms on [-1, 1] of intra-class (same label) and
    inter-class pairs, and their overlap = sum over bins of min(p_intra, p_inter) of the normalised histograms
    (1 = indistinguishable, 0 = separated; smaller is better). Rows go in chunks, so memory is O(chunk x N);
    beyond max_samples a fixed random subset of samples is used, with all of its pairs."""
    if len(feats) > max_samples:
        keep = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed))[:max_samples]
        feats, labels = feats[keep], labels[keep]
    x, labels, idx = F.normalize(feats.float(), dim=1), labels.cpu(), torch.arange(len(feats))
    hist = {"intra": torch.zeros(bins, dtype=torch.float64), "inter": torch.zeros(bins, dtype=torch.float64)}
    total = {"intra": 0.0, "inter": 0.0}
    for rows in idx.split(chunk):
        sim = (x[rows] @ x.T).clamp(-1, 1).cpu()  # (b, N); histc drops values outside [-1, 1]
        upper = rows[:, None] < idx[None, :]  # each pair once, no self-pairs
        same = labels[rows, None] == labels[None, :]
        for name, mask in (("intra", upper & same), ("inter", upper & ~same)):
            hist[name] += torch.histc(sim[mask], bins, -1, 1).double()
            total[name] += sim[mask].double().sum().item()
    out = {"num_samples": len(x), "bins": bins}
    for name, h in hist.items():
        out.update({f"{name}_pairs": int(h.sum()), f"{name}_mean": total[name] / max(h.sum().item(), 1),
                    f"{name}_hist": h.tolist()})
    p_intra, p_inter = (h / h.sum().clamp_min(1) for h in hist.values())
    return {"overlap": torch.minimum(p_intra, p_inter).sum().item(), **out}


@torch.no_grad()
def class_gates(feature_filter):
    """g(y) for every class y = 0..K-1 (eq. 4), with the filter in eval mode -> (K, D) float32 CPU."""
    was_training = feature_filter.training
    feature_filter.eval()
    gates = feature_filter.class_gates().float().cpu()
    feature_filter.train(was_training)
    return gates


def gate_analysis(gates, label_embed=None, attributes=None, png=None):
    """Class gates (K, D) -> per class the open dimensions (gate > 0.5) and the gate entropy (Fig. 9); the
    class-by-class gate overlap = cosine of the gates sharpened to {0, 1} (Fig. 12; a class with no open gate
    overlaps nothing, itself included); with label_embed (K, E) the cosine of the label embeddings f_l (Fig. 12).
    attributes (K, A), the ground truth of simlap.class_attributes (synthetic: shape and colour; fashionmnist: the
    natural group): also the mean overlap of class pairs that share an attribute against pairs that share none.
    png: pictures of both (save_gate_pictures)."""
    sharp = F.normalize((gates > 0.5).float(), dim=1)  # (K, D), unit rows (zero rows stay zero)
    overlap = sharp @ sharp.T  # (K, K)
    open_dims, entropy = (gates > 0.5).sum(1), simlap.gate_entropy(gates, dim=1)  # (K,), (K,)
    out = {"mean_open_dims": open_dims.float().mean().item(), "mean_entropy": entropy.mean().item(),
           "open_dims": open_dims.tolist(), "entropy": entropy.tolist(), "gate_overlap": overlap.tolist()}
    if label_embed is not None:
        e = F.normalize(label_embed.detach().float().cpu(), dim=1)
        out["label_similarity"] = (e @ e.T).tolist()
    if attributes is not None:
        share = (attributes[:, None, :] == attributes[None, :, :]).any(-1)  # (K, K), the diagonal included
        share_other = share & ~torch.eye(len(gates), dtype=torch.bool)
        out["overlap_shared_attribute"] = overlap[share_other].mean().item()
        out["overlap_no_shared_attribute"] = overlap[~share].mean().item()
    if png:
        out["pictures"] = save_gate_pictures(gates, overlap, png)
    return out


def save_gate_pictures(gates, overlap, png):
    """png: the (K, D) gates, white = open, one row per class in class-index order (up to 8 px tall), the columns
    (dimensions) sorted by the first class that opens them, then by how many classes do, so that a subspace shared
    by several classes shows as a vertical band; png with '_overlap': the (K, K) gate overlap (cells up to 16 px).
    -> the two paths, and the column order."""
    K, D = gates.shape
    is_open = gates > 0.5
    first = torch.where(is_open.any(0), is_open.float().argmax(0), K)  # (D,), K = opened by none
    order = is_open.sum(0).argsort(descending=True, stable=True)
    order = order[first[order].argsort(stable=True)]
    scale = lambda t, h, w: t.repeat_interleave(h, 0).repeat_interleave(w, 1)[None]  # noqa: E731  (1, H, W)
    torchvision.utils.save_image(scale(gates[:, order], max(1, min(8, 1024 // K)), max(1, min(4, 1024 // D))), png)
    cell = max(1, min(16, 1024 // K))
    overlap_png = png.replace(".png", "_overlap.png")
    torchvision.utils.save_image(scale(overlap.clamp(0, 1), cell, cell), overlap_png)
    return {"gates": png, "overlap": overlap_png, "rows": "classes in index order", "gates_columns": order.tolist()}


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


# ----------------------------------------------------------------------------------------------- main
def build_parser():
    """Every numeric flag takes a simlap.ranged type (positive_int, ...): impossible values fail at parsing."""
    p = simlap.Parser(description="kNN, linear probe and the paper's analyses of a SimLAP encoder.")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="checkpoint.pt from train.py (model and train args)")
    weights.add_argument("--backbone", help="backbone.pt from train.py (a bare state_dict)")
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
    p.add_argument("--workers", type=nonneg_int, default=4, help="data loader workers (default: 4)")
    p.add_argument("--k", type=positive_int, default=simlap.KNN_K,
                   help=f"kNN neighbours; k={PAPER_K} is always reported too (default: {simlap.KNN_K})")
    p.add_argument("--temperature", type=positive_float, default=simlap.KNN_T,
                   help=f"kNN vote temperature T (default: {simlap.KNN_T})")
    p.add_argument("--probe-iters", type=positive_int, default=300,
                   help="L-BFGS iterations of the probe (default: 300)")
    p.add_argument("--probe-wd", type=nonneg_float, default=1e-4, help="L2 strength of the probe; --transfer picks "
                   "its own on a validation split (default: 1e-4)")
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
        args.transfer = transfer_sets(args.transfer)
        for flag, value in (("--dataset", args.dataset), ("--kmeans", args.kmeans), ("--labels", args.labels),
                            ("--cache-features", args.cache_features)):
            if value is not None:
                raise UserError(f"{flag} does not apply to --transfer, which evaluates each of its sets; leave it out")
    for name in args.transfer or [args.dataset]:  # a package the data sets need, before anything else runs
        if simlap.missing_package(name):
            raise UserError(simlap.missing_package(name))
    return args


def main(argv=None):
    args = parse_args(argv)
    backbone, model, info = load_weights(args.checkpoint, args.backbone, args.arch)
    if args.transfer:
        return transfer(args, backbone, info)
    setting, splits, given = load_eval_data(args, backbone, info)  # user errors surface here, before any write
    backbone.to(args.device)
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}  # to check below that nothing trained it
    feats = all_features(backbone, splits, args, args.device, setting)
    (train_f, train_y), (test_f, test_y) = feats["train"], feats["test"]
    out_dir = args.output_dir or os.path.dirname(setting["weights"])
    os.makedirs(out_dir, exist_ok=True)
    res = {"checkpoint": args.checkpoint, "backbone": args.backbone, "arch": info["arch"],
           "trained_on": info.get("dataset"), "dataset": setting["dataset"], "data": setting["data"],
           "image_size": setting["image_size"], "num_train": len(train_y), "num_test": len(test_y),
           "feature_dim": train_f.shape[1]}
    if given is not None:
        res["labels"] = {"file": args.labels, **cluster_agreement(given, train_y)}
    if args.kmeans:
        res["kmeans"] = pseudo_labels(args, train_f, train_y, splits["train"], setting, out_dir, args.device)
    res.update(classify(args, feats))
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v, frozen[k])]
    if changed:  # a bug, not a bad input: let it raise with a traceback
        raise RuntimeError(f"the backbone changed during evaluation ({', '.join(changed[:3])}, ...)")
    res.update(analyses(model, info, test_f, test_y, args.device, out_dir))
    path = os.path.join(out_dir, "eval.json")
    simlap.save_atomic(res, path, save=simlap.save_json)
    print_table(res)
    print(f"wrote {path}")
    return res


def load_eval_data(args, backbone, info):
    """-> (the setting the features come from, the {"train", "test"} splits, the --labels file's labels or None),
    refusing what cannot be evaluated."""
    dataset, data = args.dataset or info.get("dataset") or "synthetic", args.data or info.get("data")
    size = args.image_size or info.get("image_size") or (32 if info["small_images"] else 224)
    if getattr(backbone, "image_size", size) != size:  # a ViT takes only the size its position embedding fits
        raise UserError(f"--image-size {size}: this ViT was built for {backbone.image_size} px images")
    per_class = args.synthetic_per_class or info.get("synthetic_per_class")
    # a checkpoint trained on some classes (train.py --classes) is evaluated on those by default
    classes = args.classes or (simlap.trained_classes(info) if dataset == info.get("dataset") else None)
    splits = {s: load_split(dataset, data, s, size, per_class, args.download, classes) for s in ("train", "test")}
    n_train = len(splits["train"])
    if max(args.k, PAPER_K) > n_train:
        raise UserError(f"k={max(args.k, PAPER_K)} is larger than the kNN bank ({n_train} train samples)")
    if args.kmeans is not None and not (2 <= args.kmeans <= n_train and args.kmeans_iters >= 1):
        raise UserError(f"--kmeans {args.kmeans} --kmeans-iters {args.kmeans_iters}: give 2 to {n_train} "
                        "(the train samples) clusters and at least 1 iteration")
    weights = args.checkpoint or args.backbone
    setting = {"weights": os.path.abspath(weights), "mtime_ns": os.stat(weights).st_mtime_ns, "dataset": dataset,
               "data": data, "image_size": size, "synthetic_per_class": per_class, "classes": classes}
    return setting, splits, check_labels(args, dataset, splits) if args.labels else None


def classify(args, feats):
    """Weighted kNN at --k and at the paper's k = 10, and the linear probe, on the test split's features."""
    (train_f, train_y), (test_f, test_y) = feats["train"], feats["test"]
    probe = linear_probe(train_f, train_y, test_f, test_y, iters=args.probe_iters, weight_decay=args.probe_wd,
                         device=args.device)
    return {"knn": knn_accuracy(args, feats),
            "linear_probe": {**probe, "iters": args.probe_iters, "weight_decay": args.probe_wd}}


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


def analyses(model, info, test_f, test_y, device, out_dir):
    """Dimensional collapse (Fig. 3b) of the backbone and projector embeddings, the similarity distributions
    (Fig. 4), and for the methods with a filter the class gates (Fig. 9, 12)."""
    embeddings = {"backbone": test_f}  # on the eval split
    if model is not None:
        projector = model.projector.to(device).eval()
        with torch.no_grad():
            embeddings["projector"] = torch.cat([projector(b.to(device)).float().cpu() for b in test_f.split(1024)])
    res = {"collapse": {}}
    for name, e in embeddings.items():
        s = singular_values(e)
        res["collapse"][name] = {"effective_rank": effective_rank(s), "dim": e.shape[1], "singular_values": s.tolist()}
    res["similarity"] = similarity_overlap(test_f, test_y)
    if model is not None and simlap.METHODS[info.get("method", "simlap")].filter:  # the others train no filter
        # Ground truth: the attributes (synthetic) or natural groups (fashionmnist) of the classes the filter was
        # trained on; the eval set plays no part in the gates. Pseudo labels have none.
        attributes = None
        if not info.get("labels"):
            attributes = simlap.class_attributes(info.get("dataset"), simlap.trained_classes(info))
            attributes = attributes if attributes is not None and len(attributes) == model.num_classes else None
        png = os.path.join(out_dir, "gates.png")
        res["gates"] = gate_analysis(class_gates(model.filter), model.filter.embed.weight, attributes, png)
    return res


def print_table(res, prefix=""):
    """Every scalar of eval.json, one a line; the lists (spectra, histograms, K x K matrices) stay in the file."""
    for key, value in res.items():
        if isinstance(value, dict):
            print_table(value, f"{prefix}{key}/")
        elif not isinstance(value, list):
            print(f"  {prefix + key:<44}{f'{value:.4f}' if isinstance(value, float) else value}")


# ----------------------------------------------------------------------------------------------- transfer
# The paper's transfer tables (ResNet-50 pre-trained on ImageNet-1K), their data sets in their column order, and their
# rows, quoted: Table 1, linear probe top-1 % and the average; Table 4 (appendix C), kNN (k = 10) top-1 %.
TABLE1 = ("cars", "cifar10", "cifar100", "flowers102", "pets", "stl10")
TABLE4 = ("cifar10", "cifar100", "cars", "food101")
COLUMN = {"cars": "Cars", "cifar10": "CF10", "cifar100": "CF100", "flowers102": "FLW", "pets": "Pets", "stl10": "STL",
          "food101": "Food"}  # the paper's column names
PAPER_TABLE1 = {"SimCLR, 1000 ep": (92.7, 98.2, 85.5, 92.2, 90.8, 97.5, 92.8),
                "SupCon, 600 ep": (93.0, 97.4, 85.0, 91.1, 92.1, 97.7, 92.7),
                "SimLAP, 500 ep": (92.9, 98.0, 85.0, 91.9, 91.7, 97.0, 92.7),
                "MoCo v3, 1000 ep": (93.2, 98.4, 86.1, 95.6, 93.0, 97.8, 94.0),
                "GPaCo, 700 ep": (92.8, 98.3, 86.2, 94.1, 92.2, 97.9, 93.6),
                "SimLAP-MoCo, 300 ep": (93.6, 98.3, 86.0, 95.7, 92.8, 97.9, 94.0)}
PAPER_TABLE4 = {"SimCLR": (85.5, 61.5, 14.8, 51.2), "SupCon": (84.8, 60.2, 30.9, 53.5),
                "SimLAP": (86.3, 64.6, 36.7, 54.3), "SupCon, pseudo labels": (79.5, 55.3, 17.0, 43.5),
                "SimLAP, pseudo labels": (82.2, 57.7, 18.2, 46.6)}
PAPER_SETS = {"table1": TABLE1, "table4": TABLE4}


def transfer_sets(text):
    """--transfer's comma-separated list -> data set names, in order, each once; table1 and table4 stand for the sets
    of the paper's Table 1 and Table 4."""
    names = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        for name in PAPER_SETS.get(part, (part,)):
            if name not in simlap.DATASETS:
                raise UserError(f"--transfer: unknown set {name!r}; choose from table1, table4, "
                                f"{', '.join(simlap.DATASETS)}")
            names += [name] if name not in names else []
    if not names:
        raise UserError("--transfer needs at least one set, e.g. --transfer table1")
    return names


def transfer_transform(size):
    """Chen et al. 2020's transfer preprocessing (appendix B.8), for every set: the shorter side resized to `size`
    (bicubic), a size x size center crop, ImageNet normalisation, no augmentation."""
    return v2.Compose([v2.ToImage(), v2.Resize(size, v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(simlap.MEAN, simlap.STD)])


def transfer(args, backbone, info):
    """--transfer SETS: on each set's official train/test split, features extracted once, weighted kNN (k = 10 and
    --k) and the tuned linear probe (tuned_probe) -> OUTPUT_DIR/transfer.json and transfer.md (one row per set, and
    the layouts of the paper's Tables 1 and 4 with the paper's rows beside), also printed. A set whose files are
    missing is reported as missing, with how to get it; the others still run."""
    size, data, sets, missing = load_transfer_sets(args, backbone, info)
    backbone.to(args.device)
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    rows = {}
    for name in args.transfer:
        if name in missing:
            rows[name] = {"status": "missing", "how": missing[name]}
            continue
        rows[name] = evaluate_set(args, backbone, sets.pop(name))  # its features are freed after it
    if any(not torch.equal(v, frozen[k]) for k, v in backbone.state_dict().items()):
        raise RuntimeError("the backbone changed during evaluation")  # a bug, not a bad input
    weights = args.checkpoint or args.backbone
    res = {"weights": os.path.abspath(weights), "arch": info["arch"], "trained_on": info.get("dataset"),
           "data": data, "image_size": size, "knn_temperature": args.temperature, "probe_grid": list(PROBE_GRID),
           "sets": rows}
    res["tables"] = paper_layouts(res)
    text = transfer_markdown(res, args.k)
    out_dir = args.output_dir or os.path.dirname(os.path.abspath(weights))
    os.makedirs(out_dir, exist_ok=True)
    simlap.save_atomic(res, os.path.join(out_dir, "transfer.json"), save=simlap.save_json)
    simlap.save_atomic(text, os.path.join(out_dir, "transfer.md"), save=write_text)
    print(text, end="")
    print(f"wrote {os.path.join(out_dir, 'transfer.json')} and transfer.md")
    return res


def load_transfer_sets(args, backbone, info):
    """-> (image size, --data, {set: its {"train", "test"} splits}, {set: why it is missing and how to get it}),
    refusing, before anything is written, what cannot be evaluated."""
    size = args.image_size or info.get("image_size") or (32 if info["small_images"] else 224)
    if getattr(backbone, "image_size", size) != size:  # a ViT takes only the size its position embedding fits
        raise UserError(f"--image-size {size}: this ViT was built for {backbone.image_size} px images")
    data = args.data or info.get("data")
    if not data and set(args.transfer) != {"synthetic"}:
        raise UserError("--transfer needs --data ROOT, the folder that holds its data sets (README: the layout)")
    per_class = args.synthetic_per_class or info.get("synthetic_per_class")
    sets, missing = {}, {}
    for name in args.transfer:
        try:
            sets[name] = {s: simlap.build_dataset(name, data, s, transfer_transform(size), args.download, per_class)
                          for s in ("train", "test")}
        except FileNotFoundError as e:  # reported in the table, the other sets still run
            missing[name] = str(e)
            continue
        except ValueError as e:  # e.g. an ImageFolder whose val split has a class train/ lacks
            raise UserError(str(e)) from None
        labels = simlap.targets_of(sets[name]["train"])
        if max(args.k, PAPER_K) > len(labels):
            raise UserError(f"{name}: k={max(args.k, PAPER_K)} is larger than the kNN bank ({len(labels)} train "
                            "samples)")
        if not (torch.bincount(labels) >= 2).any():
            raise UserError(f"{name}: no class has 2 training images, so no validation split for the probe's l2")
    if not sets:
        raise UserError(f"none of {', '.join(args.transfer)} was found under --data {data!r}: "
                        f"{next(iter(missing.values()))}")
    return size, data, sets, missing


def evaluate_set(args, backbone, splits):
    """One set of --transfer: features of both splits, extracted once, -> its row: sizes, kNN and tuned probe."""
    num_classes = simlap.num_classes_of(splits["train"])
    feats = all_features(backbone, splits, args, args.device, None)  # (--transfer refuses --cache-features)
    (train_f, train_y), (test_f, test_y) = feats["train"], feats["test"]
    probe = tuned_probe(train_f, train_y, test_f, test_y, num_classes, args.probe_iters, args.device)
    return {"status": "ok", "num_train": len(train_y), "num_test": len(test_y), "num_classes": num_classes,
            "knn": knn_accuracy(args, feats), "linear_probe": probe}


def paper_layouts(res):
    """This backbone's cells in the layouts of the paper's Table 1 (probe, with the average over its six sets) and
    Table 4 (kNN, k = 10): {"table1": {column: % or "missing" or None (not asked)}, "table4": ...}; a table none of
    whose sets was asked is left out. The average needs all six sets (else None)."""
    rows, knn10 = res["sets"], knn_key(PAPER_K, res["knn_temperature"])
    cell = lambda name, pick: (None if name not in rows else "missing" if rows[name]["status"] != "ok"  # noqa: E731
                               else pick(rows[name]))
    out = {}
    for table, names, pick in (("table1", TABLE1, lambda r: r["linear_probe"]["test_top1"]),
                               ("table4", TABLE4, lambda r: r["knn"][knn10])):
        if set(names) & set(rows):
            out[table] = {COLUMN[name]: cell(name, pick) for name in names}
    if "table1" in out:
        values = list(out["table1"].values())
        out["table1"]["AVG"] = sum(values) / 6 if all(isinstance(v, float) for v in values) else None
    return out


def transfer_markdown(res, k):
    """transfer.md: one row per set, then the paper's Table 1 and Table 4 layouts with this backbone's row above the
    paper's rows, then one line per missing set saying how to get it."""
    show = lambda v: "—" if v is None else v if isinstance(v, str) else f"{v:.1f}"  # noqa: E731
    T = res["knn_temperature"]
    lines = [f"| set | train | test | classes | kNN k={PAPER_K} | kNN k={k} | linear probe | probe l2 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["sets"].items():
        probe = r.get("linear_probe", {})
        cells = ["missing", "", "", "", "", "", ""] if r["status"] != "ok" else [
            r["num_train"], r["num_test"], r["num_classes"], show(r["knn"][knn_key(PAPER_K, T)]),
            show(r["knn"][knn_key(k, T)]), show(probe["test_top1"]), f"{probe['weight_decay']:g}"]
        lines.append("| " + " | ".join([name, *map(str, cells)]) + " |")
    for table, title, paper in (("table1", "Table 1: linear probe top-1 %", PAPER_TABLE1),
                                ("table4", f"Table 4: kNN (k = {PAPER_K}) top-1 %", PAPER_TABLE4)):
        if table in res["tables"]:
            ours = res["tables"][table]
            lines += ["", f"| {title} | " + " | ".join(ours) + " |", "|---" * (len(ours) + 1) + "|",
                      "| this backbone | " + " | ".join(map(show, ours.values())) + " |"]
            lines += [f"| paper: {who} | " + " | ".join(f"{v:.1f}" for v in row) + " |" for who, row in paper.items()]
    missing = [r["how"] for r in res["sets"].values() if r["status"] != "ok"]  # each names its set
    return "\n".join(lines + ([""] + missing if missing else [])) + "\n"


def write_text(text, path):
    with open(path, "w") as f:
        f.write(text)


def cli(argv=None):
    simlap.cli(main, "eval.py", argv)


if __name__ == "__main__":
    cli()
