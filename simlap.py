"""SimLAP: contrastive learning from arbitrary class pairs (Wu et al., arXiv 2410.18200), in one module.

    backbone  f_E : image -> h            (build_backbone; only this is kept after training)
    projector f_P : h -> z  (B, D)        (Projector, Table 5b)
    filter        : (y1, y2) -> g (B, D)  (FeatureFilter, eq. 3 / Table 5c)
    loss          : InfoNCE on g ⊙ z      (simlap_loss, eq. 2)

Any two classes may be a positive pair: the filter opens the subspace where the two share features, and
samples of neither class are the negatives. The paper's baselines are SimLAP(method=...) too: 'supcon'
(supcon_loss, Khosla et al.), 'simclr' (nt_xent_loss, Chen et al.), 'hydra' (NT-Xent + the SimLAP loss, as the
authors' erow/hydra) and 'supcon-arbitrary' (the SimLAP loss with all-ones gates). train.py and eval.py import
everything they share from here.
"""
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

METHODS = ("simlap", "supcon", "simclr", "hydra", "supcon-arbitrary")
PAIR_METHODS = ("simlap", "hydra", "supcon-arbitrary")  # the methods that draw partner classes (eq. 2)
FILTER_METHODS = ("simlap", "hydra")  # the methods that train the feature filter
PAIR_MODES = ("arbitrary", "arbitrary-uniform", "identical", "distinct", "nearest")
ARCHS = ("resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base")
DATASETS = ("synthetic", "cifar10", "cifar100", "stl10", "imagefolder", "flowers102", "pets", "cars")


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
        return torch.cat(torch.distributed.nn.functional.all_gather(x))
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x)
    return torch.cat(out)


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


# ----------------------------------------------------------------------------------------------- networks
def build_backbone(arch, small_images=False, image_size=None):
    """Randomly initialised encoder f_E -> (module, feature_dim). Nothing is downloaded.
    small_images (32-96 px): ResNets get the CIFAR stem (3x3 conv, stride 1, no max-pool); ViTs get patch 4."""
    if arch in ("resnet18", "resnet50"):
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=True)
        if small_images:
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim
    if arch in ("vit_tiny", "vit_small", "vit_base"):
        width, heads = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}[arch]
        size = image_size or (32 if small_images else 224)
        net = torchvision.models.VisionTransformer(image_size=size, patch_size=4 if small_images else 16,
                                                   num_layers=12, num_heads=heads, hidden_dim=width,
                                                   mlp_dim=4 * width)
        net.heads = nn.Identity()  # forward() then returns the class-token feature
        return net, width
    raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


class Projector(nn.Sequential):
    """f_P, Table 5b. The final LayerNorm is what keeps training stable (section 5.2)."""

    def __init__(self, in_dim, hidden_dim=2048, out_dim=256):
        super().__init__(nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, hidden_dim),
                         nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim),
                         nn.LayerNorm(out_dim))


