"""The completion demo under concurrent users, at iGPT-S shapes: latencies, and whether memory stays bounded.

    python benchmarks/concurrency.py [--rounds 6] [--keep-rows 28] [--samples 1] [--quick]

Prints JSON. A run with iGPT-S shapes (24 layers, width 512, 32x32, 512 colours; random weights:
speed and memory do not depend on what the weights learnt) is written to a temporary folder and
served by apps/demo.py in its own process, as `igpt demo` serves it. Two users complete the rows
below --keep-rows over and over while a third clicks pixels in the "Inside the model" tab
(/inside_distribution); each user's first round is warm-up. Reported: every request's latency
(median and max per action), and the server's resident memory (/proc/PID/statm) after start-up,
after warm-up and at the end, with its peak as sampled every 0.2 s, beside the model's fp32 bytes
(a leak of a model or decoder per request would add that much per round); and the server's
temporary files (GRADIO_TEMP_DIR) after warm-up and at the end (the same requests each round give
the same images, so the count should not change).

What a user would otherwise use is one process per user (or requests one after another): the
`sequential_seconds` line times the same completions one at a time in the same server, before the
concurrent rounds, so that `concurrent_speedup` says what serving two users at once gains on this
machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from gradio_client import Client, handle_file

from igpt_core.model import IGPT, ModelConfig
from igpt_core.palette import Palette
from igpt_core.runs import create_run, save_checkpoint
from machine import machine_facts  # benchmarks/machine.py (scripts run from this folder)

ROOT = Path(__file__).resolve().parents[1]
IGPT_S = dict(n_layer=24, n_embd=512, n_head=8, vocab_size=513, n_positions=32 * 32)
QUICK = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=513, n_positions=32 * 32)


def make_run(runs_dir: Path, shape: dict) -> int:
    """A run named "s" with one checkpoint of random weights; returns the model's fp32 bytes."""
    config = ModelConfig(**shape)
    model = IGPT(config)
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)  # the default zero head would make every colour tie
    palette = Palette(np.random.default_rng(0).uniform(-1, 1, (config.n_colors, 3)))
    info = {"dataset": "photos", "preset": None, "model_config": config.to_dict(), "train_config": None}
    run = create_run(runs_dir, "s", info, palette)
    save_checkpoint(run.checkpoint_path(1), model, palette, step=1)
    return model.num_parameters() * 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resident(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def serve(runs_dir: Path, temp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, GRADIO_TEMP_DIR=str(temp / "gradio"), TMPDIR=str(temp), GRADIO_ANALYTICS_ENABLED="False",
               PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    server = subprocess.Popen([sys.executable, str(ROOT / "apps" / "demo.py"), "--port", str(port), "--runs-dir",
                               str(runs_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return server, url
        except OSError:
            if server.poll() is not None:
                raise SystemExit("the demo server stopped at start-up")
            time.sleep(0.5)
    server.terminate()
    raise SystemExit("the demo server did not answer in 5 minutes")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per user, the first one warm-up (default 6)")
    parser.add_argument("--keep-rows", type=int, default=28, help="rows kept; the rest are completed (default 28)")
    parser.add_argument("--samples", type=int, default=1, help="completions per request (default 1)")
    parser.add_argument("--quick", action="store_true", help="a 2-layer model of width 64 (CI smoke)")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else IGPT_S
    machine = machine_facts()
    with tempfile.TemporaryDirectory() as folder:
        temp = Path(folder)
        tempfile.tempdir = folder  # gradio_client leaves an empty folder in the temp folder per download
        model_bytes = make_run(temp / "runs", shape)
        server, url = serve(temp / "runs", temp)
        try:
            report = drive(url, server.pid, temp / "gradio", args, temp)
        finally:
            server.terminate()
            server.wait(timeout=60)
    report = {"benchmark": "completion demo, two users completing while a third looks inside",
              "command": f"python benchmarks/concurrency.py --rounds {args.rounds} --keep-rows {args.keep_rows} "
                         f"--samples {args.samples}" + (" --quick" if args.quick else ""),
              "model": shape, "model_fp32_mb": round(model_bytes / 2**20, 1), **report,
              "machine": {**machine, "load_average_end": list(os.getloadavg())}}
    print(json.dumps(report, indent=2))


def drive(url: str, pid: int, gradio_temp: Path, args, temp: Path) -> dict:
    """The sequential baseline, then the concurrent rounds; latencies, memory and temp files."""
    started_rss = resident(pid)
    clients = [Client(url, verbose=False, download_files=str(temp / f"downloads-{i}")) for i in range(3)]
    for c in clients:  # as choosing the model on the page does: sets the rows slider's range to the model's size
        c.predict("s", api_name="/choose_run")
    editors = [handle_file(c.predict("s", i, api_name="/use_example")[0]["background"]) for i, c in enumerate(clients)]
    editors = [{"background": e, "layers": [], "composite": None} for e in editors]

    def complete(i: int) -> None:
        clients[i].predict("s", 1, editors[i], "", args.keep_rows, args.samples, 1.0, 0, i, "every row",
                           api_name="/complete")

    def look_inside(i: int) -> None:
        clients[i].predict(f"{args.keep_rows + 1}, 5", 1.0, 0, "s", 1, editors[i], "",  # the same click: same images
                           api_name="/inside_distribution")

    complete(0)  # loads the model once, outside every timing
    sequential = []
    for i in (0, 1):
        start = time.perf_counter()
        complete(i)
        sequential.append(time.perf_counter() - start)
    latencies, warm, peak, concurrent_s = rounds([(complete, "complete"), (complete, "complete"),
                                                  (look_inside, "inside")], pid, gradio_temp, args.rounds)
    end_rss = resident(pid)
    mb = lambda b: round(b / 2**20, 1)  # noqa: E731
    pair = statistics.median(latencies["complete"])
    return {
        "requests_answered": {k: len(v) for k, v in latencies.items()},
        "latency_seconds": {k: {"median": round(statistics.median(v), 3), "max": round(max(v), 3)}
                            for k, v in latencies.items()},
        "sequential_seconds": [round(s, 3) for s in sequential],
        "concurrent_speedup": round(sum(sequential) / pair, 2),  # two completions alone vs two side by side
        "concurrent_seconds": round(concurrent_s, 1),
        "rss_mb": {"after_start": mb(started_rss), "after_warm_up": mb(warm["rss"]), "end": mb(end_rss),
                   "peak": mb(max([started_rss, *peak])), "growth_after_warm_up": mb(end_rss - warm["rss"])},
        "temp_files": {"after_warm_up": warm["files"], "end": count_files(gradio_temp)},
    }


def rounds(users: list, pid: int, gradio_temp: Path, n_rounds: int):
    """Each user (action(i), name) in its own thread for n_rounds, the first one warm-up: (latencies by
    name, the server's memory and files after warm-up, its memory every 0.2 s, wall-clock seconds)."""
    latencies = {name: [] for _, name in users}
    peak, warm, stop = [], {}, threading.Event()
    barrier = threading.Barrier(len(users))

    def watch() -> None:
        while not stop.wait(0.2):
            peak.append(resident(pid))

    def user(i: int, action, name: str) -> None:
        for r in range(n_rounds):
            if r == 1:  # after everyone's warm-up round
                if barrier.wait(timeout=3600) == 0:
                    warm.update(rss=resident(pid), files=count_files(gradio_temp))
                barrier.wait(timeout=3600)
            start = time.perf_counter()
            action(i)
            if r:
                latencies[name].append(time.perf_counter() - start)

    watcher = threading.Thread(target=watch)
    threads = [threading.Thread(target=user, args=(i, *user_)) for i, user_ in enumerate(users)]
    start = time.perf_counter()
    for t in [watcher, *threads]:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    stop.set()
    watcher.join()
    return latencies, warm, peak, seconds


if __name__ == "__main__":
    main()
