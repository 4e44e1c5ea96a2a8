"""What both benchmarks record about the machine their numbers come from."""
import datetime
import os
import platform

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
