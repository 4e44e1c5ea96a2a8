"""Tests for simlap. Run: python -m pytest -q test_simlap.py  (CPU only, ~5 minutes on 2 cores).
Every test compares against a slow obviously-correct reference, a closed form, or a second code path."""
import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision

import simlap
import train

ev = importlib.import_module("eval")  # `eval` would shadow the builtin


# ----------------------------------------------------------------------------------------------- loss
def brute_force_loss(q, k, y, y2, gates, tau):
    """Eq. 2 written plainly: per anchor, per positive, explicit gating and cosine."""
    terms = []
    for i in range(len(q)):
        g = gates[i]
        zi = g * q[i]
        sims = [F.cosine_similarity(zi, g * k[j], dim=0) / tau for j in range(len(k))]
        negs = [sims[j] for j in range(len(k)) if y[j] != y[i] and y[j] != y2[i]]
        for p in range(len(k)):
            if y[p] == y2[i]:
                denom = torch.exp(sims[p]) + sum(torch.exp(s) for s in negs)
                terms.append(-torch.log(torch.exp(sims[p]) / denom))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("layout", ["random", "two_classes", "one_anchor_per_class", "partner_is_self"])
def test_loss_and_gradient_equal_brute_force(layout):
    torch.manual_seed(0)
    B, D, K = 12, 8, 4
    y = {"random": torch.randint(0, K, (B,)), "two_classes": torch.arange(B) % 2,
         "one_anchor_per_class": torch.arange(B), "partner_is_self": torch.randint(0, K, (B,))}[layout]
    y2 = y.clone() if layout == "partner_is_self" else y[torch.randperm(B)]  # partners present in the batch
    q, k = torch.randn(B, D, dtype=torch.float64), torch.randn(B, D, dtype=torch.float64)
    gates = torch.rand(B, D, dtype=torch.float64) * 0.98 + 0.01
    for tau in (0.1, 0.5):
        ours = simlap.simlap_loss(*(t.requires_grad_() for t in (q, k)), y, y2, gates.requires_grad_(), tau)
        ref = brute_force_loss(q, k, y, y2, gates, tau)
        assert torch.allclose(ours, ref, atol=1e-6, rtol=0), (layout, tau, ours, ref)
        # the hand-written backward against autograd through the brute force
        for a, b, name in zip(torch.autograd.grad(ours, (q, k, gates)), torch.autograd.grad(ref, (q, k, gates)),
                              "q k gates".split()):
            assert torch.allclose(a, b, atol=1e-9, rtol=1e-7), (layout, tau, name)


def test_loss_in_fp32_at_small_temperature_matches_fp64_brute_force():
    """τ = 0.01 puts logits in [-100, 100]: e^100 overflows fp32, so this checks the shifts and clamps inside."""
    torch.manual_seed(14)
    B, D = 12, 8
    y = torch.arange(B) % 3
    y2 = y.roll(1)
    q, k = torch.randn(B, D, dtype=torch.float64), torch.randn(B, D, dtype=torch.float64)
    k[:4] = q[:4]  # a few near-identical pairs: logits at the top of the range
    gates = torch.rand(B, D, dtype=torch.float64) * 0.98 + 0.01
    ref = brute_force_loss(q, k, y, y2, gates, 0.01)
    qf, kf, gf = (t.float().requires_grad_() for t in (q, k, gates))
    ours = simlap.simlap_loss(qf, kf, y, y2, gf, 0.01)
    ours.backward()
    assert torch.allclose(ours.double(), ref, rtol=1e-4), (ours, ref)
    assert all(torch.isfinite(t.grad).all() for t in (qf, kf, gf))


def test_loss_backward_passes_gradcheck():
    """Finite differences on the hand-written backward, with anchors lacking negatives or positives."""
    g = torch.Generator().manual_seed(11)
    q, k = torch.randn(5, 4, dtype=torch.float64, generator=g), torch.randn(7, 4, dtype=torch.float64, generator=g)
    gates = torch.rand(5, 4, dtype=torch.float64, generator=g) * 0.9 + 0.05
    y, key_y, y2 = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([0, 1, 2, 0, 1, 1, 0]), torch.tensor([1, 0, 2, 9, 1])
    fn = lambda q, k, gates: simlap.simlap_loss(q, k, y, y2, gates, 0.3, key_labels=key_y)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (q, k, gates)))


def test_loss_with_gathered_keys_and_absent_partners():
    """Keys from other ranks (N > B) and anchors whose partner has no key (left out, not NaN)."""
    torch.manual_seed(1)
    q, k = torch.randn(5, 6, dtype=torch.float64), torch.randn(11, 6, dtype=torch.float64)
    y, key_y = torch.tensor([0, 1, 2, 0, 3]), torch.tensor([0, 1, 2, 0, 3, 1, 1, 2, 0, 3, 2])
    y2 = torch.tensor([1, 1, -1, 2, 5])  # -1: no partner; 5: class absent from the keys
    gates = torch.rand(5, 6, dtype=torch.float64)
    ours = simlap.simlap_loss(q, k, y, y2, gates, 0.2, key_labels=key_y)
    keep = torch.tensor([0, 1, 3])
    # brute force over the anchors that have positives, with the full key set
    terms = []
    for i in keep.tolist():
        sims = torch.stack([F.cosine_similarity(gates[i] * q[i], gates[i] * k[j], dim=0) for j in range(11)]) / 0.2
        neg = (key_y != y[i]) & (key_y != y2[i])
        for p in (key_y == y2[i]).nonzero().flatten().tolist():
            terms.append(torch.logaddexp(sims[p], sims[neg].logsumexp(0)) - sims[p])
    assert torch.allclose(ours, torch.stack(terms).mean(), atol=1e-6)


def test_loss_with_instance_labels_is_cross_view_infonce():
    torch.manual_seed(2)
    B, D = 16, 32
    q, k = torch.randn(B, D), torch.randn(B, D)
    ids = torch.arange(B)
    ours = simlap.simlap_loss(q, k, ids, ids, torch.ones(B, D), 0.1)
    ref = F.cross_entropy(F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.1, ids)
    assert torch.allclose(ours, ref, atol=1e-6)


