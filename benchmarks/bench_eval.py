"""Benchmark of evaluation: the chunked kNN against a naive one, and the probe on cached features against one that
re-encodes the images every epoch.

    python benchmarks/bench_eval.py                   # kNN 50k x 10k x 512; probe on the synthetic set, 16 px
    python benchmarks/bench_eval.py --device cuda
    python benchmarks/bench_eval.py --checkpoint runs/synthetic-convnet-simlap/checkpoint.pt
    python benchmarks/bench_eval.py --smoke           # tiny and quick, for CI

kNN. Features: --bank x --queries Gaussian clusters in --dim dimensions (--classes centres, noise of the same
scale, so that neighbours are informative but not trivially so). Timed:
    simlap    simlap.knn_classify (eval.py's kNN): test rows in chunks of 1024, one (chunk, N) float64 matmul each,
              top-k, the weighted vote as one scatter_add over the k neighbours
    naive     the textbook loop: one query at a time, sort the whole bank, vote in Python over the k nearest
              (float64, the same tie rule: the lower bank index first). Run on the first --naive-queries queries
              and reported per query and extrapolated to all of them (said so in the table).
Both must predict the same class for every query the naive loop ran on; the script fails loudly otherwise.

Probe. A frozen ResNet-18 (random init, or the backbone of --checkpoint) on the synthetic set (--per-class train
images per class, a quarter of that for test, --image-size px). Three ways, all from the same backbone:
    re-encode   --epochs epochs of minibatch SGD (lr 0.1, momentum 0.9, batch 256) on a linear layer over standardised
                features; every epoch re-encodes every training image (how a probe on images is often written)
    cached      the same SGD, the same epochs and batches, on features extracted once (what eval.py does)
    L-BFGS      eval.py's probe (eval.linear_probe, --probe-iters iterations) on the same cached features
The backbone is in eval mode and sees no augmentation, so re-encode and cached see identical features and must reach
the same accuracy (checked); the difference is the time.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as evaluation  # noqa: E402  (eval.py; renamed: eval is a builtin)
import simlap  # noqa: E402
from common import add_output_flags, machine_info, write_json  # noqa: E402  (benchmarks/common.py)


def parse_args():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="default: cuda if available, else cpu")
    p.add_argument("--bank", type=int, default=50_000, help="kNN bank size N_train (default: 50000)")
    p.add_argument("--queries", type=int, default=10_000, help="kNN queries N_test (default: 10000)")
    p.add_argument("--dim", type=int, default=512, help="feature dimension (default: 512)")
    p.add_argument("--classes", type=int, default=100, help="kNN classes (default: 100)")
    p.add_argument("--k", type=int, default=20, help="neighbours (default: 20)")
    p.add_argument("--naive-queries", type=int, default=200, help="queries the naive loop runs on (default: 200)")
    p.add_argument("--checkpoint", default=None, help="probe a trained backbone (default: a random ResNet-18)")
    p.add_argument("--per-class", type=int, default=100, help="probe: train images per synthetic class (default: 100)")
    p.add_argument("--image-size", type=int, default=16, help="probe: image size (default: 16)")
    p.add_argument("--epochs", type=int, default=10, help="probe: SGD epochs of re-encode and cached (default: 10)")
    p.add_argument("--probe-iters", type=int, default=300, help="probe: L-BFGS iterations (default: 300, eval.py's)")
    add_output_flags(p, "bench_eval", "kNN 500 x 100 x 32, probe on 4 images per class at 8 px")
    args = p.parse_args()
    if args.smoke:
        args.bank, args.queries, args.dim, args.classes, args.naive_queries = 500, 100, 32, 10, 20
        args.per_class, args.image_size, args.epochs, args.probe_iters = 4, 8, 2, 20
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- kNN
def naive_knn(bank, bank_y, queries, k, T, num_classes):
    """One query at a time: every bank item's similarity, a full stable sort, a Python vote over the k nearest."""
    bank, queries = F.normalize(bank.double(), dim=1), F.normalize(queries.double(), dim=1)
    preds = []
    for q in queries:
        sims = bank @ q  # (N,)
        order = torch.sort(-sims, stable=True).indices[:k]  # equal similarities: lower index first
        scores = [0.0] * num_classes
        for j in order.tolist():
            scores[int(bank_y[j])] += float((sims[j] / T).exp())
        preds.append(max(range(num_classes), key=lambda c: (scores[c], -c)))  # equal scores: lower class
    return torch.tensor(preds)


