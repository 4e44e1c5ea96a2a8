"""Train SimLAP (arXiv 2410.18200): one process (a GPU or the CPU) or torchrun, decided from the environment.

    python train.py                                          # the demo: synthetic shapes, a small CNN, minutes on a CPU
    torchrun --standalone --nproc_per_node=8 train.py --dataset imagefolder --data /path/to/imagenet --arch resnet50
    python train.py --method simclr          # or supcon, hydra, supcon-arbitrary, simlap-moco: the baselines

The defaults are the paper's recipe (Table 5a); the demo's departures from it are printed at start. README.md gives each
table's command, several nodes and SLURM. The same command again resumes from <output-dir>/checkpoint.pt. Exit codes:
0 done, 1 a non-finite loss (or another rank failed), 2 a mistake in the command or its files, an unreadable image or
a full disk, 3 stopped by SIGTERM, SIGUSR1 or Ctrl-C with the checkpoint written (Ctrl-C twice: 130, at once).
"""
import atexit
import contextlib
import datetime
import fcntl
import hashlib
import itertools
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from tqdm import tqdm

import simlap
from simlap import UserError, nonneg_float, nonneg_int, positive_float, positive_int, ranged, rank, world_size

PAIR_METHODS = [name for name, m in simlap.METHODS.items() if m.pairs]  # those that take --pairs
WEIGHTED = [name for name, m in simlap.METHODS.items() if m.weighted]  # those that take --beta
MOMENTUM = [name for name, m in simlap.METHODS.items() if m.momentum]  # those that take --moco-m
# The paper's recipe (Table 5a, the ResNet column; base lr and weight decay per optimizer in apply_defaults) ...
PAPER = dict(arch="resnet18", epochs=1000, batch_size=1024, optimizer="lars", warmup_epochs=40.0)
# ... and where the synthetic demo departs from it, to learn visibly in a few minutes on a 2-core CPU.
DEMO = dict(arch="convnet", epochs=20, batch_size=256, optimizer="adamw", warmup_epochs=1.0)


def main(argv=None):
    try:
        args = parse_args(argv)
    except UserError as e:  # every rank finds the same mistake in the command: rank 0 says it
        raise UserError(str(e) if os.environ.get("RANK", "0") == "0" else "") from None
    device = init_device()
    torch.manual_seed(args.seed)
    run, ckpt = start_together(args)  # user errors surface here and in open_output_dir, before anything is written
    open_output_dir(args, ckpt)
    build_model(args, run, device, ckpt)
    with catch_stop_signals():
        sampler, loader = build_loader(args, run, device)
        try:
            train(args, run, device, sampler, loader)
        except BaseException:  # however the run ends, its loader's worker processes end with it
            simlap.stop_workers(loader)
            raise
    teardown()


def train(args, run, device, sampler, loader):
    """The epoch loop, after the kNN of the untrained network (the baseline the trained kNN is read against):
    checkpoints every epoch (and --save-every steps), log.jsonl, and at the end backbone.pt. Stopped by a signal
    (STOP_SIGNALS), it checkpoints the step it finished and raises Preempted."""
    main0, step, knn_untrained = rank() == 0, run.step, run.knn_untrained
    announce(args, run, device, step)
    if args.knn_every and step == 0:
        knn_untrained = knn_monitor(args, run, device, "step 0 (untrained)", print)
        log(args, dict(epoch=0, step=0, knn_top1=knn_untrained))
    knn_last, start_step, nonfinite_step = knn_untrained, step, torch.tensor(-1, device=device)
    bar = tqdm(total=run.total_steps, initial=step, disable=not main0, dynamic_ncols=True)
    tick, tick_step, stats = time.time(), step, {}
    for epoch in range(step // run.steps_per_epoch, args.epochs):
        sampler.set_epoch(epoch, start=step - epoch * run.steps_per_epoch)
        run.wrapped.train()
        for images, y, index in loader:
            want_stats = (step + 1) % args.log_every == 0
            loss, new_stats = train_step(args, run, device, (images, y, index), epoch, step, want_stats)
            nonfinite_step = torch.where((nonfinite_step < 0) & ~torch.isfinite(loss), step, nonfinite_step)
            step += 1
            bar.update(1)
            stop = _stop_signal if world_size() == 1 else 0  # several processes: only where they sync (below)
            save = (args.save_every and step % args.save_every == 0) or step - start_step == args.stop_after
            if want_stats or save or stop:  # the host syncs of the loop: every --log-every steps, and to save
                stop = check_run(device, nonfinite_step)
            if want_stats:
                ips = (step - tick_step) * args.batch_size / (time.time() - tick)
                tick, tick_step = time.time(), step
                stats = dict(new_stats, lr=run.opt.param_groups[0]["lr"], img_per_s=ips, **device_stats(run, device))
                bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.3g}",
                                gate=f"{stats['gate_open']:.0f}/{args.proj_dim}", ips=f"{ips:.0f}")
                log(args, dict(step=step, epoch=epoch, **stats))
            if stop or save:
                save_checkpoint(args, run, step, knn_untrained)
            if stop or step - start_step == args.stop_after:
                bar.close()
                if stop:
                    raise preempted(args, run, step, stop)
                if main0:
                    print(f"stopped after {args.stop_after} steps at step {step}; rerun the same command to continue")
                return
        record, stop = dict(epoch=epoch + 1, step=step, **stats), check_run(device, nonfinite_step)  # before the kNN
        if not stop and args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            record["knn_top1"] = knn_last = knn_monitor(args, run, device, f"epoch {epoch + 1}", bar.write)
        save_checkpoint(args, run, step, knn_untrained)
        log(args, record)  # after the checkpoint, so that a failed save leaves no record of a step it lost
        if stop:
            bar.close()
            raise preempted(args, run, step, stop)
    bar.close()
    if main0:
        finish(args, run.model, knn_untrained, knn_last)


