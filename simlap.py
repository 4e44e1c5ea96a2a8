"""SimLAP: contrastive learning from arbitrary class pairs (Wu et al., arXiv 2410.18200), in one module.

    backbone  f_E : image -> h             (build_backbone; only this is kept after training)
    projector f_P : h -> z  (B, D)         (Projector, Table 5b)
    filter        : (y1, y2) -> g (B, D)   (FeatureFilter, eq. 3 / Table 5c)
    loss          : InfoNCE on g ⊙ z       (simlap_loss_reference = eq. 2 as written; simlap_loss = the same, fast)

Any two classes may be a positive pair: the filter opens the subspace where the two share features, and samples
of neither class are the negatives. Read in order:
    I.   The method: filter, gate penalty, partner sampling, eq. 2 (torch only: copy this part alone; its head
         says how to call it).
    II.  The model: heads, the baselines' losses, METHODS (what each method uses), SimLAP, LARS, backbones.
    III. What train.py and eval.py share: distributed helpers, data, augmentation, kNN, command-line helpers.
"""
import argparse
import copy
import gc
import gzip
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2


# ============================================================================================ I. The method
# Copied alone, this part needs only `import math`, `import torch`, `import torch.nn as nn` and
# `import torch.nn.functional as F`. One step on two views x1, x2 (B, 3, H, W) of images labelled y (B,):
#     z1, z2 = projector(backbone(x1)), projector(backbone(x2))      # (B, D) each
#     y2 = sample_partners(y)                 # (B,) partners; -1 where the batch has none ('distinct', 'nearest')
#     g = feature_filter(y, y2.clamp_min(0))  # (B, D), eq. 3; an anchor with y2 = -1 has no positive and adds nothing
#     loss = (simlap_loss(z1, z2, y, y2, g) + simlap_loss(z2, z1, y, y2, g)) / 2  # symmetric: each view anchors once
#     loss = loss + gate_weight * gate_penalty(feature_filter)                     # eq. 5, optional
# Under DDP the keys are every rank's views gathered with gradient (simlap_loss(z1, all_gather(z2), y, y2, g, τ,
# all_gather(y), divisor)), and both calls get one divisor: the positive pairs summed over ranks / world size, so that
# DDP's gradient average is the one-process update on the global batch (SimLAP.pair_loss, ddp_divisor).
# The speed-up block at the end (simlap_loss, its fused autograd kernel): simlap_loss_reference, fast.
class FeatureFilter(nn.Module):
    """Label pair -> gate vector in (0,1)^D: g(y1,y2) = sigmoid(f_g((f_l(y1) + f_l(y2)) / 2)) (eq. 3, Table 5c).
    With one label it is the class gate g(y) = sigmoid(f_g(f_l(y))) (eq. 4)."""

    def __init__(self, num_classes, out_dim=256, embed_dim=512, hidden_dim=1024):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, embed_dim)  # f_l
        self.mlp = nn.Sequential(nn.BatchNorm1d(embed_dim), nn.ReLU(inplace=True), nn.Linear(embed_dim, hidden_dim),
                                 nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))  # f_g

    def forward(self, y1, y2=None):  # (B,) [, (B,)] -> (B, D)
        e = self.embed(y1) if y2 is None else (self.embed(y1) + self.embed(y2)) / 2  # symmetric in (y1, y2)
        return torch.sigmoid(self.mlp(e))

    def class_gates(self):  # (K, D): g(y) of every class, eq. 4
        return self(torch.arange(self.num_classes, device=self.embed.weight.device))


def gate_entropy(g, dim=None):
    """Mean Bernoulli entropy (nats) of gate values g: 0 for binary gates, log 2 at g = 0.5; over dim if given."""
    g = g.float().clamp(1e-7, 1 - 1e-7)
    h = -(g * g.log() + (1 - g) * (1 - g).log())
    return h.mean() if dim is None else h.mean(dim)


def gate_penalty(feature_filter):
    """L_G of eq. 5 with the sign fixed: the mean Bernoulli entropy of the K class gates g(y) (eq. 4).
    The paper prints L_G = 1/(KD) Σ g log g; minimising that pulls every gate to 1/e instead of to {0, 1}.
    The entropy -[g log g + (1-g) log(1-g)] is minimal exactly at 0 and 1, which is the stated intent."""
    return gate_entropy(feature_filter.class_gates())


PAIR_MODES = ("arbitrary", "arbitrary-uniform", "identical", "distinct", "nearest")


def sample_partners(y, mode="arbitrary", batch_labels=None, num_classes=None, class_dist=None, n=1,
                    generator=None):
    """Partner class y2 for every anchor label y (B,) -> (B,) long; -1 where no valid partner is in the batch
    (that anchor then has no positive and is left out of the loss).

    batch_labels: labels of every key in the global batch (default y); partners are drawn from these.
      arbitrary          y2 = the label of a uniformly random key, so classes come in proportion to their share of
                         the batch (the authors' y2 = y[randperm(B)], erow/hydra; drawn independently per anchor)
      arbitrary-uniform  y2 uniform over the classes present, whatever their share
      identical          y2 = y1
      distinct           y2 uniform over the classes present other than y1
      nearest            y2 uniform over the n present classes closest to y1 under class_dist (K, K), ties at the
                         n-th distance included; n = 0 means y1 itself (the paper's Fig. 8 "N-closest classes")
    No host sync, no Python loop: a random index, or argmax of masked uniform noise over a (B, K) mask."""
    if mode == "identical" or (mode == "nearest" and n == 0):
        return y.clone()
    if mode not in PAIR_MODES:
        raise ValueError(f"unknown pair mode {mode!r}; choose one of {', '.join(PAIR_MODES)}")
    batch_labels = y if batch_labels is None else batch_labels
    if mode == "arbitrary":
        return batch_labels[torch.randint(len(batch_labels), y.shape, generator=generator, device=y.device)]
    K = num_classes or (class_dist.shape[0] if class_dist is not None else int(batch_labels.max()) + 1)
    present = torch.zeros(K, dtype=torch.bool, device=y.device).index_fill_(0, batch_labels, True)
    allowed = present.expand(len(y), K).clone()  # (B, K)
    if mode in ("distinct", "nearest"):
        allowed[torch.arange(len(y), device=y.device), y] = False
    if mode == "nearest":
        d = class_dist.to(y.device, torch.float32)[y].masked_fill(~allowed, float("inf"))  # (B, K)
        kth = d.topk(min(n, K), dim=1, largest=False).values[:, -1:]
        allowed &= d <= kth
    noise = torch.rand(allowed.shape, generator=generator, device=y.device)
    y2 = noise.masked_fill(~allowed, -1.0).argmax(1)
    return torch.where(allowed.any(1), y2, torch.full_like(y2, -1))


def simlap_loss_reference(q, k, y, y2, gates, temperature=0.1, key_labels=None):
    """Eq. 2 as the paper writes it. q (B, D) anchors, k (N, D) keys with labels key_labels (default y), y2 (B,)
    partner classes, gates (B, D) = g(y, y2). Positives of anchor i: keys of class y2_i; negatives: keys of neither
    y_i nor y2_i. The mean over all (anchor, positive) pairs; 0 if there is none. It builds a (B, N, D) tensor:
    for reading and testing; train with simlap_loss, which computes the same value and gradient."""
    key_labels = y if key_labels is None else key_labels
    g = gates[:, None, :]  # (B, 1, D)
    s = F.cosine_similarity(g * q[:, None, :], g * k[None, :, :], dim=-1) / temperature  # (B, N) s_ij / τ
    pos = y2[:, None] == key_labels[None, :]  # (B, N)
    neg = (y[:, None] != key_labels[None, :]) & ~pos
    log_neg = s.masked_fill(~neg, -math.inf).logsumexp(1, keepdim=True)  # (B, 1) log Σ_n e^{s_in / τ}
    nll = torch.logaddexp(s, log_neg) - s  # -log(e^{s_ip/τ} / (e^{s_ip/τ} + Σ_n e^{s_in/τ}))
    return nll[pos].sum() / pos.sum().clamp_min(1)


# ------------------------------------------------------------------ speed-up: eq. 2 without a (B, N, D) tensor
def simlap_loss(q, k, y, y2, gates, temperature=0.1, key_labels=None, divisor=None, eps=1e-8):
    """Eq. 2, fast: the value and gradient of simlap_loss_reference (same arguments) without a (B, N, D) tensor,
    in fp32 (fp64 stays fp64) even under autocast. The sum over pairs is divided by their count, or by `divisor`
    if given (under DDP each rank's share of the global count: see SimLAP.pair_loss). Keys of class y_i that are
    not positives are neither; anchors without a positive (y2 = -1, or y2 absent from the keys) add nothing."""
    key_labels = y if key_labels is None else key_labels
    with torch.autocast(q.device.type, enabled=False):
        dt = torch.promote_types(q.dtype, torch.float32)
        dot, kn2 = subspace_products(q.to(dt), k.to(dt), gates.to(dt), 1 / temperature, eps)  # (B, N) each
        pos = torch.eq(y2[:, None], key_labels[None, :], out=torch.empty_like(dot))  # (B, N) 0/1
        neg = torch.eq(y[:, None], key_labels[None, :], out=torch.empty_like(dot))
        neg = torch.maximum(neg, pos, out=neg).neg_().add_(1)  # neither class y_i nor y2_i
        total = _PairInfoNCE.apply(dot, kn2, pos, neg, 1 / temperature, eps)
        return total / (pos.sum().clamp_min(1) if divisor is None else divisor)