def brute_force_supcon(z, y, tau):
    """Khosla et al. L_out, one anchor at a time: A(i) = all views but i, P(i) = those with label y_i."""
    terms = []
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        positives = [p for p in others if y[p] == y[i]]
        if not positives:
            continue
        sims = {a: F.cosine_similarity(z[i], z[a], dim=0) / tau for a in others}
        denom = sum(torch.exp(sims[a]) for a in others)
        terms.append(-sum(torch.log(torch.exp(sims[p]) / denom) for p in positives) / len(positives))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("labels", ["classes", "singletons"])
def test_supcon_loss_equals_brute_force(labels):
    g = torch.Generator().manual_seed(12)
    z = torch.randn(10, 6, dtype=torch.float64, generator=g, requires_grad=True)  # e.g. 2 views x 5 images
    # singletons: labels 7, 8, 9 appear once, so those anchors have no positive and must add nothing
    y = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 0, 1] if labels == "classes" else [0, 1, 0, 1, 2, 2, 3, 7, 8, 9])
    for tau in (0.1, 0.7):
        ours, ref = simlap.supcon_loss(z, y, tau), brute_force_supcon(z, y, tau)
        assert torch.allclose(ours, ref, atol=1e-10), (ours, ref)
        assert torch.allclose(*(torch.autograd.grad(v, z)[0] for v in (ours, ref)), atol=1e-10)


def test_nt_xent_loss_equals_brute_force_and_runs_in_fp32():
    g = torch.Generator().manual_seed(13)
    B, tau = 6, 0.2
    z1, z2 = (torch.randn(B, 5, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    z = torch.cat([z1, z2])
    terms = []  # 2B anchors; view i's positive is its other view, every other view (2B - 1) a candidate
    for i in range(2 * B):
        sims = [F.cosine_similarity(z[i], z[a], dim=0) / tau for a in range(2 * B)]
        denom = sum(torch.exp(sims[a]) for a in range(2 * B) if a != i)
        terms.append(-torch.log(torch.exp(sims[(i + B) % (2 * B)]) / denom))
    ours, ref = simlap.nt_xent_loss(z1, z2, tau), torch.stack(terms).mean()
    assert torch.allclose(ours, ref, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(torch.autograd.grad(ours, (z1, z2)),
                                                                  torch.autograd.grad(ref, (z1, z2))))
    with torch.autocast("cpu", torch.bfloat16):
        for loss in (simlap.nt_xent_loss(z1.float() * 1, z2.float() * 1),
                     simlap.supcon_loss(torch.cat([z1, z2]).float() * 1, torch.arange(2 * B) % 3)):
            assert loss.dtype == torch.float32 and torch.isfinite(loss)


def tiny_model(method, **kw):
    return simlap.SimLAP("resnet18", 4, small_images=True, proj_hidden=32, proj_dim=16, method=method, **kw).eval()


def test_model_methods_compute_their_losses():
    """Each method's forward against the loss functions on the same projections (eval mode: BN is fixed)."""
    torch.manual_seed(3)
    x1, x2, y = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    y2 = torch.tensor([1, 2, 0, 0, 1, 2])
    m = tiny_model("simlap")
    state = m.state_dict()
    z1, z2 = m.projector(m.backbone(torch.cat([x1, x2]))).chunk(2)
    def pair(gates):
        return (simlap.simlap_loss(z1, z2, y, y2, gates) + simlap.simlap_loss(z2, z1, y, y2, gates)) / 2

    expected = {"simlap": pair(m.filter(y, y2)), "supcon-arbitrary": pair(torch.ones(6, 16)),
                "supcon": simlap.supcon_loss(torch.cat([z1, z2]), torch.cat([y, y])),
                "simclr": simlap.nt_xent_loss(z1, z2),
                "hydra": (simlap.nt_xent_loss(z1, z2) + 0.3 * pair(m.filter(y, y2))) / 1.3}
    for method, ref in expected.items():
        model = tiny_model(method, beta=0.3)
        model.load_state_dict(state)
        loss, stats = model(x1, x2, y, y2, stats=True)
        assert torch.allclose(loss, ref, atol=1e-6), method
        assert (stats["gate_open"] == 16) == (method not in simlap.FILTER_METHODS), method
        assert model.filter.embed.weight.requires_grad == (method in simlap.FILTER_METHODS), method
        if method == "simclr":  # the stats' positives: the other view of each image, nothing else
            assert stats["pos_sim"] == pytest.approx(F.cosine_similarity(z1, z2).mean().item(), abs=1e-5)


def test_all_ones_gates_give_ordinary_cosine():
    torch.manual_seed(4)
    q, k = torch.randn(7, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    s = simlap.subspace_cosine(q, k, torch.ones(7, 5, dtype=torch.float64))
    assert torch.allclose(s, F.normalize(q, dim=1) @ F.normalize(k, dim=1).T, atol=1e-12)
    # binary gates: the cosine inside the selected coordinates only
    g = torch.zeros(7, 5, dtype=torch.float64)
    g[:, :2] = 1
    s = simlap.subspace_cosine(q, k, g)
    assert torch.allclose(s, F.normalize(q[:, :2], dim=1) @ F.normalize(k[:, :2], dim=1).T, atol=1e-12)


def test_large_batch_builds_no_bbd_tensor():
    """B=4096, D=1024: a (B, B, D) float tensor would need 64 GiB; the loss runs forward and backward."""
    torch.manual_seed(5)
    B, D = 4096, 1024
    q, k = torch.randn(B, D, requires_grad=True), torch.randn(B, D, requires_grad=True)
    g = torch.rand(B, D, requires_grad=True)
    y = torch.randint(0, 100, (B,))
    loss = simlap.simlap_loss(q, k, y, simlap.sample_partners(y), g, 0.1)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(t.grad).all() for t in (q, k, g))


@pytest.mark.parametrize("case", ["one_class", "b2", "tiny_gates", "zero_gates", "duplicates", "bf16"])
def test_loss_finite_on_edge_cases(case):
    torch.manual_seed(6)
    B, D = (2 if case == "b2" else 8), 16
    q, k = torch.randn(B, D), torch.randn(B, D)
    y = torch.zeros(B, dtype=torch.long) if case in ("one_class", "b2") else torch.randint(0, 3, (B,))
    logits = torch.randn(B, D)
    if case == "tiny_gates":
        logits = logits - 60  # sigmoid ~ 1e-26
    if case == "zero_gates":
        logits = logits - 200  # sigmoid underflows to exactly 0 in fp32
    if case == "duplicates":
        q, k = q[:1].repeat(B, 1), q[:1].repeat(B, 1)
    q, k, logits = q.requires_grad_(), k.requires_grad_(), logits.requires_grad_()
    y2 = y.clone() if case in ("one_class", "b2") else simlap.sample_partners(y)
    with torch.autocast("cpu", torch.bfloat16, enabled=case == "bf16"):
        loss = simlap.simlap_loss(q * 1, k * 1, y, y2, torch.sigmoid(logits), 0.1)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, logits))
    # one class only: no negatives, so every positive pair's loss is exactly 0 = -log(e^s / e^s)
    if case in ("one_class", "b2"):
        assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_no_positive_anywhere_is_zero_not_nan():
    q = torch.randn(4, 8, requires_grad=True)
    loss = simlap.simlap_loss(q, q, torch.zeros(4, dtype=torch.long), torch.full((4,), -1), torch.rand(4, 8))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(q.grad).all()