def train_step(args, run, device, batch, epoch, step, want_stats):
    """One update at global step `step` -> (the loss, unscaled and detached; the model's stats if want_stats)."""
    for group in run.opt.param_groups:
        group["lr"] = get_lr(step, run.total_steps, run.warmup_steps, run.lr)
    if args.moco_m is not None:  # MoCo v3: the momentum encoder moves before it computes this step's keys
        run.model.update_momentum(get_momentum(step, run.total_steps, args.moco_m))
    images, y, index = batch
    keys = simlap.sample_keys(args.seed, epoch, index)  # the batch's augmentation keys, in one call
    images, y, keys = (t.to(device, non_blocking=True) for t in (images, y, keys))
    x1, x2 = (x.contiguous(memory_format=run.memory_format) for x in simlap.two_views(images, keys, args.image_size))
    with torch.autocast(device.type, run.amp_dtype, enabled=run.amp_dtype is not None):  # the losses stay fp32
        loss, stats = run.wrapped(x1, x2, y, stats=want_stats)
    run.opt.zero_grad(set_to_none=True)
    # fp16: the scaler multiplies the loss before backward and skips the update where the scaled gradients overflow.
    # That is routine, not a non-finite loss (train() checks the unscaled loss). A skipped step still moves the data
    # and the lr and momentum schedules on (pure functions of the step); the optimizer state (LARS momentum, AdamW's
    # moments and step count) and the weights stay as they were. bf16 and fp32: the scaler passes everything through.
    run.scaler.scale(loss).backward()
    run.scaler.step(run.opt)
    run.scaler.update()
    return loss.detach(), stats


def get_lr(step, total_steps, warmup_steps, peak):
    """Linear warmup, then cosine to 0: a pure function of the global step, so resuming needs no scheduler."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def get_momentum(step, total_steps, m0):
    """simlap-moco: MoCo v3's momentum, from m0 at step 0 to 1 at the end on a half cosine; a pure function of the
    global step, as the lr."""
    return 1 - (1 - m0) * (math.cos(math.pi * step / total_steps) + 1) / 2


def save_checkpoint(args, run, step, knn_untrained):
    """<output-dir>/checkpoint.pt, written atomically by rank 0 with a checksum: everything an exact resume at `step`
    needs. The checkpoint it replaces stays as checkpoint.prev.pt."""
    state = run.model.generator.get_state()  # the partner sampler's RNG state, which differs per rank
    partners = [state] if world_size() == 1 else [None] * world_size()
    if world_size() > 1:
        dist.all_gather_object(partners, state)  # to rank 0: a collective, every rank takes part
    if rank() == 0:
        moco_m = get_momentum(step, run.total_steps, args.moco_m) if args.moco_m is not None else None
        ckpt = dict(model=run.model.state_dict(), optimizer=run.opt.state_dict(), step=step,
                    epoch=step // run.steps_per_epoch, args=run.meta, knn_untrained=knn_untrained,
                    rng=dict(torch=torch.get_rng_state(), partners=partners), moco_m=moco_m,
                    scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None)
        ckpt["checksum"] = simlap.checksum(ckpt)  # checked by every load (simlap.load_tensors)
        simlap.save_atomic(ckpt, run.ckpt_path, keep_previous=True)  # the one it replaces: checkpoint.prev.pt


def log(args, record):
    """One JSON line in <output-dir>/log.jsonl, by rank 0."""
    if rank() == 0:
        with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def device_stats(run, device):
    """For log.jsonl: fp16's loss scale (halved at every skipped step) and the peak GPU memory so far."""
    out = dict(grad_scale=run.scaler.get_scale()) if run.scaler.is_enabled() else {}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