def subspace_products(q, k, gates, scale=1.0, eps=1e-8):
    """The two matrix products behind the subspace cosine, never a (B, N, D) tensor. q (B, D), k (N, D) unit-
    normalised here, g = gates (B, D) -> dot, kn2 (B, N):
      dot_ij = scale <g_i⊙q_i, g_i⊙k_j> / ‖g_i⊙q_i‖ = scale ((g²⊙q / ‖g⊙q‖) kᵀ)_ij
      kn2_ij = ‖g_i⊙k_j‖² = (g² (k⊙k)ᵀ)_ij
    so that dot_ij / sqrt(kn2_ij + eps²) = scale · cos(g_i⊙q_i, g_i⊙k_j). scale (1/τ in the loss) is applied to
    the (B, D) factor, which is cheaper than to the (B, N) result."""
    # The cosine is invariant to rescaling g_i, so dividing by max(g_i) changes nothing but keeps g² from
    # underflowing when all gates are tiny. The scale is detached: its exact gradient is zero.
    g = gates / gates.amax(1, keepdim=True).detach().clamp_min(eps)
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    g2 = g * g
    q_norm = (g * q).norm(dim=1, keepdim=True).clamp_min(eps)  # (B, 1)
    return (g2 * q * (scale / q_norm)) @ k.T, g2 @ (k * k).T


def subspace_cosine(q, k, gates, eps=1e-8):
    """s[i, j] = cos(g_i ⊙ q_i, g_i ⊙ k_j): key j against anchor i inside anchor i's subspace (eq. 2) -> (B, N)"""
    dot, kn2 = subspace_products(q, k, gates, eps=eps)
    return dot * (kn2 + eps * eps).rsqrt()


EXP_MAX = 20.0  # exp() of masked-out logits is clamped here: finite, so that multiplying by the 0 mask gives 0
LOG_MIN = -80.0  # x below this adds softplus(x) < e^-80 ≈ 2e-35 to the loss: nothing, but never -inf


class _PairInfoNCE(torch.autograd.Function):
    """simlap_loss's kernel: Σ over positive pairs (i, p) of -log(e^{L_ip} / (e^{L_ip} + Σ_n e^{L_in})) with
    L = dot / sqrt(kn2 + eps²) = s / τ and pos, neg (B, N) 0/1 floats. Forward and gradient are written out by hand
    in a few elementwise (B, N) passes, mostly in place; arithmetic on 0/1 float masks instead of where() on bool
    ones is what makes it fast on the CPU."""

    @staticmethod
    def forward(ctx, dot, kn2, pos, neg, bound, eps):
        rk = (kn2 + eps * eps).rsqrt_()  # 1 / ‖g_i⊙k_j‖
        L = dot * rk  # (B, N) logits, |L| <= bound = 1/τ
        # m_i, the log-sum-exp shift: lifting negatives by 3 bound puts each above every non-negative (>= 2 bound
        # against <= bound), so the row max is the largest negative logit. Any shift gives the same value.
        m = torch.add(L, neg, alpha=3 * bound).amax(1, keepdim=True).sub_(3 * bound)  # (B, 1)
        # Negatives have L - m <= 0; masked-out entries can reach 2 bound, whose exp overflows fp32 at τ = 0.01.
        E = (L - m).clamp_max_(EXP_MAX).exp_().mul_(neg)  # e^{L_in - m_i} on negatives, 0 elsewhere
        S = E.sum(1, keepdim=True)  # (B, 1)
        x = (m + S.log() - L).clamp_min_(LOG_MIN)  # log Σ_n e^{L_in} - L_ij; -inf (S = 0) without negatives
        ctx.save_for_backward(rk, L, E, S, x, pos)
        # Σ over positives of -log σ(-x) = softplus(x) = max(x, 0) - log σ(|x|): no inf, so the 0s of pos stay 0
        pos = pos.flatten()
        return torch.dot(x.relu().flatten(), pos) - torch.dot(x.abs().sigmoid_().log_().flatten(), pos)

    @staticmethod
    def backward(ctx, grad):
        rk, L, E, S, x, pos = ctx.saved_tensors
        W = x.sigmoid().mul_(pos).mul_(grad)  # -∂/∂L_ip on positives; each also pulls Σ_n e^{L_in} down:
        coef = W.sum(1, keepdim=True).div_(S.clamp_min(torch.finfo(S.dtype).tiny))  # ∂/∂L_in = E_in · coef_i
        d_dot = (E * coef).sub_(W).mul_(rk)
        return d_dot, (d_dot * L).mul_(rk).mul_(-0.5), None, None, None, None


# ============================================================================================ II. The model
class Projector(nn.Sequential):
    """An MLP head of `layers` Linear maps in_dim -> hidden_dim -> ... -> out_dim, BatchNorm + ReLU between them.
    The defaults are f_P of Table 5b: BN + ReLU on the backbone output first, and a final LayerNorm, which is what
    keeps training stable (section 5.2). SimLAP-MoCo's heads (erow/hydra, after MoCo v3) start with a Linear
    (norm_input=False): projector 3 layers ending in LayerNorm, predictor 2 layers without (norm_output=False)."""

    def __init__(self, in_dim, hidden_dim=2048, out_dim=256, layers=2, norm_input=True, norm_output=True):
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        mlp = [nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True)] if norm_input else []
        for d_in, d_out in zip(dims, dims[1:]):
            mlp += [nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        super().__init__(*mlp[:-2], *([nn.LayerNorm(out_dim)] if norm_output else []))


class Method(NamedTuple):
    pairs: bool  # draws a partner class per anchor and trains on eq. 2 (simlap_loss)
    filter: bool  # the feature filter gates eq. 2 (else all-ones gates: the full space)
    instance: str  # the loss on the views themselves: "" (none), "supcon", "nt_xent" or "moco"
    momentum: bool  # MoCo v3: queries from a predictor, keys from a momentum encoder

    @property
    def weighted(self):  # both losses: (instance + β · pair) / (1 + β), as erow/hydra's moco/builder.py
        return self.pairs and bool(self.instance)


METHODS = {  # train.py --method; a new variant is a row here plus what is new about it
    "simlap": Method(pairs=True, filter=True, instance="", momentum=False),  # the paper's method
    "supcon": Method(pairs=False, filter=False, instance="supcon", momentum=False),  # Khosla et al. 2020
    "simclr": Method(pairs=False, filter=False, instance="nt_xent", momentum=False),  # Chen et al. 2020
    # the paper's Hydra is "SimCLR + feature filter" (the authors' builder uses MoCo v3: that is simlap-moco here)
    "hydra": Method(pairs=True, filter=True, instance="nt_xent", momentum=False),
    "supcon-arbitrary": Method(pairs=True, filter=False, instance="", momentum=False),  # "SupCon, arbitrary pairs"
    "simlap-moco": Method(pairs=True, filter=True, instance="moco", momentum=True),  # SimLAP-MoCo, Table 1
}


def supcon_loss(z, y, temperature=0.1):
    """Supervised contrastive loss L_out (Khosla et al. 2020, eq. 2), in fp32 (fp64 stays fp64) even under autocast.

    z (M, D): every view of this rank's images (two views: M = 2B, z = cat([z1, z2]), y = cat([y, y])), y (M,)
    their labels. Each view i is an anchor against all views of the global batch (gathered with gradient):
      ℓ_i = -1/|P(i)| Σ_{p∈P(i)} log( e^{s_ip/τ} / Σ_{a∈A(i)} e^{s_ia/τ} ),   s = cosine,
    A(i) every view but i itself, P(i) those of A(i) with label y_i. The loss is the mean of ℓ_i over anchors with
    a positive; anchors without one add nothing (never NaN). Under DDP the divisor is ddp_divisor's. Unlike
    SupContrast's code there is no hidden τ / base_τ factor. Instance ids for y give SimCLR: nt_xent_loss."""
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)
        keys, key_y = gather(z, with_grad=True), gather(y)  # (N, D), (N,): N = M x world size
        logits = z @ keys.T / temperature  # (M, N)
        me = (torch.arange(len(z), device=z.device) + rank() * len(z))[:, None]  # each anchor's own column
        # A finite fill (not -inf) for the anchor itself keeps the gradient finite even with a single view.
        lse = logits.scatter(1, me, torch.finfo(logits.dtype).min).logsumexp(1)  # log Σ_{a∈A(i)} e^{s_ia/τ}
        pos = (y[:, None] == key_y[None, :]).scatter_(1, me, False)  # P(i)
        num_pos = pos.sum(1)
        loss = lse - (logits * pos).sum(1) / num_pos.clamp_min(1)  # (M,): ℓ_i
        has_pos = num_pos > 0
        return torch.where(has_pos, loss, 0).sum() / ddp_divisor(has_pos.sum())


