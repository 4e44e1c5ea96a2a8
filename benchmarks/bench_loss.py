"""Benchmark of the subspace loss (eq. 2): simlap_loss against a naive (B, B, D) version and plain InfoNCE.

    python benchmarks/bench_loss.py                          # default grid B in {256,1024,4096} x D in {256,2048}
    python benchmarks/bench_loss.py --device cuda            # on a GPU (the default when one is present)
    python benchmarks/bench_loss.py --batch-sizes 512 --dims 128 256 --repeats 5
    python benchmarks/bench_loss.py --threads 1              # a busy shared CPU: 2 threads can be slower than 1
    python benchmarks/bench_loss.py --smoke                  # one tiny case, for CI

Three implementations get the same inputs q, k (B, D), gates (B, D) in (0, 1), labels from --classes classes and
partners from simlap.sample_partners('arbitrary'); each is timed on forward + backward (median of --repeats):
    simlap   simlap.simlap_loss: s_ij = cos(g_i⊙q_i, g_i⊙k_j) from two (B, D) x (D, B) matmuls, O(B² + BD) memory
    naive    eq. 2 written literally: z̄_ij = g_i⊙k_j materialised as a (B, B, D) tensor, then the cosine.
             Run only where its estimated memory is under --max-naive-gib. Its loss and gradients must match
             simlap's (checked with allclose), so the benchmark is also a correctness test.
    infonce  plain InfoNCE on the same q, k without gates: cross_entropy(q̂ k̂ᵀ / τ, arange(B)), the floor.
Each (implementation, B, D) runs in a fresh child process (this script with --case) that runs every implementation
once on tiny inputs (so lazily loaded libraries are not charged to the case) and builds the inputs: the baseline.
Peak memory is what the timed runs add to it: on CPU max RSS (ru_maxrss) after minus before them (importing torch
leaves no transient above the steady RSS, so "before" is what a child that only builds the inputs would report),
on CUDA max_memory_allocated() minus what the inputs hold.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import simlap  # noqa: E402
from common import add_output_flags, machine_info, peak_bytes, run_child, write_json  # noqa: E402

IMPLS = ("simlap", "naive", "infonce")
NAIVE_BYTES_PER_ELEMENT = 12  # measured peak of naive_loss (fp32, CPU) per element of z_bar: three (B, B, D) tensors


def naive_loss(q, k, y, y2, gates, temperature):
    """Eq. 2 as printed: for anchor i, positives p (label y2_i) and negatives n (label neither y_i nor y2_i),
    mean over pairs of -log(e^{s_ip/τ} / (e^{s_ip/τ} + Σ_n e^{s_in/τ})), s_ij = cos(g_i⊙q_i, g_i⊙k_j)."""
    z_bar = gates[:, None, :] * k[None, :, :]  # (B, B, D): key j seen in anchor i's subspace
    q_bar = gates * q  # (B, D)
    s = torch.einsum("ijd,id->ij", z_bar, q_bar) / (z_bar.norm(dim=-1) * q_bar.norm(dim=-1, keepdim=True))  # (B, B)
    e = (s / temperature).exp()  # |s| <= 1, so e <= e^{1/τ}: no overflow for τ >= 0.02
    pos = y2[:, None] == y[None, :]
    neg = (y[None, :] != y[:, None]) & ~pos
    per_pair = -(e / (e + (e * neg).sum(1, keepdim=True))).log()  # (B, B)
    return per_pair[pos].mean()


def infonce_loss(q, k, temperature):
    return F.cross_entropy(F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / temperature,
                           torch.arange(len(q), device=q.device))


def make_inputs(B, D, classes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU, so every device sees the same numbers
    q, k = torch.randn(B, D, generator=gen), torch.randn(B, D, generator=gen)
    gates = torch.rand(B, D, generator=gen)
    y = torch.randint(classes, (B,), generator=gen)
    y2 = simlap.sample_partners(y, "arbitrary", num_classes=classes, generator=gen)
    q, k, gates = (t.to(device).requires_grad_() for t in (q, k, gates))
    return q, k, gates, y.to(device), y2.to(device)


def run_impl(impl, q, k, gates, y, y2, temperature):
    """One forward + backward; returns the loss (float)."""
    for t in (q, k, gates):
        t.grad = None
    loss = (simlap.simlap_loss(q, k, y, y2, gates, temperature) if impl == "simlap" else
            naive_loss(q, k, y, y2, gates, temperature) if impl == "naive" else infonce_loss(q, k, temperature))
    loss.backward()
    return loss.item()


def run_case(args):
    """Child process: time one implementation at one (B, D); print one JSON line."""
    impl, B, D = args.case.split(",")
    B, D, device = int(B), int(D), torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tiny = make_inputs(8, 8, 4, device)
    for name in IMPLS:  # lazily loaded libraries and thread pools then belong to the baseline
        run_impl(name, *tiny, args.temperature)
    inputs = make_inputs(B, D, args.classes, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else peak_bytes(cuda)
    for _ in range(args.warmup):
        run_impl(impl, *inputs, args.temperature)
    times = []
    while len(times) < args.repeats and (not times or sum(times) < args.max_seconds):
        sync()
        t0 = time.perf_counter()
        loss = run_impl(impl, *inputs, args.temperature)
        sync()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"impl": impl, "B": B, "D": D, "loss": loss, "ms": 1e3 * statistics.median(times),
                      "repeats": len(times), "extra_bytes": peak_bytes(cuda) - base,
                      "grad_norms": [t.grad.norm().item() for t in inputs[:3] if t.grad is not None]}))


def child(args, impl, B, D):
    argv = ["--case", f"{impl},{B},{D}", "--device", args.device, "--repeats", str(args.repeats), "--warmup",
            str(args.warmup), "--max-seconds", str(args.max_seconds), "--threads", str(args.threads), "--classes",
            str(args.classes), "--temperature", str(args.temperature)]
    return run_child(__file__, argv, f"case {impl} B={B} D={D}")


def main():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="default: cuda if available, else cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096], help="default: 256 1024 4096")
    p.add_argument("--dims", type=int, nargs="+", default=[256, 2048], help="default: 256 2048")
    p.add_argument("--classes", type=int, default=100, help="labels are drawn from this many classes (default: 100)")
    p.add_argument("--temperature", type=float, default=0.1, help="τ (default: 0.1)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs, median kept (default: 10 on cuda, 3 on cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 3 on cuda, 1 on cpu)")
    p.add_argument("--max-seconds", type=float, default=15.0,
                   help="stop repeating a case once its timed runs took this long, keeping at least one (default: 15)")
    p.add_argument("--max-naive-gib", type=float, default=None,
                   help="skip the naive version above this estimated peak (default: 6 on cpu, half the GPU on cuda)")
    add_output_flags(p, "bench_loss", "one tiny case (B=64, D=32), for CI")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: IMPL,B,D in a child process
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.repeats = args.repeats or (10 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if args.case:
        return run_case(args)
    if args.smoke:
        args.batch_sizes, args.dims, args.classes, args.repeats, args.warmup = [64], [32], 8, 1, 0
    if args.max_naive_gib is None:
        args.max_naive_gib = torch.cuda.get_device_properties(device).total_memory / 2 ** 31 if gpu else 6.0
    info = machine_info(device)
    print(json.dumps(info))

    rows = []
    for B in args.batch_sizes:
        for D in args.dims:
            r = {"B": B, "D": D, "naive_est_gib": NAIVE_BYTES_PER_ELEMENT * B * B * D / 2 ** 30}
            for impl in IMPLS:
                if impl == "naive" and r["naive_est_gib"] > args.max_naive_gib:
                    continue
                res = child(args, impl, B, D)
                r.update({f"{impl}_{key}": res[key] for key in ("ms", "repeats", "loss", "grad_norms")})
                r[f"{impl}_mib"] = res["extra_bytes"] / 2 ** 20
            if "naive_ms" in r:  # fail loudly: the naive eq. 2 and simlap_loss must agree, loss and gradients
                a = torch.tensor([r["simlap_loss"], *r["simlap_grad_norms"]], dtype=torch.float64)
                b = torch.tensor([r["naive_loss"], *r["naive_grad_norms"]], dtype=torch.float64)
                r["max_rel_diff"] = ((a - b).abs() / b.abs()).max().item()
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), f"naive != simlap at B={B} D={D}: {b} vs {a}"
            rows.append(r)
            print(json.dumps(r))

    table = markdown_table(rows)
    print(f"\n{info['summary']}, torch {info['torch']}, fp32, forward + backward, median of up to {args.repeats} runs "
          f"(fewer where they took > {args.max_seconds:g} s)\n\n{table}")
    write_json(args, "bench_loss", {"machine": info, "args": vars(args), "results": rows})


def markdown_table(rows):
    head = ("| B | D | SimLAP ms | naive ms | InfoNCE ms | naive / SimLAP time | SimLAP / InfoNCE time "
            "| SimLAP MiB | naive MiB | InfoNCE MiB | naive / SimLAP memory | naive = SimLAP (max rel. diff) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    ratio = lambda a, b: f"{a / b:.1f}x" if b > 0 else "–"  # noqa: E731
    mib = lambda x: f"{x:.1f}" if abs(x) < 10 else f"{x:.0f}"  # noqa: E731
    for r in rows:
        if "naive_ms" in r:
            naive = [f"{r['naive_ms']:.1f}", ratio(r["naive_ms"], r["simlap_ms"]), mib(r["naive_mib"]),
                     ratio(r["naive_mib"], r["simlap_mib"]), f"yes ({r['max_rel_diff']:.0e})"]
        else:
            naive = [f"n/a (would need {r['naive_est_gib']:.0f} GiB)", "–", "n/a", "–", "–"]
        lines.append(f"| {r['B']} | {r['D']} | {r['simlap_ms']:.1f} | {naive[0]} | {r['infonce_ms']:.1f} | {naive[1]} "
                     f"| {ratio(r['simlap_ms'], r['infonce_ms'])} | {mib(r['simlap_mib'])} | {naive[2]} "
                     f"| {mib(r['infonce_mib'])} | {naive[3]} | {naive[4]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
