"""runs.ModelCache: a memory budget, least recently used models released, models in use never released."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import randomize
from igpt_core.errors import IgptError
from igpt_core.model import IGPT, ModelConfig
from igpt_core.palette import Palette
from igpt_core.runs import ModelCache, create_run, parse_memory, physical_memory, save_checkpoint

# Wide enough that each model (25 MB) stands out of the process's memory noise; 2 layers keep it quick.
BIG = ModelConfig(vocab_size=17, n_positions=64, n_layer=2, n_head=4, n_embd=512)
SMALL = ModelConfig(vocab_size=17, n_positions=64, n_layer=1, n_head=2, n_embd=32)


def make_run(runs_dir: Path, config: ModelConfig, steps: list[int], name: str = "big"):
    """A run with a checkpoint of different random weights at each step."""
    palette = Palette(torch.linspace(-1, 1, 48).reshape(16, 3).numpy())
    info = {"dataset": "digits", "preset": None, "model_config": config.to_dict(), "train_config": None}
    run = create_run(runs_dir, name, info, palette)
    for step in steps:
        save_checkpoint(run.checkpoint_path(step), randomize(IGPT(config), seed=step), palette, step=step)
    return run


def model_bytes(config: ModelConfig) -> int:
    return IGPT(config).num_parameters() * 4


# Runs in its own process, so that its resident memory is the cache's doing and nothing else's
MEASURE = r"""
import json, os, sys
import torch
from igpt_core.runs import ModelCache, open_run

def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

run = open_run(sys.argv[1], sys.argv[2])
cache = ModelCache(max_bytes=int(sys.argv[3]))
ids = torch.arange(64).remainder(16)[None]
with torch.inference_mode():
    rss, first_logits = [], None
    for step in run.checkpoints():
        with cache.lease(run, step) as (model, palette, _):
            logits = model(ids)[0]
        first_logits = logits if first_logits is None else first_logits
        rss.append(resident())
    with cache.lease(run, run.checkpoints()[0]) as (model, _, _):  # released long ago: loaded again
        again = model(ids)[0]
print(json.dumps({"rss": rss, "held": cache.held_bytes, "same": torch.equal(first_logits, again)}))
"""


def test_memory_stays_within_the_budget_and_a_released_model_reloads_the_same(tmp_path):
    run = make_run(tmp_path / "runs", BIG, steps=list(range(1, 7)))
    size = model_bytes(BIG)
    budget = int(2.5 * size)  # holds two models of the six
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", MEASURE, run.name, str(run.path.parent), str(budget)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["held"] <= budget
    # Measured from the first model's load on (which also holds torch's and the allocator's first-use
    # memory: ~40 MB here). Without a budget it grows by one model per checkpoint (5 x 25 MB more);
    # with it, by at most the budget: the models held, less the first one, plus the allocator's slack.
    growth = [rss - result["rss"][0] for rss in result["rss"]]
    assert max(growth) < budget, [g >> 20 for g in growth]
    assert result["same"]


def test_a_leased_model_is_never_released_and_the_rest_goes_least_recently_used_first(tmp_path):
    run = make_run(tmp_path / "runs", SMALL, steps=[1, 2, 3, 4])
    size = model_bytes(SMALL)
    cache = ModelCache(max_bytes=int(2.5 * size))
    with cache.lease(run, 1) as (pinned, _, step):
        assert step == 1
        for step in (2, 3, 4):  # the budget holds two: 2 and 3 go, 1 is in use and stays
            with cache.lease(run, step):
                pass
        assert cache.load(run, 1)[0] is pinned
    model_4 = cache.load(run, 4)[0]
    cache.load(run, 2)  # 1 (no longer leased, least recently used) goes; 4 stays
    assert cache.load(run, 4)[0] is model_4
    assert cache.held_bytes <= cache.max_bytes


def test_models_beyond_the_budget_while_in_use_are_released_when_the_requests_end(tmp_path):
    run = make_run(tmp_path / "runs", SMALL, steps=[1, 2, 3])
    cache = ModelCache(max_bytes=1)  # smaller than any model: each request still gets its own
    with cache.lease(run, 1) as (one, _, _), cache.lease(run, 2) as (two, _, _):
        assert one is not two and cache.held_bytes == 2 * model_bytes(SMALL)
    assert cache.held_bytes == 0


def test_concurrent_requests_share_one_load(tmp_path):
    run = make_run(tmp_path / "runs", SMALL, steps=[1])
    cache = ModelCache()
    seen, barrier = [], threading.Barrier(4)

    def request():
        barrier.wait()
        with cache.lease(run) as (model, _, _):
            seen.append(model)

    threads = [threading.Thread(target=request) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 4 and all(model is seen[0] for model in seen)


def test_default_budget_is_a_quarter_of_physical_memory():
    total = physical_memory()
    assert total and total > 1 << 28
    assert ModelCache().max_bytes == total // 4


@pytest.mark.parametrize("text, expected", [("4GB", 4 << 30), ("512MB", 512 << 20), ("1.5g", 3 << 29),
                                            ("300 MiB", 300 << 20), ("2000000", 2_000_000), (1 << 20, 1 << 20), ("64b", 64), ("2k", 2048)])
def test_memory_sizes_parse(text, expected):
    assert parse_memory(text) == expected


def test_a_fraction_is_of_physical_memory():
    assert parse_memory("0.5") == physical_memory() // 2


@pytest.mark.parametrize("text", ["lots", "0", "-1GB", "4PB", "", "4ib", "0.5 bytes"])
def test_bad_memory_sizes_get_one_line(text):
    with pytest.raises(IgptError, match="model memory") as err:
        parse_memory(text)
    assert "\n" not in str(err.value)


def test_a_slow_load_holds_up_only_the_users_of_that_checkpoint(tmp_path, monkeypatch):
    """While one user's model loads (iGPT-L takes seconds), a user of a model already held is answered."""
    import igpt_core.runs as runs

    run = make_run(tmp_path / "runs", SMALL, steps=[1, 2])
    cache = ModelCache()
    held = cache.load(run, 1)[0]
    release, loading = threading.Event(), threading.Event()
    real_load = runs.load_checkpoint

    def gated_load(path, device):  # the real load, started only when the test lets it
        loading.set()
        assert release.wait(30)
        return real_load(path, device)

    monkeypatch.setattr(runs, "load_checkpoint", gated_load)
    results = {}
    slow = threading.Thread(target=lambda: results.update(slow=cache.load(run, 2)[0]))
    slow.start()
    assert loading.wait(10)
    fast = threading.Thread(target=lambda: results.update(fast=cache.load(run, 1)[0]))
    fast.start()
    fast.join(10)
    assert results.get("fast") is held and "slow" not in results  # answered while step 2 still loads
    release.set()
    slow.join(30)
    assert isinstance(results["slow"], IGPT) and cache.load(run, 2)[0] is results["slow"]
