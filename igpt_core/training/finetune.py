"""Fine-tuning a pre-trained run into a classifier, and classifying images with it.

As in the paper (Chen et al. 2020, §2.3 and §3.4; docs/design.md §6): the classifier is the pre-trained iGPT
plus a linear head on the mean over positions of ln_f(h^L) — read through the public
`model.features(ids, [n_layer])` — trained on L = L_CLF + gen_weight · L_GEN, where L_GEN is the
model's own generative loss (`model(ids, targets=ids)`; for BERT runs the masked loss). AdamW with
β = (0.9, 0.95), a learning rate ~10× lower than pre-training, warm-up then cosine decay, early
stopping on validation accuracy (the best weights are kept), test accuracy reported at the end.

A fine-tuned classifier is a run of its own:

    runs/<run>-ft-<dataset>/
        run.json          kind "classifier", base_run, dataset, classes, model_config, train_config
                          (the fine-tuning settings), val_acc, test_acc, best_step
        palette.json
        checkpoints/step_XXXXXXX.safetensors   the backbone at the best step (a normal checkpoint)
        head.safetensors  the linear head: weight (n_classes, n_embd), bias (n_classes,)
        metrics.jsonl     step, loss, clf_loss, gen_loss, lr; val_acc at evaluations

so completion, likelihood and probes work on it as on any run. The folder is assembled in a
temporary directory and renamed into place: a crash leaves no half-written classifier.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..device import pick_device
from ..errors import IgptError, RunError
from ..files import atomic_write, write_jsonl
from ..images import center_square, load_image, to_rgb
from ..probe import load_probe_data
from ..progress import progress_bar
from ..runs import Run, as_run, create_run, runs_root, save_checkpoint
from .config import TrainConfig
from .loop import Callback, Trainer, copy_state, make_optimizer
from .schedule import lr_at

HEAD_FILE = "head.safetensors"
HEAD_FORMAT = "igpt-head-1"
# Datasets whose images change meaning when mirrored: never flipped by default.
_NO_FLIP = {"digits", "mnist"}


def augment_batch(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """The paper's CIFAR augmentation on uint8 (B, H, W, 3): random horizontal flip, reflect-pad
    `pad` pixels, random crop back to H × W."""
    B, H, W, _ = images.shape
    out = images.copy()
    flip = rng.random(B) < 0.5
    out[flip] = out[flip, :, ::-1]
    padded = np.pad(out, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    tops = rng.integers(0, 2 * pad + 1, B)
    lefts = rng.integers(0, 2 * pad + 1, B)
    for i in range(B):
        out[i] = padded[i, tops[i] : tops[i] + H, lefts[i] : lefts[i] + W]
    return out


class _Classifier(nn.Module):
    """Backbone + linear head on the mean-pooled final-norm features (public API only).

    The head reads the features standardised with fixed statistics of the training set, measured
    once on the pre-trained backbone (`standardize`). That is only a reparametrisation of a linear
    head — `folded_head` turns it back into one plain nn.Linear on the raw pooled features — but it
    matters for optimisation: pooled ln_f features share a large common component and differ
    between images by a few percent of it, so a head on raw features barely moves in a few hundred
    steps (as the linear probe, which standardises too, shows).
    """

    def __init__(self, model, n_classes: int):
        super().__init__()
        self.model = model
        d = model.config.n_embd
        self.head = nn.Linear(d, n_classes)
        nn.init.zeros_(self.head.weight)  # like the paper's zero-initialised output projections
        nn.init.zeros_(self.head.bias)
        self.register_buffer("shift", torch.zeros(d))
        self.register_buffer("scale", torch.ones(d))

    def pooled(self, ids):
        return self.model.features(ids, [self.model.config.n_layer])[0]

    @torch.no_grad()
    def pooled_all(self, ids: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        was = self.training
        self.eval()
        feats = torch.cat([self.pooled(b) for b in ids.split(batch_size)])
        self.train(was)
        return feats

    @torch.no_grad()
    def standardize(self, ids: torch.Tensor) -> None:
        """Fix the head's input standardisation from pooled features of (training) images `ids`."""
        feats = self.pooled_all(ids)
        self.shift.copy_(feats.mean(0))
        self.scale.copy_(feats.std(0).clamp(min=1e-6))

    def forward(self, ids):
        return self.head((self.pooled(ids) - self.shift) / self.scale)

    @torch.no_grad()
    def folded_head(self) -> nn.Linear:
        """The same map as one nn.Linear on raw pooled features: W' = W / scale, b' = b - W' · shift."""
        head = nn.Linear(self.head.in_features, self.head.out_features).to(self.shift.device)
        head.weight.copy_(self.head.weight / self.scale)
        head.bias.copy_(self.head.bias - head.weight @ self.shift)
        return head