def bench_knn(args, device):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(args.classes, args.dim, generator=g)
    make = lambda n: (lambda y: (centres[y] + torch.randn(n, args.dim, generator=g), y))(  # noqa: E731
        torch.randint(args.classes, (n,), generator=g))
    (bank, bank_y), (queries, query_y) = make(args.bank), make(args.queries)
    bank, bank_y, queries = bank.to(device), bank_y.to(device), queries.to(device)
    simlap.knn_classify(bank[:1000], bank_y[:1000], queries[:10], args.k)  # warm-up (lazy library loading)
    sync(device)
    tic = time.perf_counter()
    pred = simlap.knn_classify(bank, bank_y, queries, args.k, 0.07, args.classes)
    sync(device)
    fast_s = time.perf_counter() - tic
    n = min(args.naive_queries, args.queries)
    tic = time.perf_counter()
    naive = naive_knn(bank, bank_y.cpu(), queries[:n], args.k, 0.07, args.classes)
    sync(device)
    naive_s = time.perf_counter() - tic
    agree = (naive == pred[:n].cpu()).sum().item()
    if agree != n:  # fail loudly: the benchmark is also a correctness check
        raise SystemExit(f"bench_eval.py: the kNN disagrees with the naive loop on {n - agree} of {n} queries")
    return {"bank": args.bank, "queries": args.queries, "dim": args.dim, "k": args.k, "classes": args.classes,
            "simlap_s": fast_s, "naive_queries": n, "naive_s": naive_s, "naive_s_all_est": naive_s / n * args.queries,
            "speedup_est": naive_s / n * args.queries / fast_s, "agree": f"{agree}/{n}",
            "top1": 100 * (pred.cpu() == query_y).float().mean().item()}