# ----------------------------------------------------------------------------------------------- model
def test_gradients_reach_every_part_and_bf16_is_finite():
    torch.manual_seed(7)
    m = simlap.SimLAP("resnet18", 5, small_images=True, proj_hidden=32, proj_dim=16, gate_penalty=0.1)
    x = torch.randn(8, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    with torch.autocast("cpu", torch.bfloat16):
        loss, stats = m(x, x.flip(3), y, stats=True)
    loss.backward()
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in stats.values())
    assert set(stats) == {"loss", "gate_open", "gate_entropy", "pos_sim"} and 0 <= stats["gate_open"] <= 16
    for name, p in [("backbone", m.backbone.conv1.weight), ("projector", m.projector[2].weight),
                    ("label embedding", m.filter.embed.weight), ("filter MLP", m.filter.mlp[5].weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


def test_filter_is_symmetric_and_single_label_is_eq4():
    torch.manual_seed(8)
    f = simlap.FeatureFilter(6, out_dim=10, embed_dim=12, hidden_dim=14).eval()
    a, b = torch.tensor([0, 1, 5, 3]), torch.tensor([2, 4, 5, 0])
    assert torch.equal(f(a, b), f(b, a))
    assert torch.allclose(f(a, a), f(a), atol=1e-6)  # g(y, y) = g(y)
    g = f(a)
    assert g.shape == (4, 10) and (g > 0).all() and (g < 1).all()


def test_gate_penalty_is_mean_bernoulli_entropy_and_is_minimised_at_binary_gates():
    torch.manual_seed(9)
    f = simlap.FeatureFilter(3, out_dim=4, embed_dim=5, hidden_dim=6).eval()
    g0 = f(torch.arange(3))
    ref = -(g0 * g0.log() + (1 - g0) * (1 - g0).log()).mean()
    assert torch.allclose(simlap.gate_penalty(f), ref, atol=1e-6)
    # a few steps of descent on the penalty push gates away from 0.5 (towards 0 or 1), not towards 1/e
    opt = torch.optim.SGD(f.parameters(), lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        simlap.gate_penalty(f).backward()
        opt.step()
    g = f(torch.arange(3))
    assert simlap.gate_penalty(f) < ref and (g - 0.5).abs().mean() > (g0 - 0.5).abs().mean() + 0.1


# ----------------------------------------------------------------------------------------------- pairs
def test_pair_sampler_guarantees():
    gen = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 0, 1, 1, 3, 3, 3, 5])
    present = set(y.tolist())
    for mode in ("arbitrary", "arbitrary-uniform", "identical", "distinct"):
        y2 = simlap.sample_partners(y, mode, num_classes=6, generator=gen)
        assert set(y2.tolist()) <= present, mode
        if mode == "identical":
            assert torch.equal(y2, y)
        if mode == "distinct":
            assert (y2 != y).all()
    # distinct in a one-class batch: impossible, marked -1 (the anchor is left out of the loss)
    assert (simlap.sample_partners(torch.zeros(4, dtype=torch.long), "distinct", num_classes=3) == -1).all()
    # partners come from the global batch, not only the local anchors
    y2 = simlap.sample_partners(torch.zeros(64, dtype=torch.long), "distinct", batch_labels=torch.tensor([0, 7]),
                                num_classes=8, generator=gen)
    assert (y2 == 7).all()
    y2 = simlap.sample_partners(torch.zeros(64, dtype=torch.long), batch_labels=torch.tensor([5, 7]), generator=gen)
    assert set(y2.tolist()) == {5, 7}
    # reproducible from a generator
    a = simlap.sample_partners(y, generator=torch.Generator().manual_seed(5), num_classes=6)
    b = simlap.sample_partners(y, generator=torch.Generator().manual_seed(5), num_classes=6)
    assert torch.equal(a, b)


def test_arbitrary_partners_follow_class_frequency_and_uniform_mode_does_not():
    """One class of 200 + 56 singletons. arbitrary (the authors' draw: the label of a random sample) gives
    P(y2 = y1) = (200² + 56) / 256² = 0.611; arbitrary-uniform (uniform over the 57 classes) 1/57 = 0.018."""
    y = torch.cat([torch.zeros(200, dtype=torch.long), torch.arange(1, 57)])
    gen = torch.Generator().manual_seed(0)
    draws = 40  # 10 240 anchors per mode: sd of P(y2 = y1) ~ 0.005 (arbitrary), ~ 0.0013 (uniform)
    same = {mode: torch.stack([simlap.sample_partners(y, mode, generator=gen) == y for _ in range(draws)]).float()
            for mode in ("arbitrary", "arbitrary-uniform")}
    assert abs(same["arbitrary"].mean().item() - (200 ** 2 + 56) / 256 ** 2) < 0.025
    assert abs(same["arbitrary-uniform"].mean().item() - 1 / 57) < 0.007
    # per anchor class: arbitrary gives a big-class anchor itself 200/256 of the time, a singleton 1/256
    assert abs(same["arbitrary"][:, :200].mean().item() - 200 / 256) < 0.025
    assert same["arbitrary"][:, 200:].mean().item() < 0.02
    # and the partners' classes in proportion to the batch: class 0 in 78 % of all draws
    y2 = torch.cat([simlap.sample_partners(y, generator=gen) for _ in range(draws)])
    assert abs((y2 == 0).float().mean().item() - 200 / 256) < 0.025


def test_nearest_partners_respect_distance_and_presence():
    ds = simlap.SyntheticShapes("test", per_class=1)
    dist = ds.attribute_distance()  # (16, 16): 0, 1 or 2 attributes differ
    y = torch.arange(16).repeat(4)
    y2 = simlap.sample_partners(y, "nearest", class_dist=dist, n=1, generator=torch.Generator().manual_seed(0))
    assert (dist[y, y2] == 1).all()  # the closest other classes differ in exactly one attribute
    assert len(set(zip(y.tolist(), y2.tolist()))) > 16  # ties at the nearest distance are drawn among, not fixed
    # restricted to the classes present: class 0's neighbours 1..3 (same shape) absent, 4 (same colour) present
    y = torch.tensor([0, 0, 4, 15])
    y2 = simlap.sample_partners(y, "nearest", class_dist=dist, n=1)
    assert y2[0] == 4 and y2[1] == 4
    assert torch.equal(simlap.sample_partners(y, "nearest", class_dist=dist, n=0), y)  # N=0: same class


# ----------------------------------------------------------------------------------------------- LARS
def test_lars_update_rules():
    torch.manual_seed(10)
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = simlap.LARS([w, b], lr=0.5, weight_decay=0.0, momentum=0.9, eta=0.001)
    gw, gb = torch.randn(4, 3), torch.randn(3)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    assert torch.allclose((w - w0).norm(), 0.5 * 0.001 * w0.norm(), rtol=1e-5)  # trust-ratio step
    assert torch.allclose(b, b0 - 0.5 * gb)  # 1-D: plain SGD, no decay, no trust ratio
    w.grad, b.grad = gw.clone(), gb.clone()
    b1 = b.detach().clone()
    opt.step()
    assert torch.allclose(b, b1 - 0.5 * (0.9 * gb + gb))  # momentum
    # weight decay enters the 2-D gradient before the trust ratio: g = grad + wd * p
    p = torch.nn.Parameter(torch.ones(2, 2))
    opt = simlap.LARS([p], lr=1.0, weight_decay=0.5, momentum=0.0, eta=0.1)
    p.grad = torch.zeros(2, 2)
    opt.step()
    assert torch.allclose(p, torch.full((2, 2), 0.9))  # g = 0.5 p, scaled to 0.1 * |p| / |g| * g = 0.1 p


# ----------------------------------------------------------------------------------------------- networks
def test_backbones_and_projector_shapes():
    for arch, dim in (("resnet18", 512), ("resnet50", 2048)):
        net, d = simlap.build_backbone(arch, small_images=True)
        assert d == dim and net.conv1.kernel_size == (3, 3) and isinstance(net.maxpool, torch.nn.Identity)
        assert net.eval()(torch.randn(2, 3, 32, 32)).shape == (2, dim)
    net, d = simlap.build_backbone("resnet18")
    assert net.conv1.kernel_size == (7, 7)
    vit, d = simlap.build_backbone("vit_tiny", small_images=True)
    assert d == 192 and vit.patch_size == 4 and len(vit.encoder.layers) == 12
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    p = simlap.Projector(512, 64, 16)
    assert isinstance(p[-1], torch.nn.LayerNorm) and p(torch.randn(4, 512)).shape == (4, 16)


# ----------------------------------------------------------------------------------------------- data
def test_synthetic_dataset_deterministic_disjoint_balanced():
    a, b = simlap.SyntheticShapes("train", per_class=20, seed=3), simlap.SyntheticShapes("train", per_class=20, seed=3)
    t = simlap.SyntheticShapes("test", per_class=20, seed=3)
    assert torch.equal(a.images, b.images) and a.images.shape == (320, 3, 32, 32) and a.images.dtype == torch.uint8
    assert torch.bincount(a.targets).tolist() == [20] * 16
    flat_a, flat_t = a.images.flatten(1), t.images.flatten(1)
    assert not (flat_a[:, None] == flat_t[None]).all(-1).any()  # no test image equals a train image
    sub = simlap.SyntheticShapes("train", per_class=5, classes=[3, 7, 12])
    assert sub.attributes.tolist() == [[0, 3], [1, 3], [3, 0]] and sub.targets.max() == 2
    # images carry their class: mean colour of the shape's pixels follows the colour attribute
    red, blue = a.images[a.targets == 0].float().mean((0, 2, 3)), a.images[a.targets == 2].float().mean((0, 2, 3))
    assert red[0] > blue[0] and blue[2] > red[2]


def test_two_views_are_a_pure_function_of_seed_epoch_index():
    ds = simlap.TwoViews(simlap.SyntheticShapes("test", per_class=2), simlap.train_transform(16), seed=1)
    v1, v2, y = ds[(3, 0)]
    torch.manual_seed(123)  # global RNG state must not matter
    w1, w2, _ = ds[(3, 0)]
    assert v1.shape == (3, 16, 16) and torch.equal(v1, w1) and torch.equal(v2, w2) and not torch.equal(v1, v2)
    assert not torch.equal(ds[(3, 1)][0], v1)  # another epoch, other views


# ----------------------------------------------------------------------------------------------- train.py

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--synthetic-per-class", "8", "--batch-size", "32", "--image-size", "8", "--proj-hidden", "64",
        "--proj-dim", "32", "--knn-every", "0", "--log-every", "2", "--epochs", "2"]  # 128 images, 4 steps/epoch


