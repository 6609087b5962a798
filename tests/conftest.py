"""Shared fixtures: tiny trained runs on the embedded digits data, made once per test session."""

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the hub

from igpt_core.train import TrainConfig, start_run, train  # noqa: E402

TINY = dict(n_layer=2, n_embd=32, n_head=2)


def make_run(runs_dir, name="tiny", objective="ar", steps=40, **train_options):
    config = TrainConfig(steps=steps, batch_size=32, eval_every=10, **train_options)
    run = start_run(name, "digits", "tiny", objective, 16, train_config=config, model_overrides=TINY, runs_dir=runs_dir)
    train(run, progress=False)
    return run


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def tiny_run(runs_dir):
    """An AR digits run: 2 layers, width 32, 40 steps, checkpoints log-spaced."""
    return make_run(runs_dir, "tiny")


@pytest.fixture(scope="session")
def bert_run(runs_dir):
    return make_run(runs_dir, "tiny-bert", objective="bert", steps=20)