class FeatureFilter(nn.Module):
    """Label pair -> gate vector in (0,1)^D: g(y1,y2) = sigmoid(f_g((f_l(y1) + f_l(y2)) / 2)) (eq. 3, Table 5c).
    With one label it is the class gate g(y) = sigmoid(f_g(f_l(y))) (eq. 4)."""

    def __init__(self, num_classes, out_dim=256, embed_dim=512, hidden_dim=1024):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, embed_dim)  # f_l
        self.mlp = nn.Sequential(nn.BatchNorm1d(embed_dim), nn.ReLU(inplace=True), nn.Linear(embed_dim, hidden_dim),
                                 nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def logits(self, y1, y2=None):  # (B,) [, (B,)] -> (B, D), before the sigmoid
        e = self.embed(y1) if y2 is None else (self.embed(y1) + self.embed(y2)) / 2  # symmetric in (y1, y2)
        return self.mlp(e)

    def forward(self, y1, y2=None):
        return torch.sigmoid(self.logits(y1, y2))


def gate_penalty(filter):
    """Eq. 5 with the sign fixed: the mean Bernoulli entropy of the K class gates g(y) (eq. 4).
    The paper prints L_G = 1/(KD) sum g log g; minimising that pulls every gate to 1/e instead of to {0, 1}.
    The entropy -[g log g + (1-g) log(1-g)] is minimal exactly at 0 and 1, which is the stated intent."""
    z = filter.logits(torch.arange(filter.num_classes, device=filter.embed.weight.device)).float()  # (K, D)
    g = torch.sigmoid(z)
    return -(g * F.logsigmoid(z) + (1 - g) * F.logsigmoid(-z)).mean()


def gate_entropy(g):
    """Mean Bernoulli entropy (nats) of gate values g: 0 for binary gates, log 2 for g = 0.5."""
    g = g.float().clamp(1e-7, 1 - 1e-7)
    return -(g * g.log() + (1 - g) * (1 - g).log()).mean()


# ----------------------------------------------------------------------------------------------- pairs
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


# ----------------------------------------------------------------------------------------------- loss
def subspace_products(q, k, gates, scale=1.0, eps=1e-8):
    """The two matrix products behind the subspace cosine of eq. 2, never a (B, N, D) tensor.
    q (B, D), k (N, D), gates (B, D) -> dot, kn2 (B, N), with q, k unit-normalised and g = gates:
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
    """s[i, j] = cos(g_i ⊙ q_i, g_i ⊙ k_j), re-normalised inside anchor i's subspace (eq. 2): (B, N)."""
    dot, kn2 = subspace_products(q, k, gates, eps=eps)
    return dot * (kn2 + eps * eps).rsqrt()


class _PairInfoNCE(torch.autograd.Function):
    """Σ over positive pairs (i, p) of -log(e^{L_ip} / (e^{L_ip} + Σ_n e^{L_in})), L = dot / sqrt(kn2 + eps²), with
    pos, neg (B, N) given as 0/1 floats. Forward and gradient are written out by hand, in few elementwise (B, N)
    passes, most of them in place; autograd through bool masks, where and logaddexp took 1.4-1.9x as long on one
    CPU thread (README, bench_loss). On a CPU, arithmetic on float masks is several times faster than
    where/masked_fill on bool ones."""

    @staticmethod
    def forward(ctx, dot, kn2, pos, neg, bound, eps):
        rk = (kn2 + eps * eps).rsqrt_()  # 1 / ‖g_i⊙k_j‖
        L = dot * rk  # logits s_ij / τ, |L| <= bound = 1/τ
        # m_i ~ the largest negative logit (lifted by 3/τ, negatives top the row). Any shift gives the same value;
        # this one keeps exp from overflowing or underflowing. The clamp only touches non-negatives (masked out).
        m = torch.add(L, neg, alpha=3 * bound).amax(1, keepdim=True).sub_(3 * bound)  # (B, 1)
        E = (L - m).clamp_max_(20).exp_().mul_(neg)  # e^{L_in - m_i} on negatives, 0 elsewhere
        S = E.sum(1, keepdim=True)  # (B, 1)
        x = (m + S.log() - L).clamp_min_(-80)  # log Σ_n e^{L_in} - L_ij (-inf without negatives: the term is 0)
        ctx.save_for_backward(rk, L, E, S, x, pos)
        # Σ over positives of softplus(x) = max(x, 0) - log σ(|x|): no inf anywhere, so the 0s of pos stay 0
        pos = pos.flatten()
        return torch.dot(x.relu().flatten(), pos) - torch.dot(x.abs().sigmoid_().log_().flatten(), pos)

    @staticmethod
    def backward(ctx, grad):
        rk, L, E, S, x, pos = ctx.saved_tensors
        W = x.sigmoid().mul_(pos).mul_(grad)  # -∂/∂L_ip on positives; each also pulls Σ_n e^{L_in} down:
        coef = W.sum(1, keepdim=True).div_(S.clamp_min(torch.finfo(S.dtype).tiny))  # ∂/∂L_in = E_in · coef_i
        d_dot = (E * coef).sub_(W).mul_(rk)
        return d_dot, (d_dot * L).mul_(rk).mul_(-0.5), None, None, None, None


def simlap_loss(q, k, y, y2, gates, temperature=0.1, key_labels=None, num_pairs=None, eps=1e-8):
    """Universal contrastive loss, eq. 2, computed in fp32 (fp64 stays fp64) even under autocast.

    q (B, D) anchors (view 1), k (N, D) keys (view 2), y (B,) anchor labels, y2 (B,) partner classes,
    gates (B, D) = g(y, y2). key_labels (N,): labels of the keys (default y, i.e. N = B); under DDP the keys
    and their labels are gathered from all ranks while the anchors stay local.
    For anchor i: positives are keys with label y2[i], negatives keys whose label is neither y[i] nor y2[i]
    (keys of class y[i] that are not positives are ignored). Each (anchor, positive) pair contributes
      -log( e^{s_ip/τ} / (e^{s_ip/τ} + Σ_n e^{s_in/τ}) ),   s = subspace_cosine
    and the loss is the mean over all pairs, or their sum / num_pairs if given (DDP: see SimLAP.pair_loss).
    Anchors without a positive (y2 = -1, or y2 absent from the keys) add nothing: never NaN."""
    key_labels = y if key_labels is None else key_labels
    with torch.autocast(q.device.type, enabled=False):
        dt = torch.promote_types(q.dtype, torch.float32)
        dot, kn2 = subspace_products(q.to(dt), k.to(dt), gates.to(dt), 1 / temperature, eps)  # (B, N) each
        pos = torch.eq(y2[:, None], key_labels[None, :], out=torch.empty_like(dot))  # (B, N) 0/1
        neg = torch.eq(y[:, None], key_labels[None, :], out=torch.empty_like(dot))
        neg = torch.maximum(neg, pos, out=neg).neg_().add_(1)  # neither class y_i nor y2_i
        total = _PairInfoNCE.apply(dot, kn2, pos, neg, 1 / temperature, eps)
        return total / (pos.sum().clamp_min(1) if num_pairs is None else num_pairs)


def supcon_loss(z, y, temperature=0.1):
    """Supervised contrastive loss L_out (Khosla et al. 2020, eq. 2), in fp32 (fp64 stays fp64) even under autocast.

    z (M, D): every view of this rank's images (two views: M = 2B, z = cat([z1, z2]), y = cat([y, y])), y (M,)
    their labels. Each view i is an anchor against all views of the global batch (gathered with gradient):
      ℓ_i = -1/|P(i)| Σ_{p∈P(i)} log( e^{s_ip/τ} / Σ_{a∈A(i)} e^{s_ia/τ} ),   s = cosine,
    A(i) every view but i itself, P(i) those of A(i) with label y_i. The loss is the mean of ℓ_i over anchors with
    a positive; anchors without one add nothing (never NaN). Under DDP (every rank holds M views) the divisor is
    ddp_divisor's. Unlike
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


# ----------------------------------------------------------------------------------------------- model
class SimLAP(nn.Module):
    """backbone + projector + feature filter; forward(x1, x2, y) -> (loss, stats). The loss, by method:
      simlap            simlap_loss (eq. 2) on drawn partner pairs (pairs=), gates g(y1, y2) from the filter
      supcon-arbitrary  the same pairs with all-ones gates (the paper's "SupCon with arbitrary pairs")
      hydra             (nt_xent_loss + beta · the simlap loss) / (1 + beta), as erow/hydra's moco/builder.py
      supcon, simclr    supcon_loss, nt_xent_loss: no partners, no filter
    Works unchanged under DDP: anchors stay local, keys and labels are gathered from all ranks with gradient."""

    def __init__(self, arch="resnet18", num_classes=16, small_images=False, image_size=None, proj_hidden=2048,
                 proj_dim=256, method="simlap", pairs="arbitrary", beta=1.0, temperature=0.1, gate_penalty=0.0,
                 class_dist=None, nearest_n=1):
        super().__init__()
        for name, value, allowed in (("method", method, METHODS), ("pair mode", pairs, PAIR_MODES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        if method in PAIR_METHODS and pairs == "nearest" and class_dist is None:
            raise ValueError("pairs='nearest' needs a (K, K) class_dist")
        self.backbone, self.feature_dim = build_backbone(arch, small_images, image_size)
        self.projector = Projector(self.feature_dim, proj_hidden, proj_dim)
        self.filter = FeatureFilter(num_classes, proj_dim)  # kept by every method, so checkpoints match
        self.num_classes, self.method, self.pairs, self.beta = num_classes, method, pairs, beta
        self.use_filter = method in FILTER_METHODS
        self.temperature, self.gate_penalty, self.nearest_n = temperature, gate_penalty, nearest_n
        self.register_buffer("class_dist", class_dist.float() if class_dist is not None else None, persistent=False)
        self.generator = None  # torch.Generator for partner sampling (train.py sets and checkpoints it)
        if not self.use_filter:
            self.filter.requires_grad_(False)  # unused: keeps DDP and the optimizer away from it

    def forward(self, x1, x2, y, y2=None, stats=False):
        """x1, x2 (B, 3, H, W) two views, y (B,) labels; y2 (B,) overrides the sampled partners.
        stats=True also returns plain floats (one host sync); training asks for them every few steps only."""
        z1, z2 = self.projector(self.backbone(torch.cat([x1, x2]))).float().chunk(2)  # (B, D) each
        key_y, gates = gather(y), torch.ones_like(z1)  # labels of the global batch; all-ones gates: the full space
        if self.method == "supcon":
            loss = supcon_loss(torch.cat([z1, z2]), torch.cat([y, y]), self.temperature)
        elif self.method == "simclr":
            loss = nt_xent_loss(z1, z2, self.temperature)
        else:
            if y2 is None:
                y2 = sample_partners(y, self.pairs, key_y, self.num_classes, self.class_dist, self.nearest_n,
                                     self.generator)
            if self.use_filter:
                gates = self.filter(y, y2.clamp_min(0))  # (B, D)
            loss = self.pair_loss(z1, z2, y, y2, key_y, gates)
        if self.method == "hydra":
            # Instance loss: SimCLR's NT-Xent, since the paper's Hydra is "SimCLR + feature filter". The authors'
            # builder uses MoCo v3's cross-view InfoNCE against a momentum encoder, which this code does not have.
            loss = (nt_xent_loss(z1, z2, self.temperature) + self.beta * loss) / (1 + self.beta)
        if self.gate_penalty > 0 and self.use_filter:
            loss = loss + self.gate_penalty * gate_penalty(self.filter)
        if not stats:
            return loss, {}
        with torch.no_grad():  # the positives of view-1 anchors among the view-2 keys, as this method has them
            if self.method == "simclr":
                y = instance_ids(len(y), y.device)
                key_y = gather(y)
            pos = (y if self.method in ("supcon", "simclr") else y2)[:, None] == key_y[None, :]
            sim = subspace_cosine(z1, gather(z2), gates)
            values = torch.stack([loss.detach().float(), (gates > 0.5).float().sum(1).mean(), gate_entropy(gates),
                                  (sim * pos).sum() / pos.sum().clamp_min(1)]).tolist()
        return loss, dict(zip(("loss", "gate_open", "gate_entropy", "pos_sim"), values))

    def pair_loss(self, z1, z2, y, y2, key_y, gates):
        """simlap_loss, symmetric in the two views; every rank divides by its share of the global pair count."""
        k1, k2 = gather(z1, with_grad=True), gather(z2, with_grad=True)  # (W*B, D): keys from every rank
        num_pairs = ddp_divisor((y2[:, None] == key_y[None, :]).sum())
        return (simlap_loss(z1, k2, y, y2, gates, self.temperature, key_y, num_pairs)
                + simlap_loss(z2, k1, y, y2, gates, self.temperature, key_y, num_pairs)) / 2


# ----------------------------------------------------------------------------------------------- optimizer
class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017) as in SimCLR/MoCo v3. Parameters with ndim <= 1 (biases, BN/LN weights) get
    neither weight decay nor the trust ratio: plain momentum SGD."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = p.norm(), g.norm()
                    trust = torch.where((p_norm > 0) & (g_norm > 0), group["eta"] * p_norm / g_norm,
                                        torch.ones_like(p_norm))
                    g = g.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])


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

    def __init__(self, split="train", per_class=None, seed=0, classes=None, transform=None, size=32):
        per_class = per_class or (500 if split == "train" else 100)
        all_attrs = torch.tensor([(s, c) for s in range(len(self.SHAPES)) for c in range(len(self.COLOURS))])
        classes = list(range(len(all_attrs))) if classes is None else list(classes)
        self.attributes = all_attrs[classes]  # (K, 2): shape id, colour id
        self.classes = [f"{self.COLOUR_NAMES[c]}_{self.SHAPES[s]}" for s, c in self.attributes.tolist()]
        self.targets = torch.arange(len(classes)).repeat_interleave(per_class)  # balanced, re-indexed labels
        gen = torch.Generator().manual_seed(seed * 7919 + {"train": 1, "test": 2}.get(split, 3))
        self.images = self._render(self.attributes[self.targets], size, gen)
        self.transform = transform

    @classmethod
    def _render(cls, attrs, size, gen):  # attrs (N, 2) -> (N, 3, size, size) uint8
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
        return (img.clamp(0, 1) * 255).round().to(torch.uint8)

    def attribute_distance(self):
        """(K, K) number of attributes two classes differ in: the built-in class distance for pairs='nearest'."""
        return (self.attributes[:, None, :] != self.attributes[None, :, :]).sum(-1).float()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = torchvision.tv_tensors.Image(self.images[i])
        return (self.transform(img) if self.transform else img), int(self.targets[i])


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def train_transform(size):
    """One random view: the paper's "three augmentations" (appendix D.2) after a random resized crop and flip.
    Blur only at >= 64 px, where a 3x3+ kernel does not erase the image."""
    blur = [v2.RandomApply([v2.GaussianBlur(2 * (size // 20) + 1, sigma=(0.1, 2.0))], p=0.5)] if size >= 64 else []
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
                       v2.RandomHorizontalFlip(), v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                       v2.RandomGrayscale(p=0.2), *blur, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def eval_transform(size):
    """Resize to size/0.875 (size itself at <= 32 px) and center crop, as in the usual ImageNet protocol."""
    resize = size if size <= 32 else int(round(size / 0.875))
    return v2.Compose([v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


class TwoViews(torch.utils.data.Dataset):
    """Wraps a data set to return (view1, view2, label). Indexed by (index, epoch) from EpochSampler, it seeds
    the augmentation from (seed, epoch, index): views are then a pure function of the sample, independent of
    worker count and process, which makes resuming mid-epoch exact."""

    def __init__(self, dataset, transform, seed=0):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        img, label = self.dataset[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + i)
            return self.transform(img), self.transform(img), label


class Transformed(torch.utils.data.Dataset):
    """A data set seen through a transform (e.g. the train split with the eval transform for a kNN bank)."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, label = self.dataset[i]
        return self.transform(img), label


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


def build_dataset(name, root, split, transform=None, download=False, synthetic_per_class=None,
                  synthetic_classes=None):
    """torchvision data set for split 'train' or 'test'. imagefolder reads root/train/<class>/* and
    root/val/<class>/* (the ImageNet layout). Missing files raise FileNotFoundError naming the path.
    synthetic_per_class: train images per class of the synthetic set (test gets a quarter, at least 10);
    synthetic_classes: keep only these class ids of it (None: all 16)."""
    train = split == "train"
    tv = torchvision.datasets
    if name == "synthetic":
        per_class = synthetic_per_class and (synthetic_per_class if train else max(10, synthetic_per_class // 4))
        return SyntheticShapes(split, per_class=per_class, classes=synthetic_classes, transform=transform)
    if name == "imagefolder":
        path = os.path.join(root or "", "train" if train else "val")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no ImageFolder split at {path}: --data must hold train/<class>/ and val/<class>/")
        return tv.ImageFolder(path, transform=transform)
    makers = {"cifar10": lambda: tv.CIFAR10(root, train=train, transform=transform, download=download),
              "cifar100": lambda: tv.CIFAR100(root, train=train, transform=transform, download=download),
              "stl10": lambda: tv.STL10(root, "train" if train else "test", transform=transform, download=download),
              "flowers102": lambda: tv.Flowers102(root, "train" if train else "test", transform=transform,
                                                  download=download),
              "pets": lambda: tv.OxfordIIITPet(root, "trainval" if train else "test", transform=transform,
                                               download=download),
              "cars": lambda: tv.StanfordCars(root, "train" if train else "test", transform=transform,
                                              download=download)}
    if name not in makers:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    try:
        return makers[name]()
    except (RuntimeError, FileNotFoundError) as e:  # torchvision raises these for missing/corrupt files
        raise FileNotFoundError(f"{name} not found under --data {root!r} ({e}); pass --download to fetch it") from None


def num_classes_of(ds):
    if hasattr(ds, "classes"):
        return len(ds.classes)
    labels = getattr(ds, "targets", None) or getattr(ds, "_labels", None) or getattr(ds, "labels", None)
    return int(max(labels)) + 1


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def extract_features(backbone, loader, device, desc=None):
    """Backbone features (eval mode, no grad) and labels of a whole loader -> (N, F) float32 CPU, (N,) long."""
    from tqdm import tqdm
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, disable=desc is None or rank() != 0, leave=False):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            feats.append(backbone(x.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(y))
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_classify(train_feats, train_labels, test_feats, k=20, T=0.07, num_classes=None, chunk=1024):
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