def run_train(*args, workers=0):
    cmd = [sys.executable, os.path.join(HERE, "train.py"), *TINY, "--workers", str(workers), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=300)


def toy_model(method="simlap"):
    """A SimLAP whose encoder and projector hold no BatchNorm, and whose filter BN uses fixed statistics:
    then 2 processes with B/2 each must compute exactly what 1 process computes with B."""
    torch.manual_seed(0)
    m = simlap.SimLAP("resnet18", 5, small_images=True, proj_hidden=16, proj_dim=8, method=method, beta=0.5)
    m.backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 12))
    m.projector = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.LayerNorm(8))
    m.filter.mlp[0].eval(), m.filter.mlp[3].eval()
    m.filter.mlp[0].train = m.filter.mlp[3].train = lambda mode=True: None  # stay in eval mode
    return m


def ddp_data():
    g = torch.Generator().manual_seed(1)
    B = 8
    return (torch.randn(B, 3, 4, 4, generator=g), torch.randn(B, 3, 4, 4, generator=g),
            torch.tensor([0, 1, 2, 0, 1, 3, 4, 0]), torch.tensor([1, 1, 0, 3, 4, 2, 0, 0]))


def one_step(model, x1, x2, y, y2):
    opt = simlap.LARS([p for p in model.parameters() if p.requires_grad], lr=0.5, weight_decay=1e-4)
    loss, _ = model(x1, x2, y, y2)
    loss.backward()
    opt.step()
    return loss.detach()