def knn_monitor(args, run, device, when, write):
    """On rank 0 (the others wait): the weighted kNN top-1 (simlap.KNN_K, KNN_T) of backbone features of (a fixed
    subset of) the eval split, the bank the train split seen through the eval transform -> the top-1, None elsewhere."""
    top1 = None
    if rank() == 0:
        train_set = simlap.Transformed(run.train_raw, simlap.eval_transform(args.image_size))
        gen = torch.Generator().manual_seed(0)
        loaders = [torch.utils.data.DataLoader(
            torch.utils.data.Subset(ds, torch.randperm(len(ds), generator=gen)[: args.knn_samples].tolist()),
            batch_size=256, num_workers=args.workers, worker_init_fn=ignore_stop_signals)
            for ds in (train_set, run.test_set)]
        (fb, yb), (ft, yt) = [simlap.extract_features(run.model.backbone, dl, device, desc="knn features")
                              for dl in loaders]
        top1 = (simlap.knn_classify(fb, yb, ft) == yt).float().mean().item()
        write(f"{when}: kNN top-1 {100 * top1:.1f}%")
    if world_size() > 1:
        dist.barrier()
    return top1


def announce(args, run, device, step):
    """The start lines (derived values, the demo's departures from the paper's recipe), and args.json."""
    if rank() != 0:
        return
    print(f"SimLAP {args.arch} on {args.dataset} ({len(run.train_raw)} images, {run.num_classes} classes), "
          f"{world_size()} x {run.per_gpu_batch} = batch {args.batch_size}, effective lr {run.lr:g}, "
          f"{run.total_steps} steps, device {device}, precision {run.precision}" + (
              f", resuming at step {step} from {run.resume}" if step else ""), flush=True)
    if args.demo_departures:
        print("demo defaults that depart from the paper's recipe (Table 5a): " + ", ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in args.demo_departures.items()), flush=True)
    with open(os.path.join(args.output_dir, "args.json"), "w") as f:
        json.dump(run.meta, f, indent=1)


def finish(args, model, knn_untrained, knn_last):
    torch.save(model.backbone.state_dict(), os.path.join(args.output_dir, "backbone.pt"))
    stem = " after the small-image stem" if args.small_images else ""
    into = (f"torchvision's {args.arch} with fc=Identity{stem}" if args.arch.startswith("resnet") else
            f"simlap.build_backbone('{args.arch}')")
    print(f"done: {args.output_dir}/checkpoint.pt and backbone.pt (loads strictly into {into})")
    if knn_untrained is not None and knn_last is not None:
        print(f"kNN top-1 on the test split: untrained {100 * knn_untrained:.1f}% -> trained {100 * knn_last:.1f}%")


# ------------------------------------------------------------------ the run: flags, data, model, loader, checkpoint
def build_parser():
    """Every numeric flag takes a simlap.ranged type (positive_int, ...): impossible values fail at parsing."""
    p = simlap.Parser(description="Train SimLAP. Defaults: the paper's recipe (Table 5a); on --dataset synthetic "
                      "the demo's.")
    a = p.add_argument
    a("--dataset", default="synthetic", choices=simlap.DATASETS, help="training set (default: synthetic)")
    a("--data", default="./data", help="data root; imagefolder wants DATA/train/<class>/ and DATA/val/<class>/; "
      "fashionmnist its four idx files (apt-get install dataset-fashion-mnist: /usr/share/datasets/fashion-mnist) "
      "(default: ./data)")
    a("--download", action="store_true", help="let torchvision download the data set (cifar10, fashionmnist, ...) "
      "into --data")
    a("--synthetic-per-class", type=positive_int, default=500,
      help="synthetic training images per class (default: 500)")
    a("--classes", type=simlap.class_ids, default=None, help="comma-separated ids of the classes to train on, "
      "relabelled 0.. in this order (synthetic: id = 4 x shape + colour) (default: all); the others stay unseen, "
      "to measure transfer to them")
    a("--arch", default=None, help=f"backbone: {', '.join(simlap.ARCHS)} (default: resnet18; demo: convnet)")
    a("--image-size", type=positive_int, default=None,
      help="crop size (default: 32 synthetic, fashionmnist and cifar, 96 stl10, else 224)")
    a("--epochs", type=positive_int, default=None, help="epochs (default: 1000, Table 5a; demo: see the start line)")
    a("--batch-size", type=positive_int, default=None,
      help="GLOBAL batch over all GPUs (default: 1024, Table 5a; demo: see the start line)")
    a("--optimizer", default=None, choices=("lars", "adamw"), help="lars (default, Table 5a) or adamw (Table 3a)")
    a("--base-lr", type=positive_float, default=None, help="lr per 256 images; effective lr = base_lr x batch / 256 "
      "(default: 0.05 for lars, i.e. 0.2 at batch 1024; 5e-4 for adamw, i.e. 2e-3 at 1024; demo: see the start line)")
    a("--weight-decay", type=nonneg_float, default=None, help="default: 1e-4 for lars, 1e-2 for adamw (Table 5a)")
    a("--momentum", type=ranged(float, 0, 1, high_open=True), default=0.9, help="LARS momentum (default: 0.9)")
    a("--warmup-epochs", type=nonneg_float, default=None,
      help="linear warmup, capped at a tenth of the run (default: 40)")
    a("--temperature", type=positive_float, default=None, help="tau of eq. 2 and of the instance losses "
      "(default: 0.1; simlap-moco: 0.2, as erow/hydra's commands)")
    a("--proj-dim", type=positive_int, default=256, help="projector output D (default: 256)")
    a("--proj-hidden", type=positive_int, default=None, help="hidden width of the projector (and of simlap-moco's "
      "predictor) (default: 2048, Table 5b; simlap-moco: 4096 as erow/hydra, 2048 on the demo)")
    a("--method", default="simlap", choices=simlap.METHODS, help="loss: simlap (the paper's), supcon (Khosla et al.), "
      "simclr (NT-Xent), hydra (NT-Xent + beta x SimLAP), supcon-arbitrary (SimLAP, all-ones gates), simlap-moco "
      "(MoCo v3 + beta x SimLAP, momentum encoder) (default: simlap)")
    a("--pairs", default=None, choices=simlap.PAIR_MODES,
      help=f"the methods with partner pairs ({', '.join(PAIR_METHODS)}): how partner classes are drawn; "
      "arbitrary = the label of a random sample of the batch (default: arbitrary)")
    a("--beta", type=nonneg_float, default=None, help=f"{', '.join(WEIGHTED)}: loss = (instance loss + beta x SimLAP) "
      "/ (1 + beta), the instance loss NT-Xent or MoCo v3's (default: 1)")
    a("--moco-m", type=ranged(float, 0, 1), default=None,
      help=f"{', '.join(MOMENTUM)}: momentum m0 of the momentum encoder, raised to 1 over training by MoCo v3's "
      "cosine schedule (default: 0.99; MoCo v3 takes 0.996 for long runs)")
    a("--class-distances", default=None, help="--pairs nearest: a (K, K) tensor saved with torch.save (default on "
      "synthetic: the number of differing attributes; fashionmnist: 0 same class, 1 same group, 2 otherwise)")
    a("--nearest-n", type=nonneg_int, default=1, help="--pairs nearest: draw among the n closest classes (default: 1)")
    a("--gate-penalty", type=nonneg_float, default=0.0,
      help="lambda of the gate penalty, eq. 5 (default: 0, as Table 3d)")
    a("--workers", type=nonneg_int, default=2, help="data loader workers per process (default: 2)")
    a("--seed", type=ranged(int, 0, 2 ** 20), default=0, help="seed, 0 to 2^20 (default: 0)")
    a("--labels", default=None, metavar="FILE", help="train on the pseudo labels in FILE (eval.py --kmeans K, "
      "appendix C) instead of the data set's, with K classes; the kNN monitor still uses the true labels")
    a("--output-dir", default=None, help="default: ./runs/<dataset>-<arch>-<method>[-<pairs>, unless arbitrary]")
    a("--resume", default=None, help="checkpoint to resume from (default: <output-dir>/checkpoint.pt if it exists)")
    a("--knn-every", type=nonneg_int, default=1, help="online kNN monitor every N epochs, 0 = off (default: 1)")
    a("--knn-samples", type=ranged(int, simlap.KNN_K), default=10000,
      help=f"kNN monitor: at most this many bank/test images, at least its k = {simlap.KNN_K} (default: 10000)")
    a("--log-every", type=positive_int, default=10, help="steps between progress-bar/log.jsonl updates (default: 10)")
    a("--save-every", type=nonneg_int, default=0, help="also checkpoint every N steps, 0 = per epoch only (default: 0)")
    a("--stop-after", type=nonneg_int, default=0, help="checkpoint and exit after N steps in this invocation, e.g. "
      "to fit a job time limit; rerun the same command to continue (default: 0 = run to the end)")
    a("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"), help="autocast dtype of the network "
      "(the losses stay fp32): auto = bf16 on a GPU that computes in it natively (A100, H100, RTX 30xx ...), fp16 with "
      "a gradient scaler on older GPUs (V100, T4, RTX 20xx), fp32 on the CPU; the start line says which and why "
      "(default: auto)")
    a("--compile", nargs="?", const="inductor", choices=("inductor", "aot_eager", "eager"), metavar="BACKEND",
      help="torch.compile the model (backend: inductor, torch's default; aot_eager and eager trace the model "
      "without generating code, to tell a tracing problem from a code-generation one)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if simlap.missing_package(args.dataset):  # before anything else runs
        raise UserError(simlap.missing_package(args.dataset))
    args.demo_departures = apply_defaults(args)
    args.small_images = args.image_size <= 96
    for flag, value, methods in (("--pairs", args.pairs, PAIR_METHODS), ("--beta", args.beta, WEIGHTED),
                                 ("--moco-m", args.moco_m, MOMENTUM)):
        if value is not None and args.method not in methods:
            raise UserError(f"{flag} applies to --method {' / '.join(methods)} only, not {args.method}; leave it out")
    if args.method in PAIR_METHODS:  # None marks what a method does not use (args.json, checkpoints)
        args.pairs = args.pairs or "arbitrary"
    args.beta = (1.0 if args.beta is None else args.beta) if args.method in WEIGHTED else None
    args.moco_m = (0.99 if args.moco_m is None else args.moco_m) if args.method in MOMENTUM else None
    args.output_dir = args.output_dir or os.path.join("runs", f"{args.dataset}-{args.arch}-{args.method}" + (
        f"-{args.pairs}" if args.pairs not in (None, "arbitrary") else ""))
    if args.arch not in simlap.ARCHS:
        raise UserError(f"unknown --arch {args.arch!r}; choose one of {', '.join(simlap.ARCHS)}")
    patch = simlap.vit_patch(args.small_images)
    if args.arch.startswith("vit") and args.image_size % patch:
        raise UserError(f"--image-size {args.image_size} is not a multiple of {patch}, the patch size of a "
                        f"{args.arch} at this size")
    if args.batch_size % world_size() or args.batch_size // world_size() < 2:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {world_size()} processes and "
                        "give at least 2 images per process")
    return args


