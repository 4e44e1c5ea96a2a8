"""Benchmark of evaluation.kmeans, the spherical k-means behind the pseudo labels of appendix C: time and memory.

    python benchmarks/bench_kmeans.py                  # 100 000 x 512 features, K = 100, 20 iterations, chunk 8192 and N
    python benchmarks/bench_kmeans.py --device cuda --n 1281167 --dim 2048 --clusters 1000   # ImageNet-sized, one GPU
    python benchmarks/bench_kmeans.py --chunks 2048 8192 32768 --threads 1
    python benchmarks/bench_kmeans.py --smoke          # seconds, for CI

Features: float32 rows of a mixture of --clusters random unit directions plus Gaussian noise of norm about
--noise, with random row norms (the cosine ignores them), generated on the device from a fixed seed. Each
--chunks value runs in a fresh child process (this script with --case), which first makes the features and runs a
tiny k-means (so lazily loaded libraries and thread pools belong to the baseline), then times
    total       evaluation.kmeans(x, K, iters, chunk=c): greedy k-means++ and the iterations
    iterations  the same iterations again, started from the centroids found (init=): the Lloyd part alone
and measures what k-means adds to memory beyond the features: on the CPU the growth of the max RSS over the RSS
just before (free heap memory handed back to the OS first, the max RSS reset: common.reset_peak), on CUDA
max_memory_allocated() minus the memory allocated before. The children run with MALLOC_MMAP_THRESHOLD_=65536:
glibc then maps every block of 64 KiB or more on its own and unmaps it when freed, so the RSS follows the live
tensors (with its default adaptive threshold, freed blocks stay in the heap and the peak depends on their layout).
That must stay within the memory model of evaluation.kmeans, O(chunk x (K + F)) plus a
few rows of N, checked here with explicit constants:
    bound = 4 bytes x [2 chunk (K + F) + 4 K F + N (8 + 2 (2 + ln K))] (+ 16 MiB of allocator slack on the CPU)
For comparison the table shows what a single (N, K) float32 similarity matrix would take; --chunks 0 means one
chunk of N rows, i.e. that matrix and a normalised copy of the features. The quality column is the NMI of the
clusters against the generating mixture components (eval.cluster_agreement).
"""
import argparse
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as evaluation  # noqa: E402  (eval.py; renamed: eval is a builtin)
from common import add_output_flags, machine_info, peak_bytes, reset_peak, run_child, write_json  # noqa: E402

SLACK_CPU = 16 * 2 ** 20  # glibc arenas, thread-pool stacks, page granularity


def make_features(n, dim, k, noise, device, seed=0, block=8192):
    """-> x (n, dim) float32 and the mixture component of every row (n,), on the device, made `block` rows at a time."""
    gen = torch.Generator(device).manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, dim, generator=gen, device=device), dim=1)
    y = torch.randint(k, (n,), generator=gen, device=device)
    x = torch.empty(n, dim, device=device)
    for rows, labels in zip(x.split(block), y.split(block)):
        noisy = centres[labels] + torch.randn(len(rows), dim, generator=gen, device=device) * (noise / math.sqrt(dim))
        rows.copy_(noisy * (0.5 + torch.rand(len(rows), 1, generator=gen, device=device)))
    return x, y


def memory_bound(n, dim, k, chunk, cuda):
    return 4 * (2 * chunk * (k + dim) + 4 * k * dim + n * (8 + 2 * (2 + int(math.log(k))))) + (0 if cuda else SLACK_CPU)


def run_case(args):
    """Child process: one chunk size; print one JSON line."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    x, y = make_features(args.n, args.dim, args.clusters, args.noise, device)
    chunk = args.case or args.n
    evaluation.kmeans(x[:64], 4, 2, chunk=chunk)  # the baseline includes lazily loaded libraries
    base = reset_peak(cuda)
    tic = time.perf_counter()
    labels, centroids = evaluation.kmeans(x, args.clusters, args.iters, chunk=chunk)
    sync()
    total = time.perf_counter() - tic
    extra = peak_bytes(cuda) - base
    tic = time.perf_counter()
    evaluation.kmeans(x, args.clusters, args.iters, chunk=chunk, init=centroids)
    sync()
    iterations = time.perf_counter() - tic
    print(json.dumps({"chunk": chunk, "total_s": total, "iterations_s": iterations, "extra_bytes": extra,
                      "bound_bytes": memory_bound(args.n, args.dim, args.clusters, chunk, cuda),
                      "nmi": evaluation.cluster_agreement(labels.cpu(), y.cpu())["nmi"],
                      "min_cluster": int(torch.bincount(labels, minlength=args.clusters).min())}))


def child(args, chunk):
    argv = ["--case", str(chunk), "--device", args.device, "--n", str(args.n), "--dim", str(args.dim), "--clusters",
            str(args.clusters), "--iters", str(args.iters), "--noise", str(args.noise), "--threads", str(args.threads)]
    return run_child(__file__, argv, f"chunk {chunk}")


def main():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="default: cuda if available, else cpu")
    p.add_argument("--n", type=int, default=100_000, help="rows N (default: 100000)")
    p.add_argument("--dim", type=int, default=512, help="feature dimension F (default: 512)")
    p.add_argument("--clusters", type=int, default=100, help="K, also the number of mixture components (default: 100)")
    p.add_argument("--iters", type=int, default=20, help="k-means iterations (default: 20)")
    p.add_argument("--noise", type=float, default=1.0, help="noise norm relative to the unit centres (default: 1.0)")
    p.add_argument("--chunks", type=int, nargs="+", default=[8192, 0], help="chunk sizes; 0 = N (default: 8192 0)")
    add_output_flags(p, "bench_kmeans", "N = 5000, F = 64, K = 10, 5 iterations (for CI)")
    p.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)  # internal: a chunk size, in a child
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.case is not None:
        return run_case(args)
    if args.smoke:
        args.n, args.dim, args.clusters, args.iters, args.chunks = 5000, 64, 10, 5, [1024, 0]
    info = machine_info(torch.device(args.device))
    print(json.dumps(info))
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # for the children: RSS = live memory (see above)
    rows = []
    for chunk in args.chunks:
        rows.append(child(args, chunk))
        print(json.dumps(rows[-1]), flush=True)
    mib = lambda b: f"{b / 2 ** 20:.0f}"  # noqa: E731
    lines = ["| chunk | total s (k-means++ and iterations) | iterations alone s | s / iteration | extra memory MiB | "
             "bound MiB | NMI |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['chunk']} | {r['total_s']:.1f} | {r['iterations_s']:.1f} | {r['iterations_s'] / args.iters:.2f} "
                     f"| {mib(r['extra_bytes'])} | {mib(r['bound_bytes'])} | {r['nmi']:.3f} |")
    print(f"\n{info['summary']}, torch {info['torch']}; N = {args.n}, F = {args.dim}, K = {args.clusters}, "
          f"{args.iters} iterations; features {mib(4 * args.n * args.dim)} MiB, an (N, K) float32 matrix "
          f"{mib(4 * args.n * args.clusters)} MiB\n\n" + "\n".join(lines))
    write_json(args, "bench_kmeans", {"machine": info, "args": vars(args), "results": rows})
    over = [r["chunk"] for r in rows if r["extra_bytes"] > r["bound_bytes"]]  # fail loudly, after the table
    assert not over, f"k-means used more memory than its model allows at chunk {over}"
    assert all(r["min_cluster"] > 0 for r in rows), "an empty cluster was returned"


if __name__ == "__main__":
    main()