DDP_METHODS = ("simlap", "supcon", "simclr", "hydra")


def _ddp_worker(r, world, port, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=world)
    for method in DDP_METHODS:
        model = toy_model(method)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x1, x2, y, y2 = (t.chunk(world)[r] for t in ddp_data())
        loss = one_step(ddp, x1, x2, y, y2)
        dist.all_reduce(loss)
        torch.save({"loss": loss / world, "params": model.state_dict()}, f"{out}.{method}.{r}")
    dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process(tmp_path):
    """Every loss (keys gathered with gradient, anchors local) gives the single-process update on the global batch."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp")), nprocs=2, join=True)
    for method in DDP_METHODS:
        model = toy_model(method)
        loss = one_step(model, *ddp_data())
        for r in range(2):
            got = torch.load(tmp_path / f"ddp.{method}.{r}", weights_only=True)
            assert torch.allclose(got["loss"], loss, atol=1e-5), (method, got["loss"], loss)
            for name, p in model.state_dict().items():
                assert torch.allclose(got["params"][name], p, atol=1e-5), (method, name)
        assert not torch.equal(model.backbone[1].weight, toy_model().backbone[1].weight), method  # the step moved


def test_resume_is_exact_and_outputs_load(tmp_path):
    """2 epochs straight == a process stopped mid-epoch (step 6 of 8) that exits, then the same command again.
    The interrupted run uses 2 loader workers, the others none: augmentations do not depend on workers."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main([*TINY, "--workers", "0", "--output-dir", str(straight)])
    r = run_train("--output-dir", str(resumed), "--stop-after", "6", workers=2)
    assert r.returncode == 0 and "stopped after 6 steps at step 6" in r.stdout, r.stderr
    train.main([*TINY, "--workers", "0", "--output-dir", str(resumed), "--stop-after", "6"])
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (straight, resumed))
    assert a["step"] == b["step"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)
    # the outputs a user takes away
    assert {"checkpoint.pt", "backbone.pt", "args.json", "log.jsonl"} <= set(os.listdir(straight))
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    net.conv1, net.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()  # small-image stem
    net.load_state_dict(torch.load(straight / "backbone.pt", weights_only=True), strict=True)
    args = json.loads((straight / "args.json").read_text())
    assert args["lr"] == pytest.approx(0.05 * 32 / 256) and args["per_gpu_batch"] == 32
    epochs = [r["epoch"] for r in map(json.loads, (straight / "log.jsonl").read_text().splitlines()) if "img_per_s" in r]
    assert epochs[-1] == 2


