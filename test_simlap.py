"""Tests for simlap. Run: python -m pytest -q test_simlap.py  (CPU only; its time: benchmarks/README.md).
Every test compares against a slow obviously-correct reference, a closed form, or a second code path."""
import argparse
import copy
import functools
import gzip
import hashlib
import importlib
import json
import math
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision

import simlap
import train
from paper import analyses, figures, plot, transfer

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
        readable = simlap.simlap_loss_reference(q, k, y, y2, gates, tau)
        assert torch.allclose(ours, ref, atol=1e-6, rtol=0), (layout, tau, ours, ref)
        assert torch.allclose(readable, ref, atol=1e-12, rtol=0), (layout, tau, readable, ref)
        # the hand-written backward against autograd through the brute force
        for a, b, name in zip(torch.autograd.grad(ours, (q, k, gates)), torch.autograd.grad(ref, (q, k, gates)),
                              "q k gates".split()):
            assert torch.allclose(a, b, atol=1e-9, rtol=1e-7), (layout, tau, name)


@pytest.mark.parametrize("case", ["one_class", "b2", "tiny_gates", "duplicates", "gathered_keys", "absent_partners",
                                  "no_positive", "identical_partners"])
def test_fast_loss_equals_the_readable_eq2_in_fp64(case):
    """simlap_loss (two matmuls, hand-written backward) against simlap_loss_reference (eq. 2 as written, autograd):
    values and gradients in float64, on the edge cases the fast kernel guards against."""
    g = torch.Generator().manual_seed(21)
    B, N, D = (2, 2, 6) if case == "b2" else (6, 15 if case in ("gathered_keys", "absent_partners") else 6, 6)
    q, k = torch.randn(B, D, dtype=torch.float64, generator=g), torch.randn(N, D, dtype=torch.float64, generator=g)
    gates = torch.rand(B, D, dtype=torch.float64, generator=g) * 0.98 + 0.01
    key_y = torch.randint(0, 3, (N,), generator=g)
    y = key_y[:B].clone()
    y2 = key_y[torch.randint(0, N, (B,), generator=g)]
    if case in ("one_class", "b2"):
        y, key_y, y2 = torch.zeros(B, dtype=torch.long), torch.zeros(N, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    if case == "tiny_gates":
        gates = gates * 1e-5  # the cosine is scale-invariant: same value, gradient x 1e5
    if case == "duplicates":
        q, k = q[:1].repeat(B, 1), q[:1].repeat(N, 1)
    if case == "absent_partners":
        y2[:3] = torch.tensor([-1, 7, 7])  # no partner, and a class no key has
    if case == "no_positive":
        y2[:] = -1
    if case == "identical_partners":
        y2 = y.clone()
    args = (y, y2)
    q, k, gates = (t.requires_grad_() for t in (q, k, gates))
    fast = simlap.simlap_loss(q, k, *args, gates, 0.2, key_labels=key_y)
    ref = simlap.simlap_loss_reference(q, k, *args, gates, 0.2, key_labels=key_y)
    assert torch.allclose(fast, ref, atol=1e-10, rtol=1e-9), (case, fast, ref)
    for a, b, name in zip(torch.autograd.grad(fast, (q, k, gates), allow_unused=True),
                          torch.autograd.grad(ref, (q, k, gates), allow_unused=True), "q k gates".split()):
        a, b = (torch.zeros_like(q if name == "q" else k if name == "k" else gates) if t is None else t for t in (a, b))
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-7), (case, name)


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
        assert (stats["gate_open"] == 16) == (not simlap.METHODS[method].filter), method
        assert model.filter.embed.weight.requires_grad == simlap.METHODS[method].filter, method
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
    m = simlap.SimLAP("resnet18", 5, small_images=True, proj_hidden=32, proj_dim=16, gate_weight=0.1)
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


def moco_model(beta=1.0, **kw):
    """A tiny simlap-moco model in eval mode (fixed BN), its momentum encoder moved away from the base encoder so
    that keys computed by the wrong encoder show."""
    torch.manual_seed(9)
    m = simlap.SimLAP("convnet", 4, proj_hidden=32, proj_dim=16, method="simlap-moco", beta=beta, **kw).eval()
    with torch.no_grad():
        for p in [*m.momentum_backbone.parameters(), *m.momentum_projector.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_moco_momentum_update_and_schedule():
    m = moco_model()
    pairs = list(zip([*m.backbone.parameters(), *m.projector.parameters()],
                     [*m.momentum_backbone.parameters(), *m.momentum_projector.parameters()]))
    # convnet: 4 convs + 4 BNs = 12 tensors; projector (erow/hydra's): 3 Linear, 2 BN, 1 LayerNorm = 12 tensors
    assert len(pairs) == 24 and all(p.shape == q.shape for p, q in pairs)
    with torch.no_grad():  # values whose update is exact in binary: 0.75 * 1 + 0.25 * 3 = 1.5
        pairs[0][0].fill_(3.0), pairs[0][1].fill_(1.0)
    before = [(p.clone(), q.clone()) for p, q in pairs]
    stats = m.momentum_backbone[1].running_mean.clone()
    m.update_momentum(0.75)
    assert (pairs[0][1] == 1.5).all()
    for (p, q), (p0, q0) in zip(pairs, before):
        assert torch.equal(p, p0) and torch.allclose(q, 0.75 * q0 + 0.25 * p0, atol=1e-7)  # θ_m <- m θ_m + (1-m) θ
    assert torch.equal(m.momentum_backbone[1].running_mean, stats)  # buffers are not averaged (MoCo v3)
    # MoCo v3's cosine schedule: m0 at step 0, 1 at the end, the mean of the two half-way
    assert train.get_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert train.get_momentum(50, 100, 0.99) == pytest.approx(0.995) and train.get_momentum(100, 100, 0.99) == 1.0
    assert train.get_momentum(25, 100, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)


def moco_reference(m, x1, x2):
    """Queries and keys computed plainly from the modules: predictor(projector(backbone)), momentum encoder."""
    q1, q2 = (m.predictor(m.projector(m.backbone(x))) for x in (x1, x2))
    with torch.no_grad():
        k1, k2 = (m.momentum_projector(m.momentum_backbone(x)) for x in (x1, x2))
    return q1, q2, k1, k2


def test_moco_loss_is_moco_v3_instance_loss_plus_the_pair_term():
    """β = 0: MoCo v3's ctr(q1, k2) + ctr(q2, k1), ctr = 2τ CE, by a per-anchor loop; β = 0.3: the pair term is
    the symmetric simlap_loss on the same queries and keys, gated by g(y, y2)."""
    torch.manual_seed(10)
    x1, x2, y = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16), torch.tensor([0, 0, 1, 1, 2, 3])
    y2 = torch.tensor([1, 2, 0, 3, 1, 0])
    tau = 0.3
    m = moco_model(beta=0.0, temperature=tau)
    q1, q2, k1, k2 = moco_reference(m, x1, x2)

    def ctr(q, k):
        terms = []
        for i in range(len(q)):
            s = torch.stack([F.cosine_similarity(q[i], k[j], dim=0) for j in range(len(k))]) / tau
            terms.append(-(s[i].exp() / s.exp().sum()).log())
        return 2 * tau * torch.stack(terms).mean()

    instance = ctr(q1, k2) + ctr(q2, k1)
    assert torch.allclose(m(x1, x2, y, y2)[0], instance, atol=1e-5)
    assert torch.allclose(simlap.moco_loss(q1, q2, k1, k2, tau), instance, atol=1e-5)
    m.beta = 0.3
    gates = m.filter(y, y2)
    pair = (simlap.simlap_loss(q1, k2, y, y2, gates, tau) + simlap.simlap_loss(q2, k1, y, y2, gates, tau)) / 2
    assert torch.allclose(m(x1, x2, y, y2)[0], (instance + 0.3 * pair) / 1.3, atol=1e-5)


def test_moco_keys_carry_no_gradient():
    """Gradients reach the base encoder, predictor and filter through the queries only: they equal those of the
    loss on keys computed apart without gradient, and the momentum encoder gets none."""
    torch.manual_seed(11)
    x1, x2, y = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16), torch.tensor([0, 0, 1, 1, 2, 3])
    y2 = torch.tensor([1, 2, 0, 3, 1, 0])
    m = moco_model()
    trained = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(m(x1, x2, y, y2)[0], trained)
    q1, q2, k1, k2 = moco_reference(m, x1, x2)
    gates = m.filter(y, y2)
    pair = (simlap.simlap_loss(q1, k2, y, y2, gates, m.temperature) + simlap.simlap_loss(q2, k1, y, y2, gates,
                                                                                         m.temperature)) / 2
    ref = torch.autograd.grad((simlap.moco_loss(q1, q2, k1, k2, m.temperature) + pair) / 2, trained)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, ref))
    assert all(g.abs().sum() > 0 for g in grads[:3])  # the first backbone layers moved
    frozen = [*m.momentum_backbone.parameters(), *m.momentum_projector.parameters()]
    assert not any(p.requires_grad for p in frozen) and not set(map(id, frozen)) & set(map(id, trained))
    with pytest.raises(RuntimeError):  # the keys are not in the graph at all
        torch.autograd.grad(simlap.moco_loss(q1, q2, k1, k2), k1)


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
    dist = simlap.class_distance(ds.attributes)  # (16, 16): 0, 1 or 2 attributes differ
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
    with torch.device("meta"):  # the authors' heads (erow/hydra vits.py); MoCo v3's frozen patch embedding
        vits = {arch: simlap.build_backbone(arch)[0] for arch in ("vit_tiny", "vit_small", "vit_base")}
    assert {a: v.encoder.layers[0].self_attention.num_heads for a, v in vits.items()} == dict(
        vit_tiny=3, vit_small=12, vit_base=12)
    assert not any(p.requires_grad for v in vits.values() for p in v.conv_proj.parameters())
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    cnn, d = simlap.build_backbone("convnet")
    assert d == 256 and sum(p.numel() for p in cnn.parameters()) == 388_896  # 3x3 convs 3-32-64-128-256, BN
    assert all(cnn.eval()(torch.randn(2, 3, s, s)).shape == (2, 256) for s in (8, 16, 32, 96))
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


# ----------------------------------------------------------------------------------------------- augmentation
def unnormalise(x):
    return x * torch.tensor(simlap.STD).view(1, 3, 1, 1) + torch.tensor(simlap.MEAN).view(1, 3, 1, 1)


def neutral_params(B, **change):
    """Parameters of the identity view (full image, no flip, no colour change), with `change` applied."""
    p = dict(w=torch.ones(B), h=torch.ones(B), cx=torch.full((B,), 0.5), cy=torch.full((B,), 0.5),
             flip=torch.zeros(B, dtype=torch.bool), brightness=torch.ones(B), contrast=torch.ones(B),
             saturation=torch.ones(B), hue=torch.zeros(B), grey=torch.zeros(B, dtype=torch.bool), sigma=torch.zeros(B))
    return {**p, **{k: torch.as_tensor(v).expand(B).clone() for k, v in change.items()}}


def test_augment_params_follow_the_paper_distributions():
    keys = simlap.sample_keys(3, 7, torch.arange(40_000))
    p = simlap.augment_params(keys, view=0)
    area, ratio = p["w"] * p["h"], p["w"] / p["h"]
    assert area.min() >= 0.2 - 1e-6 and area.max() <= 1 + 1e-6 and area.mean() == pytest.approx(0.6, abs=0.01)
    clipped = (p["w"] == 1) | (p["h"] == 1)  # too wide or tall for the image: full side, same area
    assert ((ratio >= 3 / 4 - 1e-5) & (ratio <= 4 / 3 + 1e-5) | clipped).all()
    assert area[clipped].min() >= 3 / 4 - 1e-6  # only a crop of area > 3/4 can be too wide at ratio <= 4/3
    assert (p["cx"] - p["w"] / 2 >= -1e-6).all() and (p["cx"] + p["w"] / 2 <= 1 + 1e-6).all()  # inside the image
    assert (p["cy"] - p["h"] / 2 >= -1e-6).all() and (p["cy"] + p["h"] / 2 <= 1 + 1e-6).all()
    rate = lambda m: m.float().mean().item()  # noqa: E731
    assert rate(p["flip"]) == pytest.approx(0.5, abs=0.01) and rate(p["grey"]) == pytest.approx(0.2, abs=0.01)
    jitter = p["brightness"] != 1
    assert rate(jitter) == pytest.approx(0.8, abs=0.01) and rate(p["sigma"] > 0) == pytest.approx(0.5, abs=0.01)
    for name, lo, hi in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.6, 1.4), ("hue", -0.1, 0.1)):
        v = p[name][jitter]
        assert v.min() >= lo and v.max() <= hi and v.mean() == pytest.approx((lo + hi) / 2, abs=0.01), name
    assert ((p["sigma"] == 0) | ((p["sigma"] >= 0.1) & (p["sigma"] <= 2.0))).all()
    # the two views draw independently: their flips agree half the time, not always
    assert rate(simlap.augment_params(keys, view=1)["flip"] == p["flip"]) == pytest.approx(0.5, abs=0.01)


def test_views_are_a_pure_function_of_seed_epoch_index_not_of_the_batch():
    keys = simlap.sample_keys(1, 4, torch.arange(10))
    assert torch.equal(simlap.sample_keys(1, 4, [7]), keys[7:8])  # a key depends on the sample only
    assert keys.unique().numel() == 10 and not torch.equal(simlap.sample_keys(1, 5, torch.arange(10)), keys)
    x = simlap.SyntheticShapes("test", per_class=1).images[:10]
    x1, x2 = simlap.two_views(x, keys, 64)  # 64 px: blur on
    y1, y2 = simlap.two_views(x, keys, 64)
    assert x1.shape == (10, 3, 64, 64) and torch.equal(x1, y1) and torch.equal(x2, y2) and not torch.equal(x1, x2)
    alone1, alone2 = simlap.two_views(x[7:8], keys[7:8], 64)  # one image alone gets the views it gets in a batch
    assert torch.allclose(alone1, x1[7:8], atol=1e-5) and torch.allclose(alone2, x2[7:8], atol=1e-5)
    # the loader returns the uint8 image and its index (train.py turns a batch of indices into keys)
    ds = simlap.TwoViews(simlap.SyntheticShapes("test", per_class=1), 32, seed=1)
    img, label, index = ds[(7, 4)]
    assert img.dtype == torch.uint8 and torch.equal(img, x[7]) and label == 7 and index == 7
    key = keys[7]
    # variable-size data: the loader crops each view, seeded by the key
    crops = simlap.TwoViews(simlap.SyntheticShapes("test", per_class=1), 16, seed=1, crop=True)
    torch.manual_seed(123)
    a = crops[(7, 4)][0]
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, crops[(7, 4)][0]) and not torch.equal(a[0], a[1])
    v1, v2 = simlap.two_views(a[None], key[None], 16)  # then no second crop: only flip and colour
    plain = simlap.augment(a[None, 0], simlap.augment_params(key[None], 0, scale=(1.0, 1.0)), 16)
    assert torch.allclose(v1, plain, atol=1e-6)


def test_augment_matches_closed_forms_and_torchvision():
    x = simlap.SyntheticShapes("test", per_class=1).images[:4]  # (4, 3, 32, 32) uint8
    f = x.float() / 255
    aug = lambda size=32, **change: unnormalise(simlap.augment(x, neutral_params(4, **change), size))  # noqa: E731
    assert torch.allclose(aug(), f, atol=1e-6)  # the identity view: just normalised
    # a centred crop of half the side, sampled at 16 px, hits pixel centres: exactly pixels 8..23, and flipped
    assert torch.allclose(aug(16, w=0.5, h=0.5), f[..., 8:24, 8:24], atol=1e-5)
    assert torch.allclose(aug(16, w=0.5, h=0.5, flip=True), f[..., 8:24, 8:24].flip(-1), atol=1e-5)
    assert torch.allclose(aug(16, w=0.5, h=0.5, cx=0.25, cy=0.75), f[..., 16:32, 0:16], atol=1e-5)
    F_ = torchvision.transforms.v2.functional
    for name, ref in (("brightness", F_.adjust_brightness), ("contrast", F_.adjust_contrast),
                      ("saturation", F_.adjust_saturation)):
        for factor in (0.6, 1.37):
            assert torch.allclose(aug(**{name: factor}), ref(f, factor), atol=1e-5), (name, factor)
    assert torch.allclose(aug(grey=True), F_.rgb_to_grayscale(f, 3), atol=1e-5)
    sigma = torch.tensor([0.5, 1.7, 0.0, 1.0])
    blurred = unnormalise(simlap.augment(x, neutral_params(4, sigma=sigma), 64, blur=True))
    up = torch.nn.functional.interpolate(f, size=64, mode="bilinear", align_corners=False)  # what the crop does
    for i, s in enumerate(sigma.tolist()):
        want = up[i] if s == 0 else F_.gaussian_blur(up[i], [7, 7], [s, s])  # kernel 2 * (64 // 20) + 1
        assert torch.allclose(blurred[i], want, atol=1e-5), s
    # hue: a third of a turn maps red to green and green to blue, as torchvision's HSV shift does; grey stays grey
    prim = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.5, 0.5, 0.5]]).view(3, 3, 1, 1)
    rot = torch.einsum("bij,bjhw->bihw", simlap.hue_rotation(torch.full((3,), 1 / 3)), prim)
    assert torch.allclose(rot, F_.adjust_hue(prim, 1 / 3), atol=1e-5)
    assert torch.allclose(rot[:, :, 0, 0], torch.tensor([[0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]]), atol=1e-6)


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
    if method == "simlap-moco":  # a BN-free predictor; a momentum encoder that is not the base encoder
        m.predictor = torch.nn.Linear(8, 8)
        m.momentum_backbone, m.momentum_projector = (copy.deepcopy(n).requires_grad_(False)
                                                     for n in (m.backbone, m.projector))
        torch.nn.init.normal_(m.momentum_backbone[1].weight)
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
    raw = getattr(model, "module", model)
    if raw.method == "simlap-moco":
        raw.update_momentum(0.9)
    return loss.detach()


