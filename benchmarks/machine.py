"""Facts about the machine a benchmark ran on, printed with every result (ratios only mean something beside them)."""

import os
import platform


def machine_facts() -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:  # not Linux: keep platform's answer
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "load_average": list(os.getloadavg()), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "python": platform.python_version()}
