"""Distributed training under torchrun (2 CPU processes, gloo), and the recipes' command lines.

- 2 processes give the loss curve of 1 process with the same global batch, and only rank 0 writes;
- so does --fsdp (sharded weights, gradients, Adam state), with one-file checkpoints and sharded resume;
- a world that loses a process stops with a clear error in bounded time (no hang), keeps a loadable
  checkpoint and a resumable state, and `--resume` under torchrun continues the uninterrupted curve;
- a process that hangs (stopped, not dead) is given up on after $IGPT_DIST_TIMEOUT seconds;
- every `igpt ...` / `torchrun ...` command in docs/recipes.md parses with the CLI's own parser.

torchrun costs ~6 s of start-up per launch here, so each launch does as much checking as it can.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from igpt_core.data import load_dataset
from igpt_core.probe import probe_run
from igpt_core.runs import load_checkpoint, open_run
from igpt_core.training import TrainConfig, start_run, train

from conftest import TINY

REPO = Path(__file__).resolve().parent.parent
TINY_ARGS = ["--set", "n_layer=2", "--set", "n_embd=32", "--set", "n_head=2"]


def torchrun(args: list[str], cwd: Path, subcommand: str = "train", **env) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node=2 -m igpt_core.cli train ...` with this venv's Python."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "igpt_core.cli", subcommand, *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                    **{k: str(v) for k, v in env.items()})
    return subprocess.Popen(command, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{out[-3000:]}")
    return out


def worker(launcher_pid: int, rank: int, timeout: float = 120) -> int:
    """The pid of the torchrun worker with RANK=rank (a child of the launcher), read from /proc."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                if ppid == launcher_pid and f"RANK={rank}".encode() in (stat.parent / "environ").read_bytes().split(b"\0"):
                    return int(stat.parent.name)
            except (OSError, ValueError, IndexError):
                continue
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid}")