DDP_METHODS = ("simlap", "supcon", "simclr", "hydra", "simlap-moco")


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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process(tmp_path):
    """Every loss (keys gathered with gradient, anchors local) gives the single-process update on the global batch."""
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    for method in DDP_METHODS:
        model = toy_model(method)
        loss = one_step(model, *ddp_data())
        for r in range(2):
            got = torch.load(tmp_path / f"ddp.{method}.{r}", weights_only=True)
            assert torch.allclose(got["loss"], loss, atol=1e-5), (method, got["loss"], loss)
            for name, p in model.state_dict().items():
                assert torch.allclose(got["params"][name], p, atol=1e-5), (method, name)
        assert not torch.equal(model.backbone[1].weight, toy_model().backbone[1].weight), method  # the step moved


@pytest.mark.parametrize("method", ["simlap", "simlap-moco"])
def test_resume_is_exact_and_outputs_load(tmp_path, method):
    """2 epochs straight == a process stopped mid-epoch (step 6 of 8) that exits, then the same command again.
    The interrupted run uses 2 loader workers, the others none: augmentations do not depend on workers.
    simlap-moco: the momentum encoder is in the checkpoint and resumes with the momentum of its step."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main([*TINY, "--workers", "0", "--output-dir", str(straight), "--method", method])
    r = run_train("--output-dir", str(resumed), "--stop-after", "6", "--method", method, workers=2)
    assert r.returncode == 0 and "stopped after 6 steps at step 6" in r.stdout, r.stderr
    stopped = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert stopped["moco_m"] == (pytest.approx(train.get_momentum(6, 8, 0.99)) if method == "simlap-moco" else None)
    train.main([*TINY, "--workers", "0", "--output-dir", str(resumed), "--stop-after", "6", "--method", method])
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (straight, resumed))
    assert a["step"] == b["step"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    if method == "simlap-moco":  # the momentum encoder was saved, and it moved, but not onto the base encoder
        moved = a["model"]["momentum_backbone.0.weight"]
        assert not torch.equal(moved, a["model"]["backbone.0.weight"])
        assert not torch.equal(moved, stopped["model"]["momentum_backbone.0.weight"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])  # AdamW's
    # the outputs a user takes away
    assert {"checkpoint.pt", "backbone.pt", "args.json", "log.jsonl"} <= set(os.listdir(straight))
    net, _ = simlap.build_backbone("convnet")  # the demo's arch
    net.load_state_dict(torch.load(straight / "backbone.pt", weights_only=True), strict=True)
    backbone, _, _ = ev.load_weights(checkpoint=str(straight / "checkpoint.pt"))  # what eval.py evaluates
    for weights in (net.state_dict(), backbone.state_dict()):
        assert torch.equal(weights["0.weight"], a["model"]["backbone.0.weight"])  # the base encoder
    args = json.loads((straight / "args.json").read_text())
    assert args["lr"] == pytest.approx(5e-4 * 32 / 256) and args["per_gpu_batch"] == 32  # AdamW, Table 5a
    epochs = [r["epoch"] for r in map(json.loads, (straight / "log.jsonl").read_text().splitlines()) if "img_per_s" in r]
    assert epochs[-1] == 2



def same_run(a, b, atol=0.0, rtol=0.0):
    """Two checkpoints at the same step with equal weights, buffers and optimizer state (exactly, by default)."""
    assert a["step"] == b["step"]
    close = lambda x, y: torch.equal(x, y) if atol == rtol == 0 else torch.allclose(x, y, rtol, atol)  # noqa: E731
    for key in a["model"]:
        assert close(a["model"][key].double(), b["model"][key].double()), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(close(sa[i][k].double(), sb[i][k].double()) for i in sa for k in sa[i])


# ---------------------------------------------------------------- precision, torch.compile, several nodes, preemption
def test_precision_is_chosen_per_device_and_said(monkeypatch):
    """auto: bf16 where the GPU computes in it natively (compute capability 8+), fp16 with a gradient scaler on older
    GPUs (where torch would emulate bf16: is_bf16_supported() is True there, hence including_emulation=False), fp32
    on the CPU. The kNN monitor's features take the same dtype (simlap.autocast_dtype)."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda:0")
    assert train.choose_precision("auto", cpu) == (None, False, "fp32 (auto: on the CPU)")
    assert train.choose_precision("bf16", cpu) == (torch.bfloat16, False, "bf16 (--precision bf16)")
    assert train.choose_precision("fp16", cpu)[:2] == (torch.float16, True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert simlap.autocast_dtype(gpu) == torch.float16
    assert train.choose_precision("auto", gpu) == (
        torch.float16, True, "fp16 with a gradient scaler (auto: the Tesla V100 has no native bfloat16)")
    assert "emulates bfloat16" in train.choose_precision("bf16", gpu)[2]
    assert train.choose_precision("fp32", gpu) == (None, False, "fp32 (--precision fp32)")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert simlap.autocast_dtype(gpu) == torch.bfloat16
    assert train.choose_precision("auto", gpu) == (
        torch.bfloat16, False, "bf16 (auto: the NVIDIA A100 computes in bfloat16)")


def test_lars_under_a_gradient_scaler_unscales_and_skips_without_touching_its_state():
    """fp16 with LARS: torch.amp.GradScaler hands LARS the scale and its inf flag (no host sync). A finite step equals
    plain LARS on the unscaled gradient; a step with an inf gradient leaves weights and momentum as they were."""
    torch.manual_seed(11)
    w0, x = torch.randn(4, 3), torch.randn(5, 4)
    w, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt, ref_opt = simlap.LARS([w], lr=0.5, weight_decay=1e-2), simlap.LARS([ref], lr=0.5, weight_decay=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for bad in (False, False, True):
        loss = (x @ w).square().sum() * (float("inf") if bad else 1.0)
        scaler.scale(loss).backward()
        before = w.detach().clone(), opt.state[w].get("momentum_buffer", torch.zeros(())).clone()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if not bad:
            (x @ ref).square().sum().backward()
            ref_opt.step()
            ref_opt.zero_grad()
            assert torch.allclose(w, ref, atol=1e-6) and not torch.equal(w, before[0])
    assert torch.equal(w, before[0]) and torch.equal(opt.state[w]["momentum_buffer"], before[1])
    assert scaler.get_scale() == 2.0 ** 9  # the skip backed the scale off


SMALL = ["--proj-hidden", "64", "--proj-dim", "32", "--knn-every", "0", "--log-every", "2", "--workers", "0",
         "--epochs", "1"]
AMP_RUNS = {"bf16": ["--arch", "vit_tiny", "--image-size", "32", "--synthetic-per-class", "1", "--batch-size", "4"],
            "fp16": ["--image-size", "8", "--synthetic-per-class", "2", "--batch-size", "8"]}  # both 4 steps


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_the_cpu_resumes_exactly(precision, tmp_path, monkeypatch):
    """--precision bf16 (on vit_tiny at 32 px, whose patch embedding stays frozen) and fp16 with its gradient scaler,
    on the CPU: a run stopped at step 2 and resumed ends bit-identical to one run straight through; the network ran
    under autocast in that dtype while the losses stayed fp32. fp16 starts from an overflowing loss scale (2^100,
    backed off to 2^10 at the first overflow): its step 1 is skipped, which is no non-finite-loss stop and no
    update (AdamW counts 1 step at step 2); the scale and its growth counter come back from the checkpoint (without
    them the resumed run would skip again)."""
    seen = []

    def spy(*args, **kwargs):
        loss = simlap_loss(*args, **kwargs)
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), loss.dtype))
        return loss

    simlap_loss = simlap.simlap_loss
    monkeypatch.setattr(simlap, "simlap_loss", spy)
    if precision == "fp16":
        monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(
            torch.amp.GradScaler, init_scale=2.0 ** 100, backoff_factor=2.0 ** -90))
    argv = [*SMALL, *AMP_RUNS[precision], "--precision", precision]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main([*argv, "--output-dir", str(straight)])
    train.main([*argv, "--output-dir", str(resumed), "--stop-after", "2"])
    stopped = torch.load(resumed / "checkpoint.pt", weights_only=True)
    train.main([*argv, "--output-dir", str(resumed)])
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (straight, resumed))
    same_run(a, b)
    assert a["step"] == 4 and set(seen) == {(True, {"bf16": torch.bfloat16, "fp16": torch.float16}[precision],
                                              torch.float32)}
    if precision == "bf16":  # MoCo v3's frozen random patch embedding (the other weights moved)
        assert torch.equal(stopped["model"]["backbone.conv_proj.weight"], a["model"]["backbone.conv_proj.weight"])
        assert not torch.equal(stopped["model"]["backbone.class_token"], a["model"]["backbone.class_token"])
        assert a["scaler"] is None
    else:
        assert (stopped["scaler"]["scale"], stopped["scaler"]["_growth_tracker"]) == (2.0 ** 10, 1)
        assert {int(s["step"]) for s in stopped["optimizer"]["state"].values()} == {1}
        assert (a["scaler"]["scale"], a["scaler"]["_growth_tracker"]) == (2.0 ** 10, 3) and a["scaler"] == b["scaler"]


COMPILE_BACKEND = os.environ.get("SIMLAP_TEST_COMPILE_BACKEND", "aot_eager")


def initial_weights(argv):
    """The model train.main(argv) starts from: its seed, then its data and constructor, in main's order."""
    args = train.parse_args(argv)
    torch.manual_seed(args.seed)
    run = train.load_data(args)
    train.build_model(args, run, torch.device("cpu"), None)
    return run.model.state_dict()


def test_compiled_training_equals_eager_and_resumes(tmp_path):
    """train.py --compile trains as eager does: after 4 steps of simlap and of simlap-moco every tensor of the model
    is within 0.1 % of how far training moved it (+ 1e-6 of its norm, at least 1e-6: rounding) of the eager run's,
    and so is a compiled run stopped at step 2 and resumed, of the uninterrupted compiled run's. The hand-written
    autograd loss (_PairInfoNCE) compiles into a single graph (fullgraph) with the eager value and gradients.
    LARS, not AdamW: AdamW divides each gradient element by its own RMS, which turns the rounding noise of a gradient
    that is zero in exact arithmetic (a bias before BatchNorm) into whole +-lr steps that change with any reordering
    of float operations; within a tensor, LARS's step is linear in the gradient. The backend is aot_eager
    (torch.compile's tracing and autograd, without code generation): inductor's C++ code generation takes minutes on
    2 cores (benchmarks/README.md); SIMLAP_TEST_COMPILE_BACKEND=inductor runs this test with it."""
    import torch._dynamo
    argv = [*TINY, "--workers", "0", "--epochs", "1", "--optimizer", "lars", "--base-lr", "2"]
    ckpt = lambda name: torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"]  # noqa: E731

    def close(a, b, init):
        for key, x in a.items():
            if x.is_floating_point():
                assert (x - b[key]).norm() <= 1e-3 * (x - init[key]).norm() + 1e-6 * max(x.norm(), 1), key

    captured = torch._dynamo.utils.counters["stats"]["calls_captured"]
    for method in ("simlap", "simlap-moco"):
        for name, extra in (("eager", []), ("compiled", ["--compile", COMPILE_BACKEND])):
            train.main([*argv, "--method", method, "--output-dir", str(tmp_path / f"{method}-{name}"), *extra])
        close(ckpt(f"{method}-eager"), ckpt(f"{method}-compiled"), initial_weights([*argv, "--method", method]))
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] > captured  # compiled, not run eagerly
    resumed = ["--compile", COMPILE_BACKEND, "--output-dir", str(tmp_path / "resumed"), "--stop-after", "2"]
    train.main([*argv, *resumed])
    train.main([*argv, *resumed])
    close(ckpt("simlap-compiled"), ckpt("resumed"), initial_weights(argv))
    g = torch.Generator().manual_seed(12)
    q, k, gates = (torch.randn(6, 8, generator=g, requires_grad=True) for _ in range(3))
    y, y2 = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([1, 1, 0, 2, 2, 0])
    results = []
    for loss_fn in (simlap.simlap_loss, torch.compile(simlap.simlap_loss, fullgraph=True, backend=COMPILE_BACKEND)):
        loss = loss_fn(q, k, y, y2, gates.sigmoid())
        results.append([loss.detach(), *torch.autograd.grad(loss, (q, k, gates))])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(*results))