def apply_defaults(args):
    """Fill the flags left unset: the paper's recipe, or on --dataset synthetic the demo's. -> the demo values
    that depart from the paper's recipe, as printed at start ({} off the demo or when every one was given)."""
    demo = DEMO if args.dataset == "synthetic" else {}
    departures = {}
    for key, value in {**PAPER, "base_lr": None, "weight_decay": None, **demo}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
            departures.update({key: value} if key in demo else {})
    # (base lr per 256 images, weight decay): LARS, Table 5a (SimLAP: 0.2 at batch 1024; Hydra-MoCo: 0.3 read as a
    # rate per 256, as in erow/hydra's and MoCo v3's configs), AdamW, Table 3a
    moco = args.method == "simlap-moco"
    lr, wd = {"lars": (0.3, 1.5e-6) if moco else (0.05, 1e-4), "adamw": (5e-4, 1e-2)}[args.optimizer]
    args.base_lr = args.base_lr if args.base_lr is not None else lr
    args.weight_decay = args.weight_decay if args.weight_decay is not None else wd
    args.temperature = args.temperature or (0.2 if moco else 0.1)
    if args.proj_hidden is None:  # the authors' 4096 for simlap-moco's three-layer heads, too slow for the demo
        args.proj_hidden = 2048 if demo or not moco else 4096
        departures.update({"proj_hidden": 2048} if demo and moco else {})
    native = {"synthetic": 32, "fashionmnist": 32, "cifar10": 32, "cifar100": 32, "stl10": 96}  # Fashion: 28 px
    args.image_size = args.image_size or native.get(args.dataset, 224)
    return departures