def alive(pid: int) -> bool:
    """Running (not exited, not a zombie waiting for the launcher to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"torchrun ended before {path.name} appeared:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def wait_until_exited(pid: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait for process `pid` (a worker of the torchrun `proc`) to exit; a hang guard fails the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"process {pid} still runs after {timeout} s")
        time.sleep(0.05)


def lost_contact_cause(out: str) -> str:
    """The cause a survivor gave in its "lost contact with the others during step N (cause):" error."""
    match = re.search(r"lost contact with the others during step \d+ \((.*?)\):", out)
    assert match, out[-3000:]
    return match.group(1)


def curve(run) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in run.metrics()]


def assert_same_curve(a, b, tol=1e-5):
    assert [s for s, _ in a] == [s for s, _ in b]
    worst = max(abs(x - y) for (_, x), (_, y) in zip(a, b))
    assert worst <= tol, f"loss curves differ by up to {worst:.2e}"


def assert_same_weights(run_a, run_b, step=None, tol=1e-5):
    a, b = run_a.load(step)[0].state_dict(), run_b.load(step)[0].state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=tol, rtol=0, msg=lambda m: f"{name}: {m}")


def assert_same_model(run_a, run_b, tol=1e-4):
    """Same outputs. (Not same weights: the key biases get exactly zero gradient, softmax ignores them,
    so Adam turns rounding noise into lr-sized steps there, differently for 1 and 2 processes.)"""
    ids = torch.from_numpy(run_a.palette.encode(load_dataset("digits", "val").images[:32], 8))
    (model_a, _, _), (model_b, _, _) = run_a.load(), run_b.load()
    with torch.no_grad():
        torch.testing.assert_close(model_a(ids)[0], model_b(ids)[0], atol=tol, rtol=0)


def resume_beside_a_straight_run(args: list[str], tmp_path: Path, **train_options):
    """Launch torchrun with `args --resume` and, meanwhile, train the same run uninterrupted in this
    process (batch 16); returns that one when both are done."""
    resumed = torchrun([*args, "--resume"], cwd=tmp_path)
    straight = start_run("straight", "digits", "tiny", "ar", 16, train_config=TrainConfig(batch_size=16, **train_options),
                         model_overrides=TINY, runs_dir=tmp_path / "ref")
    train(straight, progress=False)
    out = finish(resumed)
    assert resumed.returncode == 0, out[-3000:]
    return straight


def files(run) -> list[str]:
    return sorted(str(p.relative_to(run.path)) for p in run.path.rglob("*") if p.is_file())


# -- 2 processes = 1 process ------------------------------------------------------------------------


@pytest.mark.slow  # torchrun
def test_two_processes_give_the_one_process_curve_and_only_rank_0_writes(tmp_path):
    launch = torchrun(["--dataset", "digits", "--steps", "8", "--batch-size", "16", *TINY_ARGS, "--name", "ddp",
                       "--runs-dir", str(tmp_path / "runs"), "--json"], cwd=tmp_path)
    # meanwhile, the same config and global batch in this process
    one = start_run("one", "digits", "tiny", "ar", 16, train_config=TrainConfig(steps=8, batch_size=16),
                    model_overrides=TINY, runs_dir=tmp_path / "ref")
    train(one, progress=False)
    out = finish(launch)
    assert launch.returncode == 0, out[-3000:]
    ddp = open_run("ddp", tmp_path / "runs")

    lines = (ddp.path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8 and len(set(lines)) == 8, "one metrics line per step, written once"
    assert_same_curve(curve(ddp), curve(one))
    val_ddp, val_one = ddp.val_losses(), one.val_losses()
    assert val_ddp.keys() == val_one.keys()
    assert all(abs(val_ddp[s] - val_one[s]) < 1e-5 for s in val_one)  # evaluation is sharded, then all-reduced
    assert ddp.checkpoints() == one.checkpoints() == TrainConfig(steps=8).checkpoint_steps()
    for step in ddp.checkpoints():
        model, palette, info = load_checkpoint(ddp.checkpoint_path(step))
        assert info["step"] == step and len(palette) == 16 and model.config.n_layer == 2
    assert_same_weights(ddp, one)
    assert ddp.palette == one.palette
    # rank 0 alone made the folder and wrote in it: the same files as one process, no leftovers
    assert files(ddp) == files(one)
    assert not list((tmp_path / "runs").glob(".*")), "no half-made run folders"
    summaries = [json.loads(m) for m in re.findall(r"^\{\n.*?^\}", out, flags=re.M | re.S)]
    assert summaries and all(s["processes"] == 2 and s["steps"] == 8 for s in summaries)
    assert summaries[0]["tokens_per_second"] > 0


# -- probes ------------------------------------------------------------------------------------------


@pytest.mark.slow  # torchrun
def test_probe_under_torchrun_shares_extraction_and_gives_the_one_process_results(tmp_path):
    # A BERT run, so that the random masks of each process's share must line up with one process's.
    run = start_run("p", "digits", "tiny", "bert", 16, train_config=TrainConfig(steps=6, batch_size=16),
                    model_overrides=TINY, runs_dir=tmp_path / "one")
    train(run, progress=False)
    shutil.copytree(run.path, tmp_path / "two" / "p")
    options = ["--checkpoints", "last", "--layers", "1,2", "--concat", "0,2", "--bert-masks", "2", "--max-train", "200"]
    launch = torchrun(["p", *options, "--runs-dir", str(tmp_path / "two"), "--json"], cwd=tmp_path, subcommand="probe")
    one = probe_run("p", runs_dir=tmp_path / "one", checkpoints="last", layers=[1, 2], concat=[0, 2], bert_masks=2,
                    max_train=200, progress=False, workers=1)
    out = finish(launch)
    assert launch.returncode == 0, out[-3000:]
    two = json.loads((tmp_path / "two" / "p" / "probes" / "digits.json").read_text())
    assert two["rows"] == one.rows and two["concat"] == one.concat and two["references"] == one.references
    assert two["settings"] == one.settings and len(one.rows) == 2 and len(one.concat) == 1
    # rank 0 gathered every share: the cached features equal one process's, file for file
    cached = {name: sorted((path / "p" / "probes" / "features").iterdir()) for name, path in
              (("one", tmp_path / "one"), ("two", tmp_path / "two"))}
    assert [f.name for f in cached["one"]] == [f.name for f in cached["two"]] and len(cached["one"]) == 6
    for a, b in zip(cached["one"], cached["two"]):
        with np.load(a) as x, np.load(b) as y:
            assert x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files)
    assert len(re.findall(r'^  "rows": ', out, flags=re.M)) == 1, "rank 0 alone prints the table"


# -- losing a process, and resuming ----------------------------------------------------------------


@pytest.mark.slow  # torchrun
def test_a_lost_process_stops_the_world_with_a_clear_error_and_resume_continues_exactly(tmp_path):
    steps = 80
    args = ["--dataset", "digits", "--steps", str(steps), "--batch-size", "16", "--checkpoints", "3",
            "--eval-every", "1000", *TINY_ARGS, "--name", "lost", "--runs-dir", str(tmp_path / "runs"), "--json"]
    launch = torchrun(args, cwd=tmp_path)
    run_path = tmp_path / "runs" / "lost"
    wait_for(run_path / "checkpoints" / "step_0000003.safetensors", launch)
    os.kill(worker(launch.pid, rank=1), signal.SIGKILL)
    out = finish(launch, timeout=120)  # a hang guard: with IGPT_DIST_TIMEOUT at 600 s, only the lost connection ends it
    assert launch.returncode != 0
    assert "lost contact with the others" in out and "--resume" in out, out[-3000:]
    assert "timed out" not in lost_contact_cause(out).lower(), out[-3000:]  # the closed connection told, not the timeout
    # the survivor ends with its own error, not by the SIGTERM torchrun sends it a moment after the loss
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\n\s*exitcode\s*: 2 ", out), out[-3000:]

    lost = open_run("lost", tmp_path / "runs")
    model, palette, info = load_checkpoint(lost.checkpoint_path(3))  # the last complete checkpoint loads
    assert info["step"] == 3 and model.config.n_embd == 32
    saved = json.loads((run_path / "resume" / "step.json").read_text())["step"]
    assert 3 <= saved < steps
    assert [s for s, _ in curve(lost)] == list(range(1, saved + 1))  # the log stops where the saved state does
    assert not list(run_path.rglob("*.tmp"))

    # exact resume under torchrun, compared with an uninterrupted run made here meanwhile
    straight = resume_beside_a_straight_run(args, tmp_path, steps=steps, checkpoints=[3], eval_every=1000)
    assert_same_curve(curve(lost), curve(straight))
    assert lost.checkpoints() == [3, steps]
    assert_same_model(lost, straight)


@pytest.mark.slow  # torchrun
def test_fsdp_gives_the_one_process_curve_one_checkpoint_file_and_resumes_after_kill_9(tmp_path):
    """--fsdp (with micro-steps and activation checkpointing): each process holds half of every weight,
    gradient and Adam moment. The resume state is
    saved as DCP shards at the checkpoint and every second of wall time (rank 0's clock, shared in the
    step's all-reduce); a SIGKILLed process stops the world, --resume continues the uninterrupted curve."""
    steps = 40
    args = ["--dataset", "digits", "--steps", str(steps), "--batch-size", "16", "--checkpoints", "6",
            "--eval-every", "20", "--save-every", "1s", "--fsdp", "--grad-accum", "2", "--activation-checkpointing",
            *TINY_ARGS, "--name", "sharded", "--runs-dir", str(tmp_path / "runs"), "--json"]
    launch = torchrun(args, cwd=tmp_path)
    run_path = tmp_path / "runs" / "sharded"
    wait_for(run_path / "resume" / "step.json", launch)
    os.kill(worker(launch.pid, rank=1), signal.SIGKILL)
    out = finish(launch, timeout=120)
    assert launch.returncode != 0 and "lost contact with the others" in out, out[-3000:]
    saved = json.loads((run_path / "resume" / "step.json").read_text())
    assert 1 <= saved["step"] < steps  # a timed save or the checkpoint at 6, whichever came first
    shards = sorted(p.name for p in (run_path / "resume" / saved["folder"]).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each process wrote its own part

    straight = resume_beside_a_straight_run(args, tmp_path, steps=steps, checkpoints=[6], eval_every=20, grad_accum=2)
    sharded = open_run("sharded", tmp_path / "runs")
    assert_same_curve(curve(sharded), curve(straight))
    val_a, val_b = sharded.val_losses(), straight.val_losses()
    assert val_a.keys() == val_b.keys() == {6, 20, 40}
    assert all(abs(val_a[s] - val_b[s]) < 1e-5 for s in val_a)
    # checkpoints: one self-contained safetensors file each, gathered from the shards
    outside_resume = [name for name in files(straight) if not name.startswith("resume/")]
    assert files(sharded) == sorted(outside_resume + ["resume/step.json"] + [
        f"resume/step_{steps:07d}/{name}" for name in (".metadata", "__0_0.distcp", "__1_0.distcp")])
    model, palette, info = load_checkpoint(sharded.checkpoint_path(steps))
    assert info["step"] == steps and len(palette) == 16 and model.config.n_embd == 32
    assert_same_model(sharded, straight)


@pytest.mark.slow  # torchrun
def test_a_hung_process_is_given_up_on_after_the_timeout(tmp_path):
    args = ["--dataset", "digits", "--steps", "400", "--batch-size", "16", "--checkpoints", "2", "--eval-every", "1000",
            *TINY_ARGS, "--name", "hung", "--runs-dir", str(tmp_path / "runs"), "--json"]
    launch = torchrun(args, cwd=tmp_path, IGPT_DIST_TIMEOUT=5)
    wait_for(tmp_path / "runs" / "hung" / "checkpoints" / "step_0000002.safetensors", launch)
    rank0, rank1 = worker(launch.pid, 0), worker(launch.pid, 1)
    os.kill(rank1, signal.SIGSTOP)  # alive but silent: no connection is closed, only the timeout can tell
    try:
        wait_until_exited(rank0, launch)
    finally:
        os.kill(rank1, signal.SIGKILL)  # the launcher would wait 30 s for a stopped process to obey SIGTERM
    out = finish(launch, timeout=60)
    assert launch.returncode != 0
    assert "lost contact with the others" in out and "IGPT_DIST_TIMEOUT=5" in out, out[-3000:]
    assert re.search(r"time[ds]? ?out", lost_contact_cause(out), flags=re.I), out[-3000:]  # the timeout told
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\n\s*exitcode\s*: 2 ", out), out[-3000:]  # its own error, not a signal
    assert open_run("hung", tmp_path / "runs").load(2)[2]["step"] == 2


# -- the hot loop does not wait for the device ------------------------------------------------------


def test_the_loop_reads_values_back_only_every_10_steps_and_at_evaluations(tmp_path, monkeypatch):
    """Every read of a tensor's value by igpt code makes a GPU host wait for the device; count them
    (on CPU, where the same code runs): 25 steps, one evaluation at the end -> 3 log flushes + 1."""
    package = str(Path(__import__("igpt_core").__file__).parent)
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(package):
                reads.append(f"{Path(caller.co_filename).name}:{caller.co_name}:{name}")
            return original(self, *args, **kwargs)
        return read

    run = start_run("sync", train_config=TrainConfig(steps=25, batch_size=16, eval_every=1000, checkpoints=[25]),
                    model_overrides=TINY, runs_dir=tmp_path)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    train(run, progress=False)
    monkeypatch.undo()
    assert sorted(reads) == sorted(["metrics.py:losses:tolist"] * 3 + ["metrics.py:evaluate:item"]), reads
    assert len(run.metrics()) == 25


# -- the recipes parse ------------------------------------------------------------------------------


def recipe_commands() -> list[list[str]]:
    """Every command line in docs/recipes.md's code blocks that runs `igpt` or torchrun (with `\\` joins)."""
    text = (REPO / "docs" / "recipes.md").read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line)
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value prefixes
                words = words[1:]
            if words and (words[0] in ("igpt", "torchrun") or words[:3] == ["python", "-m", "igpt_core.cli"]):
                commands.append(words)
    return commands


def split_command(words: list[str]) -> tuple[list[str], int]:
    """(the arguments the igpt CLI receives, the number of processes) for a command line."""
    if words[0] == "igpt":
        return words[1:], 1
    if words[0] == "python":
        return words[3:], 1
    assert "-m" in words and words[words.index("-m") + 1] == "igpt_core.cli", f"torchrun must run -m igpt_core.cli: {words}"
    from torch.distributed.run import get_args_parser

    launcher = get_args_parser().parse_args([*words[1 : words.index("-m")], "-m", "igpt_core.cli"])  # torchrun's own
    nodes = int(str(launcher.nnodes).split(":")[-1])
    return words[words.index("-m") + 2 :], nodes * int(launcher.nproc_per_node)


def test_every_command_in_the_recipes_parses():
    from igpt_core.cli import build_parser
    from igpt_core.model import preset

    commands = recipe_commands()
    assert len(commands) >= 8 and sum(c[0] == "torchrun" for c in commands) >= 4
    parser = build_parser()
    for words in commands:
        args, processes = split_command(words)
        try:
            parsed = parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"docs/recipes.md: `{shlex.join(words)}` does not parse")
        if parsed.command != "train":
            continue
        # what train() would check only after loading data: the batch splits evenly, the model exists
        assert parsed.batch_size % (parsed.grad_accum * processes) == 0, f"batch does not split: {shlex.join(words)}"
        assert 0 < parsed.warmup < 1 and parsed.lr > 0
        overrides = {k: json.loads(v) for k, _, v in (item.partition("=") for item in parsed.set or [])}
        preset(parsed.preset, vocab_size=(parsed.colors or 16) + 1, n_positions=(parsed.resolution or 32) ** 2, **overrides)