def test_lr_schedule():
    peak, total, warm = 1.0, 100, 10
    lrs = [train.get_lr(s, total, warm, peak) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90))) and lrs[-1] < 1e-3


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    train.save_atomic({"step": 1}, path)

    def broken_save(obj, f):
        open(f, "wb").write(b"half a checkp")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        train.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    argv = [*TINY, "--workers", "0", "--output-dir", out, "--stop-after", "4"]
    train.main(argv)
    before = open(os.path.join(out, "checkpoint.pt"), "rb").read()
    monkeypatch.setattr(simlap, "simlap_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(train.NonFiniteLoss, match="step 4"):
        train.main(argv)
    assert open(os.path.join(out, "checkpoint.pt"), "rb").read() == before


def test_user_errors_exit_2_with_one_line(tmp_path):
    r = run_train("--arch", "resnet7", "--output-dir", str(tmp_path / "x"))  # the CLI path: code 2, one line
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().splitlines() == [
        "train.py: error: unknown --arch 'resnet7'; choose one of resnet18, resnet50, vit_tiny, vit_small, vit_base"]
    assert not (tmp_path / "x").exists()
    good = tmp_path / "good"
    train.main([*TINY, "--workers", "0", "--output-dir", str(good), "--stop-after", "1"])
    before = {f: (good / f).read_bytes() for f in os.listdir(good)}
    afile = tmp_path / "a_file"
    afile.write_text("x")
    cases = {"unknown dataset": ["--dataset", "mnist"],
             "missing data": ["--dataset", "imagefolder", "--data", str(tmp_path / "nope")],
             "batch too small": ["--batch-size", "1"],
             "other arch": ["--output-dir", str(good), "--arch", "resnet50"],
             "other projector": ["--output-dir", str(good), "--proj-dim", "16"],
             "bad distances": ["--output-dir", str(good), "--pairs", "nearest", "--class-distances", str(afile)],
             "other method": ["--output-dir", str(good), "--method", "hydra"],
             "other pairs": ["--output-dir", str(good), "--pairs", "arbitrary-uniform"],
             "pairs without partners": ["--method", "supcon", "--pairs", "distinct"],
             "beta without hydra": ["--beta", "0.5"],
             "negative beta": ["--method", "hydra", "--beta", "-1"],
             "unwritable output": ["--output-dir", str(afile / "sub")],
             "repeated class id": ["--synthetic-classes", "1,1,2"],
             "class id out of range": ["--synthetic-classes", "3,16"],
             "class ids off synthetic": ["--dataset", "cifar10", "--synthetic-classes", "1,2"],
             "other classes": ["--output-dir", str(good), "--synthetic-classes", ",".join(map(str, range(1, 17)))]}
    for name, args in cases.items():
        with pytest.raises(train.UserError) as e:
            train.main([*TINY, "--workers", "0", "--output-dir", str(tmp_path / name), *args])
        assert "\n" not in str(e.value) and len(str(e.value)) > 20, name
    assert {f: (good / f).read_bytes() for f in os.listdir(good)} == before  # nothing overwritten


def test_method_flags_resolve_and_name_the_output_dir():
    a = train.parse_args([])
    assert (a.method, a.pairs, a.beta, a.output_dir) == ("simlap", "arbitrary", None, "runs/synthetic-resnet18-simlap")
    a = train.parse_args(["--method", "hydra", "--pairs", "distinct"])
    assert (a.pairs, a.beta, a.output_dir) == ("distinct", 1.0, "runs/synthetic-resnet18-hydra-distinct")
    a = train.parse_args(["--method", "supcon"])  # draws no partners: no pairs recorded
    assert (a.pairs, a.beta, a.output_dir) == (None, None, "runs/synthetic-resnet18-supcon")


def test_training_on_some_synthetic_classes_is_evaluated_on_them(tmp_path):
    """--synthetic-classes (transfer to held-out combinations): train and eval.py must both use only those."""
    out = tmp_path / "sub"
    train.main([*TINY, "--workers", "0", "--output-dir", str(out), "--stop-after", "1", "--synthetic-classes", "5,2,9",
                "--batch-size", "8"])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["args"]["synthetic_classes"] == [5, 2, 9] and ckpt["args"]["num_classes"] == 3
    assert ckpt["model"]["filter.embed.weight"].shape[0] == 3
    res = ev.main(["--checkpoint", str(out / "checkpoint.pt"), *EVAL_TINY, "--synthetic-per-class", "4", "--k", "5"])
    assert res["num_train"] == 3 * 4 and res["num_test"] == 3 * 10  # per class: 4 train, at least 10 test
    # classes 5 = (1, 1), 2 = (0, 2), 9 = (2, 1): 5 and 9 share colour 1, 2 shares nothing with either
    _, model, _ = ev.load_weights(str(out / "checkpoint.pt"))
    sharp = F.normalize((ev.class_gates(model.filter) > 0.5).float(), dim=1)
    overlap = sharp @ sharp.T
    assert res["gates"]["overlap_shared_attribute"] == pytest.approx(overlap[0, 2].item(), abs=1e-6)
    assert res["gates"]["overlap_no_shared_attribute"] == pytest.approx(
        (overlap[0, 1] + overlap[1, 2]).item() / 2, abs=1e-6)


# ----------------------------------------------------------------------------------------------- eval.py
TRAIN_ARGS = {"arch": "resnet18", "dataset": "synthetic", "data": None, "image_size": 16, "num_classes": 16,
              "proj_dim": 32, "proj_hidden": 64, "small_images": True, "method": "simlap"}
EVAL_TINY = ["--synthetic-per-class", "2", "--image-size", "16", "--batch-size", "64", "--workers", "0",
        "--probe-iters", "20", "--device", "cpu"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny untrained checkpoint.pt and backbone.pt in train.py's format."""
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    a = TRAIN_ARGS
    model = simlap.SimLAP(a["arch"], a["num_classes"], a["small_images"], a["image_size"], a["proj_hidden"],
                          a["proj_dim"])
    torch.save({"model": model.state_dict(), "args": dict(a), "optimizer": {}, "epoch": 0, "step": 0,
                "rng": torch.get_rng_state()}, d / "checkpoint.pt")
    torch.save(model.backbone.state_dict(), d / "backbone.pt")
    return d


# ----------------------------------------------------------------------------------------------- kNN
def brute_force_knn(train_f, train_y, test_f, k, T, C):
    """One test sample at a time: sort the bank by (-similarity, index), take k, vote exp(sim / T) per class,
    first class with the highest score wins."""
    bank, queries = F.normalize(train_f.double(), dim=1), F.normalize(test_f.double(), dim=1)
    preds = []
    for q in queries:
        sims = [float(q @ b) for b in bank]
        nearest = sorted(range(len(bank)), key=lambda j: (-sims[j], j))[:k]
        scores = [0.0] * C
        for j in nearest:
            scores[int(train_y[j])] += math.exp(sims[j] / T)
        preds.append(scores.index(max(scores)))
    return torch.tensor(preds)


def test_eval_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(120, 16, generator=g), torch.randn(40, 16, generator=g)
    train_y = torch.randint(5, (120,), generator=g)
    for k, T in ((1, 0.07), (10, 0.07), (20, 0.07), (20, 0.5)):
        got = simlap.knn_classify(train_f, train_y, test_f, k, T, num_classes=5, chunk=16)
        assert torch.equal(got, brute_force_knn(train_f, train_y, test_f, k, T, 5)), (k, T)


def test_eval_knn_ties_match_brute_force():
    # {-1, 1}^16 vectors normalise to +-1/4 exactly, so every similarity is a multiple of 1/8 computed without
    # rounding: many exact ties at the k-th neighbour, plus duplicated bank rows with other labels. With k <= 5
    # two tied classes hold at most 2 votes each, so their scores are equal bit for bit in any summation order.
    g = torch.Generator().manual_seed(1)
    sign = lambda n: torch.randint(2, (n, 16), generator=g).double() * 2 - 1  # noqa: E731
    base = sign(30)
    train_f = torch.cat([base, base[:10], base[:5]])  # rows 30.. duplicate rows 0..9
    train_y = torch.randint(3, (len(train_f),), generator=g)
    test_f = torch.cat([sign(30), base[:5]])
    for k in (1, 2, 3, 4, 5):
        got = simlap.knn_classify(train_f, train_y, test_f, k, 0.07, num_classes=3, chunk=7)
        assert torch.equal(got, brute_force_knn(train_f, train_y, test_f, k, 0.07, 3)), k
    # Hand-built symmetric tie: the query is equally close to rows 0 (class 1) and 1 (class 0).
    bank, labels, query = torch.eye(3), torch.tensor([1, 0, 2]), torch.tensor([[1.0, 1.0, 0.0]])
    assert simlap.knn_classify(bank, labels, query, k=1).item() == 1  # equal similarity: lower bank index
    assert simlap.knn_classify(bank, labels, query, k=2).item() == 0  # equal class scores: lower class index
    assert brute_force_knn(bank, labels, query, 2, 0.07, 3).item() == 0


# ----------------------------------------------------------------------------------------------- probe
def test_eval_linear_probe_separable_and_random_labels():
    g = torch.Generator().manual_seed(0)
    centers = 5 * torch.randn(5, 16, generator=g)

    def blobs(n):
        y = torch.randint(5, (n,), generator=g)
        return centers[y] + torch.randn(n, 16, generator=g), y

    (xtr, ytr), (xte, yte) = blobs(300), blobs(300)
    assert ev.linear_probe(xtr, ytr, xte, yte, iters=100)["test_top1"] >= 99
    # random labels: nothing generalises, held-out accuracy stays near chance (10 %) while train fits
    xtr, xte = torch.randn(500, 64, generator=g), torch.randn(500, 64, generator=g)
    ytr, yte = torch.randint(10, (500,), generator=g), torch.randint(10, (500,), generator=g)
    res = ev.linear_probe(xtr, ytr, xte, yte, iters=100)
    assert res["test_top1"] < 20 and res["train_top1"] > 30


# ----------------------------------------------------------------------------------------------- collapse
def test_eval_spectrum_and_effective_rank():
    g = torch.Generator().manual_seed(0)
    N, D, r = 200, 32, 5
    x = torch.randn(N, r, generator=g, dtype=torch.float64) @ torch.randn(r, D, generator=g, dtype=torch.float64)
    s = ev.singular_values(x)
    assert s.shape == (D,) and torch.all(s[:-1] >= s[1:])
    assert int((s > 1e-9 * s[0]).sum()) == r
    # flat spectrum: r orthonormal centred directions of equal energy -> effective rank exactly r
    u = torch.randn(N, r, generator=g, dtype=torch.float64)
    u = torch.linalg.qr(u - u.mean(0)).Q  # centred columns stay centred
    v = torch.linalg.qr(torch.randn(D, r, generator=g, dtype=torch.float64)).Q
    s = ev.singular_values(3 * u @ v.T)
    assert torch.allclose(s[:r], torch.full((r,), 3.0, dtype=torch.float64))
    assert abs(ev.effective_rank(s) - r) < 1e-6
    assert ev.effective_rank(torch.tensor([2.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert 1 < ev.effective_rank(torch.tensor([8.0, 4, 2, 1, 0.5])) < 4  # decaying: well below 5


# ----------------------------------------------------------------------------------------------- similarity
def test_eval_similarity_overlap():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(25)
    # classes along orthogonal axes with little noise: intra ~ 1, inter ~ 0, no overlap
    feats = 10 * torch.eye(8)[labels] + 0.1 * torch.randn(100, 8, generator=g)
    res = ev.similarity_overlap(feats, labels, chunk=7)
    assert res["overlap"] == 0 and res["intra_mean"] > 0.9 and abs(res["inter_mean"]) < 0.1
    assert res["intra_pairs"] == 4 * 25 * 24 // 2 and res["inter_pairs"] == 100 * 99 // 2 - res["intra_pairs"]
    # labels unrelated to the features: both distributions alike, large overlap; chunking changes nothing
    feats = torch.randn(100, 8, generator=g)
    a, b = ev.similarity_overlap(feats, labels, chunk=7), ev.similarity_overlap(feats, labels, chunk=1000)
    assert a["overlap"] > 0.7
    assert a["intra_hist"] == b["intra_hist"] and a["inter_hist"] == b["inter_hist"]
    brute = [(F.cosine_similarity(feats[i], feats[j], dim=0).item(), bool(labels[i] == labels[j]))
             for i in range(100) for j in range(i + 1, 100)]
    assert a["intra_mean"] == pytest.approx(sum(s for s, same in brute if same) / a["intra_pairs"], abs=1e-5)


# ----------------------------------------------------------------------------------------------- gates
def test_eval_gate_analysis(tmp_path):
    gates = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.05],    # open {0, 1}
                          [0.7, 0.3, 0.6, 0.4, 0.05],    # open {0, 2}
                          [0.2, 0.1, 0.3, 0.4, 0.05],    # none open
                          [0.6, 0.9, 0.95, 0.2, 0.05]])  # open {0, 1, 2}
    embed = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [-1.0, 0.0]])
    attributes = torch.tensor([[0, 0], [0, 1], [1, 1], [2, 2]])  # sharing: (0, 1) shape, (1, 2) colour
    png = str(tmp_path / "gates.png")
    res = ev.gate_analysis(gates, embed, attributes, png)
    assert res["open_dims"] == [2, 2, 0, 3]
    c = math.sqrt(2 / 3)  # cos({0,1}, {0,1,2}) = 2 / (sqrt 2 sqrt 3)
    expected = torch.tensor([[1, 0.5, 0, c], [0.5, 1, 0, c], [0, 0, 0, 0], [c, c, 0, 1]])
    assert torch.allclose(torch.tensor(res["gate_overlap"]), expected, atol=1e-6)
    assert res["overlap_shared_attribute"] == pytest.approx((0.5 + 0) / 2)
    assert res["overlap_no_shared_attribute"] == pytest.approx((0 + c + c + 0) / 4)
    h = -(gates * gates.log() + (1 - gates) * (1 - gates).log()).mean(1)
    assert torch.allclose(torch.tensor(res["entropy"]), h, atol=1e-5)
    r = 1 / math.sqrt(2)
    assert torch.allclose(torch.tensor(res["label_similarity"])[1], torch.tensor([r, 1, r, -r]), atol=1e-6)
    img = torchvision.io.decode_image(png)
    assert img.shape[-2:] == (4, 5)  # K x D
    assert (img[0].float() - gates * 255).abs().max() <= 1
    # class gates of a real filter: (K, D) in (0, 1), the filter's mode restored
    filt = simlap.FeatureFilter(6, out_dim=8).train()
    g = ev.class_gates(filt)
    assert g.shape == (6, 8) and filt.training and ((g > 0) & (g < 1)).all()
    assert ev.gate_analysis(g)["gate_overlap"] and len(ev.gate_analysis(g)["entropy"]) == 6