def load_data(args):
    """-> the run's namespace, which build_model completes: the splits (train_raw, test_set), the training labels
    and class distances of --pairs nearest, the schedule (lr, per_gpu_batch, steps_per_epoch, total_steps,
    warmup_steps), meta (args.json, and the checkpoint's args), and the checkpoint to write (ckpt_path) and to resume
    from (resume, None for none)."""
    try:
        chosen = dict(synthetic_per_class=args.synthetic_per_class, classes=args.classes)
        train_raw = simlap.build_dataset(args.dataset, args.data, "train", download=args.download, **chosen)
        test_set = simlap.build_dataset(args.dataset, args.data, "test", simlap.eval_transform(args.image_size),
                                        download=args.download, **chosen)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e))
    labels, num_classes = training_labels(args, train_raw)  # the data set's, or pseudo labels (--labels)
    steps_per_epoch = len(train_raw) // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {args.batch_size} is larger than the training set ({len(train_raw)} images)")
    if args.knn_every and len(train_raw) < simlap.KNN_K:
        raise UserError(f"the kNN monitor (k = {simlap.KNN_K}) needs at least {simlap.KNN_K} training images, "
                        f"not {len(train_raw)}; pass --knn-every 0 or more data")
    class_dist = None
    if args.pairs == "nearest":
        if args.class_distances:
            try:
                class_dist = simlap.load_tensors(args.class_distances)
            except ValueError as e:
                raise UserError(f"--class-distances {args.class_distances} {e}")
        elif labels is None and simlap.class_attributes(args.dataset) is not None:  # synthetic, fashionmnist
            class_dist = simlap.class_distance(simlap.class_attributes(args.dataset, args.classes))
        if class_dist is None or tuple(class_dist.shape) != (num_classes, num_classes):
            raise UserError(f"--pairs nearest needs --class-distances FILE holding a ({num_classes}, {num_classes}) "
                            "tensor")
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = min(round(args.warmup_epochs * steps_per_epoch), total_steps // 10)
    derived = dict(lr=args.base_lr * args.batch_size / 256, per_gpu_batch=args.batch_size // world_size(),
                   world_size=world_size(), num_classes=num_classes, steps_per_epoch=steps_per_epoch,
                   total_steps=total_steps, warmup_steps=warmup_steps)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    return SimpleNamespace(train_raw=train_raw, test_set=test_set, labels=labels, class_dist=class_dist,
                           meta={**vars(args), **derived}, **derived, ckpt_path=ckpt_path,
                           resume=args.resume or (ckpt_path if os.path.exists(ckpt_path) else None))


def training_labels(args, train_raw):
    """-> (labels (N,) or None, num_classes): the data set's own labels, or with --labels FILE the pseudo labels of
    eval.py --kmeans, refused unless they label exactly this training set in its order. Their hash goes into
    args, and so into the checkpoint: a resume with other labels is refused."""
    args.labels_fingerprint = None
    if not args.labels:
        return None, simlap.num_classes_of(train_raw)
    try:
        labels, f = simlap.load_labels(args.labels, args.dataset, train_raw)
    except ValueError as e:
        raise UserError(str(e))
    args.labels_fingerprint = hashlib.sha256(labels.numpy().tobytes()).hexdigest()[:16]
    if rank() == 0 and "nmi" in f:
        print(f"training on {f['num_clusters']} pseudo labels from {args.labels} (against the true labels: "
              f"NMI {f['nmi']:.3f}, purity {f['purity']:.3f})")
    return labels, f["num_clusters"]


def load_checkpoint(path, args, num_classes):
    try:
        ckpt = simlap.load_tensors(path)
    except ValueError as e:
        prev = simlap.previous(path)
        other = (f"--resume {prev} continues from the checkpoint before it" if os.path.isfile(prev) and prev != path
                 else "pass another --resume, or move it away to start again")
        raise UserError(f"checkpoint {path} {e}; it is left as it is. {other}")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        raise UserError(f"{path} is not a train.py checkpoint")
    for key, now in (("arch", args.arch), ("method", args.method), ("pairs", args.pairs), ("beta", args.beta),
                     ("moco_m", args.moco_m), ("num_classes", num_classes), ("proj_dim", args.proj_dim),
                     ("proj_hidden", args.proj_hidden), ("small_images", args.small_images),
                     ("classes", args.classes), ("labels_fingerprint", args.labels_fingerprint)):
        was = ckpt["args"].get(key)
        if was != now:
            raise UserError(f"checkpoint {path} has {key}={was} but this run has {now}; "
                            "use the same flags or another --output-dir")
    return ckpt


def build_model(args, run, device, ckpt):
    """Completes run: model (the SimLAP module), wrapped (what to call: DDP / compiled), opt, the precision
    (amp_dtype, scaler, precision: said at start), memory_format, and from the checkpoint the step to start from and
    the untrained network's kNN (knn_untrained)."""
    model = simlap.SimLAP(args.arch, run.num_classes, small_images=args.small_images, image_size=args.image_size,
                          proj_hidden=args.proj_hidden, proj_dim=args.proj_dim, method=args.method,
                          pairs=simlap.Pairs(args.pairs or "arbitrary", args.nearest_n, run.class_dist), beta=args.beta,
                          temperature=args.temperature, gate_weight=args.gate_penalty).to(device)
    model.generator = torch.Generator(device).manual_seed(args.seed * 1000 + rank())
    memory_format = torch.contiguous_format if args.arch.startswith("vit") else torch.channels_last
    model = model.to(memory_format=memory_format)
    params = [p for p in model.parameters() if p.requires_grad]
    amp_dtype, scaled, precision = choose_precision(args.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=scaled)  # fp16 only; otherwise it passes through
    if args.optimizer == "lars":
        opt = simlap.LARS(params, run.lr, args.weight_decay, args.momentum)
    else:  # no weight decay on biases and norm weights, as LARS. fp16: the fused AdamW, which takes the scaler's
        # scale and inf flag on the device (like LARS), so that the scaler adds no host sync per step
        opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1]},
                                 {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                                lr=run.lr, weight_decay=args.weight_decay, fused=scaled or None)
    step, knn_untrained = 0, None
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"], strict=True)
            opt.load_state_dict(ckpt["optimizer"])
            if scaled and ckpt.get("scaler"):  # fp16's loss scale; a run that switches precision starts a new one
                scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"checkpoint {run.resume} does not fit this model/optimizer ({str(e).splitlines()[0]})")
        step, knn_untrained = ckpt["step"], ckpt.get("knn_untrained")
        torch.set_rng_state(ckpt["rng"]["torch"])
        states = ckpt["rng"]["partners"]  # one per rank; exact resume needs the same world size
        model.generator.set_state(states[rank() % len(states)])
    wrapped = model
    if world_size() > 1:
        if device.type == "cuda":
            wrapped = torch.nn.SyncBatchNorm.convert_sync_batchnorm(wrapped)
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    wrapped = torch.compile(wrapped, backend=args.compile) if args.compile else wrapped
    vars(run).update(model=model, wrapped=wrapped, opt=opt, amp_dtype=amp_dtype, scaler=scaler, precision=precision,
                     memory_format=memory_format, step=step, knn_untrained=knn_untrained)


