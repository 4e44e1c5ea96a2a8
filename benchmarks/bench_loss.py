"""Benchmark of the subspace loss (eq. 2): simlap_loss against a naive (B, B, D) version and plain InfoNCE.

    python benchmarks/bench_loss.py                          # default grid B in {256,1024,4096} x D in {256,2048}
    python benchmarks/bench_loss.py --batch-sizes 1024 --dims 256 --rounds 15   # SimLAP / InfoNCE at B = 1024
    python benchmarks/bench_loss.py --device cuda            # on a GPU (the default when one is present)
    python benchmarks/bench_loss.py --threads 1              # a busy shared CPU: 2 threads can be slower than 1
    python benchmarks/bench_loss.py --smoke                  # one tiny case, for CI

Three implementations get the same inputs q, k (B, D), gates (B, D) in (0, 1), labels from --classes classes and
partners from simlap.sample_partners('arbitrary'); each is timed on forward + backward:
    simlap   simlap.simlap_loss: s_ij = cos(g_i⊙q_i, g_i⊙k_j) from two (B, D) x (D, B) matmuls, O(B² + BD) memory
    naive    eq. 2 written literally: z̄_ij = g_i⊙k_j materialised as a (B, B, D) tensor, then the cosine.
             Run only where its estimated memory is under --max-naive-gib. Its loss and gradients must match
             simlap's (checked with allclose), so the benchmark is also a correctness test.
    infonce  plain InfoNCE on the same q, k without gates: cross_entropy(q̂ k̂ᵀ / τ, arange(B)), the floor.
Time: per (B, D) one child process runs the implementations round-robin (simlap, naive, infonce, simlap, ...),
one forward + backward each per round, after --warmup untimed runs, so that drift of a shared machine hits all
alike. Reported: the median over rounds of each, and the ratios as medians of the per-round ratios. Rounds stop
at --rounds or once they took --max-seconds (at least 2 rounds).
Memory: per (implementation, B, D) a fresh child runs every implementation once on tiny inputs (so lazily loaded
libraries are not charged to the case), builds the inputs (the baseline), then runs the case once. Peak memory is
what that run adds: on CPU max RSS (ru_maxrss) after minus before it (importing torch leaves no transient above
the steady RSS, so "before" is what a child that only builds the inputs would report), on CUDA
max_memory_allocated() minus what the inputs hold.
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
from common import add_output_flags, machine_info, peak_bytes, run_child, write_json  # noqa: E402  (benchmarks/common.py)

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
    """One forward + backward; returns the loss."""
    for t in (q, k, gates):
        t.grad = None
    loss = (simlap.simlap_loss(q, k, y, y2, gates, temperature) if impl == "simlap" else
            naive_loss(q, k, y, y2, gates, temperature) if impl == "naive" else infonce_loss(q, k, temperature))
    loss.backward()
    return loss.detach()


def run_memory_case(args):
    """Child process: peak memory of one implementation at one (B, D); prints one JSON line."""
    impl, B, D = args.memory_case.split(",")
    B, D, device = int(B), int(D), torch.device(args.device)
    cuda = device.type == "cuda"
    tiny = make_inputs(8, 8, 4, device)
    for name in IMPLS:  # lazily loaded libraries and thread pools then belong to the baseline
        run_impl(name, *tiny, args.temperature)
    inputs = make_inputs(B, D, args.classes, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else peak_bytes(cuda)
    run_impl(impl, *inputs, args.temperature)
    print(json.dumps({"impl": impl, "B": B, "D": D, "extra_bytes": peak_bytes(cuda) - base}))


def run_timing_case(args):
    """Child process: the implementations round-robin at one (B, D); prints one JSON line of seconds per round."""
    B, D, impls = args.timing_case.split(",")
    B, D, impls, device = int(B), int(D), impls.split("+"), torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    inputs = make_inputs(B, D, args.classes, device)
    out = {"B": B, "D": D, "seconds": {impl: [] for impl in impls}}
    for impl in impls:
        for _ in range(args.warmup):
            run_impl(impl, *inputs, args.temperature)
    results = {}
    while len(out["seconds"][impls[0]]) < args.rounds:
        for impl in impls:
            sync()
            t0 = time.perf_counter()
            loss = run_impl(impl, *inputs, args.temperature)
            sync()
            out["seconds"][impl].append(time.perf_counter() - t0)
            results[impl] = [loss, *(t.grad.clone() for t in inputs[:3] if t.grad is not None)]
        spent = sum(sum(v) for v in out["seconds"].values())
        if len(out["seconds"][impls[0]]) >= 2 and spent > args.max_seconds:
            break
    if "naive" in results:  # fail loudly: the naive eq. 2 and simlap_loss must agree, loss and gradients
        diffs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(results["simlap"], results["naive"])]
        out["max_rel_diff"] = max(diffs)
        assert out["max_rel_diff"] < 1e-4, f"naive != simlap at B={B} D={D}: relative differences {diffs}"
    out["loss"] = {impl: r[0].item() for impl, r in results.items()}
    print(json.dumps(out))


def child(args, flag, value):
    argv = [flag, value, "--device", args.device, "--rounds", str(args.rounds), "--warmup", str(args.warmup),
            "--max-seconds", str(args.max_seconds), "--threads", str(args.threads), "--classes", str(args.classes),
            "--temperature", str(args.temperature)]
    return run_child(__file__, argv, f"{flag} {value}")


def main():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="default: cuda if available, else cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096], help="default: 256 1024 4096")
    p.add_argument("--dims", type=int, nargs="+", default=[256, 2048], help="default: 256 2048")
    p.add_argument("--classes", type=int, default=100, help="labels are drawn from this many classes (default: 100)")
    p.add_argument("--temperature", type=float, default=0.1, help="τ (default: 0.1)")
    p.add_argument("--rounds", type=int, default=None, help="timed round-robin rounds (default: 20 on cuda, 7 on cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs of each first (default: 3 on cuda, 1 on cpu)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop the rounds of a (B, D) once they took this long, keeping at least 2 (default: 60)")
    p.add_argument("--max-naive-gib", type=float, default=None,
                   help="skip the naive version above this estimated peak (default: 6 on cpu, half the GPU on cuda)")
    add_output_flags(p, "bench_loss", "one tiny case (B=64, D=32), for CI")
    p.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)  # internal: IMPL,B,D in a child process
    p.add_argument("--timing-case", default=None, help=argparse.SUPPRESS)  # internal: B,D,IMPL+IMPL+...
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.rounds = args.rounds or (20 if gpu else 7)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if args.memory_case:
        return run_memory_case(args)
    if args.timing_case:
        return run_timing_case(args)
    if args.smoke:
        args.batch_sizes, args.dims, args.classes, args.rounds, args.warmup = [64], [32], 8, 2, 0
    if args.max_naive_gib is None:
        args.max_naive_gib = torch.cuda.get_device_properties(device).total_memory / 2 ** 31 if gpu else 6.0
    info = machine_info(device)
    print(json.dumps(info))

    rows = []
    for B in args.batch_sizes:
        for D in args.dims:
            r = {"B": B, "D": D, "naive_est_gib": NAIVE_BYTES_PER_ELEMENT * B * B * D / 2 ** 30}
            impls = [i for i in IMPLS if i != "naive" or r["naive_est_gib"] <= args.max_naive_gib]
            t = child(args, "--timing-case", f"{B},{D},{'+'.join(impls)}")
            for impl in impls:
                r[f"{impl}_ms"] = 1e3 * statistics.median(t["seconds"][impl])
                r[f"{impl}_mib"] = child(args, "--memory-case", f"{impl},{B},{D}")["extra_bytes"] / 2 ** 20
            per_round = lambda a, b: statistics.median(x / y for x, y in zip(t["seconds"][a], t["seconds"][b]))  # noqa: E731
            r.update(rounds=len(t["seconds"]["simlap"]), loss=t["loss"], seconds=t["seconds"],
                     simlap_over_infonce=per_round("simlap", "infonce"))
            if "naive" in impls:
                r.update(naive_over_simlap=per_round("naive", "simlap"), max_rel_diff=t["max_rel_diff"])
            rows.append(r)
            print(json.dumps(r))

    info["loadavg_end"] = os.getloadavg()
    table = markdown_table(rows)
    print(f"\n{info['summary']} at start, load {info['loadavg_end'][0]:.1f} at the end, torch {info['torch']}, fp32, "
          f"forward + backward, median of up to {args.rounds} interleaved rounds\n\n{table}")
    write_json(args, "bench_loss", {"machine": info, "args": vars(args), "results": rows})


def markdown_table(rows):
    head = ("| B | D | SimLAP ms | naive ms | InfoNCE ms | naive / SimLAP time | SimLAP / InfoNCE time "
            "| SimLAP MiB | naive MiB | InfoNCE MiB | naive / SimLAP memory | naive = SimLAP (max rel. diff) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    ratio = lambda a, b: f"{a / b:.1f}x" if b > 0 else "–"  # noqa: E731
    mib = lambda x: f"{x:.1f}" if abs(x) < 10 else f"{x:.0f}"  # noqa: E731
    for r in rows:
        if "naive_ms" in r:
            naive = [f"{r['naive_ms']:.1f}", f"{r['naive_over_simlap']:.1f}x", mib(r["naive_mib"]),
                     ratio(r["naive_mib"], r["simlap_mib"]), f"yes ({r['max_rel_diff']:.0e})"]
        else:
            naive = [f"n/a (would need {r['naive_est_gib']:.0f} GiB)", "–", "n/a", "–", "–"]
        lines.append(f"| {r['B']} | {r['D']} | {r['simlap_ms']:.1f} | {naive[0]} | {r['infonce_ms']:.1f} | {naive[1]} "
                     f"| {r['simlap_over_infonce']:.2f}x | {mib(r['simlap_mib'])} | {naive[2]} "
                     f"| {mib(r['infonce_mib'])} | {naive[3]} | {naive[4]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
