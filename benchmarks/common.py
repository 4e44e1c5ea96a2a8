"""What every benchmark shares: the record of the machine its numbers come from, its output flags, and the
child processes that measure one case each."""
import ctypes
import datetime
import json
import os
import platform
import resource
import subprocess
import sys

import torch


def machine_info(device):
    """Where the numbers come from; stored with them."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    threads, load = torch.get_num_threads(), os.getloadavg()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "loadavg": load, "cuda_device": gpu,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "summary": gpu or f"{cpu} ({os.cpu_count()} cores, {threads} threads, load {load[0]:.1f})"}


def add_output_flags(p, name, smoke_help, threads=True):
    """--threads, --out and --smoke, the same in every benchmark; write_json() honours --out and --smoke."""
    if threads:
        p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                       help=f"torch CPU threads (default: {torch.get_num_threads()}, torch's default here)")
    p.add_argument("--out", default=None,
                   help=f"JSON output (default: benchmarks/results/{name}.json, {name}_smoke.json with --smoke)")
    p.add_argument("--smoke", action="store_true", help=smoke_help)


def write_json(args, name, record):
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"{name}_smoke.json" if args.smoke else f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"\nwrote {path}")
    return path


def run_child(script, argv, what, env=None, launcher=(), result=None, timeout=None):
    """Run a script in a fresh process, `python [launcher ...] script argv` (env: extra environment variables; launcher:
    e.g. -m torch.distributed.run and its flags) -> result(its stdout), by default the JSON record of its last line.
    RuntimeError, with the end of its stderr, if it fails or outlasts `timeout` seconds."""
    try:
        proc = subprocess.run([sys.executable, *launcher, os.path.abspath(script), *argv], capture_output=True,
                              text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{what} did not finish within {timeout} s") from e
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return (result or (lambda out: json.loads(out.strip().splitlines()[-1])))(proc.stdout)


def peak_bytes(cuda):
    """Peak memory of this process so far: torch's allocations on CUDA, max RSS on CPU (ru_maxrss is KiB on Linux)."""
    return torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak(cuda):
    """Start a new window for peak_bytes() -> the memory in use now, the baseline to subtract from its peak. CUDA:
    torch's peak statistics. CPU (Linux): free heap memory goes back to the OS (glibc's malloc_trim) and the max RSS
    is reset to the current RSS (/proc/self/clear_refs). Where that fails the baseline is the peak so far, which
    hides growth up to that peak's excess over the current RSS."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, AttributeError, StopIteration):
        return peak_bytes(cuda)
