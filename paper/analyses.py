"""The paper's analyses whose numbers eval.py writes to eval.json, with or without figures (paper/figures.py draws
them): dimensional collapse, the singular value spectrum and effective rank of the embeddings (Fig. 3b); the intra-
and inter-class similarity distributions and their overlap (Fig. 4); and for the methods with a feature filter the
class gates (Fig. 9) and how their overlap follows the classes' shared attributes (Fig. 12).

    from paper import analyses
    res = analyses.analyses(model, train_args, test_feats, test_labels, device)  # collapse, similarity, gates
"""
import contextlib
import math

import torch
import torch.nn.functional as F

import simlap


@contextlib.contextmanager
def eval_mode(module):
    """Puts module in eval mode for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def projections(model, feats, device):
    """The projections z = f_P(h) (N, D) float32 CPU of backbone features feats (N, F), with the projector in eval
    mode, 1024 rows at a time; a bare backbone (model None) has no projector: its features."""
    if model is None:
        return feats
    projector = model.projector.to(device).eval()
    return torch.cat([projector(b.to(device)).float().cpu() for b in feats.split(1024)])


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
    with eval_mode(feature_filter):
        return feature_filter.class_gates().float().cpu()


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
        distance = simlap.class_distance(attributes)  # (K, K): 0 itself, 1 sharing an attribute, 2 sharing none
        out["overlap_shared_attribute"] = overlap[distance == 1].mean().item()
        out["overlap_no_shared_attribute"] = overlap[distance == 2].mean().item()
    return out


def analyses(model, info, test_f, test_y, device):
    """Dimensional collapse (Fig. 3b) of the backbone and projector embeddings, the similarity distributions
    (Fig. 4), and for the methods with a filter the class gates (Fig. 9, 12)."""
    embeddings = {"backbone": test_f}  # on the eval split
    if model is not None:
        embeddings["projector"] = projections(model, test_f, device)
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
            attributes = simlap.class_attributes(info.get("dataset"), info.get("classes"))
            attributes = attributes if attributes is not None and len(attributes) == model.num_classes else None
        res["gates"] = gate_analysis(class_gates(model.filter), model.filter.embed.weight, attributes)
    return res