def build_loader(args, run, device):
    """-> (this rank's EpochSampler, its DataLoader of (uint8 images, labels, indices)). The loader only decodes (and
    crops variable-size images); two_views() augments whole batches on the device."""
    train_set = simlap.TwoViews(run.train_raw if run.labels is None else simlap.Relabelled(run.train_raw, run.labels),
                                args.image_size, args.seed, crop=args.dataset not in simlap.FIXED_SIZE)
    sampler = simlap.EpochSampler(len(train_set), run.per_gpu_batch, args.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=run.per_gpu_batch, sampler=sampler,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.workers > 0, drop_last=True,
                                         worker_init_fn=ignore_stop_signals)
    return sampler, loader


# ---------------------------------------------------------------------------------------------------- operations
class NonFiniteLoss(UserError):
    """The loss became inf or NaN: one line, exit code 1, the last checkpoint untouched."""
    exit_code, prefix = 1, ""


class Preempted(UserError):
    """Stopped by a signal after writing the checkpoint: one line (from rank 0), exit code 3, so that a requeue
    script can tell it from a failure; the same command continues the run."""
    exit_code, prefix = 3, ""


PEER_TIMEOUT = datetime.timedelta(minutes=10)  # longer than rank 0 alone takes for the kNN monitor or a checkpoint
# What schedulers send before they kill a job (SLURM: either), and Ctrl-C: the run checkpoints and stops (exit code 3)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def init_device():
    """One process, or one of torchrun's (RANK set): the process group, and this process's device."""
    if "RANK" in os.environ:  # a collective waits at most PEER_TIMEOUT for a rank that is gone (a backstop: gloo
        # notices a dead peer at once, torchrun stops the others when one fails)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=PEER_TIMEOUT)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def start_together(args):
    """-> (the namespace of load_data, the checkpoint to resume from or None), on every rank. Several processes: one
    collective then stops them all, said once by rank 0, where any rank met a user error, and where the ranks would
    start from different steps (an --output-dir that is not one folder on a shared file system): DDP would copy rank
    0's weights, but each rank would follow its own step count and lr schedule, and the run diverge or hang."""
    try:
        run = load_data(args)
        if args.resume and not os.path.isfile(args.resume):
            raise UserError(f"--resume {args.resume}: no such file")
        ckpt = load_checkpoint(run.resume, args, run.num_classes) if run.resume else None
        found = (ckpt["step"] if ckpt else 0, run.resume, socket.gethostname())
    except UserError as e:
        if world_size() == 1:
            raise
        run = ckpt = None
        found = str(e)
    if world_size() == 1:
        return run, ckpt
    every = [None] * world_size()
    dist.all_gather_object(every, found)
    errors = {f"{ranks}: {text}" for text, ranks in which_ranks(every).items() if isinstance(text, str)}
    if errors:
        alike = len(errors) == 1 and not any(isinstance(f, tuple) for f in every)  # every rank, the same error
        raise UserError(("" if rank() else every[0] if alike else "; ".join(sorted(errors))))
    if len({step for step, _, _ in every}) > 1:
        what = [f"{ranks} on {host} at step {step} ({path or 'no checkpoint'})"
                for (step, path, host), ranks in which_ranks(every).items()]
        raise UserError("" if rank() else f"the ranks would start from different steps: {'; '.join(what)}. "
                        f"--output-dir {args.output_dir} must be one folder that every node sees "
                        "(a shared file system)")
    return run, ckpt