@pytest.fixture
def torchrun():
    """-> launch(*torchrun flags, out=, epochs=): train.py (TINY) under a torchrun launcher, its output in a pipe. One
    thread per process: torchrun sets that for several processes per node, and it must hold for one as well, so that
    every launch computes bit-identically. Launchers still running at the end get SIGTERM (passed on to their
    workers, which checkpoint and stop), then SIGKILL."""
    started = []

    def launch(*flags, out, epochs):
        cmd = [sys.executable, "-m", "torch.distributed.run", *flags, os.path.join(HERE, "train.py"), *TINY,
               "--workers", "0", "--epochs", str(epochs), "--output-dir", str(out)]
        started.append(subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"}))
        return started[-1]

    yield launch
    for p in started:
        if p.poll() is None:
            p.terminate()
            try:
                p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()


def two_nodes(launch, out0, out1, epochs):
    """Two launchers as two nodes of one process each, meeting at a c10d rendezvous on this machine; `out0` and
    `out1` are each node's --output-dir (the same folder: a shared file system)."""
    endpoint = f"127.0.0.1:{free_port()}"
    return [launch("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                   out=out, epochs=epochs) for out in (out0, out1)]


def finished(procs, timeout=300):
    """-> the exit codes and outputs of the launchers, once they have ended."""
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outs


def wait_for_training(out, procs, timeout=240):
    """Until `out`/log.jsonl has its first line (training runs, past its start and its signal handlers)."""
    deadline = time.time() + timeout
    while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text().strip()):
        assert all(p.poll() is None for p in procs) and time.time() < deadline, [p.communicate() for p in procs]
        time.sleep(0.05)


def test_two_nodes_equal_one_stop_together_on_a_signal_and_refuse_unshared_checkpoints(tmp_path, torchrun):
    """torchrun as 2 nodes x 1 process (c10d rendezvous, gloo) trains as `--standalone --nproc-per-node 2` does,
    bit for bit, also when one node's launcher gets SIGTERM mid-run (as a scheduler would send it): its worker
    alone sees the signal, yet both ranks stop at one step (exit code 3), rank 0 checkpoints, and the same commands
    continue to the same end. Started with a checkpoint that one node sees and the other does not, both refuse, in
    one line (from rank 0), exit code 2, writing nothing."""
    one_node, shared, other = tmp_path / "one-node", tmp_path / "shared", tmp_path / "other-disk"
    epochs, total = 3, 12
    codes, outs = finished([torchrun("--standalone", "--nproc-per-node", "2", out=one_node, epochs=epochs)])
    assert codes == [0], outs
    nodes = two_nodes(torchrun, shared, shared, epochs)
    wait_for_training(shared, nodes)
    nodes[1].send_signal(signal.SIGTERM)  # not to the first launcher, which hosts the rendezvous
    _, outs = finished(nodes)
    stopped = torch.load(shared / "checkpoint.pt", weights_only=True)
    assert 2 <= stopped["step"] < total, outs
    said = (f"train.py: stopped by SIGTERM at step {stopped['step']} of {total}, {shared / 'checkpoint.pt'} "
            "written; run the same command again to continue (exit code 3)")
    assert sum(said in out for out in outs) == 1, outs  # rank 0, on either node
    assert "exitcode: 3" in outs[0], outs[0]  # the worker that got no signal stopped too, with the same code
    before, port = (shared / "checkpoint.pt").read_bytes(), free_port()
    ranks = [subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *TINY, "--workers", "0", "--epochs",
                               str(epochs), "--output-dir", str(out)], cwd=HERE, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2",
                                                           "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                                           "MASTER_PORT": str(port)})
             for r, out in enumerate((shared, other))]  # each node's worker, as torchrun starts it
    errs = [p.communicate(timeout=300)[1] for p in ranks]
    assert [p.returncode for p in ranks] == [2, 2] and errs == [  # said once, by rank 0
        f"train.py: error: the ranks would start from different steps: rank 0 on {socket.gethostname()} at step "
        f"{stopped['step']} ({shared / 'checkpoint.pt'}); rank 1 on {socket.gethostname()} at step 0 (no "
        f"checkpoint). --output-dir {shared} must be one folder that every node sees (a shared file system)\n", ""]
    assert (shared / "checkpoint.pt").read_bytes() == before and not other.exists()
    codes, outs = finished(two_nodes(torchrun, shared, shared, epochs))
    assert codes == [0, 0], outs
    same_run(torch.load(one_node / "checkpoint.pt", weights_only=True),
             torch.load(shared / "checkpoint.pt", weights_only=True))


def test_a_signal_stops_a_run_at_a_checkpoint_that_resumes_exactly(tmp_path):
    """SIGUSR1 to a running train.py's whole process group (its 2 loader workers too, as torchrun and SLURM send
    it): the step in progress finishes, the checkpoint is written, one line says so, exit code 3; the same command
    then ends bit-identical to a run that was never stopped."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    argv = [*TINY, "--epochs", "3"]
    train.main([*argv, "--workers", "0", "--output-dir", str(straight)])
    with open(tmp_path / "err", "w") as err:
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *argv, "--workers", "2",
                              "--output-dir", str(stopped)], cwd=HERE, stdout=subprocess.DEVNULL, stderr=err,
                             start_new_session=True)
    try:
        wait_for_training(stopped, [p])
        os.killpg(p.pid, signal.SIGUSR1)
        assert p.wait(timeout=120) == 3, (tmp_path / "err").read_text()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    step = torch.load(stopped / "checkpoint.pt", weights_only=True)["step"]
    last = (tmp_path / "err").read_text().strip().splitlines()[-1]
    assert last == (f"train.py: stopped by SIGUSR1 at step {step} of 12, {stopped / 'checkpoint.pt'} written; run "
                    "the same command again to continue (exit code 3)") and 2 <= step < 12
    assert json.loads((stopped / "log.jsonl").read_text().splitlines()[-1]) == {"step": step, "stopped_by": "SIGUSR1"}
    train.main([*argv, "--workers", "0", "--output-dir", str(stopped)])
    same_run(*(torch.load(d / "checkpoint.pt", weights_only=True) for d in (straight, stopped)))


def test_lr_schedule():
    peak, total, warm = 1.0, 100, 10
    lrs = [train.get_lr(s, total, warm, peak) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90))) and lrs[-1] < 1e-3


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    simlap.save_atomic({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkp")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        simlap.save_atomic({"step": 2}, path)
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
        "train.py: error: unknown --arch 'resnet7'; choose one of convnet, resnet18, resnet50, vit_tiny, vit_small, "
        "vit_base"]
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
             "momentum without moco": ["--method", "hydra", "--moco-m", "0.9"],
             "negative beta": ["--method", "hydra", "--beta", "-1"],
             "unwritable output": ["--output-dir", str(afile / "sub")],
             "repeated class id": ["--classes", "1,1,2"],
             "class id out of range": ["--classes", "3,16"],
             "missing fashionmnist": ["--dataset", "fashionmnist", "--data", str(tmp_path / "nope")],
             "other classes": ["--output-dir", str(good), "--classes", ",".join(map(str, range(1, 17)))]}
    for name, args in cases.items():
        with pytest.raises(simlap.UserError) as e:
            train.main([*TINY, "--workers", "0", "--output-dir", str(tmp_path / name), *args])
        assert "\n" not in str(e.value) and len(str(e.value)) > 20, name
    assert {f: (good / f).read_bytes() for f in os.listdir(good)} == before  # nothing overwritten


def test_method_flags_resolve_and_name_the_output_dir():
    a = train.parse_args([])
    assert (a.method, a.pairs, a.beta, a.output_dir) == ("simlap", "arbitrary", None, "runs/synthetic-convnet-simlap")
    a = train.parse_args(["--method", "hydra", "--pairs", "distinct"])
    assert (a.pairs, a.beta, a.output_dir) == ("distinct", 1.0, "runs/synthetic-convnet-hydra-distinct")
    a = train.parse_args(["--method", "supcon"])  # draws no partners: no pairs recorded
    assert (a.pairs, a.beta, a.output_dir) == (None, None, "runs/synthetic-convnet-supcon")
    a = train.parse_args(["--method", "simlap-moco"])  # the demo: AdamW, and heads 2048 wide (printed as departing)
    assert (a.pairs, a.beta, a.moco_m, a.temperature, a.proj_hidden, a.demo_departures["proj_hidden"]) == (
        "arbitrary", 1.0, 0.99, 0.2, 2048, 2048) and a.output_dir == "runs/synthetic-convnet-simlap-moco"
    a = train.parse_args(["--method", "simlap-moco", "--dataset", "cifar10"])  # Table 5a's Hydra-MoCo column
    assert (a.optimizer, a.base_lr, a.weight_decay, a.proj_hidden, a.temperature) == ("lars", 0.3, 1.5e-6, 4096, 0.2)
    a = train.parse_args(["--dataset", "cifar10"])  # Table 5a's SimLAP column
    assert (a.base_lr, a.weight_decay, a.proj_hidden, a.temperature, a.moco_m) == (0.05, 1e-4, 2048, 0.1, None)


def test_synthetic_test_split_is_the_same_through_every_loading_path(tmp_path):
    """train.py's kNN monitor, eval.py on a checkpoint (which names --synthetic-per-class) and on a bare backbone.pt
    (which names nothing), and the class itself all give one test split: a quarter of the training images."""
    weights = tmp_path / "backbone.pt"
    weights.write_bytes(b"")
    args = ev.parse_args(["--backbone", str(weights), "--device", "cpu"])
    net = simlap.build_backbone("convnet")[0]
    from_checkpoint = ev.load_eval_data(args, net, {"arch": "convnet", "small_images": True, "image_size": 32,
                                                    "dataset": "synthetic", "synthetic_per_class": 500})[1]["test"]
    from_backbone = ev.load_eval_data(args, net, {"arch": "convnet", "small_images": True, "image_size": None})[1]
    monitor = train.load_data(train.parse_args(["--output-dir", str(tmp_path / "run")])).test_set
    direct = simlap.SyntheticShapes("test")
    assert len(direct) == 16 * simlap.SyntheticShapes.test_per_class(500) == 16 * 125
    for ds in (from_checkpoint, from_backbone["test"], monitor):
        assert torch.equal(ds.images, direct.images) and torch.equal(ds.targets, direct.targets)
    assert len(from_backbone["train"]) == 16 * 500


def test_training_on_some_synthetic_classes_is_evaluated_on_them(tmp_path):
    """--classes (transfer to held-out combinations): train and eval.py must both use only those."""
    out = tmp_path / "sub"
    train.main([*TINY, "--workers", "0", "--output-dir", str(out), "--stop-after", "1", "--classes", "5,2,9",
                "--batch-size", "8"])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["args"]["classes"] == [5, 2, 9] and ckpt["args"]["num_classes"] == 3
    assert ckpt["model"]["filter.embed.weight"].shape[0] == 3
    res = ev.main(["--checkpoint", str(out / "checkpoint.pt"), *EVAL_TINY, "--synthetic-per-class", "4", "--k", "5"])
    assert res["num_train"] == 3 * 4 and res["num_test"] == 3 * 10  # per class: 4 train, at least 10 test
    # classes 5 = (1, 1), 2 = (0, 2), 9 = (2, 1): 5 and 9 share colour 1, 2 shares nothing with either
    _, model, _ = ev.load_weights(str(out / "checkpoint.pt"))
    sharp = F.normalize((analyses.class_gates(model.filter) > 0.5).float(), dim=1)
    overlap = sharp @ sharp.T
    assert res["gates"]["overlap_shared_attribute"] == pytest.approx(overlap[0, 2].item(), abs=1e-6)
    assert res["gates"]["overlap_no_shared_attribute"] == pytest.approx(
        (overlap[0, 1] + overlap[1, 2]).item() / 2, abs=1e-6)


# ----------------------------------------------------------------------------------------------- Fashion-MNIST
def write_idx(path, t):
    """An idx file as LeCun's MNIST page describes it, written here independently of simlap.read_idx: bytes 0, 0,
    0x08 (uint8), ndim, then each dimension as a big-endian 32-bit integer, then the data; gzipped if path ends .gz."""
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(struct.pack(">4B", 0, 0, 8, t.ndim) + struct.pack(f">{t.ndim}I", *t.shape) + t.numpy().tobytes())


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """A tiny fake Fashion-MNIST in the distribution package's layout (the four .gz files in the folder itself): 4
    train and 2 test images per class, shuffled -> (folder, {"train"/"test": (images (N, 28, 28) uint8, labels)})."""
    root, gen, splits = tmp_path_factory.mktemp("fashion"), torch.Generator().manual_seed(0), {}
    for split, name, n in (("train", "train", 4), ("test", "t10k", 2)):
        labels = torch.arange(10).repeat(n)[torch.randperm(10 * n, generator=gen)].to(torch.uint8)
        images = torch.randint(0, 256, (10 * n, 28, 28), generator=gen, dtype=torch.uint8)
        write_idx(str(root / f"{name}-images-idx3-ubyte.gz"), images)
        write_idx(str(root / f"{name}-labels-idx1-ubyte.gz"), labels)
        splits[split] = images, labels.long()
    return root, splits


def test_fashionmnist_reads_its_idx_files_in_either_layout(tmp_path, fashion):
    root, splits = fashion
    for split, (images, labels) in splits.items():
        ds = simlap.build_dataset("fashionmnist", str(root), split)
        assert torch.equal(ds.data, images) and torch.equal(simlap.targets_of(ds), labels)
        img, label = ds[3]  # grey copied to 3 channels, as the networks and the augmentation expect
        assert img.shape == (3, 28, 28) and img.dtype == torch.uint8 and label == labels[3]
        assert all(torch.equal(channel, images[3]) for channel in img)
    assert simlap.build_dataset("fashionmnist", str(root), "train").classes == [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    x, _ = simlap.build_dataset("fashionmnist", str(root), "test", simlap.eval_transform(32))[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32  # 28 px shown as 32 px
    # torchvision's layout (where --download puts them), uncompressed: read the same, and as torchvision reads it
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name, split in (("train", "train"), ("t10k", "test")):
        write_idx(str(raw / f"{name}-images-idx3-ubyte"), splits[split][0])
        write_idx(str(raw / f"{name}-labels-idx1-ubyte"), splits[split][1].to(torch.uint8))
    ours, theirs = simlap.build_dataset("fashionmnist", str(tmp_path / "tv"), "train"), \
        torchvision.datasets.FashionMNIST(str(tmp_path / "tv"), train=True)
    assert torch.equal(ours.data, theirs.data) and torch.equal(ours.targets, theirs.targets)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*--download"):
        simlap.build_dataset("fashionmnist", str(tmp_path / "nope"), "train")
    (tmp_path / "bad").mkdir()
    for f in os.listdir(root):
        (tmp_path / "bad" / f).write_bytes((root / f).read_bytes()[:-5 if "t10k-images" in f else None])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):  # a truncated file is named, not half-read
        simlap.build_dataset("fashionmnist", str(tmp_path / "bad"), "test")


def test_class_subset_relabels_in_the_given_order_and_class_distances(fashion):
    root, splits = fashion
    images, labels = splits["train"]
    sub = simlap.build_dataset("fashionmnist", str(root), "train", classes=[9, 0, 6])
    keep = [i for i, label in enumerate(labels.tolist()) if label in (9, 0, 6)]  # index order
    assert len(sub) == 12 and sub.classes == ["Ankle boot", "T-shirt/top", "Shirt"] and simlap.num_classes_of(sub) == 3
    assert simlap.targets_of(sub).tolist() == [[9, 0, 6].index(labels[i]) for i in keep]
    assert all(torch.equal(sub[k][0][0], images[i]) and sub[k][1] == [9, 0, 6].index(labels[i])
               for k, i in enumerate(keep))
    again = simlap.build_dataset("fashionmnist", str(root), "train", classes=[9, 0, 6])
    other = simlap.build_dataset("fashionmnist", str(root), "train", classes=[0, 9, 6])
    assert simlap.fingerprint(sub) == simlap.fingerprint(again) != simlap.fingerprint(other)
    with pytest.raises(ValueError, match="from 0 to 9"):
        simlap.build_dataset("fashionmnist", str(root), "train", classes=[3, 10])
    # the built-in distance: 0 same class, 1 same natural group, 2 otherwise
    tops, footwear = {0, 2, 4, 6}, {5, 7, 9}
    group = lambda c: "tops" if c in tops else "footwear" if c in footwear else c  # noqa: E731
    expected = torch.tensor([[0 if i == j else 1 if group(i) == group(j) else 2 for j in range(10)] for i in range(10)])
    assert torch.equal(simlap.class_distance(simlap.class_attributes("fashionmnist")), expected.float())
    assert torch.equal(simlap.class_distance(simlap.class_attributes("fashionmnist", [9, 0, 6])),
                       torch.tensor([[0., 2, 2], [2, 0, 1], [2, 1, 0]]))
    # on the synthetic shapes it is the number of attributes (shape, colour) = divmod(id, 4) two classes differ in
    differ = torch.tensor([[sum(a != b for a, b in zip(divmod(i, 4), divmod(j, 4))) for j in range(16)]
                           for i in range(16)])
    assert torch.equal(simlap.class_distance(simlap.class_attributes("synthetic")), differ.float())
    assert simlap.class_attributes("cifar10") is None
    assert simlap.class_ids("9,0,6") == [9, 0, 6]
    for bad in ("1", "1,1", "a,b", "-1,2", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            simlap.class_ids(bad)


def test_training_on_some_fashionmnist_classes_and_evaluating_the_others(tmp_path, fashion, monkeypatch):
    """train.py --classes on Fashion-MNIST with partners from the nearest class (Fig. 8), then eval.py on the trained
    classes (the default) and on the held-out ones (--classes)."""
    root, splits = fashion
    drawn, sample = [], simlap.sample_partners
    spy = lambda y, *a, **k: drawn.append((y, sample(y, *a, **k))) or drawn[-1][1]  # noqa: E731
    monkeypatch.setattr(simlap, "sample_partners", spy)
    out = tmp_path / "run"
    flags = [*TINY, "--workers", "0", "--dataset", "fashionmnist", "--data", str(root), "--batch-size", "24",
             "--output-dir", str(out)]
    train.main([*flags, "--classes", "0,1,3,5,6,9", "--pairs", "nearest", "--stop-after", "1"])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["args"]["classes"] == [0, 1, 3, 5, 6, 9] and ckpt["args"]["num_classes"] == 6
    (y, y2), = drawn  # one step, the whole training set: 4 images of each of the 6 classes, relabelled 0..5
    assert torch.equal(torch.bincount(y), torch.full((6,), 4))
    # t-shirt/top (0) <-> shirt (4), sandal (3) <-> ankle boot (5); trouser (1) and dress (2) have no relative
    partner = {0: {4}, 4: {0}, 3: {5}, 5: {3}, 1: {0, 2, 3, 4, 5}, 2: {0, 1, 3, 4, 5}}
    assert all(b in partner[a] for a, b in zip(y.tolist(), y2.tolist()))
    with pytest.raises(simlap.UserError, match="from 0 to 9"):
        train.main([*flags, "--classes", "3,10", "--output-dir", str(tmp_path / "x")])
    res = ev.main(["--checkpoint", str(out / "checkpoint.pt"), "--workers", "0", "--device", "cpu", "--k", "5",
                   "--probe-iters", "5", "--output-dir", str(tmp_path / "seen")])
    assert (res["dataset"], res["num_train"], res["num_test"], res["image_size"]) == ("fashionmnist", 24, 12, 8)
    _, model, _ = ev.load_weights(str(out / "checkpoint.pt"))
    sharp = F.normalize((analyses.class_gates(model.filter) > 0.5).float(), dim=1)
    overlap = sharp @ sharp.T  # the natural groups: pairs (0, 4) and (3, 5) share one, the other 13 pairs none
    same = torch.zeros(6, 6, dtype=torch.bool)
    same[0, 4] = same[4, 0] = same[3, 5] = same[5, 3] = True
    assert res["gates"]["overlap_shared_attribute"] == pytest.approx(overlap[same].mean().item(), abs=1e-6)
    none = ~same & ~torch.eye(6, dtype=torch.bool)
    assert res["gates"]["overlap_no_shared_attribute"] == pytest.approx(overlap[none].mean().item(), abs=1e-6)
    unseen = ev.main(["--checkpoint", str(out / "checkpoint.pt"), "--workers", "0", "--device", "cpu", "--k", "5",
                      "--probe-iters", "5", "--classes", "2,4,7,8", "--output-dir", str(tmp_path / "unseen")])
    assert (unseen["num_train"], unseen["num_test"]) == (16, 8)


# ----------------------------------------------------------------------------------------------- eval.py
TRAIN_ARGS = {"arch": "resnet18", "dataset": "synthetic", "data": None, "image_size": 16, "num_classes": 16,
              "proj_dim": 32, "proj_hidden": 64, "small_images": True, "method": "simlap"}
EVAL_FIGURES = ["--synthetic-per-class", "2", "--image-size", "16", "--batch-size", "64", "--workers", "0",
                "--probe-iters", "20", "--device", "cpu", "--clam-views", "2"]
EVAL_TINY = [*EVAL_FIGURES[:-2], "--no-figures"]  # numbers only


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny untrained checkpoint.pt and backbone.pt in train.py's format."""
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    a = TRAIN_ARGS
    model = simlap.SimLAP(a["arch"], a["num_classes"], small_images=a["small_images"], image_size=a["image_size"],
                          proj_hidden=a["proj_hidden"], proj_dim=a["proj_dim"])
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



def newton_logistic(x, y, C, wd, steps=30):
    """An independent solver of linear_probe's objective: Newton's method in float64 on (N, F) standardised features,
    the Hessian by autograd, its pseudo-inverse (the bias may shift freely: the Hessian is singular there)
    -> (W (C, F), b (C,), objective, Hessian at the optimum)."""
    x = ((x - x.mean(0)) / x.std(0)).double()
    F_ = x.shape[1]

    def f(theta):
        W, b = theta[:C * F_].view(C, F_), theta[C * F_:]
        return torch.nn.functional.cross_entropy(x @ W.T + b, y) + wd / 2 * W.square().sum()

    theta = torch.zeros(C * F_ + C, dtype=torch.float64)
    for _ in range(steps):
        g = torch.autograd.functional.jacobian(f, theta)
        H = torch.autograd.functional.hessian(f, theta)
        theta = theta - torch.linalg.pinv(H, hermitian=True) @ g
    assert torch.autograd.functional.jacobian(f, theta).abs().max() < 1e-12  # at the optimum, to rounding
    return theta[:C * F_].view(C, F_), theta[C * F_:], f(theta).item(), H


def test_linear_probe_stops_at_the_optimum():
    """The probe runs until its gradient's largest entry is below PROBE_TOL: its objective is then within the bound
    that tolerance gives of the optimum found by an independent Newton solver (f - f* <= P tol^2 / (2 lambda_min),
    lambda_min the Hessian's smallest non-zero eigenvalue), and its accuracies are the optimum's. A capped run that
    stops short says so."""
    g = torch.Generator().manual_seed(0)
    C, F_, wd = 3, 6, 1e-3
    y, y_test = torch.randint(C, (300,), generator=g), torch.randint(C, (300,), generator=g)
    centres = torch.randn(C, F_, generator=g)
    x, x_test = (centres[t] + 1.5 * torch.randn(len(t), F_, generator=g) + 3 for t in (y, y_test))
    W, b, f_star, H = newton_logistic(x, y, C, wd)
    eig = torch.linalg.eigvalsh(H)
    bound = len(eig) * ev.PROBE_TOL ** 2 / (2 * eig[eig > 1e-9].min().item())
    res = ev.linear_probe(x, y, x_test, y_test, weight_decay=wd)
    assert res["converged"] and res["grad_max"] <= ev.PROBE_TOL and 0 < res["iters"] < ev.PROBE_ITERS
    assert -1e-12 <= res["objective"] - f_star <= bound
    mean, std = x.mean(0), x.std(0)
    top1 = lambda a, t: 100 * (((a - mean) / std).double() @ W.T + b).argmax(1).eq(t).float().mean().item()  # noqa
    assert (res["train_top1"], res["test_top1"]) == (top1(x, y), top1(x_test, y_test))
    short = ev.linear_probe(x, y, x_test, y_test, weight_decay=wd, iters=2)
    assert not short["converged"] and short["iters"] == 2 and short["objective"] - f_star > bound


PROBE_THREADS = """
import json, sys, torch
sys.path.insert(0, sys.argv[2])
import eval as ev
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
y, y_test = torch.randint(10, (1000,), generator=g), torch.randint(10, (1000,), generator=g)
centres = torch.randn(10, 32, generator=g)
x, x_test = (centres[t] + 2 * torch.randn(len(t), 32, generator=g) for t in (y, y_test))
print(json.dumps({k: v for k, v in ev.linear_probe(x, y, x_test, y_test, weight_decay=1e-4).items() if k != "weights"}))
"""


def test_linear_probe_does_not_depend_on_the_thread_count():
    """Run to the optimum, the probe gives the same accuracies with 1 and 2 threads (each in its own process, since
    the thread count is set once per process)."""
    runs = [json.loads(subprocess.run([sys.executable, "-c", PROBE_THREADS, str(n), HERE], capture_output=True,
                                      text=True, check=True, timeout=300).stdout) for n in (1, 2)]
    assert all(r["converged"] for r in runs)
    assert (runs[0]["train_top1"], runs[0]["test_top1"]) == (runs[1]["train_top1"], runs[1]["test_top1"])
    assert runs[0]["objective"] == pytest.approx(runs[1]["objective"], abs=1e-9)


# ----------------------------------------------------------------------------------------------- collapse
def test_eval_spectrum_and_effective_rank():
    g = torch.Generator().manual_seed(0)
    N, D, r = 200, 32, 5
    x = torch.randn(N, r, generator=g, dtype=torch.float64) @ torch.randn(r, D, generator=g, dtype=torch.float64)
    s = analyses.singular_values(x)
    assert s.shape == (D,) and torch.all(s[:-1] >= s[1:])
    assert int((s > 1e-9 * s[0]).sum()) == r
    # flat spectrum: r orthonormal centred directions of equal energy -> effective rank exactly r
    u = torch.randn(N, r, generator=g, dtype=torch.float64)
    u = torch.linalg.qr(u - u.mean(0)).Q  # centred columns stay centred
    v = torch.linalg.qr(torch.randn(D, r, generator=g, dtype=torch.float64)).Q
    s = analyses.singular_values(3 * u @ v.T)
    assert torch.allclose(s[:r], torch.full((r,), 3.0, dtype=torch.float64))
    assert abs(analyses.effective_rank(s) - r) < 1e-6
    assert analyses.effective_rank(torch.tensor([2.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert 1 < analyses.effective_rank(torch.tensor([8.0, 4, 2, 1, 0.5])) < 4  # decaying: well below 5


# ----------------------------------------------------------------------------------------------- similarity
def test_eval_similarity_overlap():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(25)
    # classes along orthogonal axes with little noise: intra ~ 1, inter ~ 0, no overlap
    feats = 10 * torch.eye(8)[labels] + 0.1 * torch.randn(100, 8, generator=g)
    res = analyses.similarity_overlap(feats, labels, chunk=7)
    assert res["overlap"] == 0 and res["intra_mean"] > 0.9 and abs(res["inter_mean"]) < 0.1
    assert res["intra_pairs"] == 4 * 25 * 24 // 2 and res["inter_pairs"] == 100 * 99 // 2 - res["intra_pairs"]
    # labels unrelated to the features: both distributions alike, large overlap; chunking changes nothing
    feats = torch.randn(100, 8, generator=g)
    a, b = analyses.similarity_overlap(feats, labels, chunk=7), analyses.similarity_overlap(feats, labels, chunk=1000)
    assert a["overlap"] > 0.7
    assert a["intra_hist"] == b["intra_hist"] and a["inter_hist"] == b["inter_hist"]
    brute = [(F.cosine_similarity(feats[i], feats[j], dim=0).item(), bool(labels[i] == labels[j]))
             for i in range(100) for j in range(i + 1, 100)]
    assert a["intra_mean"] == pytest.approx(sum(s for s, same in brute if same) / a["intra_pairs"], abs=1e-5)


# ----------------------------------------------------------------------------------------------- gates
def test_eval_gate_analysis():
    gates = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.05],    # open {0, 1}
                          [0.7, 0.3, 0.6, 0.4, 0.05],    # open {0, 2}
                          [0.2, 0.1, 0.3, 0.4, 0.05],    # none open
                          [0.6, 0.9, 0.95, 0.2, 0.05]])  # open {0, 1, 2}
    embed = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [-1.0, 0.0]])
    attributes = torch.tensor([[0, 0], [0, 1], [1, 1], [2, 2]])  # sharing: (0, 1) shape, (1, 2) colour
    res = analyses.gate_analysis(gates, embed, attributes)
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
    # Fig. 9's columns: by the first class that opens them, then by how many classes do (already in order here)
    assert figures.gate_column_order(gates).tolist() == [0, 1, 2, 3, 4]
    assert figures.gate_column_order(gates[:, [3, 2, 0, 4, 1]]).tolist() == [2, 4, 1, 0, 3]
    # Fig. 9 as drawn: every cell of the heat map has the colour of its gate value, columns in that order
    img = figures.draw_gates(gates[:, [3, 2, 0, 4, 1]], ["a", "b", "c", "d"])
    pixels = torchvision.transforms.functional.pil_to_tensor(img).permute(1, 2, 0)
    matrix = (pixels == plot.colormap(gates[0, 0])).all(-1).nonzero()  # the first cell's colour: the top-left cell
    top, left = matrix[0].tolist()
    coloured = (pixels != 255).any(-1)  # the matrix is the block of coloured pixels from there
    ch = int(coloured[top:, left].int().cumprod(0).sum()) // 4  # 4 classes
    cw = int(coloured[top, left:].int().cumprod(0).sum()) // 5  # 5 dimensions
    cells = pixels[top + ch // 2::ch, left + cw // 2::cw][:4, :5]
    assert torch.equal(cells, plot.colormap(gates))
    # class gates of a real filter: (K, D) in (0, 1), the filter's mode restored
    filt = simlap.FeatureFilter(6, out_dim=8).train()
    g = analyses.class_gates(filt)
    assert g.shape == (6, 8) and filt.training and ((g > 0) & (g < 1)).all()
    assert analyses.gate_analysis(g)["gate_overlap"] and len(analyses.gate_analysis(g)["entropy"]) == 6


# ----------------------------------------------------------------------------------------------- paper's figures
def test_synthetic_masks_leave_the_images_unchanged():
    """shape_masks() renders the split again: the images are bit for bit those rendered before masks existed (their
    sha256 is pinned here), and the masks cover the pixels painted in the class's colour."""
    ds = simlap.SyntheticShapes("test", per_class=10)
    sub = simlap.SyntheticShapes("train", per_class=3, classes=[5, 2, 9], size=16)
    digest = lambda d: hashlib.sha256(d.images.numpy().tobytes()).hexdigest()  # noqa: E731
    assert digest(ds) == "edbb8cf36f6478bcd7a8dd3921d0de951a6d71e78f3152f9dc7c4d59279962e1"
    assert digest(sub) == "5da4915a3a4a21ba020fd40959d5f8c6af8d07ec7769e596aad2f486071bdb92"
    masks = ds.shape_masks()
    assert masks.shape == (160, 32, 32) and masks.dtype == torch.bool and sub.shape_masks().shape == (9, 16, 16)
    colour = torch.tensor(ds.COLOURS)[ds.attributes[ds.targets][:, 1]]  # (N, 3): each image's class colour
    cos = F.cosine_similarity(ds.images.float(), colour[:, :, None, None], dim=1)  # (N, 32, 32)
    assert cos[masks].mean() > 0.97 and cos[~masks].mean() < 0.9
    # through the eval transform (resize to 64 / 0.875 = 73, centre crop 64): the mask follows the image
    big = simlap.SyntheticShapes("test", per_class=10, transform=simlap.eval_transform(64))
    m = figures.eval_mask(big, masks, 3)
    assert m.shape == (64, 64) and abs(m.float().mean() - masks[3, 2:30, 2:30].float().mean()) < 0.03


def test_tsne_keeps_separated_clusters_apart_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(30)
    x = (10 * torch.randn(4, 10, generator=g))[y] + torch.randn(120, 10, generator=g)
    p = figures.tsne_affinities(torch.cdist(x.double(), x.double()).square(), 15)  # each row at perplexity 15
    assert torch.allclose(p.sum(1), torch.ones(120, dtype=torch.float64)) and (p.diagonal() == 0).all()
    assert torch.allclose((-torch.xlogy(p, p).sum(1)).exp(), torch.full((120,), 15.0, dtype=torch.float64))
    a = figures.tsne(x, perplexity=15, iters=400, seed=1)
    near = torch.cdist(a, a).fill_diagonal_(math.inf).topk(5, largest=False).indices  # 5 nearest in the map
    assert (y[near].mode(1).values == y).float().mean() >= 0.98
    short = figures.tsne(x, perplexity=15, iters=30, seed=1)  # the same seed, the same map; another seed, another
    assert torch.equal(short, figures.tsne(x, perplexity=15, iters=30, seed=1))
    assert not torch.equal(short, figures.tsne(x, perplexity=15, iters=30, seed=2))
    sep = figures.pair_separation(a, y, 0, 1)  # centre distance over the mean distance to the own centre, by hand
    c0, c1 = a[y == 0].mean(0), a[y == 1].mean(0)
    spread = torch.cat([(a[y == 0] - c0).norm(dim=1), (a[y == 1] - c1).norm(dim=1)]).mean()
    assert sep["ratio"] == pytest.approx(((c0 - c1).norm() / spread).item()) and sep["ratio"] > 3


def region_encoder():
    """A backbone whose features average a 1x1 convolution of the raw image (before normalisation), with ReLU: black
    pixels give exactly 0 features, so an image black but for one region is seen through that region only."""
    mean, std = torch.tensor(simlap.MEAN), torch.tensor(simlap.STD)
    conv = torch.nn.Conv2d(3, 8, 1)
    with torch.no_grad():
        conv.bias.copy_(conv.weight[:, :, 0, 0] @ (mean / std))  # w·x + b = w·(x + mean / std) = w·(raw / std)
    return torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()


def test_clam_heat_map_falls_on_the_region_that_decides_the_similarity():
    torch.manual_seed(0)
    mean, std = torch.tensor(simlap.MEAN).view(3, 1, 1), torch.tensor(simlap.STD).view(3, 1, 1)
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[2:8, 1:7] = True  # off-centre: a view not taken back through its crop and flip lands elsewhere
    raw = torch.zeros(3, 16, 16)
    raw[:, region] = torch.rand(3, int(region.sum()))
    anchor, positive = (raw - mean) / std, (torch.rand(3, 16, 16) - mean) / std
    net, class_gates = region_encoder(), analyses.class_gates(simlap.FeatureFilter(3, out_dim=8))
    gates = {"global": torch.ones(8), "y1": class_gates[0], "y2": class_gates[1]}  # eq. 4's single-class gates
    out = figures.clam(net, figures.cam_layer(net, 16)[0], anchor, positive, gates, views=8)
    views, _ = figures.anchor_views(anchor, 8)
    with torch.no_grad():
        z, z_pos = net(views), net(positive[None])
    for name, g in gates.items():
        score, heat = out[name]
        assert score == pytest.approx(F.cosine_similarity(g * z, g * z_pos).mean().item(), abs=1e-5), name
        assert heat.shape == (16, 16) and heat.min() >= 0 and figures.mask_share(heat, region) > 0.9, name
    net.requires_grad_(False)  # a frozen backbone: the same maps
    frozen = figures.clam(net, figures.cam_layer(net, 16)[0], anchor, positive, gates, views=8)
    assert all(torch.equal(frozen[k][1], out[k][1]) for k in gates)
    # the layers Grad-CAM reads: the last stage with a map of at least 7 x 7 (the last ReLU here; the convnet's third
    # at 32 px, its fourth at 224; a ResNet's layer3 at 32 px, its layer4 at 224 as the paper's), a ViT's last block
    cnn, resnet = simlap.convnet()[0], simlap.build_backbone("resnet18", small_images=True)[0]
    assert figures.cam_layer(net, 16) == (net[1], "1 (ReLU)", (16, 16))
    assert figures.cam_layer(cnn, 32) == (cnn[6], "6 (ReLU)", (8, 8)) and figures.cam_layer(cnn, 224)[1:] == ("14 (ReLU)", (14, 14))
    assert figures.cam_layer(resnet, 32) == (resnet.layer3, "layer3", (8, 8))
    big = simlap.build_backbone("resnet18")[0]
    assert figures.cam_layer(big, 224) == (big.layer4, "layer4", (7, 7))
    vit = simlap.build_backbone("vit_tiny", small_images=True, image_size=16)[0].eval()
    assert figures.cam_layer(vit, 16) == (vit.encoder.layers[-1].ln_1, "encoder.layers[-1].ln_1", (4, 4))
    out = figures.clam(vit, figures.cam_layer(vit, 16)[0], anchor, positive, {"global": torch.ones(192)}, views=2)
    with torch.no_grad():
        hand = F.cosine_similarity(vit(figures.anchor_views(anchor, 2)[0]), vit(positive[None])).mean().item()
    assert out["global"][0] == pytest.approx(hand, abs=1e-5)
    assert out["global"][1].shape == (16, 16) and out["global"][1].sum() > 0  # the patch tokens get a gradient


def test_occlusion_map_equals_patches_hidden_one_by_one():
    """The occlusion map against a loop that hides each patch by hand and scores eq. 6 on the same views; on the
    region encoder, where the similarity depends on one region, the map leans on that region."""
    torch.manual_seed(0)
    net, size, patch = region_encoder(), 9, 4
    anchor, positive = torch.randn(3, size, size), torch.randn(3, size, size)
    gates = {"global": torch.ones(8), "y1": torch.rand(8)}
    out = figures.occlusion(net, anchor, positive, gates, views=3, patch=patch)
    with torch.no_grad():
        score = lambda image, g: F.cosine_similarity(g * net(figures.anchor_views(image, 3)[0]),  # noqa: E731
                                                     g * net(positive[None])).mean()
        for name, g in gates.items():
            total, count = torch.zeros(size, size), torch.zeros(size, size)
            for top in (0, 2, 4, 5):  # every 2 px (half of 4), and the last flush with the far edge
                for left in (0, 2, 4, 5):
                    hidden = anchor.clone()
                    hidden[:, top:top + patch, left:left + patch] = 0  # the mean colour, after normalisation
                    total[top:top + patch, left:left + patch] += score(anchor, g) - score(hidden, g)
                    count[top:top + patch, left:left + patch] += 1
            assert torch.allclose(out[name], (total / count).relu(), atol=1e-5), name
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[2:8, 1:7] = True
    raw = torch.zeros(3, 16, 16)
    raw[:, region] = torch.rand(3, int(region.sum()))
    mean, std = torch.tensor(simlap.MEAN).view(3, 1, 1), torch.tensor(simlap.STD).view(3, 1, 1)
    heat = figures.occlusion(net, (raw - mean) / std, (torch.rand(3, 16, 16) - mean) / std, {"global": torch.ones(8)})
    assert figures.mask_share(heat["global"], region) > 2 * region.float().mean()  # twice what a uniform map puts there


def test_fig12_class_similarity_and_correlations_against_hand_computation():
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(30, 6, generator=g, dtype=torch.float64), torch.arange(30) % 4
    sim = figures.class_similarity(feats, labels, 4)
    for a in range(4):
        for b in range(4):
            pairs = [F.cosine_similarity(feats[i], feats[j], dim=0).item() for i in range(30) for j in range(30)
                     if labels[i] == a and labels[j] == b and i != j]
            assert sim[a, b].item() == pytest.approx(sum(pairs) / len(pairs), abs=1e-9)
    m = {k: torch.rand(4, 4, generator=g) for k in ("gates", "features", "labels")}
    m["labels"] = torch.ones(4, 4)  # constant: no correlation
    got = figures.correlations(m)
    upper = lambda t: [t[i, j].item() for i in range(4) for j in range(i + 1, 4)]  # noqa: E731
    assert got["gates vs features"] == pytest.approx(statistics.correlation(upper(m["gates"]), upper(m["features"])))
    assert got["gates vs labels"] is None and set(got) == {"gates vs features", "gates vs labels", "features vs labels"}


def figure_is_drawn(path, min_size):
    """A PNG of at least min_size (H, W) with a drawing in it: not blank, several colours, some ink."""
    img = torchvision.io.decode_image(str(path), mode=torchvision.io.ImageReadMode.RGB)
    colours = len(torch.unique(img.flatten(1), dim=1).T)
    assert img.shape[1] >= min_size[0] and img.shape[2] >= min_size[1], (path, img.shape)
    assert colours > 8 and (img < 200).any(0).float().mean() > 0.02, path
    return img.shape[1:]


def test_eval_figures_report_and_compare(tmp_path):
    torch.manual_seed(0)
    a = {**TRAIN_ARGS, "arch": "convnet"}  # its Grad-CAM layer: the last ReLU
    model = simlap.SimLAP("convnet", 16, small_images=True, image_size=16, proj_hidden=64, proj_dim=32)
    os.makedirs(tmp_path / "run")
    torch.save({"model": model.state_dict(), "args": a}, tmp_path / "run" / "checkpoint.pt")
    log = [{"epoch": 0, "step": 0, "knn_top1": 0.25}, {"step": 10, "epoch": 0, "loss": 5.0, "gate_open": 9, "lr": 1e-3},
           {"step": 20, "epoch": 0, "loss": 4.5, "gate_open": 8, "lr": 1e-3},
           {"step": 20, "epoch": 0, "loss": 4.0, "gate_open": 7, "lr": 1e-3},  # resumed: step 20 logged twice
           {"epoch": 1, "step": 20, "loss": 4.0, "gate_open": 7, "lr": 1e-3, "knn_top1": 0.5}]
    (tmp_path / "run" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    out = tmp_path / "simlap"
    res = ev.main(["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), *EVAL_FIGURES, "--output-dir", str(out)])
    assert res["training"] == {"step": [10, 20], "loss": [5.0, 4.0], "lr": [1e-3, 1e-3], "gate_open": [9, 7],
                               "knn_step": [0, 20], "knn_top1": [25.0, 50.0]}
    assert res["tsne"]["groups"] == [["red_square", "red_triangle", "red_cross"],
                                     ["green_circle", "blue_circle", "yellow_circle"]]
    assert res["tsne"]["points"] == 60 and set(res["tsne"]["panels"]) == {"global", "subspace"}
    assert [(p["y1"], p["y2"]) for p in res["clam"]["pairs"]] == [tuple(p) for p in figures.SYNTHETIC_PAIRS]
    assert all(set(p["score"]) == {"global", "y1", "y2"} and 0 < p["area"] < 1 for p in res["clam"]["pairs"])
    clam = res["clam"]
    assert clam["grid"] == [8, 8] and set(clam["mass"]) == {"gradcam", "occlusion"}  # 16 px: the ResNet's layer2
    assert set(clam["mass"]["occlusion"]) == {"global", "y1", "y2"} and 0 < clam["area"] < 1
    assert set(res["class_similarity"]["correlation"]) == {"gates vs features", "gates vs labels", "features vs labels"}
    sizes = {"fig3b_spectrum.png": (300, 560), "fig4_similarity.png": (300, 440), "fig5_tsne.png": (380, 900),
             "fig6_clam.png": (6 * 48, 5 * 48), "fig9_gates.png": (16 * 12, 32 * 4),
             "fig12_class_similarity.png": (16 * 14, 3 * 16 * 14), "training.png": (600, 880)}
    assert set(res["figures"]) == set(sizes)
    for name, size in sizes.items():
        figure_is_drawn(out / name, size)
    assert res["figures"]["fig9_gates.png"] == str(out / "fig9_gates.png") and "pictures" not in res["gates"]
    report = (out / "report.md").read_text()
    assert all(f"]({name})" in report for name in sizes)
    assert f"| knn/k=10 T=0.07 | {figures.fmt(res['knn']['k=10 T=0.07'])} |" in report
    # a second run, numbers only (supcon: no filter, so no gates), then both side by side
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    os.makedirs(tmp_path / "supcon")
    torch.save({**ckpt, "args": {**a, "method": "supcon"}}, tmp_path / "supcon" / "checkpoint.pt")
    other = ev.main(["--checkpoint", str(tmp_path / "supcon" / "checkpoint.pt"), *EVAL_TINY])
    assert "gates" not in other and "figures" not in other and not os.path.exists(tmp_path / "supcon" / "report.md")
    with pytest.raises(simlap.UserError, match="overwritten"):  # its report.md would replace the run's own
        ev.main(["--compare", str(out), str(tmp_path / "supcon"), "--output-dir", str(out)])
    both = ev.main(["--compare", str(out), str(tmp_path / "supcon" / "eval.json"), "--output-dir", str(tmp_path / "c")])
    stored = json.load(open(tmp_path / "c" / "compare.json"))
    for name, folder in (("simlap", out), ("supcon", tmp_path / "supcon")):
        numbers = dict(figures.numbers(json.load(open(folder / "eval.json"))))
        assert {k: v[name] for k, v in stored["values"].items() if name in v} == numbers  # every number, exactly
    table = (tmp_path / "c" / "report.md").read_text()
    for key in ("knn/k=10 T=0.07", "linear_probe/test_top1", "similarity/overlap"):
        row = f"| {key} | {figures.fmt(res[key.split('/')[0]][key.split('/')[1]])} | "
        assert row + f"{figures.fmt(other[key.split('/')[0]][key.split('/')[1]])} |" in table
    assert "| gates/mean_open_dims | " + figures.fmt(res["gates"]["mean_open_dims"]) + " | – |" in table
    assert set(both["figures"]) == {"compare_spectra.png", "compare_similarity.png", "compare_training.png"}
    for name in both["figures"]:
        figure_is_drawn(tmp_path / "c" / name, (300, 440))


# ----------------------------------------------------------------------------------------------- loading, CLI
def test_eval_backbone_geometry_is_inferred(tmp_path, weights):
    bb, model, info = ev.load_weights(backbone=str(weights / "backbone.pt"), arch="resnet18")
    assert model is None and info["small_images"] is True
    vit, _ = simlap.build_backbone("vit_tiny", small_images=True, image_size=16)
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    _, _, info = ev.load_weights(backbone=str(tmp_path / "vit.pt"), arch="vit_tiny")
    assert info["small_images"] is True and info["image_size"] == 16
    assert ev.load_weights(backbone=str(tmp_path / "vit.pt"))[2] == info  # the arch, too, is read off the file
    cnn, _ = simlap.build_backbone("convnet")
    torch.save(cnn.state_dict(), tmp_path / "cnn.pt")
    loaded, _, info = ev.load_weights(backbone=str(tmp_path / "cnn.pt"))
    assert info["arch"] == "convnet" and info["small_images"] is True
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), cnn.state_dict().values()))


def test_eval_end_to_end(tmp_path, weights):
    cache = str(tmp_path / "feats.pt")
    cmd = [sys.executable, os.path.join(HERE, "eval.py"), "--checkpoint", str(weights / "checkpoint.pt"),
           *EVAL_FIGURES, "--clam-pairs", "0,1", "--k", "5", "--output-dir", str(tmp_path), "--cache-features", cache]
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
    assert set(res["figures"]) >= {"fig6_clam.png", "fig9_gates.png"}  # a ResNet's heat maps: from layer4
    assert all(os.path.exists(path) for path in [*res["figures"].values(), tmp_path / "report.md"])
    # a second run reads the cached features and gives the same numbers
    again = ev.main(["--checkpoint", str(weights / "checkpoint.pt"), *EVAL_TINY, "--k", "5", "--output-dir",
                     str(tmp_path / "again"), "--cache-features", cache])
    assert again["knn"] == res["knn"] and again["linear_probe"] == res["linear_probe"]
    with pytest.raises(simlap.UserError, match="cache-features"):  # features of another image size: refused
        ev.main(["--checkpoint", str(weights / "checkpoint.pt"), *EVAL_TINY, "--image-size", "32", "--cache-features",
                 cache])


def test_eval_skips_gates_of_a_method_without_filter(tmp_path, weights):
    """The other side of test_eval_end_to_end (simlap: gates analysed): supcon-arbitrary trains no filter."""
    ckpt = torch.load(weights / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "args": {**ckpt["args"], "method": "supcon-arbitrary"}}, tmp_path / "ckpt.pt")
    res = ev.main(["--checkpoint", str(tmp_path / "ckpt.pt"), *EVAL_FIGURES, "--clam-pairs", "0,1", "--k", "5",
                   "--output-dir", str(tmp_path)])
    assert "gates" not in res and "knn" in res and not os.path.exists(tmp_path / "fig9_gates.png")
    assert "subspace" not in res["tsne"]["panels"] and "correlation" not in res["class_similarity"]
    assert all(set(p["score"]) == {"global"} for p in res["clam"]["pairs"])  # CLAM: the global column only


