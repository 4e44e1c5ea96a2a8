"""Evaluate a SimLAP encoder on frozen features: weighted kNN and a linear probe, the paper's analyses and its
figures: dimensional collapse (Fig. 3b), similarity distributions (Fig. 4), t-SNE of a pair's subspace (Fig. 5), CLAM
heat maps (Fig. 6), the class gates (Fig. 9) and class similarities (Fig. 12), and the training curves.

    python eval.py --checkpoint runs/x/checkpoint.pt                      # on the checkpoint's own data set
    python eval.py --checkpoint runs/x/checkpoint.pt --dataset cifar10 --data ~/data --download
    python eval.py --backbone runs/x/backbone.pt --dataset stl10 --data ~/data --image-size 96  # arch read off it
    python eval.py --checkpoint runs/x/checkpoint.pt --synthetic-per-class 20 --image-size 16 --device cpu  # smoke
    python eval.py --checkpoint runs/simclr/checkpoint.pt --kmeans 1000     # pseudo labels for train.py --labels
    python eval.py --compare runs/simlap runs/supcon runs/simclr --output-dir runs/compare   # eval outputs side by side
The paper's transfer evaluation (Table 1: linear probe on 6 sets; Table 4: kNN, k = 10, on 4), every set under --data:
    python eval.py --backbone runs/x/backbone.pt --image-size 224 --data ~/data --transfer table1,table4

The train split is the kNN bank and the probe's training set; the test split is what is evaluated. Features come
from the backbone only (appendix B keeps f_E alone), in eval mode; they are extracted once per split and reused by
every evaluation (--cache-features also keeps them on disk). --kmeans K clusters the train-split features into K
pseudo labels (appendix C) and reports their NMI and purity against the true labels; --labels FILE reports those of
an existing label file. Everything else uses the true labels. Every number goes to OUTPUT_DIR/eval.json (default:
the folder of the weights), every figure to a PNG beside it (fig3b_spectrum, fig4_similarity, fig5_tsne, fig6_clam,
fig9_gates, fig12_class_similarity, training) and report.md shows them all with the numbers (--no-figures: eval.json
only). --compare reads the eval.json of several such folders, recomputing nothing. A bad input (an impossible flag
value, missing or corrupt weights, weights carrying pickled code, another arch, missing data or split, a package a
data set needs, k larger than the bank, a class the data set lacks) prints one line on stderr and exits with status 2,
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
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

import plot
import simlap
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


def gate_analysis(gates, label_embed=None, attributes=None):
    """Class gates (K, D) -> per class the open dimensions (gate > 0.5) and the gate entropy (Fig. 9); the
    class-by-class gate overlap = cosine of the gates sharpened to {0, 1} (Fig. 12; a class with no open gate
    overlaps nothing, itself included); with label_embed (K, E) the cosine of the label embeddings f_l (Fig. 12).
    attributes (K, A), the ground truth of simlap.class_attributes (synthetic: shape and colour; fashionmnist: the
    natural group): also the mean overlap of class pairs that share an attribute against pairs that share none."""
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
    return out


def gate_column_order(gates):
    """Fig. 9's column order of the (K, D) gates: dimensions sorted by the first class that opens them (gate > 0.5),
    then by how many classes do, so that a subspace shared by several classes shows as a band -> (D,) long."""
    is_open = gates > 0.5
    first = torch.where(is_open.any(0), is_open.float().argmax(0), len(gates))  # (D,), K = opened by none
    order = is_open.sum(0).argsort(descending=True, stable=True)
    return order[first[order].argsort(stable=True)]


# ----------------------------------------------------------------------------------------------- Fig. 5, 6, 12
PERPLEXITY = 30.0  # t-SNE's, as in van der Maaten & Hinton 2008 and scikit-learn


def tsne(x, perplexity=PERPLEXITY, iters=1000, seed=0):
    """Exact t-SNE (van der Maaten & Hinton 2008) of the rows of x (N, F) -> (N, 2) float64, the same map for the
    same seed. P: row i is a Gaussian over the other points whose precision is bisected until its perplexity is
    `perplexity`, symmetrised p_ij = (p_j|i + p_i|j) / 2N. Q: the Student-t kernel w_ij = (1 + ‖y_i - y_j‖²)⁻¹
    over its sum. Gradient descent on KL(P ‖ Q) from N(0, 1e-4²) points (seeded), with P exaggerated 12-fold and
    momentum 0.5 for the first 250 iterations and 0.8 after, per-coordinate gains (van der Maaten's code), learning
    rate max(N / 48, 50) (scikit-learn's 'auto'). Each iteration is O(N²) in time and memory: a few thousand points
    at most."""
    N = len(x)
    x = x.double()
    P = tsne_affinities(torch.cdist(x, x).square(), min(perplexity, (N - 1) / 3))
    P = ((P + P.T) / (2 * N)).float()
    P_early = 12 * P  # early exaggeration
    y = 1e-4 * torch.randn(N, 2, generator=torch.Generator().manual_seed(seed))
    update, gains, lr = torch.zeros_like(y), torch.ones_like(y), max(N / 48, 50)
    for it in range(iters):
        early = it < 250
        sq = y.square().sum(1)
        w = torch.addmm((sq[:, None] + sq[None, :]).add_(1), y, y.T, alpha=-2)  # 1 + ‖y_i - y_j‖², (N, N)
        w = w.clamp_min_(1).reciprocal_().fill_diagonal_(0)
        pq = (P_early if early else P).sub(w, alpha=1 / w.sum().item()).mul_(w)  # (p_ij - q_ij) w_ij
        grad = 4 * (pq.sum(1, keepdim=True) * y - pq @ y)  # ∂KL/∂y_i = 4 Σ_j (p_ij - q_ij) w_ij (y_i - y_j)
        gains = torch.where((grad > 0) != (update > 0), gains + 0.2, gains * 0.8).clamp_min(0.01)
        update = (0.5 if early else 0.8) * update - lr * gains * grad
        y = y + update
    return (y - y.mean(0)).double()


def tsne_affinities(d2, perplexity, steps=64):
    """t-SNE's conditionals p_j|i ∝ exp(-β_i d2_ij), p_i|i = 0, for squared distances d2 (N, N), each β_i bisected
    until the entropy of row i is log(perplexity) nats -> (N, N) float64, rows summing to 1."""
    d2, eye = d2.double().clamp_min(0), torch.eye(len(d2), dtype=torch.bool)
    beta = 1 / d2.mean(1, keepdim=True).clamp_min(1e-12)  # (N, 1), a start on the data's scale
    lo, hi = torch.zeros_like(beta), torch.full_like(beta, math.inf)
    for _ in range(steps):
        p = (-beta * d2).masked_fill_(eye, -math.inf).softmax(1)
        flat = -torch.xlogy(p, p).sum(1, keepdim=True) > math.log(perplexity)  # entropy too high: raise β
        lo, hi = torch.where(flat, beta, lo), torch.where(flat, hi, beta)
        beta = torch.where(hi.isinf(), 2 * beta, (lo + hi) / 2)
    return p


def pair_separation(x, labels, a, b):
    """How far apart classes a and b sit among the points x (N, d): the distance between their centres, their spread
    (the mean distance of their points to their own centre) and the ratio of the two (larger = farther apart)."""
    ca, cb = x[labels == a].mean(0), x[labels == b].mean(0)
    spread = torch.cat([(x[labels == a] - ca).norm(dim=1), (x[labels == b] - cb).norm(dim=1)]).mean().item()
    distance = (ca - cb).norm().item()
    return {"centre_distance": distance, "spread": spread, "ratio": distance / max(spread, 1e-12)}


def fig5_embedding(z, labels, groups, pair, gates=None, max_points=2000, seed=0):
    """Fig. 5: t-SNE of the projections z (N, D) of the samples of two groups of classes (lists of class ids) in the
    global space (z / ‖z‖) and, given gates = g(y1, y2) (D,) of `pair` (eq. 3), in that pair's subspace
    (g ⊙ z / ‖g ⊙ z‖, what eq. 2 compares; the paper says "features", but only projections have a subspace). At
    most max_points samples, a seeded subset beyond. -> (numbers, {panel: (map (M, 2), labels (M,))}); the numbers
    hold how far apart the pair's classes sit (pair_separation) in each 2-D map and in the space itself, since
    t-SNE keeps neighbourhoods rather than distances."""
    keep = torch.isin(labels, torch.tensor(groups[0] + groups[1])).nonzero().squeeze(1)
    if len(keep) > max_points:
        keep = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))[:max_points].sort()[0]]
    z, y = z[keep].double(), labels[keep]
    spaces = {"global": F.normalize(z, dim=1)}
    if gates is not None:
        spaces["subspace"] = F.normalize(gates.double() * z, dim=1)
    out, maps = {"points": len(keep), "perplexity": PERPLEXITY, "panels": {}}, {}
    for name, v in spaces.items():
        maps[name] = (tsne(v, seed=seed), y)
        out["panels"][name] = {"map": pair_separation(maps[name][0], y, *pair), "space": pair_separation(v, y, *pair)}
    return out, maps


def cam_layer(backbone):
    """The layer whose output Grad-CAM weighs: a ResNet's layer4; a ViT's last block's patch tokens as they enter its
    attention (its ln_1: after the block the class token no longer reads the patch tokens, so their gradient there
    is 0); else the last ReLU (the convnet's last convolution stage)."""
    if hasattr(backbone, "layer4"):
        return backbone.layer4
    if isinstance(backbone, torchvision.models.VisionTransformer):
        return backbone.encoder.layers[-1].ln_1
    return [m for m in backbone.modules() if isinstance(m, nn.ReLU)][-1]


def anchor_views(x, n, seed=0):
    """Appendix E's A(x): n views of the anchor x (3, H, W), normalised by simlap.MEAN/STD -> (views (n, 3, H, W),
    theta (n, 2, 3): each view's sampling grid in the anchor's coordinates). A view is a random resized crop and flip
    drawn as in training (simlap.augment_params), then the channels times (1.0, 1.1, 0.9) for every view whose key
    says so (p = 0.5: the paper names the factors, not how often)."""
    keys = simlap.sample_keys(seed, 0, torch.arange(n))
    p = simlap.augment_params(keys, 0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = p["w"] * (1 - 2 * p["flip"].float()), 2 * p["cx"] - 1
    theta[:, 1, 1], theta[:, 1, 2] = p["h"], 2 * p["cy"] - 1
    grid = F.affine_grid(theta, [n, *x.shape], align_corners=False)
    views = F.grid_sample(x.cpu().expand(n, *x.shape), grid, padding_mode="border", align_corners=False)
    mean, std = torch.tensor(simlap.MEAN).view(3, 1, 1), torch.tensor(simlap.STD).view(3, 1, 1)
    scale = torch.where(simlap.uniforms(keys, 1, offset=40) < 0.5, torch.tensor([1.0, 1.1, 0.9]), 1.0)  # (n, 3)
    return ((views * std + mean) * scale[:, :, None, None]).clamp(0, 1).sub(mean).div(std), theta


def to_anchor(maps, theta, size):
    """Heat maps (n, h, w) of n views -> one map (H, W) on the anchor: each is resized to its view, taken back through
    the inverse of the view's crop and flip, and the pixels average the views that cover them."""
    inverse = torch.linalg.inv(theta[:, :, :2])  # anchor point a = A v + t, so v = A⁻¹ a - A⁻¹ t
    theta_back = torch.cat([inverse, -inverse @ theta[:, :, 2:]], 2)
    grid = F.affine_grid(theta_back, [len(maps), 1, *size], align_corners=False)
    up = F.interpolate(maps[:, None].cpu(), size=size, mode="bilinear", align_corners=False)
    back = lambda m: F.grid_sample(m, grid, padding_mode="zeros", align_corners=False).sum(0)[0]  # noqa: E731
    return back(up) / back(torch.ones_like(up)).clamp_min(1)


def clam(encode, layer, anchor, positive, gates, views=16, seed=0):
    """CLAM (appendix E, eq. 6): Grad-CAM (Selvaraju et al. 2017) of score = the mean over `views` augmented views
    A(x) of the anchor (anchor_views) of sim(f(x⁺), f(A(x))), f = encode (images -> projections). One score and heat
    map per gate vector in gates {name: (D,)}: the cosine is taken in the subspace g ⊙ f (all-ones gates: the global
    space). Heat map of a view: ReLU(Σ_c α_c A_c), A the feature map `layer` outputs (a ViT block's patch tokens on
    their grid), α_c the spatial mean of ∂score/∂A_c; the views' maps are averaged on the anchor (to_anchor).
    -> {name: (score, heat map (H, W) >= 0, on the CPU)}"""
    x, theta = anchor_views(anchor, views, seed)
    seen = []
    hook = layer.register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        with torch.no_grad():
            z_pos = encode(positive[None])  # (1, D)
        with torch.enable_grad():
            z = encode(x.to(positive.device))  # (n, D)
            fmap, out = seen[-1], {}
            for name, g in gates.items():
                score = simlap.subspace_cosine(z, z_pos, g.to(z).expand_as(z)).mean()  # eq. 6
                a, grad = fmap.detach(), torch.autograd.grad(score, fmap, retain_graph=True)[0]
                if a.ndim == 3:  # ViT tokens (n, 1 + h w, C): the patch tokens as a (C, h, w) map
                    side = math.isqrt(a.shape[1] - 1)
                    a, grad = (t[:, 1:].unflatten(1, (side, side)).permute(0, 3, 1, 2) for t in (a, grad))
                cam = (grad.mean((2, 3), keepdim=True) * a).sum(1).relu()  # (n, h, w)
                out[name] = (score.item(), to_anchor(cam, theta, anchor.shape[1:]))
    finally:
        hook.remove()
    return out


def fig6_clam(encode, layer, ds, pairs, gates, views, device, masks=None):
    """Fig. 6 for each class pair (y1, y2): the first test image of class y1 is the anchor, the first of class y2
    (another image if y2 = y1) the positive, as eq. 2 pairs them; CLAM under the global space and, given the class
    gates g(y) (K, D) of a filter (eq. 4), the subspaces of y1 and of y2. masks (N, H, W) bool, where the data set
    has them (the synthetic shapes): the share of each heat map's mass on the anchor's shape. -> (numbers, pictures)"""
    labels, out, pictures = simlap.targets_of(ds), [], []
    for y1, y2 in pairs:
        first, second = (labels == y1).nonzero()[:, 0], (labels == y2).nonzero()[:, 0]
        second = second[second != first[0]] if len(first) else second
        if not (len(first) and len(second)):  # a class without (another) test image: no pair to show
            continue
        i, j = first[0].item(), second[0].item()
        anchor, positive = ds[i][0].to(device), ds[j][0].to(device)
        settings = {"global": torch.ones(1, device=device)}  # all-ones gates (broadcast to D): the global space
        if gates is not None:
            settings.update(y1=gates[y1].to(device), y2=gates[y2].to(device))
        maps = clam(encode, layer, anchor, positive, settings, views)
        row = {"y1": y1, "y2": y2, "anchor": i, "positive": j, "score": {k: s for k, (s, _) in maps.items()}}
        if masks is not None:
            mask = eval_mask(ds, masks, i)
            row["mask_area"] = mask.float().mean().item()
            row["mask_share"] = {k: mask_share(m, mask) for k, (_, m) in maps.items()}
        out.append(row)
        pictures.append((displayable(anchor), displayable(positive), maps))
    return out, pictures


def eval_mask(ds, masks, i):
    """Sample i's shape mask (synthetic set) through the resize and crop its image went through -> (H, W) bool."""
    mask = torchvision.tv_tensors.Mask(masks[i].to(torch.uint8))
    return (ds.transform(torchvision.tv_tensors.Image(ds.images[i]), mask)[1] if ds.transform else mask).bool()


def mask_share(heat, mask):
    """The share of a heat map's mass (H, W) >= 0 inside mask (H, W); None for an all-zero map."""
    total = heat.sum().item()
    return (heat * mask).sum().item() / total if total > 0 else None


def displayable(x):
    """A normalised image (3, H, W) (simlap.MEAN/STD) -> uint8 on the CPU, to draw."""
    mean, std = torch.tensor(simlap.MEAN).view(3, 1, 1), torch.tensor(simlap.STD).view(3, 1, 1)
    return ((x.detach().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def class_similarity(feats, labels, num_classes):
    """Fig. 12's feature similarity of two classes a, b: the mean cosine of the features of every two distinct
    samples of a and b -> (K, K) float64. Σ_{i∈a, j∈b} cos(h_i, h_j) = s_a · s_b, s_a the sum of class a's unit
    features: one (K, K) product. On the diagonal the n_a pairs of a sample with itself are left out."""
    u = F.normalize(feats.double(), dim=1)
    n = torch.bincount(labels, minlength=num_classes).double()
    s = torch.zeros(num_classes, u.shape[1], dtype=torch.float64).index_add_(0, labels, u)
    return (s @ s.T - torch.diag(n)) / (torch.outer(n, n) - torch.diag(n)).clamp_min(1)


def correlations(matrices):
    """Pearson correlation of every two (K, K) class-similarity matrices {name: matrix} over the class pairs a < b
    (the diagonal, one class against itself, is left out) -> {"name1 vs name2": r}; None where one is constant."""
    K, out = len(next(iter(matrices.values()))), {}
    upper = torch.triu_indices(K, K, 1)
    flat = {k: torch.as_tensor(m, dtype=torch.float64)[upper[0], upper[1]] for k, m in matrices.items()}
    names = list(flat)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            x, y = flat[a] - flat[a].mean(), flat[b] - flat[b].mean()
            norm = (x.norm() * y.norm()).item()
            out[f"{a} vs {b}"] = (x @ y).item() / norm if norm > 0 else None
    return out


def training_curves(path):
    """train.py's log.jsonl -> {"step", "loss", "lr", "gate_open"} every --log-every steps and {"knn_step",
    "knn_top1" in %} at every kNN evaluation; the last record of a step wins (a resumed run logs some twice).
    None without a log; a log that cannot be read is said on stderr and skipped."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        print(f"eval.py: note: {path} cannot be read ({one_line(e, 100)}): no training curves", file=sys.stderr)
        return None
    rows = [r for r in rows if isinstance(r, dict) and "step" in r]
    stats = {r["step"]: r for r in rows if "loss" in r}
    knn = {r["step"]: r["knn_top1"] for r in rows if "knn_top1" in r}
    steps = sorted(stats)
    return {"step": steps, **{k: [stats[s].get(k) for s in steps] for k in ("loss", "lr", "gate_open")},
            "knn_step": sorted(knn), "knn_top1": [100 * knn[s] for s in sorted(knn)]}


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
    if args.compare:
        return compare(args.compare, args.output_dir)
    backbone, model, info = load_weights(args.checkpoint, args.backbone, args.arch)
    if args.transfer:
        return transfer(args, backbone, info)
    setting, splits, given = load_eval_data(args, backbone, info)  # user errors surface here, before any write
    plan = None if args.no_figures else figure_plan(args, splits["test"], model, info, setting["dataset"])
    backbone.to(args.device)
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}  # to check below that nothing trained it
    feats = all_features(backbone, splits, args, args.device, setting)
    (train_f, train_y), (test_f, test_y) = feats["train"], feats["test"]
    out_dir = args.output_dir or os.path.dirname(setting["weights"])
    os.makedirs(out_dir, exist_ok=True)
    res = {"checkpoint": args.checkpoint, "backbone": args.backbone, "arch": info["arch"], "method": info.get("method"),
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
    res.update(analyses(model, info, test_f, test_y, args.device))
    if plan:
        res.update(paper_figures(args, model, backbone, info, splits["test"], feats["test"], res, plan, out_dir))
    path = os.path.join(out_dir, "eval.json")
    simlap.save_atomic(res, path, save=simlap.save_json)
    print_table(res)
    print(f"wrote {path}" + (f", {run_report(res, out_dir)} and {len(res['figures'])} figures" if plan else ""))
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


def analyses(model, info, test_f, test_y, device):
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
        if not info.get("labels"):  # pseudo labels have no attributes
            attributes = simlap.class_attributes(info.get("dataset"), simlap.trained_classes(info))
            attributes = attributes if attributes is not None and len(attributes) == model.num_classes else None
        res["gates"] = gate_analysis(class_gates(model.filter), model.filter.embed.weight, attributes)
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
    simlap.save_atomic(text, os.path.join(out_dir, "transfer.md"), save=save_text)
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


# ----------------------------------------------------------------------------------------------- figures, report.md
SYNTHETIC_GROUPS = (("red_square", "red_triangle", "red_cross"), ("green_circle", "blue_circle", "yellow_circle"))
SYNTHETIC_PAIRS = (("red_circle", "green_circle"), ("blue_cross", "yellow_cross"),  # a shape in common
                   ("blue_square", "blue_triangle"), ("green_cross", "green_square"),  # a colour in common
                   ("yellow_triangle", "red_square"), ("red_cross", "blue_circle"))  # nothing in common
CAPTIONS = {  # file -> (title, what it shows)
    "fig3b_spectrum.png": ("Fig. 3b: singular value spectrum", "Singular values of the centred test-split "
                           "embeddings over the largest, on a log scale; a faster fall means more dimensional "
                           "collapse. The legend gives the effective rank (Roy & Vetterli 2007)."),
    "fig4_similarity.png": ("Fig. 4: similarity distributions", "Cosine similarity of the backbone features of every "
                            "two test samples of one class (intra) and of two classes (inter); the overlap is the sum "
                            "of the smaller of the two normalised histograms (smaller = classes better apart)."),
    "fig5_tsne.png": ("Fig. 5: t-SNE of two groups of classes", "Projections z of the test samples of two groups of "
                      "classes (dots, squares) in the global space and, for a filter method, in the subspace of one "
                      "pair across the groups (g(y1, y2) ⊙ z re-normalised, as eq. 2); large markers are class "
                      "centres. Titles: the pair's centre distance over its spread (smaller = closer)."),
    "fig6_clam.png": ("Fig. 6: CLAM heat maps", "For each class pair: the anchor (class y1), the positive (class y2) "
                      "and Grad-CAM of the anchor (appendix E: mean cosine of the positive's projection with those of "
                      "augmented views of the anchor) in the global space and the subspaces of y1 and y2 (eq. 4)."),
    "fig9_gates.png": ("Fig. 9: class gates", "g(y) of every class (eq. 4), one row each; columns are dimensions "
                       "sorted by the first class that opens them (gate > 0.5), so shared subspaces form bands."),
    "fig12_class_similarity.png": ("Fig. 12: class similarities", "Class-by-class: overlap of the sharpened gates, "
                                   "mean cosine of the backbone features, cosine of the label embeddings f_l; their "
                                   "correlations over the class pairs are in eval.json (class_similarity)."),
    "training.png": ("Training curves", "From the run's log.jsonl: loss, online kNN top-1, open gates per anchor "
                     "and learning rate against the training step."),
    "compare_spectra.png": ("Fig. 3b, every run", "Backbone singular values over the largest, log scale."),
    "compare_similarity.png": ("Fig. 4, every run", "Intra- and inter-class cosine similarity, backbone features."),
    "compare_training.png": ("Training curves, every run", "From each run's log.jsonl, as eval.py stored it."),
}


def class_id(text, names, flag, dataset):
    if text in names:
        return names.index(text)
    if text.isdigit() and int(text) < len(names):
        return int(text)
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    raise UserError(f"{flag}: the {dataset} data set has no class {text!r} (its classes: {shown}; or an id 0 to "
                    f"{len(names) - 1})")


def figure_plan(args, test_set, model, info, dataset):
    """Class names, the classes Fig. 5 and 6 show (--groups, --pair, --clam-pairs, else defaults) and whether the
    filter's classes are the data's (trained on its true labels). A class the data lacks is a UserError, raised
    before anything is written."""
    K = simlap.num_classes_of(test_set)
    names = [str(c) for c in getattr(test_set, "classes", range(K))]
    ids = lambda text, flag: [class_id(t, names, flag, dataset) for t in text.split(",")]  # noqa: E731
    groups = [ids(g, "--groups") for g in args.groups] if args.groups else [
        [names.index(c) for c in g if c in names] for g in SYNTHETIC_GROUPS]
    if not args.groups and not all(groups):  # not the synthetic set: the first classes against the next ones
        groups = [list(range(min(5, K // 2))), list(range(min(5, K // 2), 2 * min(5, K // 2)))]
    if set(groups[0]) & set(groups[1]):
        raise UserError("--groups: the two groups share a class; give two disjoint groups")
    pair = [class_id(y, names, "--pair", dataset) for y in args.pair] if args.pair else [g[0] for g in groups if g]
    if args.pair and not (pair[0] in groups[0] and pair[1] in groups[1]):
        raise UserError("--pair Y1 Y2: Y1 must be in the first group of --groups, Y2 in the second")
    clam_pairs = [ids(p, "--clam-pairs") for p in args.clam_pairs or []]
    if any(len(p) != 2 for p in clam_pairs):
        raise UserError("--clam-pairs: give each pair as Y1,Y2 (two class names or ids and a comma)")
    clam_pairs = clam_pairs or [[names.index(a), names.index(b)] for a, b in SYNTHETIC_PAIRS
                                if a in names and b in names] or [[k, (k + 1) % K] for k in range(0, min(K, 8), 2)]
    filtered = (model is not None and simlap.METHODS[info.get("method", "simlap")].filter and not info.get("labels")
                and info.get("dataset") == dataset and model.num_classes == K)
    return {"names": names, "groups": groups, "pair": pair if len(pair) == 2 else None, "clam_pairs": clam_pairs,
            "filtered": filtered}


@torch.no_grad()
def pair_gates(feature_filter, y1, y2):
    """g(y1, y2) (eq. 3) with the filter in eval mode -> (D,) float32 CPU."""
    was_training, device = feature_filter.training, feature_filter.embed.weight.device
    g = feature_filter.eval()(torch.tensor([y1], device=device), torch.tensor([y2], device=device))[0]
    feature_filter.train(was_training)
    return g.float().cpu()


def paper_figures(args, model, backbone, info, test_set, test_feats, res, plan, out_dir):
    """Fig. 5, 6 and 12's numbers and the training curves (entries of eval.json), and every figure, as PNGs in
    out_dir. Fig. 5 and CLAM read the projections z = f_P(f_E(x)) (a bare backbone: its features)."""
    (test_f, test_y), names, device = test_feats, plan["names"], args.device
    gates = class_gates(model.filter) if "gates" in res else None
    own = gates if plan["filtered"] else None  # class gates that belong to the classes of this data set
    sims = {"features": class_similarity(test_f, test_y, len(names)).tolist()}
    out = {"class_similarity": {"features": sims["features"]}}
    if own is not None:
        sims = {"gates": res["gates"]["gate_overlap"], **sims, "labels": res["gates"]["label_similarity"]}
        out["class_similarity"]["correlation"] = correlations(sims)
    encode = backbone.eval() if model is None else nn.Sequential(model.backbone, model.projector).eval()
    with torch.no_grad():
        z = test_f if model is None else torch.cat([model.projector(b.to(device)).float().cpu()
                                                    for b in test_f.split(1024)])
    maps = None
    if plan["pair"]:
        g = pair_gates(model.filter, *plan["pair"]) if own is not None else None
        out["tsne"], maps = fig5_embedding(z, test_y, plan["groups"], plan["pair"], g, args.tsne_points)
        out["tsne"]["groups"] = [[names[k] for k in g] for g in plan["groups"]]
        out["tsne"]["pair"] = [names[k] for k in plan["pair"]]
    masks = test_set.shape_masks() if isinstance(test_set, simlap.SyntheticShapes) else None
    rows, pictures = fig6_clam(encode, cam_layer(backbone), test_set, plan["clam_pairs"], own, args.clam_views,
                               device, masks)
    out["clam"] = clam_summary(rows, names, args.clam_views)
    curves = training_curves(os.path.join(os.path.dirname(args.checkpoint), "log.jsonl")) if args.checkpoint else None
    if curves:
        out["training"] = curves
    figures = {"fig3b_spectrum.png": draw_spectra({f"{k} (effective rank {v['effective_rank']:.1f} of {v['dim']})":
                                                   v["singular_values"] for k, v in res["collapse"].items()}),
               "fig4_similarity.png": draw_histograms(res["similarity"]),
               "fig5_tsne.png": maps and draw_tsne(maps, out["tsne"], plan),
               "fig6_clam.png": draw_clam(out["clam"], pictures),
               "fig9_gates.png": gates is not None and draw_gates(gates, names if own is not None else None),
               "fig12_class_similarity.png": draw_class_similarity(sims, names, out["class_similarity"]),
               "training.png": curves and draw_training({"": curves})}
    out["figures"] = {f: plot.save(img, os.path.join(out_dir, f)) for f, img in figures.items() if img}
    if gates is not None:  # where the gate pictures were before there were figures
        res["gates"]["pictures"] = {"gates": out["figures"]["fig9_gates.png"], "rows": "classes in index order",
                                    "overlap": out["figures"]["fig12_class_similarity.png"],
                                    "gates_columns": gate_column_order(gates).tolist()}
    return out


def clam_summary(rows, names, views):
    """fig6_clam's numbers with class names, and where there are shape masks, per column (global, y1, y2): the mean
    share of the heat maps' mass on the shape and how many maps put more than half of it there (an all-zero map
    counts as not); and the shape's mean share of the image, what a map spread evenly would get."""
    for r in rows:
        r["y1"], r["y2"] = names[r["y1"]], names[r["y2"]]
    out = {"views": views, "pairs": rows}
    if rows and "mask_share" in rows[0]:
        out["mask_area_mean"] = sum(r["mask_area"] for r in rows) / len(rows)
        for column in rows[0]["mask_share"]:
            shares = [r["mask_share"][column] for r in rows if r["mask_share"][column] is not None]
            out.setdefault("mask_share_mean", {})[column] = sum(shares) / len(shares) if shares else None
            out.setdefault("maps_on_shape", {})[column] = sum(s > 0.5 for s in shares)
    return out


def draw_spectra(spectra, title="Fig. 3b: singular values over the largest (log scale)"):
    """{name: singular values (descending)} -> one line each; values below 1e-6 of the largest (numerical zeros) are
    left out."""
    series = [(name, [k + 1 for k in range(len(s)) if s[k] >= 1e-6 * s[0]], [v / s[0] for v in s if v >= 1e-6 * s[0]])
              for name, s in spectra.items() if s and s[0] > 0]
    return plot.lines(series, title, "index k (largest first)", "s_k / s_1", ylog=True, size=(560, 300))


def draw_histograms(sim, name=""):
    """similarity_overlap's histograms as the shares of pairs per bin, intra- against inter-class."""
    bins = sim["bins"]
    edges = [-1 + 2 * i / bins for i in range(bins + 1)]
    series = []
    for kind in ("intra", "inter"):
        h = sim[f"{kind}_hist"]
        p = [v / max(sum(h), 1) for v in h]
        series.append((f"{kind}-class (mean {sim[f'{kind}_mean']:.2f})",  # steps: each bin's share over its width
                       [e for i in range(bins) for e in edges[i:i + 2]], [v for v in p for _ in range(2)]))
    title = f"{name + ': ' if name else 'Fig. 4: '}similarity of test pairs, overlap {sim['overlap']:.3f}"
    return plot.lines(series, title, "cosine similarity", "share of pairs")


def draw_tsne(maps, tsne_numbers, plan):
    names, (y1, y2) = plan["names"], tsne_numbers["pair"]
    panels = [plot.scatter(xy, y, names, f"{'global space' if panel == 'global' else f'subspace g({y1}, {y2})'}: "
                                         f"pair distance / spread {tsne_numbers['panels'][panel]['map']['ratio']:.2f}",
                           squares=set(plan["groups"][1])) for panel, (xy, y) in maps.items()]
    return plot.panels(panels, f"Fig. 5: t-SNE of the projections z of two groups (dots, squares), pair {y1} - {y2}; "
                               "large markers: class centres")


def draw_clam(clam_numbers, pictures):
    header = ["anchor (y1)", "positive (y2)", "global space", "subspace of y1", "subspace of y2"]
    rows = []
    for r, (anchor, positive, maps) in zip(clam_numbers["pairs"], pictures):
        row = [(anchor, r["y1"]), (positive, r["y2"])]
        for k, (score, heat) in maps.items():
            share = r.get("mask_share", {}).get(k)
            caption = f"sim {score:.3f}" + (f"\n{100 * share:.0f}% on the shape" if share is not None else "")
            row.append((plot.overlay(anchor, heat / heat.max().clamp_min(1e-12)), caption))
        rows.append(row)
    return plot.panels([plot.tiles(rows, header[:len(rows[0])])], f"Fig. 6: CLAM, Grad-CAM of the anchor's mean "
                       f"similarity to the positive over {clam_numbers['views']} augmented views (sim)")


def draw_gates(gates, names):
    K, D = gates.shape
    cell = (max(1, min(4, 1024 // D)), max(1, min(12, 1024 // K)))
    return plot.heatmap(gates[:, gate_column_order(gates)], f"Fig. 9: class gates g(y), eq. 4 ({K} classes x {D} "
                        "dimensions, columns sorted by the first class opening them)", names if K <= 64 else None,
                        None, 0, 1, cell, xlabel="dimension", ylabel="" if names and K <= 64 else "class")


def draw_class_similarity(matrices, names, numbers):
    titles = {"gates": "gate overlap", "features": "mean feature cosine", "labels": "label embedding cosine"}
    shown, cell = (names if len(names) <= 40 else None), max(2, min(14, 560 // len(names)))
    r = ", ".join(f"{k} {v:.2f}" for k, v in numbers.get("correlation", {}).items() if v is not None)
    return plot.panels([plot.heatmap(torch.as_tensor(m), titles[k], shown, shown, cell=(cell, cell))
                        for k, m in matrices.items()],
                       "Fig. 12: class similarities" + (f"; their correlations: {r}" if r else ""))


def draw_training(runs):
    """{name: training_curves} -> loss, kNN, open gates and lr against step, one line per run."""
    def panel(key, steps, title, ylabel):
        return plot.lines([(n, c[steps], c[key]) for n, c in runs.items() if None not in c[key]], title, "step", ylabel)
    return plot.panels([panel("loss", "step", "training loss", "loss"),
                        panel("knn_top1", "knn_step", "online kNN top-1 (train.py's monitor)", "%"),
                        panel("gate_open", "step", "open gates (> 0.5) per anchor", "dimensions"),
                        panel("lr", "step", "learning rate", "lr")], "Training curves (log.jsonl)", columns=2)


def numbers(res, prefix=""):
    """Every number of an eval.json as (key path, value), dicts and lists of dicts walked in order."""
    items = res.items() if isinstance(res, dict) else enumerate(res)
    for key, value in items:
        if isinstance(value, dict) or (isinstance(value, list) and value and isinstance(value[0], dict)):
            yield from numbers(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


def fmt(value):
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(out_dir, title, header, table, figures):
    """out_dir/report.md: a title, a line on what was evaluated, every figure with its caption (by relative path, so
    that the folder reads in any Markdown viewer), then the table (rows of cells, the first row its head)."""
    lines = [f"# {title}", "", header]
    for file in figures:
        lines += ["", f"## {CAPTIONS[file][0]}", "", CAPTIONS[file][1], "", f"![{CAPTIONS[file][0]}]({file})"]
    lines += ["", "## Every number", "", "| " + " | ".join(table[0]) + " |", "|---" * len(table[0]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    path = os.path.join(out_dir, "report.md")
    simlap.save_atomic("\n".join(lines) + "\n", path, save=save_text)
    return path


def save_text(text, f):
    f.write(text.encode())


def run_report(res, out_dir):
    what = f"{res['arch']} backbone, method {res.get('method') or 'unknown (a bare backbone)'}, evaluated on " \
           f"{res['dataset']} ({res['num_train']} train / {res['num_test']} test images, {res['image_size']} px)."
    table = [["quantity", "value"]] + [[k, fmt(v)] for k, v in numbers(res)]
    return write_report(out_dir, f"eval.py: {res['checkpoint'] or res['backbone']}", what, table, res["figures"])


# ----------------------------------------------------------------------------------------------- --compare
def compare(dirs, out_dir):
    """eval.py --compare: the eval.json of several eval.py outputs side by side (nothing is recomputed) -> in out_dir
    report.md (every number of every run in one table, and the figures), compare.json (the same numbers, exact) and
    the overlay figures of Fig. 3b, Fig. 4 and the training curves."""
    if not out_dir:
        raise UserError("--compare needs --output-dir, the folder its report.md and figures go to")
    runs, paths = {}, []
    for d in dirs:
        path = d if os.path.isfile(d) else os.path.join(d, "eval.json")
        try:
            with open(path) as f:
                res = json.load(f)
        except OSError:
            raise UserError(f"--compare {d}: no eval.json there; run eval.py on the weights first") from None
        except ValueError as e:
            raise UserError(f"--compare {path} is not valid JSON ({one_line(e, 100)})") from None
        if not isinstance(res, dict) or not {"knn", "collapse", "similarity"} <= res.keys():
            raise UserError(f"--compare {path} is not an eval.json of eval.py (no knn, collapse or similarity)")
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        while name in runs:
            name += "'"
        runs[name] = res
        paths.append(os.path.dirname(os.path.abspath(path)))
    if os.path.abspath(out_dir) in paths:
        raise UserError(f"--output-dir {out_dir} is one of the compared folders, whose report.md would be overwritten; "
                        "pick another")
    values = {}
    for name, res in runs.items():
        for key, value in numbers(res):
            values.setdefault(key, {})[name] = value
    os.makedirs(out_dir, exist_ok=True)
    spectra = {f"{n} (effective rank {r['collapse']['backbone']['effective_rank']:.1f})":
               r["collapse"]["backbone"]["singular_values"] for n, r in runs.items()}
    figures = {"compare_spectra.png": draw_spectra(spectra, "Fig. 3b: backbone singular values over the largest "
                                                   "(log scale)"),
               "compare_similarity.png": plot.panels([draw_histograms(r["similarity"], n) for n, r in runs.items()],
                                                     "Fig. 4: cosine similarity of test pairs, backbone features"),
               "compare_training.png": draw_training({n: r["training"] for n, r in runs.items() if "training" in r})
               if any("training" in r for r in runs.values()) else None}
    figures = {f: plot.save(img, os.path.join(out_dir, f)) for f, img in figures.items() if img}
    simlap.save_atomic({"runs": dict(zip(runs, paths)), "values": values}, os.path.join(out_dir, "compare.json"),
                       save=simlap.save_json)
    head = [["quantity", *runs]] + [[k, *(str(runs[n].get(k)) for n in runs)] for k in ("method", "dataset", "arch")]
    table = head + [[k, *(fmt(v.get(n)) for n in runs)] for k, v in values.items()]
    what = "Runs: " + "; ".join(f"{n} = {p}" for n, p in zip(runs, paths)) + ". Numbers as in each eval.json (exact: "\
           "compare.json); – where a run has none."
    path = write_report(out_dir, "eval.py --compare", what, table, figures)
    print(f"wrote {path}")
    return {"runs": dict(zip(runs, paths)), "values": values, "figures": figures}


def cli(argv=None):
    simlap.cli(main, "eval.py", argv)


if __name__ == "__main__":
    cli()
