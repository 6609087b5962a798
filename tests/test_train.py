"""Training: learns, logs, checkpoints, resumes exactly, refuses changed configs, leaves no half files."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from igpt_core.errors import ConfigError, DatasetError, RunError
from igpt_core.model import IGPT, preset
from igpt_core.runs import ModelCache, load_checkpoint, open_run
from igpt_core.training import (Callback, SaveSchedule, TrainConfig, Trainer, check_resume, copy_state, forward_backward,
                                lr_at, make_optimizer, parse_save_every, start_run, train)

from conftest import TINY


def test_run_folder_is_complete_and_loss_beats_the_unigram_baseline(tiny_run):
    info = tiny_run.info
    assert (tiny_run.path / "palette.json").exists()
    assert tiny_run.checkpoints() == TrainConfig(steps=40).checkpoint_steps()
    rows = tiny_run.metrics()
    assert [r["step"] for r in rows] == list(range(1, 41))
    val = tiny_run.val_losses()
    assert min(val.values()) < info["unigram_val_loss"]  # learned more than colour frequencies
    model, palette, meta = tiny_run.load()
    assert meta["step"] == 40 and len(palette) == 16 and model.config.n_positions == 64
    assert not list(tiny_run.path.rglob("*.tmp"))


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
    straight = start_run("a", train_config=TrainConfig(steps=12, batch_size=16, eval_every=4), model_overrides=TINY,
                         runs_dir=tmp_path)
    train(straight, progress=False)
    broken = start_run("b", train_config=TrainConfig(steps=12, batch_size=16, eval_every=4), model_overrides=TINY,
                       runs_dir=tmp_path)

    def stop_at_7(step, loss):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(broken, progress=False, on_step=stop_at_7)
    def saved_step():
        return json.loads((broken.path / "resume" / "step.json").read_text())["step"]

    assert saved_step() == 7
    seen = []  # a resumed run may save more often: a run-time setting, like the device
    train(broken, resume=True, progress=False, on_step=lambda step, loss: seen.append(saved_step()),
          runtime=TrainConfig(save_every="1"))
    assert seen == list(range(8, 13))
    a = [(r["step"], r["loss"]) for r in straight.metrics()]
    b = [(r["step"], r["loss"]) for r in broken.metrics()]
    assert [s for s, _ in b] == list(range(1, 13))
    for (sa, la), (sb, lb) in zip(a, b):
        assert sa == sb and la == pytest.approx(lb, abs=1e-6)
    assert straight.load()[0].state_dict()["lm_head.weight"].allclose(broken.load()[0].state_dict()["lm_head.weight"], atol=1e-6)


def test_bert_objective_trains_with_the_same_loop(bert_run):
    assert bert_run.model_config.objective == "bert"
    val = bert_run.val_losses()
    assert min(val.values()) < bert_run.info["unigram_val_loss"] + 0.5
    assert all(r["loss"] == r["loss"] for r in bert_run.metrics())  # no NaN


def test_resume_with_changed_config_is_refused(tiny_run):
    with pytest.raises(ConfigError, match="n_layer 2 -> 4"):
        check_resume(tiny_run, "digits", "tiny", "ar", 16, TrainConfig(steps=40, batch_size=32, eval_every=10), {})
    with pytest.raises(ConfigError, match="lr"):
        check_resume(tiny_run, "digits", "tiny", "ar", 16, TrainConfig(steps=40, batch_size=32, eval_every=10, lr=1.0), TINY)
    check_resume(tiny_run, "digits", "tiny", "ar", 16, TrainConfig(steps=40, batch_size=32, eval_every=10), TINY)


def test_bad_names_fail_cleanly_and_leave_nothing(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset"):
        start_run("x", dataset="imagenet", runs_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown preset"):
        start_run("x", preset_name="xxl", runs_dir=tmp_path)
    with pytest.raises(RunError, match="no run named"):
        open_run("x", tmp_path)
    with pytest.raises(ConfigError, match="--fsdp shards the model across processes"):
        start_run("x", train_config=TrainConfig(fsdp=True), runs_dir=tmp_path)
    with pytest.raises(ConfigError, match="must divide by grad_accum"):
        start_run("x", train_config=TrainConfig(batch_size=10, grad_accum=4), runs_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_schedule_warms_up_then_decays_to_zero():
    tc = TrainConfig(steps=100, lr=1.0, warmup=0.1)
    assert lr_at(1, tc) == pytest.approx(0.1) and lr_at(10, tc) == pytest.approx(1.0)
    assert lr_at(55, tc) == pytest.approx(0.5) and lr_at(100, tc) == pytest.approx(0.0)


def test_weight_decay_only_on_matrices():
    model = IGPT(preset("tiny", vocab_size=17, n_positions=16, **TINY))
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    names = {id(p): name for name, p in model.named_parameters()}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)  # every parameter, once
    assert {names[i] for i in decay} == {name for name, p in model.named_parameters() if p.dim() >= 2}
    assert not any("ln_" in names[i] or names[i].endswith(".bias") for i in decay)


def test_copy_state_is_a_cpu_snapshot():
    model = IGPT(preset("tiny", vocab_size=17, n_positions=16, **TINY))
    snapshot = copy_state(model)
    name, weight = next(iter(model.named_parameters()))
    with torch.no_grad():
        weight.add_(1.0)
    assert all(t.device.type == "cpu" for t in snapshot.values())
    assert not torch.equal(snapshot[name], weight)  # a copy: later steps do not change it
    model.load_state_dict(snapshot)  # and it loads back


def test_model_cache_loads_once_and_again_when_the_file_changes(tiny_run, tmp_path):
    import os
    import shutil

    run = open_run(tiny_run.name, shutil.copytree(tiny_run.path, tmp_path / tiny_run.name).parent)
    cache = ModelCache()
    model, palette, step = cache.load(run)
    assert step == run.checkpoints()[-1] and cache.load(run, step)[0] is model
    assert cache.palette(run) is cache.palette(run) and cache.palette(run) == palette
    stamp = run.checkpoint_path(step).stat().st_mtime_ns
    os.utime(run.checkpoint_path(step), ns=(stamp + 10**9, stamp + 10**9))  # as a re-trained run's file
    assert cache.load(run, step)[0] is not model
    with pytest.raises(RunError, match="no checkpoint at step 7"):
        cache.load(run, 7)


# -- no lost work: the resume state is saved between checkpoints too ---------------------------------


def test_kill_9_at_a_random_step_loses_at_most_save_every_and_resume_gives_the_uninterrupted_curve(tmp_path):
    steps, save_every = 80, 7  # 7: saves also fall between the log's flushes (every 10 steps)
    args = [sys.executable, "-m", "igpt_core.cli", "train", "--dataset", "digits", "--steps", str(steps),
            "--batch-size", "16", "--eval-every", "25", "--save-every", str(save_every), "--set", "n_layer=2",
            "--set", "n_embd=32", "--set", "n_head=2", "--name", "killed", "--runs-dir", str(tmp_path / "runs"), "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seed = random.randrange(1 << 30)
    kill_after = random.Random(seed).randrange(2 * save_every, steps // 2)  # logged steps before the kill
    run_path = tmp_path / "runs" / "killed"

    def logged() -> int:
        rows = open_run("killed", tmp_path / "runs").metrics() if (run_path / "run.json").exists() else []
        return rows[-1]["step"] if rows else 0

    while logged() < kill_after:
        assert proc.poll() is None, f"training ended before step {kill_after} (seed {seed}):\n{proc.stdout.read()[-2000:]}"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # no handler runs: only what is already on disk survives
    proc.communicate()
    last_logged = logged()
    saved = json.loads((run_path / "resume" / "step.json").read_text())["step"]
    assert last_logged - save_every <= saved < steps, (seed, last_logged, saved)

    # the same run, uninterrupted, in this process
    straight = start_run("straight", train_config=TrainConfig(steps=steps, batch_size=16, eval_every=25),
                         model_overrides=TINY, runs_dir=tmp_path / "ref")
    train(straight, progress=False)
    resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    killed = open_run("killed", tmp_path / "runs")
    a, b = straight.metrics(), killed.metrics()
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys() and ra["lr"] == rb["lr"], (ra, rb)
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5), (seed, ra, rb)
        assert ra.get("val_loss", 0) == pytest.approx(rb.get("val_loss", 0), abs=1e-5), (seed, ra, rb)
    assert killed.checkpoints() == straight.checkpoints()
    assert load_checkpoint(killed.checkpoint_path(steps))[2]["step"] == steps
    assert sorted(p.name for p in (run_path / "resume").iterdir()) == ["step.json", f"step_{steps:07d}"]


def test_save_every_takes_steps_or_wall_time():
    assert parse_save_every("50") == (50, None)
    assert parse_save_every("90s") == (None, 90.0)
    assert parse_save_every("10m") == (None, 600.0) and parse_save_every(TrainConfig().save_every) == (None, 600.0)
    assert parse_save_every("1.5h") == (None, 5400.0)
    for bad in ["0", "-5", "2.5", "10 min", "m", ""]:
        with pytest.raises(ConfigError, match="save_every"):
            parse_save_every(bad)
    now = [100.0]
    by_time = SaveSchedule("10m", clock=lambda: now[0])
    assert not by_time.time_due() and not by_time.step_due(600)
    now[0] += 599
    assert not by_time.time_due()
    now[0] += 1
    assert by_time.time_due()
    by_time.saved()
    assert not by_time.time_due()  # counted again from the last save
    by_steps = SaveSchedule("50", clock=lambda: now[0])
    assert by_steps.step_due(100) and not by_steps.step_due(101) and not by_steps.time_due()


# -- the one loop knows only the loss function and the callbacks it is given -----------------------------


class Recorder(Callback):
    """Records what the Trainer passes; asks to stop after step `stop_at`."""

    def __init__(self, stop_at=None):
        self.events, self.stop_at = [], stop_at

    def after_backward(self, step, losses):
        self.events.append(("after_backward", step))
        return {**losses, "loss": losses["loss"] * 0 + 123.0}  # what a callback returns is what on_step sees

    def on_step(self, step, losses):
        self.events.append(("on_step", step, losses["loss"].item(), sorted(losses)))
        return step == self.stop_at


def test_trainer_runs_any_loss_with_the_schedule_and_stops_where_a_callback_asks():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def squared_error(net, batch):  # not a language model at all
        inputs, targets = batch
        error = ((net(inputs) - targets) ** 2).mean()
        return {"loss": error, "error_again": error}

    tc = TrainConfig(steps=10, lr=0.1, warmup=0.2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    first, later = Recorder(stop_at=4), Recorder()
    trainer = Trainer(model, optimizer, lr_at=lambda step: lr_at(step, tc), loss_fn=squared_error, grad_clip=0,
                      callbacks=[first, later])
    last = trainer.fit(lambda step: ([(x, y)], None), 1, 10)
    assert last == 4 and trainer.completed == 4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(4, tc))  # each step set its own rate
    assert first.events[:2] == [("after_backward", 1), ("on_step", 1, 123.0, ["error_again", "loss"])]
    assert [e[1] for e in first.events if e[0] == "on_step"] == [1, 2, 3, 4]
    assert [e[1] for e in later.events if e[0] == "on_step"] == [1, 2, 3]  # not called once the first asked to stop


def test_micro_batches_accumulate_the_gradient_of_the_whole_batch():
    torch.manual_seed(0)
    model = IGPT(preset("tiny", vocab_size=17, n_positions=16, **TINY))
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)  # a real gradient everywhere, not the zero init
    ids = torch.randint(0, 16, (8, 16))
    whole = forward_backward(model, [ids])["loss"]
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    parts = forward_backward(model, list(ids.split(2)))["loss"]
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_train_config_from_a_run_file_refuses_unknown_keys_and_fills_missing_ones():
    recorded = {k: v for k, v in vars(TrainConfig(steps=7)).items() if k not in ("fsdp", "save_every")}  # an older run
    assert TrainConfig.from_dict(recorded) == TrainConfig(steps=7)
    with pytest.raises(ConfigError, match=r"unknown training config fields \['stpes'\]"):
        TrainConfig.from_dict({"stpes": 7})


def test_resume_of_a_run_that_was_not_trained_here_is_refused(tiny_run, tmp_path):
    import shutil

    copy = shutil.copytree(tiny_run.path, tmp_path / "imported")
    info = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**info, "train_config": None}))
    with pytest.raises(ConfigError, match="nothing to resume"):
        check_resume(open_run("imported", tmp_path), "digits", "tiny", "ar", 16, TrainConfig(), TINY)