def bad_inputs(tmp_path, weights):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"foo": 1}, tmp_path / "other.pt")
    for cls in ("a", "b"):  # an ImageFolder with train/ but no val/
        os.makedirs(tmp_path / "folder" / "train" / cls)
        png = str(tmp_path / "folder" / "train" / cls / "0.png")
        torchvision.io.write_png(torch.zeros(3, 4, 4, dtype=torch.uint8), png)
    os.makedirs(tmp_path / "empty")
    ckpt, backbone = str(weights / "checkpoint.pt"), str(weights / "backbone.pt")
    few = ["--synthetic-per-class", "10"]  # the data set is loaded before the classes are looked up
    return {"missing checkpoint": ["--checkpoint", str(tmp_path / "nope.pt")],
            "corrupt checkpoint": ["--checkpoint", str(tmp_path / "garbage.pt")],
            "not a checkpoint": ["--checkpoint", str(tmp_path / "other.pt")],
            "arch mismatch (checkpoint)": ["--checkpoint", ckpt, "--arch", "resnet50"],
            "arch mismatch (backbone)": ["--backbone", backbone, "--arch", "resnet50"],
            "missing split": ["--checkpoint", ckpt, "--dataset", "imagefolder", "--data", str(tmp_path / "folder")],
            "missing data": ["--checkpoint", ckpt, "--dataset", "cifar10", "--data", str(tmp_path / "empty")],
            "no data root": ["--checkpoint", ckpt, "--dataset", "cifar10"],
            "k above bank": ["--checkpoint", ckpt, "--synthetic-per-class", "1", "--k", "20"],
            "unknown class": ["--checkpoint", ckpt, *few, "--groups", "red_circle", "purple_blob"],
            "pair outside the groups": ["--checkpoint", ckpt, *few, "--groups", "0,1", "2,3", "--pair", "2", "0"],
            "half a CLAM pair": ["--checkpoint", ckpt, *few, "--clam-pairs", "red_circle"],
            "compare: no eval.json": ["--compare", str(tmp_path / "empty")],
            "compare and weights": ["--compare", str(tmp_path / "empty"), "--checkpoint", ckpt]}


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