def which_ranks(values):
    """[a, a, b, a] -> {a: 'ranks 0-1, 3', b: 'rank 2'}: which ranks hold each value, for messages."""
    out = {}
    for v in dict.fromkeys(values):
        ranks = [i for i, w in enumerate(values) if w == v]
        spans = [[i for _, i in g] for _, g in itertools.groupby(enumerate(ranks), lambda t: t[1] - t[0])]
        out[v] = f"rank{'s' * (len(ranks) > 1)} " + ", ".join(f"{s[0]}-{s[-1]}" if len(s) > 1 else f"{s[0]}"
                                                               for s in spans)
    return out


def open_output_dir(args, ckpt):
    """A writable --output-dir, rank 0's lock on it, and a log.jsonl that is not ahead of the checkpoint."""
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        probe = os.path.join(args.output_dir, f".write-test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to --output-dir {args.output_dir} ({e.strerror})")
    if rank() == 0:  # if refused, rank 0 exits and the other ranks stop at their first collective
        lock_output_dir(args.output_dir)  # released by teardown(), or at exit
        trim_log(os.path.join(args.output_dir, "log.jsonl"), ckpt["step"] if ckpt else 0)


def trim_log(path, step):
    """Starting at `step`: the records of later steps (logged after the checkpoint, before a crash or a failed save)
    leave log.jsonl, so that no step is logged twice."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = [line for line in lines if line.endswith("\n") and json.loads(line).get("step", 0) <= step]
    if keep != lines:
        simlap.save_atomic("".join(keep), path, save=lambda text, f: f.write(text.encode()))


_lock = None  # the open lock file of the output folder this process holds (rank 0 of a run)


def lock_output_dir(folder):
    """An advisory lock (fcntl.flock) on the output folder, held by rank 0 for the whole run, so that two live runs
    never write one checkpoint.pt. The kernel drops it when its holder dies, however it dies: a dead run never blocks
    a restart. The pid, host and start time in train.lock only name the holder in messages."""
    global _lock
    unlock_output_dir()  # one run per process: a main() that ended by an exception (Ctrl-C in a notebook) held it
    f = open(os.path.join(folder, "train.lock"), "a+")  # creates it if missing, changes nothing otherwise

    def holder():
        f.seek(0)
        return " ".join(f.read().split())[:200]

    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = holder() or "it has not written its pid yet"
        f.close()
        raise UserError(f"--output-dir {folder} is in use by another live run ({other}); let it finish or stop it, "
                        "or pass another --output-dir") from None
    except OSError as e:  # a file system without flock: run, but say so
        f.close()
        print(f"train.py: warning: cannot lock {f.name} ({e.strerror}); a second run on it would go unnoticed",
              file=sys.stderr)
        return
    if holder():
        print(f"train.py: {f.name} was left by a run that is gone ({holder()}); taking it over", file=sys.stderr)
    f.truncate(0)
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _lock = f


@atexit.register
def unlock_output_dir():
    global _lock
    if _lock is not None:
        _lock.truncate(0)  # an empty train.lock: no run holds the folder
        fcntl.flock(_lock, fcntl.LOCK_UN)  # explicitly: forked loader workers share the file
        _lock.close()
        _lock = None


_stop_signal = 0  # the stop signal (STOP_SIGNALS) this process received while training, 0 if none


@contextlib.contextmanager
def catch_stop_signals():
    """While training, the stop signals set a flag instead of killing the process: the loop then finishes its step,
    checkpoints and stops (check_run). Handlers live in the main thread only: elsewhere (a notebook's thread) the
    signals keep their default action."""
    global _stop_signal
    _stop_signal = 0
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum, frame):
        global _stop_signal
        if signum == _stop_signal == signal.SIGINT:  # Ctrl-C twice: stop now, without the checkpoint
            raise KeyboardInterrupt
        _stop_signal = signum

    before = {sig: signal.signal(sig, note) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def ignore_stop_signals(worker_id):
    """DataLoader workers leave the stop signals to the main process, which shuts them down on every way out:
    torchrun, SLURM and Ctrl-C signal whole process groups, and a killed worker would crash the main process."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def check_run(device, nonfinite_step):
    """-> the stop signal that any rank received (0: none); raises NonFiniteLoss if any rank's loss was not finite
    (nonfinite_step: its first such step, -1 if none). The same on every rank, so that all stop at one step. Several
    processes: a MAX all-reduce, a collective and a host sync, so train() asks only where it syncs anyway (every
    --log-every steps, to save, and at the end of each epoch): a run stops at most --log-every steps after a signal."""
    last = 2 ** 62  # the first bad step s is sent as last - s, so that MAX finds the earliest over ranks (0: none)
    status = torch.stack([torch.tensor(_stop_signal, device=device),
                          torch.where(nonfinite_step < 0, 0, last - nonfinite_step)])
    if world_size() > 1:
        dist.all_reduce(status, op=dist.ReduceOp.MAX)
    stop, bad = status.tolist()
    if bad:
        raise NonFiniteLoss(f"loss is not finite at step {last - bad}; stopped, the last checkpoint is untouched "
                            "(try a lower --base-lr or a longer --warmup-epochs)" if rank() == 0 else "")
    return stop


def preempted(args, run, step, signum):
    """-> the Preempted to raise on every rank once the checkpoint at `step` is written; only rank 0's has words."""
    name = signal.Signals(signum).name
    log(args, dict(step=step, stopped_by=name))
    return Preempted(f"stopped by {name} at step {step} of {run.total_steps}, {run.ckpt_path} written; run the same "
                     f"command again to continue (exit code {Preempted.exit_code})" if rank() == 0 else "")


def choose_precision(requested, device):
    """--precision -> (autocast dtype, None for fp32; whether fp16's gradient scaler runs; what and why, said at
    start). The losses compute in fp32 inside autocast whatever is chosen."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    if requested == "auto" and gpu is None:
        return None, False, "fp32 (auto: on the CPU)"
    if requested == "auto":
        if simlap.autocast_dtype(device) == torch.bfloat16:
            return torch.bfloat16, False, f"bf16 (auto: the {gpu} computes in bfloat16)"
        return torch.float16, True, f"fp16 with a gradient scaler (auto: the {gpu} has no native bfloat16)"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[requested]
    note = ""
    if gpu and dtype == torch.bfloat16 and simlap.autocast_dtype(device) != dtype:
        note = f"; the {gpu} emulates bfloat16, slowly: fp16 is its fast mixed precision"
    elif gpu is None and dtype == torch.float16:
        note = "; slow on the CPU, which has no fast fp16 convolutions: for testing"
    scaled = dtype == torch.float16
    return dtype, scaled, f"{requested}{' with a gradient scaler' if scaled else ''} (--precision {requested}{note})"


def teardown():
    unlock_output_dir()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cli(argv=None):
    simlap.cli(main, "train.py", argv, cleanup=teardown)


if __name__ == "__main__":
    cli()