@torch.no_grad()
def _accuracy(clf: _Classifier, ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    was = clf.training
    clf.eval()
    correct = 0
    for b_ids, b_y in zip(ids.split(batch_size), labels.split(batch_size)):
        correct += (clf(b_ids).argmax(-1) == b_y).sum().item()
    clf.train(was)
    return correct / max(1, len(labels))


def finetune(run_name, dataset: str | None = None, *, name: str | None = None, steps: int = 300,
             lr: float | None = None, batch_size: int = 64, gen_weight: float = 1.0, patience: int = 5,
             eval_every: int | None = None, augment: bool | None = None, runs_dir=None, data_dir=None,
             step: int | None = None, seed: int = 0, progress: bool = True, overwrite: bool = False,
             max_train: int | None = None, device: str = "auto") -> dict:
    """Fine-tune checkpoint `step` (default: the last) of a run on a labelled dataset; save a classifier run.

    lr: default the run's pre-training lr / 10. eval_every: default steps // 10 (at least 1); the
    validation accuracy is measured every eval_every steps and at the end, and training stops after
    `patience` evaluations without improvement. augment: None = flip + reflect-pad-4 + random crop
    for 32×32 images (not for digits / MNIST, whose flips change meaning), True / False to force.
    Returns a summary dict (run, path, val_acc, test_acc, best_step, steps_run, stopped_early, ...).
    """
    base = as_run(run_name, runs_dir)
    info = base.info
    dataset = dataset or info["dataset"]
    root = runs_root(runs_dir)
    name = name or f"{base.name}-ft-{dataset}".replace(":", "_").replace("/", "_")
    _check_request(base, name, root, overwrite, steps=steps, batch_size=batch_size, patience=patience,
                   gen_weight=gen_weight)
    base_step = base.resolve_step(step)
    tc = _fine_tuning_config(info.get("train_config") or {}, lr, steps=steps, batch_size=batch_size,
                             eval_every=eval_every or max(1, steps // 10), seed=seed)
    dev = pick_device(device)
    model, palette, _ = base.load(base_step, device=dev)
    size = model.config.image_size
    data, classes, note, _ = load_probe_data(base, dataset, size, data_dir, max_train, seed)
    if augment is None:
        augment = size == 32 and dataset.lower().replace("_", "-") not in _NO_FLIP
    batches = _Batches(data["train"], palette, size, batch_size, bool(augment), seed)
    val_ids, val_y = _encoded(data["val"], palette, size, dev)
    torch.manual_seed(seed)
    clf = _Classifier(model, len(classes)).to(dev)
    # The head's input standardisation, from (a seeded sample of at most 4096) unaugmented training images.
    clf.standardize(batches.standardization_sample(4096).to(dev))

    t0 = time.perf_counter()
    bar = progress_bar(progress, total=steps, desc=f"fine-tuning {base.name} on {dataset}", unit="step")
    result = _train_classifier(clf, batches, (val_ids, val_y), tc, gen_weight=gen_weight, patience=patience, bar=bar)
    clf.load_state_dict(result["best_state"])
    test_acc, seconds = _accuracy(clf, *_encoded(data["test"], palette, size, dev)), time.perf_counter() - t0

    settings = {"steps": steps, "lr": tc.lr, "batch_size": batch_size, "gen_weight": gen_weight, "patience": patience,
                "eval_every": tc.eval_every, "augment": bool(augment), "seed": seed, "base_step": base_step,
                "max_train": max_train, "warmup": tc.warmup, "beta2": tc.beta2, "grad_clip": tc.grad_clip}
    run_info = _classifier_info(base, dataset, data_dir, model.config, classes, settings, result, test_acc, note)
    path = _save_classifier(root, name, run_info, palette, clf, classes, result["metrics"], result["best_step"],
                            overwrite)
    return {
        "run": name, "path": str(path), "base_run": base.name, "base_step": base_step, "dataset": dataset,
        "best_step": result["best_step"], "steps_run": result["steps_run"], "stopped_early": result["stopped_early"],
        "val_acc": result["val_acc"], "test_acc": test_acc, "augment": bool(augment), "lr": tc.lr, "seconds": seconds,
        "note": note,
    }


def _fine_tuning_config(base_settings: dict, lr: float | None, **settings) -> TrainConfig:
    """The fine-tuning schedule: lr (default: the base run's / 10; the paper fine-tunes about 10× lower
    than it pre-trains), the base run's warm-up fraction and β2, no weight decay, clip at 1.

    base_settings: the base run's recorded settings — a pre-training TrainConfig, a classifier's
    fine-tuning settings (which hold lr, warmup and beta2 too), or {} for imported weights (defaults)."""
    inherited = {key: value for key, value in base_settings.items() if key in ("lr", "warmup", "beta2")}
    base = replace(TrainConfig(), **inherited)
    lr = float(lr) if lr is not None else base.lr / 10
    if not lr > 0:
        raise IgptError(f"lr must be > 0, got {lr}")
    return TrainConfig(lr=lr, warmup=base.warmup, beta2=base.beta2, weight_decay=0.0, grad_clip=1.0, **settings)


def _classifier_info(base: Run, dataset: str, data_dir, config, classes, settings: dict, result: dict,
                     test_acc: float, note: str | None) -> dict:
    """The classifier run's run.json: what it was fine-tuned from, on what, how, and how well."""
    info = base.info
    return {
        "kind": "classifier", "base_run": base.name, "base_step": settings["base_step"], "dataset": dataset,
        "classes": classes, "preset": info.get("preset"), "model_config": config.to_dict(), "train_config": settings,
        "data_dir": str(data_dir) if data_dir else (info.get("data_dir") if dataset == info.get("dataset") else None),
        "best_step": result["best_step"], "val_acc": result["val_acc"], "test_acc": test_acc, "note": note,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _check_request(base: Run, name: str, runs_root: Path, overwrite: bool, **whole_numbers) -> None:
    """Refuse a fine-tuning request that cannot work, before any data or weights are loaded."""
    if name == base.name:
        raise RunError(f"the classifier needs a name other than its base run {base.name!r}")
    if (runs_root / name).exists() and not overwrite:
        raise RunError(f"a run named {name!r} already exists at {runs_root / name}: pass --overwrite to replace it, "
                       "or choose another --name")
    gen_weight = whole_numbers.pop("gen_weight")
    for label, value in whole_numbers.items():
        if not isinstance(value, int) or value < 1:
            raise IgptError(f"{label} must be a whole number >= 1, got {value!r}")
    if gen_weight < 0:
        raise IgptError(f"gen_weight must be >= 0 (0 trains on the classification loss alone), got {gen_weight}")


def _encoded(split: tuple[np.ndarray, np.ndarray], palette, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(palette ids, labels) of a split's (images, labels), on the device."""
    images, labels = split
    return torch.from_numpy(palette.encode(images, size)).to(device), torch.from_numpy(labels).to(device)


class _Batches:
    """Training batches of (palette ids, labels): seeded epochs of shuffled images, augmented or not."""

    def __init__(self, split, palette, size: int, batch_size: int, augment: bool, seed: int):
        self.images, self.labels = split[0], torch.from_numpy(split[1])
        self.palette, self.size, self.batch_size, self.augment, self.seed = palette, size, batch_size, augment, seed
        # Without augmentation every batch is a slice of the same ids: encode them once.
        self.ids = None if augment else torch.from_numpy(palette.encode(self.images, size))
        self.rng = np.random.default_rng(seed)
        self.order, self.pos = self.rng.permutation(len(self.images)), 0

    def standardization_sample(self, most: int) -> torch.Tensor:
        index = np.sort(np.random.default_rng([self.seed, 1]).permutation(len(self.images))[:most])
        return torch.from_numpy(self.palette.encode(self.images[index], self.size))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch_size > len(self.images):
            self.order, self.pos = self.rng.permutation(len(self.images)), 0
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        if self.augment:
            ids = torch.from_numpy(self.palette.encode(augment_batch(self.images[idx], self.rng), self.size))
        else:
            ids = self.ids[idx]
        return ids, self.labels[idx]


class _EarlyStopping(Callback):
    """Fine-tuning's callbacks: a metrics row per step (read back at once: fine-tuning runs are short), the
    validation accuracy every tc.eval_every steps and at the end, the best weights so far (kept on the
    CPU), and a stop after `patience` evaluations without gain."""

    def __init__(self, clf: _Classifier, val, tc: TrainConfig, patience: int, bar=None):
        self.clf, self.val, self.tc, self.patience, self.bar = clf, val, tc, patience, bar
        # Step 0 (the zero head: the majority-of-ties class) is the baseline every evaluation must beat.
        self.best = {"val_acc": _accuracy(clf, *val), "best_step": 0, "best_state": copy_state(clf)}
        self.metrics: list[dict] = [{"step": 0, "val_acc": self.best["val_acc"]}]
        self.bad_evals = 0

    def on_step(self, step, losses):
        gen_loss = losses.get("gen_loss")
        row = {"step": step, "loss": losses["loss"].item(), "clf_loss": losses["clf_loss"].item(),
               "gen_loss": None if gen_loss is None else gen_loss.item(), "lr": lr_at(step, self.tc)}
        if step % self.tc.eval_every == 0 or step == self.tc.steps:
            row["val_acc"] = _accuracy(self.clf, *self.val)
            if row["val_acc"] > self.best["val_acc"]:
                self.best = {"val_acc": row["val_acc"], "best_step": step, "best_state": copy_state(self.clf)}
                self.bad_evals = 0
            else:
                self.bad_evals += 1
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{row['loss']:.3f}", val_acc=f"{row['val_acc']:.3f}",
                                     best=f"{self.best['val_acc']:.3f}")
        self.metrics.append(row)
        if self.bar is not None:
            self.bar.update(1)
        return self.bad_evals >= self.patience and step < self.tc.steps


def classifier_loss(gen_weight: float):
    """The fine-tuning objective (§3.4): L = L_CLF + gen_weight · L_GEN, L_GEN the model's own generative
    loss (for BERT runs the masked loss), as a Trainer loss function of (classifier, (ids, labels))."""

    def loss_fn(clf: _Classifier, batch) -> dict[str, torch.Tensor]:
        ids, labels = batch
        clf_loss = F.cross_entropy(clf(ids), labels)
        if not gen_weight:
            return {"loss": clf_loss, "clf_loss": clf_loss}
        gen_loss = clf.model(ids, targets=ids)[1]
        return {"loss": clf_loss + gen_weight * gen_loss, "clf_loss": clf_loss, "gen_loss": gen_loss}

    return loss_fn


def _train_classifier(clf: _Classifier, batches: _Batches, val, tc: TrainConfig, *, gen_weight: float,
                      patience: int, bar=None) -> dict:
    """Fine-tune with the one training loop (loop.Trainer) on L_CLF + gen_weight · L_GEN.

    Returns the best weights and their step, the metrics rows, and whether `patience` evaluations
    without gain stopped it early.
    """
    device = clf.shift.device
    clf.train()
    stopping = _EarlyStopping(clf, val, tc, patience, bar)
    trainer = Trainer(clf, make_optimizer(clf, tc, device), lr_at=lambda step: lr_at(step, tc),
                      loss_fn=classifier_loss(gen_weight), grad_clip=tc.grad_clip, callbacks=[stopping])

    def batch(step: int):
        ids, labels = (t.to(device) for t in batches.next())
        return [(ids, labels)], [tc.seed * 1_000_003 + step]  # the seed: BERT masks of L_GEN, reproducible

    try:
        steps_run = trainer.fit(batch, 1, tc.steps)
    finally:
        if bar is not None:
            bar.close()
    clf.eval()
    return {**stopping.best, "metrics": stopping.metrics, "steps_run": steps_run, "stopped_early": steps_run < tc.steps}


def _save_classifier(runs_root: Path, name: str, info: dict, palette, clf: _Classifier, classes, metrics,
                     best_step: int, overwrite: bool) -> Path:
    """Write the classifier run: built in a temporary folder, then renamed into place."""

    def fill(run: Run) -> None:
        write_jsonl(run.path / "metrics.jsonl", metrics)
        save_checkpoint(run.checkpoint_path(best_step), clf.model, palette, step=best_step,
                        val_acc=info["val_acc"], base_run=info["base_run"], base_step=info["base_step"])
        folded = clf.folded_head()
        head = {"weight": folded.weight.detach().cpu().float().contiguous(),
                "bias": folded.bias.detach().cpu().float().contiguous()}
        metadata = {"format": HEAD_FORMAT, "classes": json.dumps(classes), "layer": str(clf.model.config.n_layer),
                    "pool": "mean"}
        atomic_write(run.path / HEAD_FILE, lambda tmp: save_file(head, tmp, metadata=metadata))

    return create_run(runs_root, name, info, palette, overwrite=overwrite, fill=fill).path


def load_classifier(run_name, *, runs_dir=None, device="cpu"):
    """(backbone, head nn.Linear, palette, classes) of a classifier run made by `finetune`."""
    run = as_run(run_name, runs_dir)
    info = run.info
    if info.get("kind") != "classifier":
        raise IgptError(f"run {run.name!r} is not a classifier: fine-tune it first with "
                        f"`igpt finetune {run.name} --dataset digits` and classify with the run that makes")
    path = run.path / HEAD_FILE
    if not path.is_file():
        raise RunError(f"classifier run {run.name!r} has no {HEAD_FILE}: it is incomplete; fine-tune again with --overwrite")
    model, palette, _ = run.load(device=device)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
        classes = json.loads(metadata["classes"])
        weight, bias = tensors["weight"], tensors["bias"]
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise RunError(f"{path} is damaged ({err}); fine-tune again with --overwrite") from None
    if metadata.get("format") != HEAD_FORMAT or weight.shape != (len(classes), model.config.n_embd) \
            or bias.shape != (len(classes),):
        raise RunError(f"{path} does not fit the run's model ({tuple(weight.shape)} for {len(classes)} classes and "
                       f"width {model.config.n_embd}); fine-tune again with --overwrite")
    head = nn.Linear(model.config.n_embd, len(classes))
    head.load_state_dict({"weight": weight, "bias": bias})
    return model, head.to(device).eval(), palette, classes


@torch.no_grad()
def classify(run_name, image, *, runs_dir=None) -> list[tuple[str, float]]:
    """Class probabilities of one image under a classifier run, most likely first.

    image: a path (or bytes) read with images.load_image, or an array / PIL image (images.to_rgb).
    A non-square image is centre-cropped to a square (as folder datasets are), then resized to the
    model's resolution and mapped to palette ids by palette.encode.
    """
    model, head, palette, classes = load_classifier(run_name, runs_dir=runs_dir)
    rgb = load_image(image) if isinstance(image, (str, Path, bytes)) else to_rgb(image)
    if rgb.shape[0] != rgb.shape[1]:
        rgb = center_square(rgb)
    size = model.config.image_size
    ids = torch.from_numpy(palette.encode(rgb[None], size))
    probs = head(model.features(ids, [model.config.n_layer])[0]).softmax(-1)[0].tolist()
    return sorted(zip(classes, probs), key=lambda cp: -cp[1])