# ----------------------------------------------------------------------------------------------- loading, CLI
def test_eval_backbone_geometry_is_inferred(tmp_path, weights):
    bb, model, info = ev.load_weights(backbone=str(weights / "backbone.pt"), arch="resnet18")
    assert model is None and info["small_images"] is True
    vit, _ = simlap.build_backbone("vit_tiny", small_images=True, image_size=16)
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    _, _, info = ev.load_weights(backbone=str(tmp_path / "vit.pt"), arch="vit_tiny")
    assert info["small_images"] is True and info["image_size"] == 16


def test_eval_end_to_end(tmp_path, weights):
    cache = str(tmp_path / "feats.pt")
    cmd = [sys.executable, os.path.join(HERE, "eval.py"), "--checkpoint", str(weights / "checkpoint.pt"), *EVAL_TINY,
           "--k", "5", "--output-dir", str(tmp_path), "--cache-features", cache]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.load(open(tmp_path / "eval.json"))
    assert {"checkpoint", "dataset", "knn", "linear_probe", "collapse", "similarity", "gates"} <= res.keys()
    assert res["dataset"] == "synthetic"
    assert (res["num_train"], res["num_test"]) == (32, 160)  # the test split has max(10, 2 // 4) per class
    assert set(res["knn"]) == {"k=5 T=0.07", "k=10 T=0.07"} and all(0 <= a <= 100 for a in res["knn"].values())
    assert set(res["collapse"]) == {"backbone", "projector"}
    assert len(res["collapse"]["projector"]["singular_values"]) == 32  # min(N, D)
    assert len(res["gates"]["open_dims"]) == 16 and "overlap_shared_attribute" in res["gates"]
    assert torchvision.io.decode_image(res["gates"]["png"]).shape[-2:] == (16, 32)
    # a second run reads the cached features and gives the same numbers
    again = ev.main(["--checkpoint", str(weights / "checkpoint.pt"), *EVAL_TINY, "--k", "5", "--output-dir",
                     str(tmp_path / "again"), "--cache-features", cache])
    assert again["knn"] == res["knn"] and again["linear_probe"] == res["linear_probe"]
    with pytest.raises(ev.UserError, match="cache-features"):  # features of another image size: refused
        ev.main(["--checkpoint", str(weights / "checkpoint.pt"), *EVAL_TINY, "--image-size", "32", "--cache-features",
                 cache])