# ----------------------------------------------------------------------------------------------- data sets on disk
# Tiny fake copies of torchvision's data sets in their real on-disk formats (file names, pickles, binaries, split and
# label files), written here since none can be downloaded in the tests. Every image of class c has the colour
# PALETTE[c], so a label read wrongly, or read for another image, shows.
PALETTE = torch.tensor([[230, 30, 30], [30, 200, 40], [40, 60, 230], [240, 220, 30]], dtype=torch.uint8)
FAKE_LABELS = {"train": [i % 4 for i in range(20)], "test": [i % 4 for i in range(8)]}  # 5 and 2 per class


def swatch(label, h=8, w=12):
    return PALETTE[label].view(3, 1, 1).expand(3, h, w).contiguous()


def colour_class(image):
    """The class whose palette colour is nearest the mean colour of a PIL image."""
    x = torchvision.transforms.v2.functional.pil_to_tensor(image).float().mean((1, 2))
    return int((PALETTE.float() - x).norm(dim=1).argmin())


def md5(path):
    import hashlib
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def trust(monkeypatch, cls, folder, attrs):
    """Point the checksums a torchvision class verifies at the fake files (the real check_integrity still runs)."""
    for attr in attrs:
        value = getattr(cls, attr)
        if isinstance(value, list):  # [[file, md5], ...]
            monkeypatch.setattr(cls, attr, [[f, md5(folder / f)] for f, _ in value])
        elif "filename" in value:  # CIFAR's meta
            monkeypatch.setattr(cls, attr, {**value, "md5": md5(folder / value["filename"])})
        else:  # Flowers-102's {id: (file, md5)}
            monkeypatch.setattr(cls, attr, {k: (f, md5(folder / f) if (folder / f).exists() else m)
                                            for k, (f, m) in value.items()})


def write_jpegs(folder, names, labels, h=8, w=12):
    os.makedirs(folder, exist_ok=True)
    for name, label in zip(names, labels):
        torchvision.io.write_jpeg(swatch(label, h, w), str(folder / name))


