"""The paper's figures, drawn from what eval.py measured: the singular value spectrum (Fig. 3b), the similarity
distributions (Fig. 4), t-SNE of two groups of classes in the global space and a pair's subspace (Fig. 5), CLAM heat
maps (Fig. 6, appendix E), the class gates (Fig. 9), class similarities (Fig. 12) and the training curves; report.md
shows them with every number. compare() puts several eval.py outputs side by side (eval.py --compare). The numbers of
Figs. 3b, 4, 9 and 12's gates are paper/analyses.py's; the drawing is paper/plot.py's.

    python eval.py --checkpoint runs/x/checkpoint.pt                    # eval.json, every figure and report.md
    python paper/figures.py runs/simlap runs/supcon runs/simclr --output-dir runs/compare   # = eval.py --compare
"""
import json
import math
import os
import sys

if __package__ in (None, ""):  # run as a script: the repository root holds simlap.py and paper/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

import simlap  # noqa: E402
from paper import plot  # noqa: E402
from paper.analyses import class_gates, eval_mode, projections  # noqa: E402
from simlap import UserError, one_line  # noqa: E402


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


def cam_layer(backbone, image_size):
    """The layer Grad-CAM weighs -> (module, its name, its map's (h, w)). A ViT: its last block's patch tokens as they
    enter its attention (its ln_1: after the block the class token no longer reads the patch tokens, so their gradient
    there is 0). Else the last stage whose map is at least 7 x 7 at this image size, as the paper's layer4 of a
    ResNet-50 at 224 px: a ResNet's layer4 at 224 px, its layer3 at 32 px; the convnet's 8 x 8 ReLU at 32 px (its
    last, 2 x 2, could put at most 28 % of a map's mass on a shape covering 13 % of the image)."""
    if isinstance(backbone, torchvision.models.VisionTransformer):
        side = image_size // backbone.patch_size
        return backbone.encoder.layers[-1].ln_1, "encoder.layers[-1].ln_1", (side, side)
    stages = ([(n, m) for n, m in backbone.named_children() if n.startswith("layer")] if hasattr(backbone, "layer4")
              else [(f"{n} (ReLU)", m) for n, m in backbone.named_modules() if isinstance(m, nn.ReLU)])
    grids = {}
    hooks = [m.register_forward_hook(lambda module, i, out, n=n: grids.update({n: tuple(out.shape[-2:])}))
             for n, m in stages]
    try:
        with torch.no_grad(), eval_mode(backbone):
            backbone(torch.zeros(1, 3, image_size, image_size, device=next(backbone.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    fine = [(n, m) for n, m in stages if min(grids[n]) >= 7] or stages[:1]  # an image too small: the finest there is
    name, module = fine[-1]
    return module, name, grids[name]


def anchor_views(x, n, seed=0):
    """Appendix E's A(x): n views of the anchor x (3, H, W), or the same n views of each image of a batch x (B, 3, H,
    W), normalised by simlap.MEAN/STD -> (views (n, 3, H, W), or (B n, 3, H, W) image by image,
    theta (n, 2, 3): each view's sampling grid in the anchor's coordinates). A view is a random resized crop and flip
    drawn as in training (simlap.augment_params), then the channels times (1.0, 1.1, 0.9) for every view whose key
    says so (p = 0.5: the paper names the factors, not how often)."""
    keys = simlap.sample_keys(seed, 0, torch.arange(n))
    theta = simlap.crop_theta(simlap.augment_params(keys, 0))  # (n, 2, 3), as augment crops and flips
    batch = x.cpu().reshape(-1, *x.shape[-3:])
    grid = F.affine_grid(theta, [n, *batch.shape[1:]], align_corners=False).repeat(len(batch), 1, 1, 1)
    views = F.grid_sample(batch.repeat_interleave(n, 0), grid, padding_mode="border", align_corners=False)
    mean, std = torch.tensor(simlap.MEAN).view(3, 1, 1), torch.tensor(simlap.STD).view(3, 1, 1)
    scale = torch.where(simlap.uniforms(keys, 1, offset=40) < 0.5, torch.tensor([1.0, 1.1, 0.9]), 1.0)  # (n, 3)
    scale = scale.repeat(len(batch), 1)
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
            z = encode(x.to(positive.device).requires_grad_())  # (n, D); a frozen backbone still gives a gradient
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


@torch.no_grad()
def occlusion(encode, anchor, positive, gates, views=16, patch=None, seed=0, chunk=1024):
    """The occlusion map (Zeiler and Fergus 2014) of eq. 6's score, beside Grad-CAM: a patch of the data set's mean
    colour (0 after normalisation) slides over the anchor at half its side; every position's drop of the score (the
    same views A(x) as clam) is spread over the pixels it covers, and each pixel gets the mean drop of the positions
    covering it, ReLU'd (where hiding it lowers the similarity). patch: a fifth of the side by default (6 px at 32,
    45 at 224). -> {name: heat map (H, W) >= 0, on the CPU}"""
    (_, H, W), device = anchor.shape, positive.device
    patch = patch or max(2, round(min(H, W) / 5))
    starts = lambda n: sorted({*range(0, n - patch + 1, max(1, patch // 2)), n - patch})  # noqa: E731 (edges too)
    cover = torch.zeros(len(starts(H)) * len(starts(W)), H, W, dtype=torch.bool)  # (P, H, W): each patch's pixels
    for k, (top, left) in enumerate((t, l) for t in starts(H) for l in starts(W)):
        cover[k, top:top + patch, left:left + patch] = True
    hidden = torch.cat([anchor[None].cpu(), anchor.cpu() * ~cover[:, None]])  # (1 + P, 3, H, W): intact, occluded
    x = anchor_views(hidden, views, seed)[0]  # ((1 + P) n, 3, H, W)
    z = torch.cat([encode(b.to(device)) for b in x.split(chunk)])
    z_pos, out = encode(positive[None]), {}
    for name, g in gates.items():
        score = simlap.subspace_cosine(z, z_pos, g.to(z).expand_as(z)).view(len(hidden), views).mean(1)  # eq. 6
        drop = (score[0] - score[1:]).cpu()  # (P,)
        out[name] = ((drop[:, None, None] * cover).sum(0) / cover.sum(0)).relu()
    return out


def fig6_clam(encode, layer, ds, pairs, gates, views, device, masks=None):
    """Fig. 6 for each class pair (y1, y2): the first test image of class y1 is the anchor, the first of class y2
    (another image if y2 = y1) the positive, as eq. 2 pairs them; CLAM under the global space and, given the class
    gates g(y) (K, D) of a filter (eq. 4), the subspaces of y1 and of y2; beside each Grad-CAM map the occlusion map
    of the same score. masks (N, H, W) bool, where the data set has them (the synthetic shapes): the share of each
    map's mass on the anchor's shape, and the shape's share of the image (what a uniform map puts on it).
    -> (numbers, pictures)"""
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
        grad_cam = clam(encode, layer, anchor, positive, settings, views)
        maps = {"gradcam": {k: m for k, (_, m) in grad_cam.items()},
                "occlusion": occlusion(encode, anchor, positive, settings, views)}
        row = {"y1": y1, "y2": y2, "anchor": i, "positive": j, "score": {k: s for k, (s, _) in grad_cam.items()}}
        if masks is not None:
            mask = eval_mask(ds, masks, i)
            row["area"] = mask.float().mean().item()
            row["mass"] = {kind: {k: mask_share(m, mask) for k, m in by.items()} for kind, by in maps.items()}
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
                      "augmented views of the anchor) in the global space and the subspaces of y1 and y2 (eq. 4), each "
                      "beside the occlusion map of the same score (the drop when a patch of the mean colour hides a "
                      "part of the anchor). Where the data set knows the object (the synthetic shapes), each map's "
                      "share of its mass on it, against the object's share of the image: what a uniform map gets."),
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
    device = feature_filter.embed.weight.device
    with eval_mode(feature_filter):
        return feature_filter(torch.tensor([y1], device=device), torch.tensor([y2], device=device))[0].float().cpu()


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
    z = projections(model, test_f, device)
    maps = None
    if plan["pair"]:
        g = pair_gates(model.filter, *plan["pair"]) if own is not None else None
        out["tsne"], maps = fig5_embedding(z, test_y, plan["groups"], plan["pair"], g, args.tsne_points)
        out["tsne"]["groups"] = [[names[k] for k in g] for g in plan["groups"]]
        out["tsne"]["pair"] = [names[k] for k in plan["pair"]]
    masks = test_set.shape_masks() if isinstance(test_set, simlap.SyntheticShapes) else None
    layer, layer_name, grid = cam_layer(backbone, test_set[0][0].shape[-1])
    rows, pictures = fig6_clam(encode, layer, test_set, plan["clam_pairs"], own, args.clam_views, device, masks)
    out["clam"] = {"views": args.clam_views, "layer": layer_name, "grid": list(grid), **clam_summary(rows, names)}
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
    return out


def clam_summary(rows, names):
    """fig6_clam's numbers with class names, and their means over the pairs per column (global, y1, y2): the
    similarity (score), and where there are shape masks, the share of each kind of map's mass on the shape (mass:
    gradcam, occlusion; an all-zero map left out) with how many maps put more than half of it there, and the shape's
    share of the image (area), the mass a map spread evenly would put on it."""
    for r in rows:
        r["y1"], r["y2"] = names[r["y1"]], names[r["y2"]]
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    out = {"pairs": rows, "score": {k: mean([r["score"][k] for r in rows]) for k in (rows[0]["score"] if rows else ())}}
    if rows and "mass" in rows[0]:
        out["area"] = mean([r["area"] for r in rows])
        shares = {kind: {k: [r["mass"][kind][k] for r in rows if r["mass"][kind][k] is not None] for k in by}
                  for kind, by in rows[0]["mass"].items()}
        out["mass"] = {kind: {k: mean(v) for k, v in by.items()} for kind, by in shares.items()}
        out["maps_on_object"] = {kind: {k: sum(s > 0.5 for s in v) for k, v in by.items()} for kind, by in shares.items()}
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


def draw_clam(clam, pictures):
    header, rows = ["anchor (y1)", "positive (y2)"], []
    for r, (anchor, positive, maps) in zip(clam["pairs"], pictures):
        row = [(anchor, r["y1"]), (positive, r["y2"])]
        for k in maps["gradcam"]:
            for kind, heat in ((kind, maps[kind][k]) for kind in ("gradcam", "occlusion")):
                share = r.get("mass", {}).get(kind, {}).get(k)
                caption = (f"sim {r['score'][k]:.3f}" if kind == "gradcam" else "occlusion") + (
                    f"\n{100 * share:.0f}% on the shape" if share is not None else "")
                row.append((plot.overlay(anchor, heat / heat.max().clamp_min(1e-12)), caption))
        rows.append(row)
    header += [f"{k} {kind}" for k in pictures[0][2]["gradcam"] for kind in ("CAM", "occl.")] if rows else []
    area = f"; the shapes cover {100 * clam['area']:.0f}% of the images, what a uniform map puts on them" if (
        "area" in clam) else ""
    grid = "x".join(map(str, clam["grid"]))
    return plot.panels([plot.tiles(rows, header)], f"Fig. 6: CLAM, Grad-CAM (CAM) at {clam['layer']} ({grid}) and occlusion "
                       f"(occl.) of the anchor's mean similarity to the positive over {clam['views']} views (sim), "
                       f"globally and in the subspaces of y1 and y2{area}")


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


def main(argv=None):
    p = simlap.Parser(description="eval.py --compare: the eval.json of several eval.py outputs side by side.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="eval.py output folders (or their eval.json)")
    p.add_argument("--output-dir", required=True, help="where report.md, compare.json and the figures go")
    args = p.parse_args(argv)
    return compare(args.dirs, args.output_dir)


if __name__ == "__main__":
    simlap.cli(main, "paper/figures.py")