# ----------------------------------------------------------------------------------------------- probe
def sgd_probe(batches_per_epoch, dim, num_classes, epochs, device, seed=0):
    """Minibatch SGD on a linear layer: batches_per_epoch(epoch) yields (x, y) standardised features."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(dim, num_classes).to(device)
    opt = torch.optim.SGD(linear.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(epochs):
        for x, y in batches_per_epoch(epoch):
            opt.zero_grad()
            F.cross_entropy(linear(x), y).backward()
            opt.step()
    return linear


def bench_probe(args, device):
    if args.checkpoint:
        backbone, _, _ = evaluation.load_weights(args.checkpoint)
    else:
        torch.manual_seed(0)
        backbone, _ = simlap.build_backbone("resnet18", small_images=True)
    backbone.to(device).eval()
    t = simlap.eval_transform(args.image_size)
    train_set = simlap.build_dataset("synthetic", None, "train", t, synthetic_per_class=args.per_class)
    test_set = simlap.build_dataset("synthetic", None, "test", t, synthetic_per_class=args.per_class)
    C, batch = len(train_set.classes), 256
    loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=batch)  # noqa: E731
    order = lambda epoch: torch.randperm(len(train_set), generator=torch.Generator().manual_seed(epoch))  # noqa: E731
    acc = lambda linear, x, y: 100 * (linear(x).argmax(1).cpu() == y).float().mean().item()  # noqa: E731
    res = {}

    # cached: extract once (standardised with train statistics, as eval.linear_probe does), then SGD epochs
    tic = time.perf_counter()
    (train_f, train_y), (test_f, test_y) = [simlap.extract_features(backbone, loader(ds), device)
                                            for ds in (train_set, test_set)]
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    x, x_test = ((train_f - mean) / std).to(device), ((test_f - mean) / std).to(device)
    extract_s = time.perf_counter() - tic
    linear = sgd_probe(lambda e: ((x[i], train_y[i].to(device)) for i in order(e).split(batch)),
                       x.shape[1], C, args.epochs, device)
    with torch.no_grad():
        res["cached"] = {"s": time.perf_counter() - tic, "extract_s": extract_s, "test_top1": acc(linear, x_test, test_y)}

    # re-encode: the same SGD on the same batches, encoding each batch's images again every epoch
    def encoded_batches(epoch):  # the same batches as the cached run, each one's images encoded again
        batches = torch.utils.data.DataLoader(train_set, batch_sampler=[i.tolist() for i in order(epoch).split(batch)])
        for imgs, y in batches:
            with torch.no_grad():
                f = backbone(imgs.to(device)).float()
            yield (f - mean.to(device)) / std.to(device), y.to(device)

    tic = time.perf_counter()
    with torch.no_grad():  # the test features, once, as any probe needs them at the end
        test_again = torch.cat([backbone(im.to(device)).float() for im, _ in loader(test_set)])
    test_again = (test_again - mean.to(device)) / std.to(device)
    linear2 = sgd_probe(encoded_batches, x.shape[1], C, args.epochs, device)
    with torch.no_grad():
        res["re-encode"] = {"s": time.perf_counter() - tic, "test_top1": acc(linear2, test_again, test_y)}
    if abs(res["re-encode"]["test_top1"] - res["cached"]["test_top1"]) > 100 / len(test_y) + 1e-6:
        raise SystemExit("bench_eval.py: the re-encoding probe and the cached probe disagree by more than one image")

    tic = time.perf_counter()
    lbfgs = evaluation.linear_probe(train_f, train_y, test_f, test_y, iters=args.probe_iters, device=device)
    res["lbfgs"] = {"s": time.perf_counter() - tic + extract_s, "extract_s": extract_s, "test_top1": lbfgs["test_top1"]}
    res.update(train_images=len(train_set), test_images=len(test_set), epochs=args.epochs,
               backbone=args.checkpoint or "random ResNet-18")
    return res


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine_info(device)
    print(json.dumps(info), flush=True)
    knn = bench_knn(args, device)
    print(json.dumps(knn), flush=True)
    probe = bench_probe(args, device)
    print(json.dumps(probe), flush=True)
    print(f"\n{info['summary']}, torch {info['torch']}\n\n"
          f"| kNN, {knn['bank']} x {knn['queries']} x {knn['dim']}, k={knn['k']} | seconds | predictions |\n|---|---|---|\n"
          f"| simlap.knn_classify (chunked, float64) | {knn['simlap_s']:.1f} | – |\n"
          f"| naive loop, per query | {knn['naive_s'] / knn['naive_queries']:.3f} | equal on {knn['agree']} |\n"
          f"| naive loop, all {knn['queries']} queries (extrapolated) | {knn['naive_s_all_est']:.0f} | – |\n"
          f"| speed-up (extrapolated) | {knn['speedup_est']:.0f}x | – |\n\n"
          f"| probe, {probe['train_images']} train / {probe['test_images']} test images | seconds | test top-1 % |\n"
          f"|---|---|---|\n"
          f"| re-encode every epoch, SGD {probe['epochs']} epochs | {probe['re-encode']['s']:.1f} | "
          f"{probe['re-encode']['test_top1']:.1f} |\n"
          f"| cached features, SGD {probe['epochs']} epochs (extraction {probe['cached']['extract_s']:.1f} s included)"
          f" | {probe['cached']['s']:.1f} | {probe['cached']['test_top1']:.1f} |\n"
          f"| cached features, eval.py's L-BFGS {args.probe_iters} iters (extraction included) | "
          f"{probe['lbfgs']['s']:.1f} | {probe['lbfgs']['test_top1']:.1f} |")
    write_json(args, "bench_eval", {"machine": info, "args": vars(args), "knn": knn, "probe": probe})


if __name__ == "__main__":
    main()