def nt_xent_loss(z1, z2, temperature=0.1):
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1), in fp32 even under autocast. z1, z2 (B, D): the two views of
    this rank's images. Each of the 2B views of the global batch is an anchor with its other view j(i) as the
    only positive and every other view as a candidate (2B - 1 in all):
      ℓ_i = -log( e^{s_{i,j(i)}/τ} / Σ_{a≠i} e^{s_ia/τ} ),   s = cosine,   loss = mean over the 2B anchors.
    It is supcon_loss with instance ids for labels."""
    ids = instance_ids(len(z1), z1.device)
    return supcon_loss(torch.cat([z1, z2]), torch.cat([ids, ids]), temperature)


def moco_loss(q1, q2, k1, k2, temperature=0.2):
    """MoCo v3's symmetric loss (Chen et al. 2021; facebookresearch/moco-v3, moco/builder.py), in fp32 even under
    autocast: ctr(q1, k2) + ctr(q2, k1), where for this rank's queries q (B, D) and the keys k (N, D) of the global
    batch (gathered from all ranks without gradient: they come from the momentum encoder)
      ctr(q, k) = 2τ · mean_i -log( e^{s_{i,j(i)}/τ} / Σ_n e^{s_in/τ} ),   s = cosine,
    j(i) = the global index of query i's own image. The 2τ factor is MoCo v3's; the authors' erow/hydra averages
    the two terms without it (its loss is 1/(4τ) times this one)."""
    with torch.autocast(q1.device.type, enabled=False):
        labels = instance_ids(len(q1), q1.device)

        def ctr(q, k):
            q, k = (F.normalize(t.to(torch.promote_types(t.dtype, torch.float32)), dim=1) for t in (q, k))
            return F.cross_entropy(q @ k.T / temperature, labels) * (2 * temperature)

        return ctr(q1, k2) + ctr(q2, k1)


class Pairs(NamedTuple):
    """How SimLAP draws each anchor's partner class (sample_partners): a mode of PAIR_MODES, and for 'nearest' the
    number n of closest classes and the (K, K) class distance."""
    mode: str = "arbitrary"
    nearest_n: int = 1
    class_dist: torch.Tensor = None


class SimLAP(nn.Module):
    """backbone + projector + feature filter; forward(x1, x2, y) -> (loss, stats), the loss as METHODS[method]
    says: eq. 2 on partner pairs (pairs=) gated by the filter or by all-ones gates, an instance loss, or both,
    (instance + beta · pair) / (1 + beta). simlap-moco adds a predictor and a momentum encoder (encode,
    update_momentum). Works unchanged under DDP: anchors stay local, keys and labels are gathered from all ranks
    (with gradient, except the momentum encoder's keys, which have none)."""

    def __init__(self, arch="resnet18", num_classes=16, *, small_images=False, image_size=None,  # the backbone
                 proj_hidden=2048, proj_dim=256,  # the heads
                 method="simlap", pairs=Pairs(), beta=1.0, temperature=0.1, gate_weight=0.0):  # the loss
        super().__init__()
        for name, value, allowed in (("method", method, METHODS), ("pair mode", pairs.mode, PAIR_MODES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        self.spec = spec = METHODS[method]
        if spec.pairs and pairs.mode == "nearest" and pairs.class_dist is None:
            raise ValueError("Pairs('nearest') needs a (K, K) class_dist")
        self.backbone, self.feature_dim = build_backbone(arch, small_images, image_size)
        if spec.momentum:  # erow/hydra's heads: projector in -> H -> H -> D, predictor D -> H -> D
            self.projector = Projector(self.feature_dim, proj_hidden, proj_dim, layers=3, norm_input=False)
            self.predictor = Projector(proj_dim, proj_hidden, proj_dim, norm_input=False, norm_output=False)
            # the momentum encoder: a copy of backbone + projector that only update_momentum changes
            self.momentum_backbone, self.momentum_projector = (copy.deepcopy(m).requires_grad_(False)
                                                               for m in (self.backbone, self.projector))
        else:
            self.projector = Projector(self.feature_dim, proj_hidden, proj_dim)
        self.filter = FeatureFilter(num_classes, proj_dim)  # kept by every method, so checkpoints match
        if not spec.filter:
            self.filter.requires_grad_(False)  # unused: keeps DDP and the optimizer away from it
        self.num_classes, self.method, self.pairs, self.beta = num_classes, method, pairs, beta
        self.temperature, self.gate_weight = temperature, gate_weight  # τ, λ of eq. 5
        class_dist = pairs.class_dist  # a buffer, so that .to(device) moves it
        self.register_buffer("class_dist", class_dist.float() if class_dist is not None else None, persistent=False)
        self.generator = None  # torch.Generator for partner sampling (train.py sets and checkpoints it)

    def forward(self, x1, x2, y, y2=None, stats=False):
        """x1, x2 (B, 3, H, W) two views, y (B,) labels; y2 (B,) overrides the sampled partners.
        stats=True also returns plain floats (one host sync); training asks for them every few steps only."""
        spec = self.spec
        q1, q2, k1, k2 = self.encode(x1, x2)
        key_y, gates = gather(y), torch.ones_like(q1)  # labels of the global batch; all-ones gates: the full space
        if spec.pairs:
            if y2 is None:
                y2 = sample_partners(y, self.pairs.mode, key_y, self.num_classes, self.class_dist,
                                     self.pairs.nearest_n, self.generator)
            if spec.filter:
                gates = self.filter(y, y2.clamp_min(0))  # (B, D), eq. 3
            pos = y2[:, None] == key_y[None, :]  # (B, N): each anchor's positives, the keys of its partner class
            loss = self.pair_loss(q1, q2, k1, k2, y, y2, key_y, gates, pos)
        if spec.instance:
            instance = {"supcon": lambda: supcon_loss(torch.cat([q1, q2]), torch.cat([y, y]), self.temperature),
                        "nt_xent": lambda: nt_xent_loss(q1, q2, self.temperature),
                        "moco": lambda: moco_loss(q1, q2, k1, k2, self.temperature)}[spec.instance]()
            loss = (instance + self.beta * loss) / (1 + self.beta) if spec.pairs else instance
        if self.gate_weight > 0 and spec.filter:
            loss = loss + self.gate_weight * gate_penalty(self.filter)  # eq. 5
        if not stats:
            return loss, {}
        with torch.no_grad():  # view-1 anchors against view-2 keys, with the positives of this method
            if not spec.pairs:  # supcon: the same label; simclr: the same image
                ids = y if spec.instance == "supcon" else instance_ids(len(y), y.device)
                pos = ids[:, None] == gather(ids)[None, :]
            sim = subspace_cosine(q1, gather(q2) if k2 is None else k2, gates)
            values = torch.stack([loss.detach().float(), (gates > 0.5).float().sum(1).mean(), gate_entropy(gates),
                                  (sim * pos).sum() / pos.sum().clamp_min(1)]).tolist()
        return loss, dict(zip(("loss", "gate_open", "gate_entropy", "pos_sim"), values))

    def encode(self, x1, x2):
        """-> queries q1, q2 (B, D) of this rank's images and keys k1, k2 (world_size · B, D) of the global batch,
        fp32. Queries are the projections f_P(f_E(x)), or with a momentum encoder predictor(f_P(f_E(x))). Keys are
        the queries gathered with gradient, or the momentum encoder's projections without; None for the methods
        without pairs (supcon_loss gathers for itself)."""
        x = torch.cat([x1, x2])
        z = self.projector(self.backbone(x))
        if not self.spec.momentum:
            z1, z2 = z.float().chunk(2)
            if not self.spec.pairs:
                return z1, z2, None, None
            return z1, z2, gather(z1, with_grad=True), gather(z2, with_grad=True)
        with torch.no_grad():
            k1, k2 = self.momentum_projector(self.momentum_backbone(x)).float().chunk(2)
        return *self.predictor(z).float().chunk(2), gather(k1), gather(k2)

    @torch.no_grad()
    def update_momentum(self, m):
        """simlap-moco, once per step before the forward: θ_m <- m θ_m + (1 - m) θ for every parameter of the
        momentum encoder (MoCo v3; its buffers, the BatchNorm statistics, are its own)."""
        momentum = [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]
        torch._foreach_mul_(momentum, m)
        torch._foreach_add_(momentum, [*self.backbone.parameters(), *self.projector.parameters()], alpha=1 - m)

    def pair_loss(self, q1, q2, k1, k2, y, y2, key_y, gates, pos):
        """simlap_loss, symmetric in the two views (anchors q1 against keys k2, q2 against k1). pos (B, N): the
        positives, counted over all ranks so that each rank divides by its share of the global pair count."""
        divisor = ddp_divisor(pos.sum())
        return (simlap_loss(q1, k2, y, y2, gates, self.temperature, key_y, divisor)
                + simlap_loss(q2, k1, y, y2, gates, self.temperature, key_y, divisor)) / 2


class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017) as in SimCLR/MoCo v3. Parameters with ndim <= 1 (biases, BN/LN weights) get
    neither weight decay nor the trust ratio: plain momentum SGD.
    Under fp16, torch.amp.GradScaler hands it the loss scale and its inf/NaN flag as device tensors (grad_scale,
    found_inf: _step_supports_amp_scaling), so that a step it skips costs no host sync: the step then leaves every
    parameter and momentum buffer as it was."""
    _step_supports_amp_scaling = True

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)  # set by GradScaler
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if scale is None else p.grad / scale
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = p.norm(), g.norm()
                    trust = torch.where((p_norm > 0) & (g_norm > 0), group["eta"] * p_norm / g_norm,
                                        torch.ones_like(p_norm))
                    g = g.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                if found_inf is None:
                    buf.mul_(group["momentum"]).add_(g)
                    p.add_(buf, alpha=-group["lr"])
                else:  # where() and not a branch on found_inf, which would sync with the host
                    ok = found_inf == 0
                    buf.copy_(torch.where(ok, buf * group["momentum"] + g, buf))
                    p.sub_(torch.where(ok, buf * group["lr"], 0))


ARCHS = ("convnet", "resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base")


def vit_patch(small_images):
    return 4 if small_images else 16


def build_backbone(arch, small_images=False, image_size=None):
    """Randomly initialised encoder f_E -> (module, feature_dim). Nothing is downloaded.
    small_images (32-96 px): ResNets get the CIFAR stem (3x3 conv, stride 1, no max-pool); ViTs get patch 4.
    convnet: a small CNN for CPU runs, tests and the demo (not in the paper)."""
    if arch == "convnet":
        return convnet()
    if arch in ("resnet18", "resnet50"):
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=True)
        if small_images:
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim
    if arch in ("vit_tiny", "vit_small", "vit_base"):
        # The authors' ViTs (erow/hydra vits.py, after MoCo v3): ViT-S has 12 heads of 32, not DeiT-S's 6 of 64
        width, heads = {"vit_tiny": (192, 3), "vit_small": (384, 12), "vit_base": (768, 12)}[arch]
        size = image_size or (32 if small_images else 224)
        net = torchvision.models.VisionTransformer(image_size=size, patch_size=vit_patch(small_images),
                                                   num_layers=12, num_heads=heads, hidden_dim=width,
                                                   mlp_dim=4 * width)
        net.heads = nn.Identity()  # forward() then returns the class-token feature
        net.conv_proj.requires_grad_(False)  # MoCo v3's frozen random patch embedding: stabilises contrastive ViTs
        return net, width
    raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


def convnet(widths=(32, 64, 128, 256)):
    """Four conv-BN-ReLU stages, the first with stride 2, the others after a 2x2 max-pool, then global average
    pooling: 0.39M parameters, ~4M multiply-adds for a 32 px image, any input size. -> (module, feature_dim)"""
    layers, c_in = [], 3
    for i, c in enumerate(widths):
        pool = [nn.MaxPool2d(2, ceil_mode=True)] if i else []
        layers += pool + [nn.Conv2d(c_in, c, 3, 1 if i else 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), c_in


# ============================================================================ III. What train.py and eval.py share
# ----------------------------------------------------------------------------------------------- distributed
def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather(x, with_grad=False):
    """Concatenate x from all ranks along dim 0 (a no-op in one process). Plain all_gather has no gradient:
    keys need it (with_grad=True) so that the update equals the single-process update on the global batch."""
    if world_size() == 1:
        return x
    if with_grad:
        return _GatherWithGrad.apply(x)
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered tensor and keeps this rank's rows (what
    torch.distributed.nn.functional.all_gather computes; that one is deprecated and warns on every rank)."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(world_size())[rank()]


def autocast_dtype(device):
    """The mixed-precision dtype of a device: bfloat16 on a GPU that computes in it natively (compute capability
    8.0 and up: A100, H100, RTX 30xx ...), float16 on older GPUs (V100, T4, RTX 20xx: torch would emulate bfloat16,
    slowly), bfloat16 on the CPU (where train.py uses it only when asked: --precision)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


def instance_ids(n, device):
    """Global ids of this rank's n images, unique across ranks (every rank holds n)."""
    return torch.arange(n, device=device) + rank() * n


def ddp_divisor(count):
    """What a rank divides its loss sum by: the count summed over ranks / world size (at least 1 / world size).
    DDP averages gradients over ranks, so the update then equals the single-process update on the global batch."""
    if world_size() > 1:
        count = count.clone()
        dist.all_reduce(count)
    return count.clamp_min(1) / world_size()


# ----------------------------------------------------------------------------------------------- data
class SyntheticShapes(torch.utils.data.Dataset):
    """Offline data set with known class structure: class = (shape, colour), 4 x 4 = 16 classes by default.
    Two classes sharing a shape or a colour share a ground-truth feature, so the paper's claims (gates overlap
    for related classes, transfer to unseen combinations) are checkable. 32x32 RGB uint8 images with nuisance
    position, scale, hue jitter, shading and a noisy striped background; generated vectorised, deterministic
    per (seed, split), class-balanced. `classes` keeps a subset (labels are re-indexed 0..len-1; `attributes`
    follows), which is how transfer to held-out attribute combinations is measured."""

    SHAPES = ("circle", "square", "triangle", "cross")
    COLOURS = ((0.9, 0.15, 0.15), (0.15, 0.8, 0.2), (0.2, 0.3, 0.95), (0.95, 0.85, 0.1))
    COLOUR_NAMES = ("red", "green", "blue", "yellow")

    NUM_CLASSES = len(SHAPES) * len(COLOURS)
    ATTRIBUTES = torch.cartesian_prod(torch.arange(len(SHAPES)), torch.arange(len(COLOURS)))  # (16, 2), id 4 s + c
    TRAIN_PER_CLASS = 500  # the default size of the training split

    @staticmethod
    def test_per_class(train_per_class):
        """The test split's size per class: a quarter of the training split's, at least 10, whatever loads it."""
        return max(10, train_per_class // 4)

    def __init__(self, split="train", per_class=None, seed=0, classes=None, transform=None, size=32):
        """per_class: images per class of this split (default: 500 train, test_per_class(500) = 125 test)."""
        train_per_class = self.TRAIN_PER_CLASS
        per_class = per_class or (train_per_class if split == "train" else self.test_per_class(train_per_class))
        classes = list(range(self.NUM_CLASSES)) if classes is None else list(classes)
        self.attributes = self.ATTRIBUTES[classes]  # (K, 2): shape id, colour id
        self.classes = [f"{self.COLOUR_NAMES[c]}_{self.SHAPES[s]}" for s, c in self.attributes.tolist()]
        self.targets = torch.arange(len(classes)).repeat_interleave(per_class)  # balanced, re-indexed labels
        self.render_seed, self.size = seed * 7919 + {"train": 1, "test": 2}.get(split, 3), size
        self.images = self._rendered()[0]
        self.transform = transform

    def shape_masks(self):
        """(N, size, size) bool: where each image shows its shape (the rest is background), rendered again."""
        return self._rendered()[1]

    def _rendered(self):  # a fresh generator of the same seed each time: the same images
        return self._render(self.attributes[self.targets], self.size, torch.Generator().manual_seed(self.render_seed))

    @classmethod
    def _render(cls, attrs, size, gen):  # attrs (N, 2) -> (N, 3, size, size) uint8 images, (N, size, size) bool masks
        N = len(attrs)
        r = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
        coords = torch.linspace(-1, 1, size)
        yy, xx = coords[None, :, None], coords[None, None, :]
        cx, cy, scale = (r(N, 1, 1) - 0.5) * 0.7, (r(N, 1, 1) - 0.5) * 0.7, 0.35 + 0.3 * r(N, 1, 1)
        u, v = (xx - cx) / scale, (yy - cy) / scale  # (N, size, size)
        masks = torch.stack([u ** 2 + v ** 2 <= 1,                                               # circle
                             (u.abs() <= 0.8) & (v.abs() <= 0.8),                                # square
                             (v <= 0.8) & (u.abs() <= (0.8 - v) / 2) & (v >= -1),                # triangle
                             ((u.abs() <= 0.3) & (v.abs() <= 1)) | ((v.abs() <= 0.3) & (u.abs() <= 1))])  # cross
        mask = masks[attrs[:, 0], torch.arange(N)].float()[:, None]  # (N, 1, size, size)
        colour = torch.tensor(cls.COLOURS)[attrs[:, 1]] + (r(N, 3) - 0.5) * 0.2  # hue jitter
        shade = 0.75 + 0.25 * r(N, 1, 1, 1)
        freq, phase = 2 + 6 * r(N, 1, 1, 1), 6.3 * r(N, 1, 1, 1)
        background = (0.25 + 0.25 * r(N, 3, 1, 1) + 0.08 * torch.sin(freq * (xx + yy)[None] * 3 + phase)
                      + 0.06 * torch.randn(N, 3, size, size, generator=gen))
        img = background * (1 - mask) + colour[:, :, None, None] * shade * mask
        img = img + 0.03 * torch.randn(N, 3, size, size, generator=gen)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8), mask[:, 0] > 0

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = torchvision.tv_tensors.Image(self.images[i])
        return (self.transform(img) if self.transform else img), int(self.targets[i])


class FashionMNIST(torchvision.datasets.FashionMNIST):
    """torchvision's Fashion-MNIST (Xiao et al. 2017: 28 px grayscale photographs of clothes, 10 classes, 60000 train
    and 10000 test images), read from a folder holding its four idx files itself, gzipped or not (the layout of the
    distribution package dataset-fashion-mnist), or from torchvision's root/FashionMNIST/raw/ (where download=True
    puts them). Images come as 3-channel uint8 tensors (the grey channel copied), like every other data set's."""

    # The natural groups, the ground truth of the gate analysis (Fig. 12) and of pairs='nearest': tops {t-shirt/top,
    # pullover, coat, shirt}, footwear {sandal, sneaker, ankle boot}; trouser, dress and bag each alone.
    GROUPS = (0, 1, 0, 2, 0, 3, 0, 3, 4, 3)
    FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    HINT = ("it needs the four idx files of Fashion-MNIST (train-images-idx3-ubyte[.gz], ...) in that folder or in "
            "its FashionMNIST/raw/: `apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/"
            "fashion-mnist (pass that as --data), or pass --download")

    @property
    def raw_folder(self):  # the root itself where it holds the files, else torchvision's root/FashionMNIST/raw
        return self.root if all(_idx_file(os.path.join(self.root, f)) for f in self.FILES) else super().raw_folder

    def _check_exists(self):
        return all(_idx_file(os.path.join(self.raw_folder, f)) for f in self.FILES)

    def _load_data(self):
        split = os.path.join(self.raw_folder, "train" if self.train else "t10k")
        images, labels = read_idx(f"{split}-images-idx3-ubyte", 3), read_idx(f"{split}-labels-idx1-ubyte", 1).long()
        if len(images) != len(labels) or labels.max() >= len(self.classes):
            raise ValueError(f"the Fashion-MNIST files {split}-*-ubyte do not match: {len(images)} images, "
                             f"{len(labels)} labels up to {labels.max()}")
        return images, labels

    def __getitem__(self, i):
        img = torchvision.tv_tensors.Image(self.data[i].expand(3, -1, -1))
        return (self.transform(img) if self.transform else img), int(self.targets[i])


def _idx_file(path):
    """path, or path + '.gz', whichever exists (None if neither)."""
    return next((p for p in (path, path + ".gz") if os.path.isfile(p)), None)


def read_idx(path, ndim):
    """The idx file (LeCun's MNIST format: bytes 0, 0, 0x08 = uint8, ndim; each dimension as a big-endian 4-byte
    integer; the data) at path or path + '.gz' -> uint8 tensor of ndim dimensions. ValueError naming the file if it
    is not one. (torchvision's reader opens only uncompressed files, and asserts on a truncated one.)"""
    path = _idx_file(path) or path
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # missing, unreadable, a broken gzip stream
        raise ValueError(f"{path} cannot be read ({one_line(e)})") from None
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if raw[:4] != bytes([0, 0, 8, ndim]) or len(raw) != 4 + 4 * ndim + math.prod(dims):
        raise ValueError(f"{path} is not an idx file of {ndim}-d uint8 data (wrong header or size)")
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).view(*dims)


# ----------------------------------------------------------------------------------------------- augmentation
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GREY = (0.2989, 0.587, 0.114)  # luma weights, as torchvision's rgb_to_grayscale


def _hash32(x):
    """Integer mixer (Wellons' lowbias32) on int64 tensors holding values in [0, 2^32). Every product stays below
    2^63, so it is exact and gives the same bits on every device."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def sample_keys(seed, epoch, index):
    """Augmentation key of each sample, a pure function of (seed, epoch, index): a sample's views do not depend
    on the worker, the rank or the batch it lands in, which makes resuming mid-epoch exact."""
    index = torch.as_tensor(index, dtype=torch.int64)
    seed_epoch = _hash32((_hash32(torch.tensor(seed & 0xFFFFFFFF)) + epoch + 0x9E3779B9) & 0xFFFFFFFF)
    return _hash32((seed_epoch + index) & 0xFFFFFFFF)


def uniforms(keys, n, offset=0):
    """(B,) keys -> (B, n) float32 in [0, 1): stream offset + j of each key, on the keys' device."""
    j = torch.arange(offset, offset + n, device=keys.device)
    return (_hash32((keys[:, None] + j * 0x9E3779B9) & 0xFFFFFFFF) >> 8).float() / 2 ** 24


def augment_params(keys, view, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """Per-sample parameters of one view, drawn from the keys: the paper's augmentations (appendix D.2: random
    resized crop and flip, colour jitter 0.4/0.4/0.4/0.1 at p = 0.8, grayscale at p = 0.2, blur at p = 0.5).
    The crop is (w, h) as fractions of the image side and its centre (cx, cy) in [0, 1]. A crop too wide (tall)
    for the image keeps its area and takes the full width (height), where torchvision redraws up to 10 times."""
    u = uniforms(keys, 13, offset=16 * view)  # (B, 13), disjoint streams per view
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    r = torch.exp(math.log(ratio[0]) + math.log(ratio[1] / ratio[0]) * u[:, 1])
    w, h = (area * r).sqrt(), (area / r).sqrt()
    w, h = torch.where(w > 1, 1.0, torch.where(h > 1, area, w)), torch.where(h > 1, 1.0, torch.where(w > 1, area, h))
    jitter = u[:, 5] < 0.8
    factor = lambda v, lo, hi, off: torch.where(jitter, lo + (hi - lo) * v, off)  # noqa: E731
    return dict(w=w, h=h, cx=w / 2 + (1 - w) * u[:, 2], cy=h / 2 + (1 - h) * u[:, 3], flip=u[:, 4] < 0.5,
                brightness=factor(u[:, 6], 0.6, 1.4, 1.0), contrast=factor(u[:, 7], 0.6, 1.4, 1.0),
                saturation=factor(u[:, 8], 0.6, 1.4, 1.0), hue=factor(u[:, 9], -0.1, 0.1, 0.0),
                grey=u[:, 10] < 0.2, sigma=torch.where(u[:, 11] < 0.5, 0.1 + 1.9 * u[:, 12], 0.0))


def crop_theta(p):
    """The crop + flip of augment_params' p as one affine map of the sampling grid -> theta (B, 2, 3), the view's
    grid in the image's coordinates [-1, 1] (F.affine_grid)."""
    theta = torch.zeros(len(p["w"]), 2, 3, device=p["w"].device)
    theta[:, 0, 0], theta[:, 0, 2] = p["w"] * (1 - 2 * p["flip"].float()), 2 * p["cx"] - 1
    theta[:, 1, 1], theta[:, 1, 2] = p["h"], 2 * p["cy"] - 1
    return theta


def augment(images, p, size, blur=False):
    """Batched augmentation on the images' device: uint8 (B, 3, H, W) + parameters p of augment_params ->
    normalised float32 (B, 3, size, size). Tensor ops on the whole batch, each sample with its own parameters,
    in torchvision's order: crop + flip, brightness, contrast, saturation, hue, grayscale, blur, normalise."""
    x, B = images.float() / 255, len(images)
    grid = F.affine_grid(crop_theta(p), [B, 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    col = lambda v: v.view(B, 1, 1, 1)  # noqa: E731
    grey = lambda t: torch.einsum("bchw,c->bhw", t, t.new_tensor(GREY))[:, None]  # noqa: E731  (B, 1, H, W)
    x = (x * col(p["brightness"])).clamp(0, 1)  # the blends of torchvision's adjust_* functions
    x = torch.lerp(grey(x).mean((2, 3), keepdim=True), x, col(p["contrast"])).clamp(0, 1)
    x = torch.lerp(grey(x), x, col(p["saturation"])).clamp(0, 1)
    x = torch.einsum("bij,bjhw->bihw", hue_rotation(p["hue"]), x).clamp(0, 1)
    x = torch.where(col(p["grey"]), grey(x).expand_as(x), x)
    if blur:
        x = gaussian_blur(x, p["sigma"], 2 * (size // 20) + 1)
    mean, std = x.new_tensor(MEAN).view(1, 3, 1, 1), x.new_tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def hue_rotation(hue):
    """(B,) hue shifts in turns -> (B, 3, 3) rotations of RGB about the grey axis by 2 pi hue (Rodrigues). This
    shifts hue like torchvision's HSV shift (a third of a turn maps red to green exactly) and keeps grey pixels;
    it differs from it for mixed colours."""
    k = torch.full((3,), 3 ** -0.5, device=hue.device)
    cross = torch.tensor([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], device=hue.device) * 3 ** -0.5  # k x v = cross @ v
    t = (2 * math.pi * hue).view(-1, 1, 1)
    return t.cos() * torch.eye(3, device=hue.device) + t.sin() * cross + (1 - t.cos()) * torch.outer(k, k)


def gaussian_blur(x, sigma, ksize):
    """Per-sample separable Gaussian blur of (B, C, H, W) with reflect padding; sigma 0 leaves a sample as is."""
    B, C, H, W = x.shape
    t = torch.arange(ksize, device=x.device) - ksize // 2
    k = torch.exp(-t.square() / (2 * sigma.clamp_min(1e-6)[:, None] ** 2))  # (B, ksize)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, ksize)
    x = F.pad(x.reshape(1, B * C, H, W), [ksize // 2] * 4, mode="reflect")
    x = F.conv2d(x, k[:, None, :, None], groups=B * C)
    return F.conv2d(x, k[:, None, None, :], groups=B * C).view(B, C, H, W)


def two_views(images, keys, size):
    """The two augmented views (x1, x2) of a batch. images: uint8 (B, 3, H, W), or (B, 2, 3, size, size) when
    the loader already cropped each view (variable-size data sets); keys (B,) from sample_keys."""
    pairs = images.unbind(1) if images.ndim == 5 else (images, images)
    scale = (0.2, 1.0) if images.ndim == 4 else (1.0, 1.0)  # scale 1: the identity crop, flip only
    return tuple(augment(im, augment_params(keys, v, scale), size, blur=size >= 64) for v, im in enumerate(pairs))


def train_views(size, crop):
    """Per-image part of the training pipeline: decode to a uint8 tensor, and for variable-size data sets the
    random resized crop (antialiased, from the full image), one per view."""
    return v2.Compose([v2.ToImage(), *([v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True)] if crop else []),
                       v2.ToDtype(torch.uint8)])


def eval_transform(size):
    """Resize to size/0.875 (size itself at <= 32 px) and center crop, as in the usual ImageNet protocol."""
    resize = size if size <= 32 else int(round(size / 0.875))
    return v2.Compose([v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


class TwoViews(torch.utils.data.Dataset):
    """Wraps a data set to return (images uint8, label, index) for two_views(): the decoded image (3, H, W), or for
    variable-size data (crop=True) two random resized crops (2, 3, size, size), seeded by the sample's key. Indexed
    by (index, epoch) from EpochSampler. The keys of a batch are computed in one call in the training loop, not
    here: per sample, sample_keys() cost more than the decoding."""

    def __init__(self, dataset, size, seed=0, crop=False):
        self.dataset, self.transform, self.seed, self.crop = dataset, train_views(size, crop), seed, crop

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        img, label = self.dataset[i]
        if not self.crop:
            return self.transform(img).as_subclass(torch.Tensor), label, i
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(sample_keys(self.seed, epoch, i)))
            return torch.stack([self.transform(img), self.transform(img)]).as_subclass(torch.Tensor), label, i


# ----------------------------------------------------------------------------------------------- data sets
class Transformed(torch.utils.data.Dataset):
    """A data set seen through a transform (e.g. the train split with the eval transform for a kNN bank)."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, label = self.dataset[i]
        return self.transform(img), label


class Relabelled(torch.utils.data.Dataset):
    """A data set whose labels are replaced: sample i keeps its image and gets labels[i] (e.g. the pseudo labels
    of appendix C, one per sample in index order)."""

    def __init__(self, dataset, labels):
        self.dataset, self.labels = dataset, labels

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], int(self.labels[i])


class ClassSubset(torch.utils.data.Dataset):
    """The samples of some classes of a data set, in index order, relabelled 0..len(classes)-1 in the order the
    classes are given (--classes: the other classes stay unseen, to measure transfer to them). It keeps what
    targets_of() and fingerprint() read: the labels, the class names, the pixels of an in-memory data set."""

    def __init__(self, dataset, classes):
        targets, K = targets_of(dataset), num_classes_of(dataset)
        check_class_ids(classes, K)
        new = torch.full((K,), -1, dtype=torch.long).index_copy_(0, torch.tensor(classes), torch.arange(len(classes)))
        self.dataset, self.indices = dataset, (new[targets] >= 0).nonzero().squeeze(1)
        self.targets = new[targets[self.indices]]
        names = getattr(dataset, "classes", None)
        self.classes = [names[c] for c in classes] if names else [str(c) for c in classes]
        if getattr(dataset, "data", None) is not None:  # in memory: CIFAR, STL-10, Fashion-MNIST
            self.data = dataset.data[self.indices.numpy()]
        if hasattr(dataset, "samples"):  # ImageFolder: its file list, relative to its root
            self.samples, self.root = [dataset.samples[i] for i in self.indices.tolist()], dataset.root

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[int(self.indices[i])][0], int(self.targets[i])


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of a seeded permutation per epoch (as DistributedSampler with drop_last), yielding
    (index, epoch) and able to start mid-epoch (`start` batches are skipped, for exact resume)."""

    def __init__(self, n, batch_size, seed=0):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, 0, 0
        self.steps = n // (batch_size * world_size())  # full global batches per epoch

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        per_rank = perm[: self.steps * self.batch_size * world_size()].view(self.steps, world_size(), -1)
        for i in per_rank[self.start:, rank()].flatten().tolist():
            yield i, self.epoch

    def __len__(self):
        return (self.steps - self.start) * self.batch_size



TRANSFER_ONLY = ("flowers102", "pets", "cars", "food101")  # the transfer tables' sets, built by paper/transfer.py
DATASETS = ("synthetic", "fashionmnist", "cifar10", "cifar100", "stl10", "imagefolder") + TRANSFER_ONLY
FIXED_SIZE = ("synthetic", "fashionmnist", "cifar10", "cifar100", "stl10")  # same-size images: cropped on device
# Packages that torchvision needs for a data set and requirements.txt leaves out: it reads the .mat label files of
# Flowers-102 and Stanford Cars with scipy. Checked before anything else runs (missing_package).
NEEDS = {"flowers102": "scipy", "cars": "scipy"}
GET_IT = {"cars": "torchvision cannot download Stanford Cars any more: put devkit/, cars_train/, cars_test/ and "
                  "cars_test_annos_withlabels.mat under DATA/stanford_cars/"}  # the others: --download


def build_dataset(name, root, split, transform=None, download=False, synthetic_per_class=None, classes=None):
    """torchvision data set for split 'train' or 'test' (README: each set's splits and sizes). imagefolder reads
    root/train/<class>/* and root/val/<class>/* (the ImageNet layout). Missing files raise FileNotFoundError naming
    the path and how to get them; a package the set needs that is not installed, ValueError. Images stored as files
    are read by read_image, which names a file it cannot decode.
    synthetic_per_class: train images per class of the synthetic set (default 500; the test split gets
    SyntheticShapes.test_per_class of it); classes: keep only these class ids, relabelled 0..len-1 in this order
    (None: all). The synthetic set renders only those classes; the others are a ClassSubset of the whole split."""
    train = split == "train"
    tv = torchvision.datasets
    if missing_package(name):
        raise ValueError(missing_package(name))
    if name == "synthetic":
        check_class_ids(classes, SyntheticShapes.NUM_CLASSES)
        per_class = synthetic_per_class or SyntheticShapes.TRAIN_PER_CLASS
        per_class = per_class if train else SyntheticShapes.test_per_class(per_class)
        return SyntheticShapes(split, per_class=per_class, classes=classes, transform=transform)
    if name == "imagefolder":
        ds = image_folder(root, train, transform)
        return ds if classes is None else ClassSubset(ds, classes)
    makers = {"fashionmnist": lambda: FashionMNIST(root, train=train, transform=transform, download=download),
              "cifar10": lambda: tv.CIFAR10(root, train=train, transform=transform, download=download),
              "cifar100": lambda: tv.CIFAR100(root, train=train, transform=transform, download=download),
              "stl10": lambda: tv.STL10(root, "train" if train else "test", transform=transform, download=download)}
    if name in TRANSFER_ONLY:
        from paper import transfer  # the transfer tables' code and data sets (Tables 1 and 4)
        makers[name] = lambda: transfer.transfer_set(name, root, train, transform, download)
    if name not in makers:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    try:
        ds = makers[name]()
    except (RuntimeError, OSError) as e:  # torchvision raises these for missing/corrupt files (OSError: downloads)
        hint = (FashionMNIST.HINT if name == "fashionmnist" and not download else
                f"({one_line(e, 200)})" + ("" if download else "; " + GET_IT.get(name, "pass --download to fetch it")))
        raise FileNotFoundError(f"{name} not found under --data {root!r}: {hint}") from None
    return ds if classes is None else ClassSubset(ds, classes)


def check_class_ids(classes, num_classes):
    if classes is not None and not all(0 <= c < num_classes for c in classes):
        raise ValueError(f"--classes {','.join(map(str, classes))}: this data set's class ids go from 0 to "
                         f"{num_classes - 1}")


def class_attributes(name, classes=None):
    """The ground truth of a data set with a known class structure, one row per class in training order (classes:
    the ids --classes kept) -> (K, A) long, or None for the other data sets: the synthetic shapes' (shape, colour),
    Fashion-MNIST's natural group. Classes sharing an attribute are related: the gate analysis (Fig. 12) compares
    their gates with the others', and class_distance() gives pairs='nearest' its built-in distance."""
    attributes = {"synthetic": SyntheticShapes.ATTRIBUTES, "fashionmnist": torch.tensor(FashionMNIST.GROUPS)[:, None]}
    if name not in attributes:
        return None
    return attributes[name] if classes is None else attributes[name][list(classes)]


def class_distance(attributes):
    """(K, K) class distance for pairs='nearest' from attributes (K, A): 0 from a class to itself, 1 to a class sharing
    an attribute with it, 2 to one sharing none. The synthetic shapes: the number of attributes two classes differ
    in; Fashion-MNIST: 1 within a natural group, 2 across groups."""
    share = (attributes[:, None, :] == attributes[None, :, :]).any(-1)  # (K, K)
    return (~torch.eye(len(attributes), dtype=torch.bool)).float() + (~share).float()


def missing_package(name):
    """'<name> needs <package>: pip install <package>' if data set `name` needs a package (NEEDS) that is not
    installed, else None."""
    if name in NEEDS:
        try:
            __import__(NEEDS[name])
        except ImportError:
            return f"{name} needs {NEEDS[name]}: pip install {NEEDS[name]}"
    return None


def image_folder(root, train, transform=None):
    """root/train or root/val as an ImageFolder. val's classes take train's indices by folder name: torchvision
    numbers each split's own folders, so with train/{a,b,c} and val/{a,c} it would label val's c as train's b and
    every accuracy on it would be silently wrong. A val class that train/ lacks is refused (ValueError, naming it);
    a val split with fewer classes is fine."""
    path = os.path.join(root or "", "train" if train else "val")
    for split in (path, os.path.join(root or "", "train")):
        if not os.path.isdir(split):
            raise FileNotFoundError(f"no ImageFolder split at {split}: --data must hold train/<class>/ and "
                                    "val/<class>/")
    ds = torchvision.datasets.ImageFolder(path, transform=transform, loader=read_image)
    if train:
        return ds
    classes, index = torchvision.datasets.folder.find_classes(os.path.join(root or "", "train"))
    unknown = [c for c in ds.classes if c not in index]
    if unknown:
        raise ValueError(f"the val split under --data {root} has class folder(s) {', '.join(unknown[:5])} that "
                         "train/ lacks; every val/<class>/ needs a train/<class>/ of the same name")
    ds.samples = ds.imgs = [(file, index[ds.classes[label]]) for file, label in ds.samples]
    ds.targets = [label for _, label in ds.samples]
    ds.classes, ds.class_to_idx = classes, index
    return ds


def read_image(path):
    """The RGB image in the file at `path`, as torchvision's default loader reads it (PIL). A file that cannot be
    decoded (truncated, not an image, gone) raises UnreadableImage naming it: never skipped, never a traceback."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        why = "not an image PIL can identify" if isinstance(e, Image.UnidentifiedImageError) else one_line(e, 120)
        raise UnreadableImage(f"cannot read image {path} ({why}); replace or remove the file") from None


def num_classes_of(ds):
    return len(ds.classes) if hasattr(ds, "classes") else int(targets_of(ds).max()) + 1


def targets_of(ds):
    """The true label of every sample, in index order, read without decoding an image -> (N,) long."""
    for name in ("targets", "_labels", "labels"):  # ImageFolder, CIFAR, synthetic / Flowers, Pets / STL-10
        if getattr(ds, name, None) is not None:
            return torch.as_tensor(getattr(ds, name)).long()
    if hasattr(ds, "_samples"):  # StanfordCars
        return torch.tensor([label for _, label in ds._samples])
    return torch.tensor([ds[i][1] for i in range(len(ds))])


def fingerprint(ds):
    """A cheap identity of a data set in its index order: sha256 of its class names, its label sequence, its file
    list (ImageFolder, relative to the root) and its pixels where it holds them in memory (CIFAR, STL-10,
    synthetic). Another data set, subset, version or order of samples changes it (up to swaps of two files of
    one class)."""
    h = hashlib.sha256(repr(list(getattr(ds, "classes", []))).encode())
    h.update(targets_of(ds).numpy().tobytes())
    h.update("\n".join(os.path.relpath(path, ds.root) for path, _ in getattr(ds, "samples", [])).encode())
    pixels = getattr(ds, "data", getattr(ds, "images", None))
    if pixels is not None:
        h.update(torch.as_tensor(pixels).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_labels(path, dataset, ds):
    """A label file of eval.py --kmeans, checked against the data set `ds` (named `dataset`) it must label ->
    (labels (N,) long, the file's dict). ValueError, in one line, if it labels another data set, size or order."""
    try:
        f = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, corrupt, not a torch file
        raise ValueError(f"--labels {path} cannot be loaded ({type(e).__name__}); make one with eval.py --kmeans K")
    if not (isinstance(f, dict) and {"labels", "num_clusters", "dataset", "fingerprint"} <= f.keys()
            and isinstance(f["labels"], torch.Tensor) and f["labels"].dtype == torch.long and f["labels"].ndim == 1):
        raise ValueError(f"--labels {path} is not a label file of eval.py --kmeans")
    labels, K = f["labels"], f["num_clusters"]
    made = {k: (f.get("source") or {}).get(k) for k in ("data", "synthetic_per_class", "classes")}
    if f["dataset"] != dataset:
        raise ValueError(f"--labels {path} labels the {f['dataset']} data set, not {dataset}")
    if len(labels) != len(ds):
        raise ValueError(f"--labels {path} holds {len(labels)} labels but the {dataset} training set has {len(ds)} "
                         f"samples; use the data the file was made from ({made})")
    if f["fingerprint"] != fingerprint(ds):
        raise ValueError(f"--labels {path} was made for other samples or another order of the {dataset} training "
                         f"set (fingerprints differ); use the data it was made from ({made}) or rerun eval.py --kmeans")
    if labels.min() < 0 or labels.max() >= K:
        raise ValueError(f"--labels {path}: its labels are not all in [0, {K})")
    return labels, f


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def extract_features(backbone, loader, device, desc=None):
    """Backbone features (eval mode, no grad) and labels of a whole loader -> (N, F) float32 CPU, (N,) long."""
    from tqdm import tqdm
    was_training = backbone.training
    backbone.eval()
    feats, labels, batches = [], [], iter(loader)
    try:
        for x, y in tqdm(batches, desc=desc, disable=desc is None or rank() != 0, leave=False):
            with torch.autocast(device.type, autocast_dtype(device), enabled=device.type == "cuda"):
                feats.append(backbone(x.to(device, non_blocking=True)).float().cpu())
            labels.append(torch.as_tensor(y))
    finally:
        stop_workers(batches)
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def stop_workers(batches):
    """Shut the worker processes of a DataLoader's iterator (or of a loader's persistent one) down now; a no-op
    without workers. Python does it when the iterator is freed, but an error's traceback can keep the iterator alive
    until exit, where multiprocessing then waits for workers that ignore SIGTERM (train.py): the run never ends."""
    batches = getattr(batches, "_iterator", batches)  # a loader with persistent workers keeps its iterator
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own clean shutdown of the iterator's workers
    if shutdown is not None:
        shutdown()


KNN_K, KNN_T = 20, 0.07  # the weighted kNN's neighbours and vote temperature (Wu et al. 2018; DINO)


def knn_classify(train_feats, train_labels, test_feats, k=KNN_K, T=KNN_T, num_classes=None, chunk=1024):
    """Weighted kNN (Wu et al. 2018; DINO's eval_knn): cosine top-k neighbours vote for their class with
    weight exp(sim / T). Returns predictions (N_test,). Processed in chunks of test rows, so memory is
    O(chunk x N_train). Ties, by rule: among equal similarities the lower bank index is the nearer neighbour;
    among equal class scores the lower class index wins (argmax returns the first maximum)."""
    if k > len(train_feats):
        raise ValueError(f"k={k} is larger than the feature bank ({len(train_feats)} samples)")
    C = num_classes or int(train_labels.max()) + 1
    bank, labels = F.normalize(train_feats.double(), dim=1), train_labels.long()
    preds = []
    for q in F.normalize(test_feats.double(), dim=1).split(chunk):
        sim = q @ bank.T  # (b, N)
        kth = sim.topk(k, dim=1).values[:, -1:]  # the k-th largest similarity
        above, ties = sim > kth, sim == kth
        chosen = above | ties
        need = k - above.sum(1, keepdim=True)  # places left for the ties
        crowded = (ties.sum(1, keepdim=True) > need).squeeze(1)  # rare: more ties than places
        if crowded.any():  # keep the lowest-index ties only (a cumsum over whole rows, so only where needed)
            rows = crowded.nonzero().squeeze(1)
            chosen[rows] = above[rows] | (ties[rows] & (ties[rows].cumsum(1) <= need[rows]))
        nearest = chosen.nonzero()[:, 1].view(len(q), k)  # exactly k per row, in bank order
        weights = (sim.gather(1, nearest) / T).exp()
        scores = torch.zeros(len(q), C, dtype=sim.dtype, device=sim.device).scatter_add_(1, labels[nearest], weights)
        preds.append(scores.argmax(1))
    return torch.cat(preds)


# ----------------------------------------------------------------------------------------------- command line
def ranged(kind, low, high=None, low_open=False, high_open=False):
    """argparse type= for an int or float (kind) in a range. Every numeric flag of train.py and eval.py takes one
    of these, so an impossible value (--epochs -3, --temperature 0, nan) is refused while parsing, in one line:
    "argument --epochs: -3 is not an integer >= 1"."""
    what = ("an integer " if kind is int else "a number ") + (
        f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}" if high is not None
        else f"{'>' if low_open else '>='} {low}")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ((kind is int or math.isfinite(value)) and (value > low if low_open else value >= low)
                                 and (high is None or (value < high if high_open else value <= high))):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    return parse


positive_int, nonneg_int = ranged(int, 1), ranged(int, 0)
positive_float, nonneg_float = ranged(float, 0, low_open=True), ranged(float, 0)


def class_ids(text):
    """argparse type= of --classes: at least 2 distinct class ids >= 0, comma-separated -> list of int (checked
    against the data set's number of classes when it is loaded: build_dataset)."""
    try:
        ids = [int(i) for i in text.split(",")]
    except ValueError:
        ids = []
    if len(ids) < 2 or len(set(ids)) < len(ids) or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not at least 2 distinct class ids, comma-separated, e.g. 0,1,3")
    return ids


def load_tensors(path):
    """torch.load(path, weights_only=True) on the CPU; ValueError with one line saying why not. A file written with a
    checksum (train.py's checkpoints) must still match it. A pickle that carries code or objects other than tensors
    and plain containers is refused by weights_only and is not loaded: torch's own message suggests retrying with
    weights_only=False, which must never be done with an untrusted file, so it is not quoted."""
    try:
        with warnings.catch_warnings():  # e.g. torch's multi-line note on the pickle protocol
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load fails in many ways (bad zip, unpickling, EOF): all mean "not loadable"
        text = " ".join(str(e).split()) or type(e).__name__
        if "weights_only" in text:
            found = re.search(r"GLOBAL (\S+)", text)
            raise ValueError("contains pickled code/objects" + (f" ({found[1]})" if found else "") +
                             " that weights_only loading refuses; it was not loaded") from None
        raise ValueError(f"cannot be loaded: it is truncated, corrupt or not a torch file ({text.split('. ')[0]})"
                         ) from None
    if isinstance(obj, dict) and "checksum" in obj and obj["checksum"] != checksum(obj):
        raise ValueError("is corrupt: its contents do not match the checksum written with it")
    return obj


def checksum(obj):
    """sha256 of a checkpoint's contents (every tensor's dtype, shape and bytes, every other value's repr, in order),
    its own "checksum" key left out. Written into the file and compared when it is loaded (load_tensors): bytes that
    changed on disk are refused, never trained on."""
    h = hashlib.sha256()

    def visit(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {tuple(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(b"{")
            for k, v in x.items():
                if not (x is obj and k == "checksum"):
                    visit(k)
                    visit(v)
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                visit(v)
            h.update(b"]")
        else:
            h.update(f"{x!r};".encode())

    visit(obj)
    return h.hexdigest()


class UserError(Exception):
    """A mistake in the command or the files it names: cli() prints one line on stderr and exits with exit_code
    (2), without a traceback and before anything is overwritten."""
    exit_code, prefix = 2, "error: "


class UnreadableImage(UserError):
    """An image file that cannot be decoded (read_image). Raised in a DataLoader worker, it reaches the main process
    rebuilt by torch from the worker's whole traceback text, whose last line is this message: only that is kept."""

    def __init__(self, text):
        last = str(text).strip().splitlines()[-1]
        super().__init__(last.partition(f"{type(self).__name__}: ")[2] or last)


def one_line(e, limit=None):
    text = " ".join(str(e).split()) or type(e).__name__
    return text if limit is None or len(text) <= limit else text[:limit] + " ..."


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UserError(message)


class CannotWrite(UserError):
    """A file that cannot be written (no space left, no permission): the file it would replace is kept."""


class Interrupted(UserError):
    """Ctrl-C outside train.py's loop (or twice inside it): one line, exit code 130, the shell's for SIGINT."""
    exit_code = 130


class PeerFailed(UserError):
    """Another process of a multi-process run stopped (its line, or torchrun's report, says why), so a collective of
    this one failed: exit code 1, and no line of its own."""
    exit_code = 1

    @staticmethod
    def caused(e):
        """Whether exception `e` is a collective failing because a peer is gone: the error NCCL (and a process group's
        timeout) raise, or gloo's lost connection."""
        return world_size() > 1 and (isinstance(e, getattr(dist, "DistError", ())) or isinstance(e, RuntimeError) and
                                     any(w in str(e) for w in ("closed by peer", "reset by peer", "Broken pipe")))


def cli(main, prog, argv=None, cleanup=None):
    """Run main(argv) as the command `prog`: a UserError becomes one line '<prog>: error: ...' on stderr (none if
    its message is empty) and its exit code; Ctrl-C (KeyboardInterrupt) one line and exit code 130; a collective
    that fails because another process of the run stopped, exit code 1 and no line. cleanup() runs first."""
    try:
        main(argv)
        return
    except (UserError, KeyboardInterrupt, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not PeerFailed.caused(e):
            raise  # a bug: its traceback
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", ())):  # a progress bar cut short: cleared, not left on the line
            bar.leave = False
            bar.close()
        if isinstance(e, KeyboardInterrupt):
            e = Interrupted("interrupted (Ctrl-C)")
        elif isinstance(e, RuntimeError):
            e = PeerFailed("")
        if str(e):  # empty: another process of the run (rank 0) says it
            print(f"{prog}: {e.prefix}{one_line(e)}", file=sys.stderr)
        code = e.exit_code
    # Exit outside the except block: a SystemExit raised inside it would chain the error, whose traceback keeps
    # main's frames alive, and with them DataLoader worker processes (stop_workers and end_workers see to those).
    if cleanup:
        cleanup()
    end_workers()
    sys.exit(code)


def end_workers(grace=10.0):
    """Before exit: data loader workers that an error path left running (no stop_workers) get `grace` seconds to end
    on their own, then SIGKILL. train.py's workers ignore SIGTERM (so that a scheduler's signal reaches only the
    main process), and multiprocessing would otherwise wait for them at exit forever."""
    gc.collect()  # frees iterators that only an error's reference cycle still held: they shut their workers down
    children = multiprocessing.active_children()
    if not children:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the killed workers as a failure
    deadline = time.time() + grace
    for p in children:
        p.join(max(0.0, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join()


def save_atomic(obj, path, save=None, keep_previous=False):
    """save(obj, f) (default torch.save) into a temp file beside `path`, flushed to the disk (fsync), then os.replace:
    a crash, a power loss or a full disk mid-write leaves the file that was there. keep_previous: that file stays
    as PATH.prev (checkpoint.pt -> checkpoint.prev.pt), a hard link, so that `path` exists at every moment. A failed
    write raises CannotWrite, in one line."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            (save or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and os.path.exists(path):
            prev = previous(path)
            if os.path.exists(prev):
                os.remove(prev)
            try:
                os.link(path, prev)
            except OSError:  # a file system without hard links
                shutil.copyfile(path, prev)
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself reaches the disk
        finally:
            os.close(folder)
    except (OSError, RuntimeError) as e:
        while e is not None and not isinstance(e, OSError):  # torch.save reports a failed write as a RuntimeError
            e = e.__context__
        if e is None:
            raise
        what = (e.strerror or str(e)).lower()
        kept = "the previous one is kept" if os.path.exists(path) else "nothing was written"
        raise CannotWrite(f"cannot write {path}: {what}; {kept}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def previous(path):
    """checkpoint.pt -> checkpoint.prev.pt: where save_atomic(keep_previous=True) keeps the file it replaced."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def save_json(obj, f):
    f.write(json.dumps(obj).encode())