def fake_cifar(root, monkeypatch, name):
    import pickle
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder, key = root / cls.base_folder, "labels" if name == "cifar10" else "fine_labels"
    os.makedirs(folder)
    chunks = {"train": [FAKE_LABELS["train"][i::len(cls.train_list)] for i in range(len(cls.train_list))],
              "test": [FAKE_LABELS["test"]]}
    for split, files in (("train", cls.train_list), ("test", cls.test_list)):
        for (file, _), labels in zip(files, chunks[split]):
            data = torch.stack([swatch(y, 32, 32) for y in labels]).flatten(1).numpy()  # (N, 3072): R, G, B planes
            pickle.dump({"data": data, key: labels}, open(folder / file, "wb"))
    classes = [f"class {i}" for i in range(10 if name == "cifar10" else 100)]
    pickle.dump({cls.meta["key"]: classes}, open(folder / cls.meta["filename"], "wb"))
    trust(monkeypatch, cls, folder, ("train_list", "test_list", "meta"))
    return len(classes)


def fake_stl10(root, monkeypatch):
    folder = root / "stl10_binary"
    os.makedirs(folder)
    binary = lambda labels: torch.stack([swatch(y, 96, 96).transpose(1, 2) for y in labels]).numpy().tobytes()  # noqa: E731
    for split in ("train", "test"):  # images stored column-major, labels 1-based
        (folder / f"{split}_X.bin").write_bytes(binary(FAKE_LABELS[split]))
        (folder / f"{split}_y.bin").write_bytes(bytes(y + 1 for y in FAKE_LABELS[split]))
    (folder / "unlabeled_X.bin").write_bytes(binary([0]))
    (folder / "class_names.txt").write_text("\n".join(f"class {i}" for i in range(10)))
    trust(monkeypatch, torchvision.datasets.STL10, folder, ("train_list", "test_list"))
    return 10


def fake_flowers102(root, monkeypatch):
    import numpy as np
    import scipy.io
    folder = root / "flowers-102"
    labels = FAKE_LABELS["train"] + FAKE_LABELS["test"]  # image ids 1..28; train 1..12, val 13..20, test 21..28
    write_jpegs(folder / "jpg", [f"image_{i:05d}.jpg" for i in range(1, 29)], labels)
    scipy.io.savemat(folder / "imagelabels.mat", {"labels": np.array(labels) + 1})
    scipy.io.savemat(folder / "setid.mat", {"trnid": np.arange(1, 13), "valid": np.arange(13, 21),
                                            "tstid": np.arange(21, 29)})
    trust(monkeypatch, torchvision.datasets.Flowers102, folder, ("_file_dict",))
    return 102


def fake_pets(root, monkeypatch):
    breeds = ["Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound"]  # class ids 1..4
    folder = root / "oxford-iiit-pet"
    os.makedirs(folder / "annotations")
    for split, file in (("train", "trainval.txt"), ("test", "test.txt")):
        ids = [f"{breeds[y]}_{split}{i}" for i, y in enumerate(FAKE_LABELS[split])]
        write_jpegs(folder / "images", [f"{i}.jpg" for i in ids], FAKE_LABELS[split])
        lines = [f"{i} {y + 1} {1 if breeds[y][0].isupper() else 2} 1" for i, y in zip(ids, FAKE_LABELS[split])]
        (folder / "annotations" / file).write_text("\n".join(lines) + "\n")
    return 4


def fake_cars(root, monkeypatch):
    import numpy as np
    import scipy.io
    folder = root / "stanford_cars"
    os.makedirs(folder / "devkit")
    for split, annotations in (("train", folder / "devkit" / "cars_train_annos.mat"),
                               ("test", folder / "cars_test_annos_withlabels.mat")):
        names = [f"{i:05d}.jpg" for i in range(1, len(FAKE_LABELS[split]) + 1)]
        write_jpegs(folder / f"cars_{split}", names, FAKE_LABELS[split])
        records = np.array([(n, y + 1) for n, y in zip(names, FAKE_LABELS[split])],
                           dtype=[("fname", object), ("class", object)])
        scipy.io.savemat(annotations, {"annotations": records})
    scipy.io.savemat(folder / "devkit" / "cars_meta.mat",
                     {"class_names": np.array([f"car {i}" for i in range(196)], dtype=object)})
    return 196


def fake_food101(root, monkeypatch):
    classes = ["apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio"]
    folder = root / "food-101"
    os.makedirs(folder / "meta")
    for split in ("train", "test"):
        meta = {c: [] for c in classes}
        for i, y in enumerate(FAKE_LABELS[split]):
            meta[classes[y]].append(f"{classes[y]}/{split}{i}")
            write_jpegs(folder / "images" / classes[y], [f"{split}{i}.jpg"], [y])
        (folder / "meta" / f"{split}.json").write_text(json.dumps(meta))
    return 4


FAKES = {"cifar10": lambda root, mp: fake_cifar(root, mp, "cifar10"),
         "cifar100": lambda root, mp: fake_cifar(root, mp, "cifar100"), "stl10": fake_stl10,
         "flowers102": fake_flowers102, "pets": fake_pets, "cars": fake_cars, "food101": fake_food101}
NEEDS_SCIPY = [name for name in FAKES if name in simlap.NEEDS]


def have_scipy():
    import importlib.util
    return importlib.util.find_spec("scipy") is not None


@pytest.mark.parametrize("name", list(FAKES))
def test_every_data_set_reads_its_on_disk_format(name, tmp_path, monkeypatch):
    """Sizes, classes and every label (against its image's colour), as build_dataset, train.py and eval.py read
    them. Flowers-102's training split is its train and val splits together (the paper's 2040 images)."""
    if name in NEEDS_SCIPY:
        pytest.importorskip("scipy")
    num_classes = FAKES[name](tmp_path, monkeypatch)
    for split, labels in FAKE_LABELS.items():
        ds = simlap.build_dataset(name, str(tmp_path), split)
        targets = simlap.targets_of(ds)
        assert len(ds) == len(labels) and simlap.num_classes_of(ds) == num_classes, (split, len(ds))
        assert torch.equal(torch.bincount(targets, minlength=4), torch.bincount(torch.tensor(labels), minlength=4))
        assert [colour_class(ds[i][0]) for i in range(len(ds))] == targets.tolist() == [y for _, y in ds]
    run = train.load_data(train.parse_args(["--dataset", name, "--data", str(tmp_path), "--batch-size", "4"]))
    assert (len(run.train_raw), len(run.test_set), run.num_classes) == (20, 8, num_classes)
    (tmp_path / "w.pt").write_bytes(b"")  # load_eval_data only stats the weights
    args = ev.parse_args(["--backbone", str(tmp_path / "w.pt"), "--dataset", name, "--data", str(tmp_path),
                          "--device", "cpu"])
    _, splits, _ = ev.load_eval_data(args, torch.nn.Identity(), {"small_images": True, "image_size": 16})
    assert (len(splits["train"]), len(splits["test"])) == (20, 8) and splits["test"][0][0].shape == (3, 16, 16)


def test_transfer_over_every_data_set_prints_the_papers_tables(tmp_path, weights, monkeypatch, capsys):
    """eval.py --transfer table1,table4 on the fake copies of all seven sets (the five without scipy, which the CI's
    requirements leave out): one row per set, and this backbone's row in Table 1's and Table 4's layouts. Every image
    of a class is the same here, so the kNN must be perfect; the probe equals tuned_probe on the same features."""
    names = [n for n in FAKES if have_scipy() or n not in NEEDS_SCIPY]
    for name in names:
        FAKES[name](tmp_path / "data", monkeypatch)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(weights / "checkpoint.pt"), *EVAL_TINY, "--probe-iters", "5", "--data",
            str(tmp_path / "data"), "--output-dir", str(out), "--transfer"]
    res = ev.main([*argv, "table1,table4" if have_scipy() else ",".join(names)])
    printed = capsys.readouterr().out
    assert list(res["sets"]) == (list(transfer.TABLE1) + ["food101"] if have_scipy() else names)
    for name, row in res["sets"].items():
        assert (row["status"], row["num_train"], row["num_test"]) == ("ok", 20, 8), name
        assert row["knn"] == {"k=20 T=0.07": 100.0, "k=10 T=0.07": 100.0}, name
    assert json.loads((out / "transfer.json").read_text())["sets"] == json.loads(json.dumps(res["sets"]))
    markdown = (out / "transfer.md").read_text()
    assert markdown in printed
    probe = {name: row["linear_probe"]["test_top1"] for name, row in res["sets"].items()}
    table1 = res["tables"]["table1"]
    assert list(table1) == ["Cars", "CF10", "CF100", "FLW", "Pets", "STL", "AVG"]
    assert [table1[transfer.COLUMN[n]] for n in ("cifar10", "cifar100", "pets", "stl10")] == [
        probe[n] for n in ("cifar10", "cifar100", "pets", "stl10")]
    assert table1["AVG"] == (pytest.approx(sum(probe[n] for n in transfer.TABLE1) / 6) if have_scipy() else None)
    assert res["tables"]["table4"]["Food"] == 100.0 and "| Table 1: linear probe top-1 % | Cars | CF10 |" in markdown
    assert "| paper: SimLAP, 500 ep | 92.9 | 98.0 | 85.0 | 91.9 | 91.7 | 97.0 | 92.7 |" in markdown
    assert "| paper: SimLAP | 86.3 | 64.6 | 36.7 | 54.3 |" in markdown
    ours = "| this backbone | " + " | ".join("—" if v is None else f"{v:.1f}" for v in table1.values()) + " |"
    assert ours in markdown
    # the probe is tuned_probe on these features (the path eval.py takes: transfer transform, eval mode)
    backbone, _, _ = ev.load_weights(str(weights / "checkpoint.pt"))
    splits = {s: simlap.build_dataset("pets", str(tmp_path / "data"), s, transfer.transfer_transform(16))
              for s in ("train", "test")}
    feats = ev.all_features(backbone, splits, ev.parse_args(argv + ["pets"]), torch.device("cpu"), None)
    again = ev.tuned_probe(*feats["train"], *feats["test"], 4, 5)
    assert again["test_top1"] == probe["pets"] and again["weight_decay"] == res["sets"]["pets"]["linear_probe"][
        "weight_decay"]
    # a set whose files are missing is reported, with how to get it, and the others still run
    os.rename(tmp_path / "data" / "food-101", tmp_path / "food")
    res = ev.main([*argv, "food101,pets"])
    printed = capsys.readouterr().out
    assert res["sets"]["food101"]["status"] == "missing" and res["sets"]["pets"]["status"] == "ok"
    assert "| food101 | missing |" in printed and "\nfood101 not found under --data" in printed
    assert "pass --download to fetch it" in printed and res["tables"]["table1"]["AVG"] is None
    assert res["tables"]["table4"] == {"CF10": None, "CF100": None, "Cars": None, "Food": "missing"}


def test_transfer_refuses_what_it_cannot_run_before_writing(tmp_path, weights, capsys):
    cases = {"unknown set": (["--transfer", "table1,mnist"], "--transfer: unknown set 'mnist'"),
             "no set": (["--transfer", ","], "--transfer needs at least one set"),
             "with --dataset": (["--transfer", "cifar10", "--dataset", "cifar10"], "--dataset does not apply"),
             "with --kmeans": (["--transfer", "cifar10", "--kmeans", "4"], "--kmeans does not apply"),
             "no data": (["--transfer", "cifar10,synthetic"], "--transfer needs --data ROOT"),
             "nothing there": (["--transfer", "cifar10,pets", "--data", str(tmp_path)], "none of cifar10, pets was "
                               "found under --data")}
    before = snapshot(tmp_path), snapshot(weights)
    for name, (argv, expected) in cases.items():
        with pytest.raises(SystemExit) as exit:
            ev.cli(["--checkpoint", str(weights / "checkpoint.pt"), *EVAL_TINY, *argv])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and expected in err, (name, err)
    assert (snapshot(tmp_path), snapshot(weights)) == before
    assert transfer.transfer_sets("table4, pets,cifar10,table1") == ["cifar10", "cifar100", "cars", "food101", "pets",
                                                              "flowers102", "stl10"]


def test_a_missing_optional_package_is_named_in_one_line(tmp_path, weights, monkeypatch, capsys):
    """Flowers-102 and Cars need scipy, which requirements.txt does not install: one line, exit 2, before anything
    runs (here scipy is hidden, whether it is installed or not)."""
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy now raises ImportError
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path), snapshot(weights)
    for cli, argv, line in ((ev.cli, ["--dataset", "flowers102"], "eval.py: error: flowers102 needs scipy: pip "
                             "install scipy\n"),
                            (ev.cli, ["--transfer", "pets,table1"], "eval.py: error: cars needs scipy: pip install "
                             "scipy\n"),
                            (train.cli, ["--dataset", "cars"], "train.py: error: cars needs scipy: pip install "
                             "scipy\n")):
        weights_flags = ["--checkpoint", str(weights / "checkpoint.pt"), *EVAL_TINY] if cli is ev.cli else []
        with pytest.raises(SystemExit) as exit:
            cli([*weights_flags, *argv, "--data", str(tmp_path)])
        assert exit.value.code == 2 and capsys.readouterr().err == line
    with pytest.raises(ValueError, match="^flowers102 needs scipy: pip install scipy$"):
        simlap.build_dataset("flowers102", str(tmp_path), "train")
    assert (snapshot(tmp_path), snapshot(weights)) == before


def image_folder(root, classes, per_class=4, h=8, w=12):
    """root/<class>/<i>.png, class `name` coloured by its index in PALETTE's order a, b, c, d."""
    for name in classes:
        write_pngs = [swatch("abcd".index(name), h, w) for _ in range(per_class)]
        os.makedirs(root / name)
        for i, img in enumerate(write_pngs):
            torchvision.io.write_png(img, str(root / name / f"{i}.png"))


def test_imagefolder_val_classes_take_train_indices_by_name(tmp_path, weights, capsys):
    """train/{a,b,c} and val/{a,c}: torchvision alone numbers val's c as 1, train's b, and kNN and probe report 50 %
    on data they classify perfectly; mapped by name, val's c is 2 and both report 100 %."""
    image_folder(tmp_path / "train", "abc")
    image_folder(tmp_path / "val", "ac")
    assert torchvision.datasets.ImageFolder(str(tmp_path / "val")).targets == [0] * 4 + [1] * 4  # the trap
    val = simlap.build_dataset("imagefolder", str(tmp_path), "test")
    assert val.targets == [0] * 4 + [2] * 4 == [label for _, label in val] and val.classes == ["a", "b", "c"]
    flags = ["--checkpoint", str(weights / "checkpoint.pt"), *EVAL_TINY, "--data", str(tmp_path), "--k", "5",
             "--output-dir", str(tmp_path / "out")]
    res = ev.main([*flags, "--dataset", "imagefolder"])
    assert res["knn"] == {"k=5 T=0.07": 100.0, "k=10 T=0.07": 100.0} and res["linear_probe"]["test_top1"] == 100.0
    assert ev.main([*flags, "--transfer", "imagefolder"])["sets"]["imagefolder"]["knn"]["k=10 T=0.07"] == 100.0
    run = train.load_data(train.parse_args(["--dataset", "imagefolder", "--data", str(tmp_path), "--batch-size", "4",
                                            "--knn-every", "0"]))
    assert run.test_set.targets == val.targets and run.num_classes == 3
    # a val class that train/ lacks is refused, naming it: eval.py, --transfer, train.py (its kNN monitor's split)
    image_folder(tmp_path / "val", "d", per_class=1)
    capsys.readouterr()
    for cli, argv in ((ev.cli, [*flags, "--dataset", "imagefolder"]), (ev.cli, [*flags, "--transfer", "imagefolder"]),
                      (train.cli, ["--dataset", "imagefolder", "--data", str(tmp_path), "--output-dir",
                                   str(tmp_path / "run")])):
        with pytest.raises(SystemExit) as exit:
            cli(argv)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and "class folder(s) d that train/ lacks" in err, err
    assert not (tmp_path / "run").exists()


def test_tuned_probe_picks_the_l2_on_a_carved_validation_split():
    """carve_validation: stratified, at least one per class of 2 or more, every class left in training, seeded.
    tuned_probe equals picking by hand with linear_probe over the grid, then refitting on the whole split."""
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 1 + [3] * 25)[torch.randperm(39, generator=torch.Generator()
                                                                                 .manual_seed(0))]
    val = ev.carve_validation(labels)
    assert torch.bincount(labels[val], minlength=4).tolist() == [2, 1, 0, 5]
    assert torch.equal(val, ev.carve_validation(labels)) and not torch.equal(val, ev.carve_validation(labels, seed=1))
    g = torch.Generator().manual_seed(0)
    y, y_test = torch.randint(3, (60,), generator=g), torch.randint(3, (30,), generator=g)
    centres = torch.randn(3, 8, generator=g)
    x, x_test = (centres[t] + 1.5 * torch.randn(len(t), 8, generator=g) for t in (y, y_test))
    val = ev.carve_validation(y)
    for grid, expected in (((1e-4, 1e-2, 10.0), 1e-2), ((1e-2, 0.3, 100.0), 0.3)):  # a tie at the top; a clear best
        res = ev.tuned_probe(x, y, x_test, y_test, grid=grid)  # each fit to its optimum, along a warm-started path
        scores = [ev.linear_probe(x[~val], y[~val], x[val], y[val], weight_decay=wd, tol=ev.GRID_TOL)["test_top1"]
                  for wd in grid]
        assert res["weight_decay"] == expected == max(zip(scores, grid))[1]  # ties: the strongest
        assert list(res["validation_top1"].values()) == scores and res["num_validation"] == int(val.sum()) == 11
        assert res["test_top1"] == ev.linear_probe(x, y, x_test, y_test, weight_decay=expected)["test_top1"]


