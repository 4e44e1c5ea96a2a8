"""Throughput of one full training step (forward, loss, backward, LARS) for SimLAP, SimCLR, SupCon, Hydra and
SimLAP-MoCo, and of the data augmentation: the batched on-device two_views() against the per-image torchvision
pipeline it replaced.

    python benchmarks/bench_step.py                          # CPU: the demo's convnet, 32 px, batch 256
    python benchmarks/bench_step.py --device cuda            # GPU: resnet50, 224 px, batch 256, bf16, channels_last
    python benchmarks/bench_step.py --device cuda --compile  # the same under torch.compile
    python benchmarks/bench_step.py --threads 1              # a busy shared CPU: 2 threads can be slower than 1
    python benchmarks/bench_step.py --smoke                  # tiny and quick, for CI
    python benchmarks/bench_step.py --device cuda --amp fp16 --modes SimLAP --no-augment   # fp16 + GradScaler

The modes are the same simlap.SimLAP model (same arch, image size, batch and initial weights) with another
method= (train.py's --method), so the difference is only the loss and the feature filter, and for SimLAP-MoCo its
heads and momentum encoder:
    SimLAP  simlap (arbitrary pairs, filter)     SimCLR  simclr (NT-Xent)
    SupCon  supcon (Khosla et al.)               Hydra   hydra (NT-Xent + SimLAP loss, filter)
    SimLAP-MoCo  simlap-moco (the momentum update and the momentum encoder's forward are in its step; its projector
                 has 3 layers and a predictor follows, both --proj-hidden wide, where the authors' are 4096)
    Backbone     the bare backbone alone, forward and backward of both views (loss: the features' mean), without
                 heads, filter, loss or optimizer: the floor under every method's step
--modes runs a subset. --amp fp16 runs each step as train.py --precision fp16 does, with torch.amp.GradScaler.
Inputs are random tensors already on the device (two views per image) with random labels from --classes classes:
no data loading is timed. Modes run round-robin (SimLAP, SimCLR, SupCon, Hydra, SimLAP-MoCo, SimLAP, ...), each
round timing --steps steps per mode, so that drift of a shared machine hits all modes alike. Reported: median
images/s over rounds (an image is two views), and each mode's step time over SimCLR's (and SimLAP-MoCo's over
SimLAP's) as the median of the per-round ratios. On CUDA the peak memory column is torch.cuda.max_memory_allocated()
while that mode ran, with all models resident.

Augmentation (same rounds): two views of --batch-size uint8 synthetic images at --image-size, (a) one image at a time
through the per-image torchvision v2 pipeline train.py used before (per_image_pipeline below), (b) simlap.two_views()
on the whole batch on --device; and a full SimLAP step with each, augmentation included, in this one process (no
loader workers, which on a GPU machine would run the per-image pipeline beside the model). --no-augment leaves
these out.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from torchvision.transforms import v2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import simlap  # noqa: E402
from common import add_output_flags, machine_info, write_json  # noqa: E402  (benchmarks/common.py)

MODES = {"SimLAP": "simlap", "SimCLR": "simclr", "SupCon": "supcon", "Hydra": "hydra",
         "SimLAP-MoCo": "simlap-moco", "Backbone": None}  # name -> method (None: the bare backbone)
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def per_image_pipeline(size):
    """One view, one image at a time: the torchvision pipeline train.py ran in its loader workers before two_views()
    (same augmentations and parameters: crop scale 0.2-1, flip, jitter 0.4/0.4/0.4/0.1 at p 0.8, grey 0.2, blur)."""
    blur = [v2.RandomApply([v2.GaussianBlur(2 * (size // 20) + 1, sigma=(0.1, 2.0))], p=0.5)] if size >= 64 else []
    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2), *blur,
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(simlap.MEAN, simlap.STD)])


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="default: cuda if available, else cpu")
    p.add_argument("--arch", default=None, choices=simlap.ARCHS, help="default: resnet50 on cuda, convnet on cpu")
    p.add_argument("--image-size", type=int, default=None, help="default: 224 on cuda, 32 on cpu")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step, 2 views each (default: 256)")
    p.add_argument("--classes", type=int, default=None,
                   help="random labels from this many classes (default: 100 on cuda, 16 on cpu)")
    p.add_argument("--proj-hidden", type=int, default=2048, help="projector hidden width (default: 2048)")
    p.add_argument("--proj-dim", type=int, default=256, help="projector output dim D (default: 256)")
    p.add_argument("--amp", default=None, choices=list(AMP),
                   help="autocast dtype, fp16 with a GradScaler (default: bf16 on cuda, none on cpu)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), metavar="MODE",
                   help=f"the steps to time, of {', '.join(MODES)} (default: all)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the augmentation, alone and in a SimLAP step (default: on)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for cuda, off for cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile each model (default: off)")
    p.add_argument("--rounds", type=int, default=None,
                   help="round-robin rounds, the median is reported (default: 10 on cuda, 7 on cpu)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per mode per round (default: 10 on cuda, 1 on cpu)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per mode first (default: 5 on cuda, 1 on cpu)")
    add_output_flags(p, "bench_step", "tiny convnet at 16 px, batch 8, one round (for CI)")
    args = p.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    if args.smoke:
        args.arch, args.image_size, args.batch_size, args.classes = "convnet", 16, 8, 4
        args.proj_hidden, args.proj_dim, args.rounds, args.steps, args.warmup = 64, 32, 1, 1, 1
    defaults = dict(arch=("resnet50", "convnet"), image_size=(224, 32), batch_size=(256, 256), classes=(100, 16),
                    amp=("bf16", "none"), channels_last=(True, True), rounds=(10, 7), steps=(10, 3), warmup=(5, 1))
    for name, (on_gpu, on_cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    info = machine_info(device)
    print(json.dumps(info))
    print(json.dumps(vars(args)))

    gen = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen)
              .to(device, memory_format=fmt) for _ in range(2))
    y = torch.randint(args.classes, (args.batch_size,), generator=gen).to(device)
    step_fns = {name: make_step(args, device, fmt, MODES[name], y, lambda: (x1, x2)) for name in args.modes}
    if args.augment:
        step_fns.update(augment_steps(args, device, fmt, y))

    def timed(name, n):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            loss = step_fns[name]()
        sync()
        seconds = (time.perf_counter() - t0) / n
        if not torch.isfinite(loss).all():  # fail loudly: a diverged run is not a valid timing
            raise FloatingPointError(f"{name}: non-finite loss {loss.item()}")
        return seconds

    for name in step_fns:
        for _ in range(args.warmup):
            step_fns[name]()
    secs = {name: [] for name in step_fns}  # seconds per step, one entry per round
    peak = {}
    for r in range(args.rounds):
        for name in step_fns:
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            secs[name].append(timed(name, args.steps))
            if gpu:
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated() / 2 ** 30)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {1e3 * s[-1]:.0f} ms/step" for n, s in secs.items()))
    report(args, info, secs, peak, gpu)


def make_step(args, device, fmt, method, y, views):
    """-> a function doing one training step of `method` (a SimLAP model with LARS, its own initial weights the same
    in every mode), or with method None the bare backbone's forward and backward; it returns the loss."""
    torch.manual_seed(0)  # same initial weights in every mode
    small = args.image_size <= 96  # CIFAR stem (ResNet) / patch 4 (ViT) for 32-96 px images, see build_backbone
    dtype = AMP[args.amp]
    if method is None:
        net = simlap.build_backbone(args.arch, small, args.image_size)[0].to(device, memory_format=fmt).train()
        forward = torch.compile(net) if args.compile else net

        def backbone_step(views=views):
            net.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype, enabled=dtype is not None):
                loss = forward(torch.cat(views())).float().mean()
            loss.backward()
            return loss

        return backbone_step
    model = simlap.SimLAP(args.arch, args.classes, small_images=small, image_size=args.image_size,
                          proj_hidden=args.proj_hidden, proj_dim=args.proj_dim,
                          method=method).to(device, memory_format=fmt).train()
    opt = simlap.LARS([p for p in model.parameters() if p.requires_grad], lr=0.01, weight_decay=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")  # as train.py --precision fp16
    forward = torch.compile(model) if args.compile else model

    def step(views=views):
        v1, v2 = views()
        if model.method == "simlap-moco":
            model.update_momentum(0.99)  # as train.py, before the forward
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype, enabled=dtype is not None):
            loss, _ = forward(v1, v2, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    return step


def augment_steps(args, device, fmt, y):
    """The augmentation modes: each augmentation alone, and a full SimLAP step with each."""
    B, size = args.batch_size, args.image_size
    images = simlap.SyntheticShapes("train", per_class=-(-B // 16), size=size).images[:B]  # (B, 3, size, size) uint8
    keys = simlap.sample_keys(0, 0, torch.arange(B))
    per_image = per_image_pipeline(size)
    augment = {"per-image": lambda: [torch.stack([per_image(img) for img in images]).to(device, memory_format=fmt)
                                     for _ in range(2)],
               "batched": lambda: [x.contiguous(memory_format=fmt)
                                   for x in simlap.two_views(images.to(device), keys.to(device), size)]}
    step = make_step(args, device, fmt, "simlap", y, None)
    out = {}
    for aug, views in augment.items():
        out[f"SimLAP + {aug} aug"] = lambda views=views: step(views)
        out[f"{aug} aug only"] = lambda views=views: views()[0].sum()
    return out


def report(args, info, secs, peak, gpu):
    """Medians over rounds, ratios as medians of per-round ratios; the tables, and the JSON."""
    def per_round(a, b):
        return statistics.median(x / y for x, y in zip(secs[a], secs[b])) if a in secs and b in secs else None

    results = {}
    for name, s in secs.items():
        ms = 1e3 * statistics.median(s)
        results[name] = {"ms_per_step": ms, "images_per_s": args.batch_size / ms * 1e3,
                         "images_per_s_range": [args.batch_size / max(s), args.batch_size / min(s)],
                         "ratio_to_simclr": per_round(name, "SimCLR"),
                         "ratio_to_per_image": per_round(name, "per-image aug only"),
                         "seconds": s, "peak_gib": peak.get(name)}
    ratios = {"SimLAP step time / SimCLR step time": per_round("SimLAP", "SimCLR"),
              "SimLAP-MoCo step time / SimLAP step time": per_round("SimLAP-MoCo", "SimLAP"),
              "SimLAP step time / the bare backbone's forward + backward": per_round("SimLAP", "Backbone")}
    ratios = {what: r for what, r in ratios.items() if r is not None}
    table = markdown_table({n: r for n, r in results.items() if n in MODES}, gpu)
    print(f"\n{info['summary']}, torch {info['torch']}, {args.arch} at {args.image_size} px, batch {args.batch_size} "
          f"(2 views each), amp {args.amp}, channels_last {args.channels_last}, compile {args.compile}, "
          f"median of {args.rounds} rounds x {args.steps} steps\n\n"
          f"Training step on tensors already on the device (no augmentation):\n{table}\n\n"
          + "".join(f"{what}: {r:.3f}\n" for what, r in ratios.items()))
    if args.augment:
        aug_table = markdown_table({n: r for n, r in results.items() if n not in MODES}, gpu, "per_image")
        speedup = 1 / results["batched aug only"]["ratio_to_per_image"]
        print(f"Augmentation of two views, alone and inside a SimLAP step:\n{aug_table}\n\n"
              f"batched two_views() / per-image pipeline, images/s: {speedup:.1f}x")
    write_json(args, "bench_step", {"machine": info, "args": vars(args), "results": results, "ratios": ratios})


def markdown_table(results, gpu, ratio="simclr"):
    base = "SimCLR" if ratio == "simclr" else "per-image aug"
    head = f"| mode | images/s | ms/step | images/s range | time / {base} |" + (" peak GiB |" if gpu else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        lo, hi, to = *r["images_per_s_range"], r[f"ratio_to_{ratio}"]
        lines.append(f"| {name} | {r['images_per_s']:.1f} | {r['ms_per_step']:.0f} | {lo:.1f}–{hi:.1f} "
                     f"| {'–' if to is None else f'{to:.3f}'} |" + (f" {r['peak_gib']:.1f} |" if gpu else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
