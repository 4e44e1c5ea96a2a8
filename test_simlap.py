"""Tests for simlap. Run: python -m pytest -q test_simlap.py  (CPU only, ~5 minutes on 2 cores).
Every test compares against a slow obviously-correct reference, a closed form, or a second code path."""
import math

import pytest
import torch
import torch.nn.functional as F

import simlap


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
def test_loss_equals_brute_force(layout):
    torch.manual_seed(0)
    B, D, K = 12, 8, 4
    y = {"random": torch.randint(0, K, (B,)), "two_classes": torch.arange(B) % 2,
         "one_anchor_per_class": torch.arange(B), "partner_is_self": torch.randint(0, K, (B,))}[layout]
    y2 = y.clone() if layout == "partner_is_self" else y[torch.randperm(B)]  # partners present in the batch
    q, k = torch.randn(B, D, dtype=torch.float64), torch.randn(B, D, dtype=torch.float64)
    gates = torch.rand(B, D, dtype=torch.float64) * 0.98 + 0.01
    for tau in (0.1, 0.5):
        ours = simlap.simlap_loss(q, k, y, y2, gates, tau)
        ref = brute_force_loss(q, k, y, y2, gates, tau)
        assert torch.allclose(ours, ref, atol=1e-6, rtol=0), (layout, tau, ours, ref)


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


def test_instance_mode_is_cross_view_infonce():
    torch.manual_seed(2)
    B, D = 16, 32
    q, k = torch.randn(B, D), torch.randn(B, D)
    ids = torch.arange(B)
    ours = simlap.simlap_loss(q, k, ids, ids, torch.ones(B, D), 0.1)
    ref = F.cross_entropy(F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.1, ids)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_model_instance_mode_without_filter_is_simclr():
    """SimLAP(pairs='instance', use_filter=False) computes SimCLR's symmetric cross-view InfoNCE."""
    torch.manual_seed(3)
    m = simlap.SimLAP("resnet18", 4, small_images=True, proj_hidden=32, proj_dim=16, pairs="instance",
                      use_filter=False).eval()
    x1, x2, y = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    loss, _ = m(x1, x2, y)
    z1, z2 = F.normalize(m.projector(m.backbone(torch.cat([x1, x2]))), dim=1).chunk(2)
    ids = torch.arange(6)
    ref = (F.cross_entropy(z1 @ z2.T / 0.1, ids) + F.cross_entropy(z2 @ z1.T / 0.1, ids)) / 2
    assert torch.allclose(loss, ref, atol=1e-5)


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
    for mode in ("arbitrary", "identical", "distinct", "instance"):
        y2 = simlap.sample_partners(y, mode, num_classes=6, generator=gen)
        assert set(y2.tolist()) <= present, mode
        if mode in ("identical", "instance"):
            assert torch.equal(y2, y)
        if mode == "distinct":
            assert (y2 != y).all()
    # distinct in a one-class batch: impossible, marked -1 (the anchor is left out of the loss)
    assert (simlap.sample_partners(torch.zeros(4, dtype=torch.long), "distinct", num_classes=3) == -1).all()
    # partners come from the global batch, not only the local anchors
    y2 = simlap.sample_partners(torch.zeros(64, dtype=torch.long), "distinct", batch_labels=torch.tensor([0, 7]),
                                num_classes=8, generator=gen)
    assert (y2 == 7).all()
    # reproducible from a generator
    a = simlap.sample_partners(y, generator=torch.Generator().manual_seed(5), num_classes=6)
    b = simlap.sample_partners(y, generator=torch.Generator().manual_seed(5), num_classes=6)
    assert torch.equal(a, b)


def test_arbitrary_partners_are_uniform_over_present_classes():
    """y2 is uniform over the classes present, not over samples: class 0 holds 90% of the batch."""
    y = torch.tensor([0] * 90 + [1] * 5 + [2] * 5)
    y2 = torch.cat([simlap.sample_partners(y, generator=torch.Generator().manual_seed(s)) for s in range(60)])
    freq = torch.bincount(y2, minlength=3).float() / len(y2)  # 6000 draws; sd of a share ~ 0.006
    assert (freq - 1 / 3).abs().max() < 0.03, freq


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