def test_eval_skips_gates_of_a_method_without_filter(tmp_path, weights):
    """The other side of test_eval_end_to_end (simlap: gates analysed): supcon-arbitrary trains no filter."""
    ckpt = torch.load(weights / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "args": {**ckpt["args"], "method": "supcon-arbitrary"}}, tmp_path / "ckpt.pt")
    res = ev.main(["--checkpoint", str(tmp_path / "ckpt.pt"), *EVAL_TINY, "--k", "5", "--output-dir", str(tmp_path)])
    assert "gates" not in res and "knn" in res and not os.path.exists(tmp_path / "gates.png")


def bad_inputs(tmp_path, weights):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"foo": 1}, tmp_path / "other.pt")
    for cls in ("a", "b"):  # an ImageFolder with train/ but no val/
        os.makedirs(tmp_path / "folder" / "train" / cls)
        png = str(tmp_path / "folder" / "train" / cls / "0.png")
        torchvision.io.write_png(torch.zeros(3, 4, 4, dtype=torch.uint8), png)
    os.makedirs(tmp_path / "empty")
    ckpt, backbone = str(weights / "checkpoint.pt"), str(weights / "backbone.pt")
    return {"missing checkpoint": ["--checkpoint", str(tmp_path / "nope.pt")],
            "corrupt checkpoint": ["--checkpoint", str(tmp_path / "garbage.pt")],
            "not a checkpoint": ["--checkpoint", str(tmp_path / "other.pt")],
            "arch mismatch (checkpoint)": ["--checkpoint", ckpt, "--arch", "resnet50"],
            "arch mismatch (backbone)": ["--backbone", backbone, "--arch", "resnet50"],
            "missing split": ["--checkpoint", ckpt, "--dataset", "imagefolder", "--data", str(tmp_path / "folder")],
            "missing data": ["--checkpoint", ckpt, "--dataset", "cifar10", "--data", str(tmp_path / "empty")],
            "no data root": ["--checkpoint", ckpt, "--dataset", "cifar10"],
            "k above bank": ["--checkpoint", ckpt, "--synthetic-per-class", "1", "--k", "20"]}


def test_eval_bad_inputs_exit_2_with_one_line(tmp_path, weights, capsys):
    cases = bad_inputs(tmp_path, weights)
    # One through a real process (started first, it imports torch while the rest run): no traceback on stderr.
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "eval.py"), *cases["corrupt checkpoint"]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, argv in cases.items():  # all of them through cli(), which is what __main__ runs
        with pytest.raises(SystemExit) as exit:
            ev.cli([*argv, "--device", "cpu", "--workers", "0", "--output-dir", str(tmp_path)])
        err = capsys.readouterr().err
        assert exit.value.code == 2, name
        assert err.startswith("eval.py: error: ") and err.count("\n") == 1 and "Traceback" not in err, (name, err)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.startswith("eval.py: error: ") and err.count("\n") == 1, err