# A failed run ends: every error path runs here as users run it, in its own process with 2 loader workers (the default),
# under a time limit that fails the test instead of hanging the suite, and leaves no process behind.
FAULT_RUN = ["--dataset", "imagefolder", "--arch", "convnet", "--image-size", "8", "--batch-size", "10", "--epochs", "2",
             "--proj-hidden", "32", "--proj-dim", "16", "--log-every", "1", "--workers", "2"]


def session(sid):
    """The pids of the processes still alive in session `sid` (a command started with start_new_session: its loader
    workers and ranks too, even once orphaned)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except (OSError, ValueError):
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
        if fields[3] == str(sid) and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def run_to_end(cmd, timeout=90, signal_after=None, env=None):
    """Run `cmd` (a list) in a session of its own -> (exit code, stderr lines). Fails if it has not ended within
    `timeout` s or leaves a process behind (all are killed either way). signal_after=(path, signal): once the file
    `path` has grown by a line, the signal goes to the whole process group, as Ctrl-C in a terminal sends it."""
    lines = lambda path: len(path.read_text().splitlines()) if path.exists() else 0  # noqa: E731
    before = lines(signal_after[0]) if signal_after else 0
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    try:
        if signal_after:
            deadline = time.time() + timeout
            while lines(signal_after[0]) == before:
                assert p.poll() is None and time.time() < deadline, p.communicate()
                time.sleep(0.05)
            os.killpg(p.pid, signal_after[1])
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(map(str, cmd[:3]))} ... did not end within {timeout} s")
        time.sleep(0.5)  # a process that outlived the command would still be here
        left = session(p.pid)
        assert not left, f"processes left behind: {left}"
        return p.returncode, [line for line in err.replace("\r", "\n").split("\n") if line.strip()]
    finally:
        for pid in session(p.pid):
            os.kill(pid, signal.SIGKILL)
        if p.poll() is None:
            p.kill()
            p.wait()


def last_line(err):
    """The one line of an error, after the progress bars it cleared; no traceback, no warning."""
    assert not any("Traceback" in line or "Warning" in line for line in err), err
    return err[-1].strip()


@pytest.fixture
def faulty(tmp_path):
    """An ImageFolder (2 classes x 10) and a run on it stopped after its first step -> (data, run, checkpoint bytes)."""
    data, run = tmp_path / "data", tmp_path / "run"
    image_folder(data / "train", "ab", per_class=10)  # the kNN monitor needs 20
    image_folder(data / "val", "ab", per_class=2)
    train.main([*FAULT_RUN, "--data", str(data), "--output-dir", str(run), "--stop-after", "1"])
    return data, run, (run / "checkpoint.pt").read_bytes()


def test_an_unreadable_image_ends_every_process_with_one_line(faulty, tmp_path, weights):
    """Truncated images in train/ (met by the loader workers of 1 process, and of one of 2 torchrun ranks), a stray
    file that is no image in val/ (met by the kNN monitor, and by eval.py): one line naming the file, exit code 2
    (torchrun: 1, whatever its workers return), every process ended, the last checkpoint untouched."""
    data, run, checkpoint = faulty
    argv = [sys.executable, os.path.join(HERE, "train.py"), *FAULT_RUN, "--data", str(data), "--output-dir", str(run)]
    intact = {f: f.read_bytes() for f in (data / "train" / "b").iterdir()}
    for f, png in intact.items():  # every b truncated: the next step certainly meets one
        f.write_bytes(png[: len(png) // 2])
    code, err = run_to_end([*argv, "--knn-every", "0"])
    assert code == 2 and last_line(err).startswith(f"train.py: error: cannot read image {data / 'train' / 'b'}{os.sep}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *argv[1:],
                "--knn-every", "0", "--batch-size", "4", "--output-dir", str(tmp_path / "ranks")]
    code, err = run_to_end(torchrun)
    said = [line[line.index("train.py:"):] for line in err if "train.py:" in line]  # torchrun adds its report
    assert code == 1 and len(said) == 1 and said[0].startswith("train.py: error: cannot read image "), err
    for f, png in intact.items():
        f.write_bytes(png)
    stray = data / "val" / "a" / "notes.jpg"
    stray.write_text("not an image")
    line = f"error: cannot read image {stray} (not an image PIL can identify); replace or remove the file"
    code, err = run_to_end([*argv, "--knn-every", "1"])  # the monitor, at the end of the first epoch
    assert code == 2 and last_line(err) == f"train.py: {line}"
    assert (run / "checkpoint.pt").read_bytes() == checkpoint
    code, err = run_to_end([sys.executable, os.path.join(HERE, "eval.py"), "--checkpoint",
                            str(weights / "checkpoint.pt"), "--image-size", "16", "--probe-iters", "20", "--data",
                            str(data), "--dataset", "imagefolder", "--k", "5", "--no-figures", "--output-dir",
                            str(tmp_path / "eval")])  # its default --workers
    assert code == 2 and last_line(err) == f"eval.py: {line}" and not (tmp_path / "eval").exists()


NAN_LOSS = "import runpy, sys, simlap, torch; simlap.simlap_loss = lambda *a, **k: torch.tensor(float('nan'), " \
           "requires_grad=True); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def test_ctrl_c_a_nonfinite_loss_and_a_corrupt_checkpoint_end_with_one_line(faulty):
    """Ctrl-C (SIGINT to the process group) checkpoints the step it finished, exit code 3; a non-finite loss stops
    with exit code 1, the checkpoint untouched; a checkpoint whose bytes changed on disk, or that was cut short, is
    refused by train.py and eval.py, named and kept, and the message says how to resume from the one before it."""
    data, run, _ = faulty
    argv = [os.path.join(HERE, "train.py"), *FAULT_RUN, "--data", str(data), "--output-dir", str(run),
            "--knn-every", "0", "--epochs", "1000"]
    code, err = run_to_end([sys.executable, *argv], signal_after=(run / "log.jsonl", signal.SIGINT))
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert code == 3 and last_line(err) == (f"train.py: stopped by SIGINT at step {ckpt['step']} of 2000, "
                                            f"{run / 'checkpoint.pt'} written; run the same command again to "
                                            "continue (exit code 3)") and ckpt["step"] > 1
    prev = torch.load(run / "checkpoint.prev.pt", weights_only=True)["step"]
    assert prev < ckpt["step"]
    checkpoint = (run / "checkpoint.pt").read_bytes()
    code, err = run_to_end([sys.executable, "-c", NAN_LOSS, *argv])
    assert code == 1 and last_line(err) == (f"train.py: loss is not finite at step {ckpt['step']}; stopped, the last "
                                            "checkpoint is untouched (try a lower --base-lr or a longer "
                                            "--warmup-epochs)")
    assert (run / "checkpoint.pt").read_bytes() == checkpoint
    middle = len(checkpoint) // 2  # a flipped byte inside the weights: torch.load itself does not notice
    for damaged, why in ((checkpoint[:middle] + bytes([checkpoint[middle] ^ 1]) + checkpoint[middle + 1:],
                          "is corrupt: its contents do not match the checksum written with it"),
                         (checkpoint[: len(checkpoint) // 3], "cannot be loaded: it is truncated, corrupt or not a "
                          "torch file")):
        (run / "checkpoint.pt").write_bytes(damaged)
        code, err = run_to_end([sys.executable, *argv])
        assert code == 2 and last_line(err).startswith(f"train.py: error: checkpoint {run / 'checkpoint.pt'} {why}")
        assert last_line(err).endswith(f"it is left as it is. --resume {run / 'checkpoint.prev.pt'} continues from "
                                       "the checkpoint before it")
        assert (run / "checkpoint.pt").read_bytes() == damaged
        with pytest.raises(simlap.UserError, match=re.escape(f"--checkpoint {run / 'checkpoint.pt'} {why}")):
            ev.main(["--checkpoint", str(run / "checkpoint.pt")])
    train.main([*argv[1:], "--resume", str(run / "checkpoint.prev.pt"), "--stop-after", "1"])
    logged = log_records(run)
    assert len(set(logged)) == len(logged) and max(logged)[0] == prev + 1, logged  # no step twice, none ahead


def log_records(out):
    """(step, epoch) of every record of out/log.jsonl: a step's record and its epoch's record differ in epoch."""
    return [(r["step"], r.get("epoch")) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]


def test_a_full_disk_keeps_the_last_checkpoint(faulty, tmp_path):
    """No space left while the checkpoint is written (a small tmpfs; where mounting is not allowed, fsync raises
    ENOSPC): one line, exit code 2, the last checkpoint and its predecessor as they were, no temp file, and a rerun
    once there is space continues from it without logging a step twice."""
    data, run, _ = faulty
    disk = tmp_path / "disk"
    disk.mkdir()
    try:  # root, and a container that allows it
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)],
                                 capture_output=True).returncode == 0
    except OSError:  # no mount command
        mounted = False
    try:
        out = disk / "run"
        argv = [sys.executable, os.path.join(HERE, "train.py"), *FAULT_RUN, "--data", str(data), "--output-dir",
                str(out), "--knn-every", "0"]
        assert run_to_end([*argv, "--stop-after", "1"])[0] == 0
        before = {f: (out / f).read_bytes() for f in os.listdir(out) if f.endswith(".pt")}
        if mounted:  # leave less room than one checkpoint takes
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            (disk / "filler").write_bytes(bytes(free - len(before["checkpoint.pt"]) // 2))
        else:
            argv[1:1] = ["-c", "import errno, os, runpy, sys; os.fsync = lambda fd: (_ for _ in ()).throw(OSError("
                               "errno.ENOSPC, os.strerror(errno.ENOSPC))); sys.argv = sys.argv[1:]; "
                               "runpy.run_path(sys.argv[0], run_name='__main__')"]
        code, err = run_to_end(argv)
        assert code == 2 and last_line(err) == (f"train.py: error: cannot write {out / 'checkpoint.pt'}: no space left "
                                                "on device; the previous one is kept"), err
        assert {f: (out / f).read_bytes() for f in os.listdir(out) if ".pt" in f} == before
        if mounted:
            (disk / "filler").unlink()
        else:
            del argv[1:3]
        code, err = run_to_end(argv)
        assert code == 0, err
        assert log_records(out) == [(1, 0), (2, 0), (2, 1), (3, 1), (4, 1), (4, 2)]  # (step, epoch): none twice
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)])


# ----------------------------------------------------------------------------------------------- hardening
def test_ranged_flag_types():
    fraction = simlap.ranged(float, 0, 1, high_open=True)
    good = {simlap.positive_int: {"1": 1, "12": 12}, simlap.nonneg_int: {"0": 0, "3": 3},
            simlap.positive_float: {"1e-9": 1e-9, "2": 2.0}, simlap.nonneg_float: {"0": 0.0, "0.5": 0.5},
            fraction: {"0": 0.0, "0.99": 0.99}}
    bad = {simlap.positive_int: ["0", "-1", "2.5", "1e3", "x", ""], simlap.nonneg_int: ["-1", "nan"],
           simlap.positive_float: ["0", "-1e-9", "nan", "inf", "x"], simlap.nonneg_float: ["-0.1", "-inf"],
           fraction: ["1", "-0.01", "nan"]}
    for parse, cases in good.items():
        assert {text: parse(text) for text in cases} == cases
    for parse, texts in bad.items():
        for text in texts:
            with pytest.raises(argparse.ArgumentTypeError):
                parse(text)
    with pytest.raises(argparse.ArgumentTypeError, match=r"^1 is not a number in \[0, 1\)$"):
        fraction("1")


def numeric_flags(module):
    return {a.option_strings[0]: a for a in module.build_parser()._actions if a.option_strings}


def bounds(parse):
    """(kind, low, high, low_open, high_open) of a simlap.ranged type, read off the line it gives for a non-number
    ("x is not an integer >= 1", "x is not a number in [0, 1)"); None for any other type."""
    try:
        parse("x")
    except argparse.ArgumentTypeError as e:
        m = re.fullmatch(r"x is not (an integer|a number) (?:(>=?) (\S+)|in ([\[(])(\S+), (\S+)([\])]))", str(e))
    except Exception:  # int, float, str ...
        return None
    else:
        return None
    if m is None:
        return None
    kind = int if m[1] == "an integer" else float
    number = lambda text: int(text) if re.fullmatch(r"-?\d+", text) else float(text)  # noqa: E731
    if m[2]:
        return kind, number(m[3]), None, m[2] == ">", False
    return kind, number(m[5]), number(m[6]), m[4] == "(", m[7] == ")"


def bad_values(kind, low, high, low_open, high_open):
    """Values just outside the range, one of the wrong kind, and one that is no number."""
    out = [str(low if low_open else low - 1), "2.5" if kind is int else "nan", "x"]
    return out + ([str(high if high_open else high + 1)] if high is not None else [])


BAD_FLAGS = [(script, flag, bad) for script, module in (("train", train), ("eval", ev))
             for flag, action in numeric_flags(module).items() if bounds(action.type)
             for bad in bad_values(*bounds(action.type))]


def snapshot(folder):
    """(size, mtime) of every file and folder below `folder`: whatever a command creates or writes shows."""
    stat = lambda path: (os.stat(path).st_size, os.stat(path).st_mtime_ns)  # noqa: E731
    return {os.path.relpath(os.path.join(d, name), folder): stat(os.path.join(d, name))
            for d, dirs, files in os.walk(folder) for name in dirs + files}


@pytest.mark.parametrize("module", [train, ev], ids=["train", "eval"])
def test_every_numeric_flag_has_a_range_holding_its_default(module):
    """A flag added later with type=int (or a numeric default and no type) fails here: use simlap.positive_int & co."""
    for flag, a in numeric_flags(module).items():
        if a.type in (int, float) or type(a.default) in (int, float):
            assert bounds(a.type), f"{flag}: give it a simlap.ranged type"
        if bounds(a.type) and a.default is not None:
            assert a.type(str(a.default)) == a.default, flag
    assert len(BAD_FLAGS) > 60


@pytest.mark.parametrize("script, flag, bad", BAD_FLAGS, ids=[" ".join(case) for case in BAD_FLAGS])
def test_impossible_flag_value_exits_2_with_one_line_and_writes_nothing(script, flag, bad, tmp_path, weights,
                                                                        monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where a default output folder would go
    if script == "train":
        cli, argv = train.cli, [*TINY, "--workers", "0", "--output-dir", str(tmp_path / "out")]
    else:  # its default output folder is the folder of the weights
        cli, argv = ev.cli, ["--checkpoint", str(weights / "checkpoint.pt"), *EVAL_TINY]
    before = snapshot(tmp_path), snapshot(weights)
    with pytest.raises(SystemExit) as exit:
        cli([*argv, flag, bad])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith(f"{script}.py: error: argument {flag}: {bad} is not "), err
    assert err.count("\n") == 1 and (snapshot(tmp_path), snapshot(weights)) == before


def test_impossible_flag_combinations_fail_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    cases = {"ViT patch": ["--arch", "vit_tiny", "--image-size", "30"],
             "kNN bank below k": ["--synthetic-per-class", "1", "--batch-size", "8", "--knn-every", "1"],
             "batch above data": ["--synthetic-per-class", "1", "--batch-size", "32"]}
    for name, args in cases.items():
        with pytest.raises(simlap.UserError) as e:
            train.main([*TINY, "--workers", "0", "--output-dir", str(out), *args])
        assert "\n" not in str(e.value) and not out.exists(), name


def test_arch_of_names_every_arch_at_any_image_size():
    """A new arch needs its row in eval.ARCH_SIGNATURES: this fails until it has one."""
    for arch in simlap.ARCHS:
        for small, size in ((True, 16), (False, 224)):
            with torch.device("meta"):  # shapes only, nothing allocated
                net, _ = simlap.build_backbone(arch, small, size)
            assert ev.arch_of(net.state_dict()) == arch, (arch, small)
    assert ev.arch_of({"conv1.weight": torch.zeros(64, 3, 3, 3)}) is None and ev.arch_of([1]) is None


def test_untrusted_or_mismatched_weights_are_refused_saying_what_was_found(tmp_path, weights, capsys):
    ran = tmp_path / "code-ran"

    class Payload:  # unpickling it would call open(ran, "w")
        def __reduce__(self):
            return open, (str(ran), "w")

    evil, vit = str(tmp_path / "evil.pt"), str(tmp_path / "vit.pt")
    torch.save({"model": {}, "args": Payload(), "step": 0}, evil)
    with torch.device("meta"):
        torch.save(simlap.build_backbone("vit_small", True, 16)[0].state_dict(), vit)
    ckpt, backbone = str(weights / "checkpoint.pt"), str(weights / "backbone.pt")
    refused = "contains pickled code/objects (io.open) that weights_only loading refuses; it was not loaded"
    cases = [(ev.cli, ["--checkpoint", evil], f"--checkpoint {evil} {refused}"),
             (ev.cli, ["--backbone", evil], f"--backbone {evil} {refused}"),
             (train.cli, [*TINY, "--resume", evil, "--output-dir", str(tmp_path / "out")],
              f"checkpoint {evil} {refused}"),
             (ev.cli, ["--backbone", backbone, "--arch", "resnet50"],
              f"--backbone {backbone} holds a resnet18 backbone, but --arch resnet50 was asked for; "
              "pass --arch resnet18"),
             (ev.cli, ["--backbone", vit, "--arch", "vit_tiny"], "holds a vit_small backbone, but --arch vit_tiny"),
             (ev.cli, ["--checkpoint", backbone], "it holds a bare resnet18 backbone: pass it as --backbone"),
             (ev.cli, ["--backbone", ckpt], "is a train.py checkpoint: pass it as --checkpoint")]
    before = snapshot(tmp_path), snapshot(weights)
    for cli, argv, expected in cases:
        with pytest.raises(SystemExit) as exit:
            cli([*argv, "--workers", "0", *(["--device", "cpu"] if cli is ev.cli else [])])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and expected in err, err
        assert "False" not in err  # torch's advice to retry with weights_only=False is not passed on
    assert not ran.exists() and (snapshot(tmp_path), snapshot(weights)) == before


def test_output_lock_refuses_a_live_run_and_takes_over_a_dead_ones(tmp_path, capsys):
    """A first run in its own process holds the lock; a second one (here, in this process) is refused without
    changing anything; once the first is killed (-9: no clean-up runs), a restart takes its lock over."""
    out, lock = tmp_path / "run", tmp_path / "run" / "train.lock"
    argv = [*TINY, "--workers", "0", "--epochs", "10000", "--output-dir", str(out)]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *argv], stdout=log, stderr=log)
    try:
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().startswith(f"pid {first.pid} ")):
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.1)
        os.kill(first.pid, signal.SIGSTOP)  # alive and holding the lock, but frozen: the folder stays as it is
        before = snapshot(out)
        with pytest.raises(SystemExit) as exit:
            train.cli([*argv, "--stop-after", "1"])  # (were it not refused, it would not train for long)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1, err
        assert f"in use by another live run (pid {first.pid} on host {socket.gethostname()}, started " in err
        assert snapshot(out) == before
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        first.kill()
    stale = lock.read_text().strip()
    assert stale.startswith(f"pid {first.pid} ")  # left behind by the killed run
    train.main([*argv, "--stop-after", "1"])
    notices = [line for line in capsys.readouterr().err.splitlines() if "train.lock" in line]
    assert notices == [f"train.py: {lock} was left by a run that is gone ({stale}); taking it over"]
    assert lock.read_text() == "" and train._lock is None  # released at the end
# ----------------------------------------------------------------------------------------------- pseudo labels
def blobs(per_cluster, k, dim, noise, seed=0):
    """k well-separated directions (orthonormal centres), rows in shuffled order with random norms (which the
    cosine ignores) -> x (N, dim), generating labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(dim, k, generator=g))[0].T  # (k, dim)
    y = torch.arange(k).repeat_interleave(per_cluster)[torch.randperm(k * per_cluster, generator=g)]
    x = (centres[y] + noise * torch.randn(len(y), dim, generator=g)) * (0.5 + torch.rand(len(y), 1, generator=g))
    return x, y


