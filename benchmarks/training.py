"""Training throughput and peak memory: our training step against Hugging Face's, side by side.

- ours: igpt_core.training's own step — `forward_backward` (IGPT forward with targets, loss over all T
        pixels, backward) then `optimizer_update` (clip 1.0, AdamW (0.9, 0.95) from `make_optimizer`,
        zero_grad) — exactly what `igpt train` runs per optimizer step.
- hf:   ImageGPTForCausalImageModeling(input_ids=[SOS, x1..x_{T-1}], labels=same) (dropout 0, its
        default attention), backward, clip 1.0, torch AdamW with the same settings, zero_grad.

Both start from the same weights (converted with igpt_core.pretrained.state_dict_to_hf; logits are checked
equal first) and train on the same batch. Shape by default: 8 layers, width 256, 8 heads,
32×32 images (1024 tokens), 512 colours, batch 8 — iGPT-S is too slow for this CPU.

Each side runs in its own fresh subprocess (so peak RSS is its own), driven alternately step by
step from here: the timings are interleaved, so load from other processes hits both sides alike.
Memory: peak RSS (ru_maxrss) during the timed steps minus the RSS just before them (model,
optimizer and batch already built); on CUDA, torch.cuda.max_memory_allocated the same way.

    OMP_NUM_THREADS=1 python benchmarks/training.py [--quick] [--rounds 5] [--threads 1] [--device cpu]

Prints one JSON object; "ratio_tokens_per_s" > 1 means ours is faster (target >= 1.5 at no more memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from machine import machine_facts  # benchmarks/machine.py (scripts run from this folder)

SOS_NOTE = "HF reads [SOS, x1..x_{T-1}] and scores T-1 pixels; ours reads x1..x_T (SOS inside) and scores T"


# -- the worker: one side, in its own process -------------------------------------------------------


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def build(side: str, spec: dict):
    import torch

    from igpt_core.model import IGPT, ModelConfig
    from igpt_core.training import TrainConfig, forward_backward, make_optimizer, optimizer_update

    device = torch.device(spec["device"])
    config = ModelConfig(vocab_size=spec["colors"] + 1, n_positions=spec["size"] ** 2, n_layer=spec["layers"],
                         n_head=spec["heads"], n_embd=spec["width"])
    torch.manual_seed(0)
    ours = IGPT(config)
    torch.nn.init.normal_(ours.lm_head.weight, std=0.02)  # not the zero init: a real gradient everywhere
    ids = torch.randint(0, spec["colors"], (spec["batch"], config.n_positions),
                        generator=torch.Generator().manual_seed(1)).to(device)
    tc = TrainConfig(lr=3e-3, beta2=0.95, weight_decay=0.0, grad_clip=1.0)
    info = {}
    if side == "ours":
        model = ours.to(device).train()
        optimizer = make_optimizer(model, tc, device)

        def step():
            loss = forward_backward(model, [ids])["loss"]
            optimizer_update(model, optimizer, tc.grad_clip)
            return loss
    else:
        from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

        from igpt_core.pretrained import state_dict_to_hf

        hf_config = ImageGPTConfig(vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
                                   n_layer=config.n_layer, n_head=config.n_head, activation_function="quick_gelu",
                                   layer_norm_epsilon=config.layer_norm_epsilon, resid_pdrop=0.0, embd_pdrop=0.0,
                                   attn_pdrop=0.0)
        model = ImageGPTForCausalImageModeling(hf_config)
        missing, unexpected = model.load_state_dict(state_dict_to_hf(ours.state_dict()), strict=False)
        assert not unexpected and all(k.endswith(("attn.bias", "attn.masked_bias")) for k in missing), (missing, unexpected)
        model = model.to(device).train()
        inputs = torch.cat([torch.full_like(ids[:, :1], config.sos_id), ids[:, :-1]], dim=1)
        with torch.no_grad():  # same function: HF([SOS, x1..]) == ours(x1..)
            probe = ids[:1, :64]
            ours_logits = ours.eval()(probe)[0]
            hf_logits = model.eval()(input_ids=inputs[:1, :64]).logits
            info["logits_max_abs_diff"] = float((ours_logits - hf_logits).abs().max())
            model.train()
        info["hf_attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, tc.beta2), weight_decay=tc.weight_decay,
                                      fused=device.type == "cuda")

        def step():
            loss = model(input_ids=inputs, labels=inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()
    del ours
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return step, info


def worker(side: str, spec: dict) -> None:
    import gc

    import torch

    torch.set_num_threads(spec["threads"])
    step, info = build(side, spec)
    device = torch.device(spec["device"])
    gc.collect()
    rss0, peak0 = current_rss(), peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda0 = torch.cuda.memory_allocated()
    reply = lambda value: print(json.dumps(value), flush=True)  # noqa: E731
    reply({"ready": True, **info})
    for line in sys.stdin:
        command = line.split()
        if command[0] == "steps":
            seconds, losses = [], []
            for _ in range(int(command[1])):
                t0 = time.perf_counter()
                loss = step()
                losses.append(float(loss))  # reads back: the step is finished (also on CUDA)
                seconds.append(time.perf_counter() - t0)
            reply({"seconds": seconds, "losses": losses})
        elif command[0] == "memory":
            result = {"rss_before_steps_mb": rss0 / 2**20, "peak_rss_mb": peak_rss() / 2**20,
                      "peak_rss_before_steps_mb": peak0 / 2**20,
                      "step_peak_mb": (peak_rss() - rss0) / 2**20}
            if device.type == "cuda":
                result["cuda_step_peak_mb"] = (torch.cuda.max_memory_allocated() - cuda0) / 2**20
            reply(result)
        elif command[0] == "quit":
            return


# -- the driver -------------------------------------------------------------------------------------


class Side:
    def __init__(self, name: str, spec: dict):
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), HF_HUB_OFFLINE="1")
        self.name = name
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", name, "--spec", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker died (exit code {self.proc.wait()})")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 2, 4 layers, 2 rounds: a smoke run (~1 min)")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 5; quick 2)")
    parser.add_argument("--steps-per-round", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side first (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="image side: T = size² tokens (default 32)")
    parser.add_argument("--colors", type=int, default=512)
    parser.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, json.loads(args.spec))
        return

    spec = {"device": args.device, "threads": args.threads, "batch": args.batch or (2 if args.quick else 8),
            "layers": args.layers or (4 if args.quick else 8), "width": args.width, "heads": args.heads,
            "size": args.size, "colors": args.colors}
    rounds = args.rounds or (2 if args.quick else 5)
    tokens = spec["batch"] * spec["size"] ** 2
    t_start = time.perf_counter()
    sides = {name: Side(name, spec) for name in ("ours", "hf")}
    try:
        for side in sides.values():
            if args.warmup:
                side.ask(f"steps {args.warmup}")
        times = {name: [] for name in sides}
        losses = {name: [] for name in sides}
        round_ratios = []
        for r in range(rounds):  # alternate who goes first, so neither always follows the other
            per_round = {}
            for name in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
                result = sides[name].ask(f"steps {args.steps_per_round}")
                times[name] += result["seconds"]
                losses[name] += result["losses"]
                per_round[name] = statistics.median(result["seconds"])
            round_ratios.append(per_round["hf"] / per_round["ours"])
        memory = {name: side.ask("memory") for name, side in sides.items()}
    finally:
        for side in sides.values():
            side.close()

    def summary(name):
        median = statistics.median(times[name])
        return {"step_seconds_median": median, "step_seconds_all": [round(t, 3) for t in times[name]],
                "tokens_per_s": tokens / median, "losses": [round(x, 4) for x in losses[name]], **memory[name]}

    ours, hf = summary("ours"), summary("hf")
    mem_key = "cuda_step_peak_mb" if args.device.startswith("cuda") else "step_peak_mb"
    result = {
        "benchmark": "training step: igpt_core.training vs transformers ImageGPTForCausalImageModeling",
        "quick": args.quick,
        "machine": {**machine_facts(), "torch_threads_per_side": args.threads},
        "shape": {**spec, "tokens_per_step": tokens, "parameters": sides["ours"].info["parameters"]},
        "hf_attn_implementation": sides["hf"].info.get("hf_attn_implementation"),
        "logits_max_abs_diff": sides["hf"].info.get("logits_max_abs_diff"),
        "note": SOS_NOTE,
        "rounds": rounds,
        "ours": ours,
        "hf": hf,
        "ratio_tokens_per_s": ours["tokens_per_s"] / hf["tokens_per_s"],
        "ratio_per_round": [round(x, 3) for x in round_ratios],
        "ratio_per_round_median": statistics.median(round_ratios),
        "memory_ratio_ours_over_hf": ours[mem_key] / hf[mem_key],
        "target": ">= 1.5x HF tokens/s at no more memory",
        "meets_target": ours["tokens_per_s"] >= 1.5 * hf["tokens_per_s"] and ours[mem_key] <= hf[mem_key],
        "seconds_total": time.perf_counter() - t_start,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