def test_kmeans_recovers_separated_clusters_deterministically():
    x, y = blobs(20, 12, 24, 0.05)
    u = F.normalize(x, dim=1)
    for seed in range(8):  # k-means++ matters here: a uniform random start fails 5 of these 8 seeds
        labels, centroids = ev.kmeans(x, 12, iters=10, seed=seed, chunk=50)  # chunks smaller than N
        assert ev.cluster_agreement(labels, y) == {"nmi": pytest.approx(1.0), "purity": 1.0}, seed
        means = F.normalize(torch.stack([u[labels == c].sum(0) for c in range(12)]), dim=1)
        assert torch.allclose(centroids, means, atol=1e-6)  # centroids = normalised means of their clusters
    a, b = ev.kmeans(x, 12, seed=3), ev.kmeans(x, 12, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], ev.kmeans(x, 12, seed=4)[0])  # (the same partition, other cluster ids)


def test_kmeans_iterations_equal_plain_lloyd():
    """From the same start, the chunked iterations equal Lloyd's algorithm written with the full (N, K) matrix."""
    x = torch.randn(300, 10, generator=torch.Generator().manual_seed(0)) + 0.5
    init = x[:6]
    u, c = F.normalize(x, dim=1), F.normalize(init, dim=1)
    for _ in range(4):
        ref = (u @ c.T).argmax(1)
        assert torch.bincount(ref, minlength=6).min() > 0  # no re-seeding in this reference
        c = F.normalize(torch.stack([u[ref == j].sum(0) for j in range(6)]), dim=1)
    labels, centroids = ev.kmeans(x, 6, iters=4, init=init, chunk=64)
    assert torch.equal(labels, ref) and torch.allclose(centroids, c, atol=1e-6)


def test_kmeans_reseeds_empty_clusters_with_the_farthest_rows():
    # the third start direction is nearest to no row: its cluster empties and takes the row farthest from its
    # centroid, row 2 (cosine 0.89 with [1, 0]; all others > 0.99)
    x = torch.tensor([[1, 0.], [1, .1], [1, -.5], [0, 1.], [.1, 1]])
    labels, centroids = ev.kmeans(x, 3, iters=1, init=torch.tensor([[1, 0.], [0, 1.], [-1, -1.]]))
    assert labels.tolist() == [0, 0, 2, 1, 1] and torch.allclose(centroids[2], F.normalize(x[2], dim=0))
    # never a cluster's last row: row 4 is the farthest (0.83 with [-1, -1]) but alone, so row 3 (0.98) moves
    x = torch.tensor([[1, 0.], [1, .1], [0, 1.], [.2, 1], [-1, -.2]])
    labels, _ = ev.kmeans(x, 4, iters=1, init=torch.tensor([[1, 0.], [0, 1.], [-1, -1.], [0, -1.]]))
    assert labels.tolist() == [0, 0, 1, 3, 2]
    # more clusters than distinct rows: duplicates are split so that every cluster is non-empty, on every pass
    x = torch.eye(3).repeat(10, 1)
    for iters in (1, 2, 5):
        labels, _ = ev.kmeans(x, 5, iters=iters)
        assert torch.bincount(labels, minlength=5).min() > 0
        assert ev.cluster_agreement(labels, torch.arange(3).repeat(10))["purity"] == 1.0  # a cluster: one row value
    with pytest.raises(ValueError, match="k-means"):
        ev.kmeans(x, 31)


def test_cluster_agreement_against_hand_computation():
    pred, true = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 1, 1])
    # contingency n = [[2, 1], [0, 3]], N = 6, cluster sizes 3 and 3, class sizes 2 and 4
    mi = 2 / 6 * math.log(6 * 2 / (3 * 2)) + 1 / 6 * math.log(6 * 1 / (3 * 4)) + 3 / 6 * math.log(6 * 3 / (3 * 4))
    h_pred, h_true = math.log(2), -(2 / 6 * math.log(2 / 6) + 4 / 6 * math.log(4 / 6))
    res = ev.cluster_agreement(pred, true)
    assert res["nmi"] == pytest.approx(mi / ((h_pred + h_true) / 2)) and res["purity"] == pytest.approx(5 / 6)
    # known values: a renamed perfect clustering, one cluster, independent labels; unused cluster ids are harmless
    t = torch.tensor
    assert ev.cluster_agreement(t([1, 1, 0, 0]), t([0, 0, 1, 1])) == {"nmi": pytest.approx(1.0), "purity": 1.0}
    assert ev.cluster_agreement(t([0, 0, 0, 0]), t([0, 1, 2, 3])) == {"nmi": 0.0, "purity": 0.25}
    assert ev.cluster_agreement(t([0, 1, 0, 1]), t([0, 0, 1, 1]))["nmi"] == pytest.approx(0.0, abs=1e-12)
    assert ev.cluster_agreement(t([7, 7, 2, 2]), t([0, 0, 1, 1]))["nmi"] == pytest.approx(1.0)
    # random labels against the textbook double sum over the contingency table
    g = torch.Generator().manual_seed(0)
    pred, true = torch.randint(7, (200,), generator=g), torch.randint(5, (200,), generator=g)
    n = [[int(((pred == i) & (true == j)).sum()) for j in range(5)] for i in range(7)]
    a, b = [sum(r) for r in n], [sum(c) for c in zip(*n)]
    mi = sum(n[i][j] / 200 * math.log(200 * n[i][j] / (a[i] * b[j])) for i in range(7) for j in range(5) if n[i][j])
    h = lambda counts: -sum(c / 200 * math.log(c / 200) for c in counts if c)  # noqa: E731
    res = ev.cluster_agreement(pred, true)
    assert res["nmi"] == pytest.approx(2 * mi / (h(a) + h(b))) and res["purity"] == pytest.approx(sum(map(max, n)) / 200)


def test_fingerprint_detects_other_samples_and_order(tmp_path):
    ds = simlap.SyntheticShapes("train", per_class=3)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    shuffled = simlap.SyntheticShapes("train", per_class=3)
    shuffled.targets, shuffled.images = ds.targets[perm], ds.images[perm]
    other = simlap.SyntheticShapes("train", per_class=3, classes=[15, *range(1, 16)])  # same labels, one class swapped
    assert simlap.fingerprint(ds) == simlap.fingerprint(simlap.SyntheticShapes("train", per_class=3))
    assert len({simlap.fingerprint(d) for d in (ds, shuffled, other)}) == 3
    for cls, n in (("a", 2), ("b", 2)):  # an ImageFolder: the same files elsewhere match, a renamed one does not
        os.makedirs(tmp_path / "f" / "train" / cls)
        for i in range(n):
            png = str(tmp_path / "f" / "train" / cls / f"{i}.png")
            torchvision.io.write_png(torch.zeros(3, 4, 4, dtype=torch.uint8), png)
    folder = lambda: simlap.build_dataset("imagefolder", str(tmp_path / "f"), "train")  # noqa: E731
    before = simlap.fingerprint(folder())
    os.rename(tmp_path / "f", tmp_path / "g")
    assert simlap.fingerprint(simlap.build_dataset("imagefolder", str(tmp_path / "g"), "train")) == before
    os.rename(tmp_path / "g", tmp_path / "f")
    os.rename(tmp_path / "f" / "train" / "b" / "1.png", tmp_path / "f" / "train" / "b" / "2.png")
    assert simlap.fingerprint(folder()) != before


@pytest.fixture(scope="module")
def label_file(weights, tmp_path_factory):
    """eval.py --kmeans 4 on the tiny checkpoint's train split (synthetic, 2 per class: 32 samples)."""
    out = tmp_path_factory.mktemp("kmeans")
    res = ev.main(["--checkpoint", str(weights / "checkpoint.pt"), *EVAL_TINY, "--k", "5", "--kmeans", "4",
                   "--output-dir", str(out)])
    return out / "pseudo_labels_4.pt", res


LABELLED = [*TINY, "--workers", "0", "--synthetic-per-class", "2", "--image-size", "16", "--batch-size", "16",
            "--epochs", "1"]  # the label file's data set: 32 samples, 2 steps


def test_pseudo_label_round_trip(tmp_path, weights, label_file, monkeypatch):
    path, res = label_file
    f = torch.load(path, weights_only=True)
    true = simlap.SyntheticShapes("train", per_class=2).targets
    assert f["labels"].shape == (32,) and f["centroids"].shape == (4, 512) and f["num_clusters"] == 4
    assert torch.bincount(f["labels"], minlength=4).min() > 0 and not torch.equal(f["labels"], true)
    assert res["kmeans"]["nmi"] == ev.cluster_agreement(f["labels"], true)["nmi"] == f["nmi"]
    # the labels are k-means of exactly the features eval.py extracts (eval transform, index order)
    bb, _, _ = ev.load_weights(str(weights / "checkpoint.pt"))
    ds = simlap.SyntheticShapes("train", per_class=2, transform=simlap.eval_transform(16))
    feats, _ = simlap.extract_features(bb, torch.utils.data.DataLoader(ds, batch_size=8), torch.device("cpu"))
    assert torch.equal(ev.kmeans(feats, 4)[0], f["labels"])
    # eval.py --labels reports the same agreement
    again = ev.main(["--checkpoint", str(weights / "checkpoint.pt"), *EVAL_TINY, "--labels", str(path), "--output-dir",
                     str(tmp_path / "again")])
    assert again["labels"]["nmi"] == res["kmeans"]["nmi"] and again["labels"]["purity"] == res["kmeans"]["purity"]
    # train.py --labels: every label the model sees in one epoch (all 32 samples) is a pseudo label
    seen, forward = [], simlap.SimLAP.forward
    spy = lambda self, x1, x2, y, *a, **k: seen.append(y) or forward(self, x1, x2, y, *a, **k)  # noqa: E731
    monkeypatch.setattr(simlap.SimLAP, "forward", spy)
    train.main([*LABELLED, "--labels", str(path), "--output-dir", str(tmp_path / "run")])
    assert torch.equal(torch.bincount(torch.cat(seen), minlength=4), torch.bincount(f["labels"], minlength=4))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["args"]["num_classes"] == 4 and ckpt["model"]["filter.embed.weight"].shape[0] == 4
    assert ckpt["args"]["labels"] == str(path) and len(ckpt["args"]["labels_fingerprint"]) == 16


def test_mismatched_label_file_is_refused(tmp_path, weights, label_file, capsys):
    path, _ = label_file
    f = torch.load(path, weights_only=True)
    edited = lambda name, **change: torch.save({**f, **change}, tmp_path / name) or str(tmp_path / name)  # noqa: E731
    shuffled = simlap.SyntheticShapes("train", per_class=2)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    shuffled.targets, shuffled.images = shuffled.targets[perm], shuffled.images[perm]
    cases = {"other length": [str(path), "--synthetic-per-class", "3"],
             "other samples, same length": [str(path), "--synthetic-per-class", "4", "--classes",
                                            ",".join(map(str, range(8)))],
             "other order": [edited("order.pt", fingerprint=simlap.fingerprint(shuffled))],
             "other data set": [edited("cifar.pt", dataset="cifar10")],
             "labels out of range": [edited("range.pt", num_clusters=2)],
             "not a label file": [edited("no.pt", labels=[1, 2])],
             "missing file": [str(tmp_path / "nope.pt")]}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *LABELLED, "--labels", *cases["other order"],
                           "--output-dir", str(tmp_path / "cli")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("train.py: error: --labels") and proc.stderr.count("\n") == 1
    assert "another order" in proc.stderr
    for name, (file, *flags) in cases.items():
        with pytest.raises(simlap.UserError) as e:
            train.main([*LABELLED, *flags, "--labels", file, "--output-dir", str(tmp_path / name)])
        assert "\n" not in str(e.value) and "--labels" in str(e.value), name
        assert not (tmp_path / name).exists(), name  # nothing written
    with pytest.raises(SystemExit) as e:  # eval.py --labels refuses the same way, before extracting features
        ev.cli(["--checkpoint", str(weights / "checkpoint.pt"), *EVAL_TINY, "--labels", cases["other order"][0]])
    assert e.value.code == 2 and "another order" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # more clusters than samples
        ev.cli(["--checkpoint", str(weights / "checkpoint.pt"), *EVAL_TINY, "--kmeans", "33"])
    assert e.value.code == 2 and "--kmeans 33" in capsys.readouterr().err
    # resuming with other labels is refused: same data set and fingerprint, other clusters
    run = tmp_path / "resume"
    train.main([*LABELLED, "--labels", str(path), "--output-dir", str(run), "--stop-after", "1"])
    other = edited("other.pt", labels=(f["labels"] + 1) % 4)
    with pytest.raises(simlap.UserError, match="labels_fingerprint"):
        train.main([*LABELLED, "--labels", other, "--output-dir", str(run)])
    assert not (tmp_path / "cli").exists()
