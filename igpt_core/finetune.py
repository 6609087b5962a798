"""Fine-tuning a pre-trained run into a classifier, and classifying images with it.

As in the paper (Chen et al. 2020, §3.4 / DESIGN.md §1): the classifier is the pre-trained iGPT
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

import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import IgptError, RunError
from .images import center_square, load_image, to_rgb
from .runs import Run, atomic_write, create_run, default_runs_dir, open_run, save_checkpoint

HEAD_FILE = "head.safetensors"
HEAD_FORMAT = "igpt-head-1"
# Datasets whose images change meaning when mirrored: never flipped by default.
_NO_FLIP = {"digits", "mnist"}


def _as_run(run, runs_dir=None) -> Run:
    return run if isinstance(run, Run) else open_run(str(run), runs_dir)


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
    from .probe import _load_probe_data
    from .train import TrainConfig, lr_at, pick_device

    base = _as_run(run_name, runs_dir)
    info = base.info
    dataset = dataset or info["dataset"]
    runs_root = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    name = name or f"{base.name}-ft-{dataset}".replace(":", "_").replace("/", "_")
    if name == base.name:
        raise RunError(f"the classifier needs a name other than its base run {base.name!r}")
    if (runs_root / name).exists() and not overwrite:
        raise RunError(f"a run named {name!r} already exists at {runs_root / name}: pass --overwrite to replace it, "
                       "or choose another --name")
    for label, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("patience", patience, 1)):
        if not isinstance(value, int) or value < low:
            raise IgptError(f"{label} must be a whole number >= {low}, got {value!r}")
    if gen_weight < 0:
        raise IgptError(f"gen_weight must be >= 0 (0 trains on the classification loss alone), got {gen_weight}")
    base_step = base.resolve_step(step)
    base_tc = TrainConfig.from_dict(info.get("train_config") or {})
    lr = float(lr) if lr is not None else base_tc.lr / 10
    if not lr > 0:
        raise IgptError(f"lr must be > 0, got {lr}")
    eval_every = eval_every or max(1, steps // 10)

    dev = pick_device(device)
    model, palette, _ = base.load(base_step, device=dev)
    config = model.config
    size = config.image_size
    data, classes, note = _load_probe_data(base, dataset, size, data_dir, max_train, seed)
    if augment is None:
        augment = size == 32 and dataset.lower().replace("_", "-") not in _NO_FLIP
    train_images, train_y = data["train"]
    val_ids = torch.from_numpy(palette.encode(data["val"][0], size)).to(dev)
    test_ids = torch.from_numpy(palette.encode(data["test"][0], size)).to(dev)
    val_y = torch.from_numpy(data["val"][1]).to(dev)
    test_y = torch.from_numpy(data["test"][1]).to(dev)
    train_ids = None if augment else torch.from_numpy(palette.encode(train_images, size))
    train_y_t = torch.from_numpy(train_y)
    n = len(train_images)

    torch.manual_seed(seed)
    clf = _Classifier(model, len(classes)).to(dev)
    # The head's input standardisation, from (a seeded sample of at most 4096) unaugmented training images.
    stats_index = np.sort(np.random.default_rng([seed, 1]).permutation(n)[:4096])
    clf.standardize(torch.from_numpy(palette.encode(train_images[stats_index], size)).to(dev))
    clf.train()
    optimizer = torch.optim.AdamW(clf.parameters(), lr=lr, betas=(0.9, base_tc.beta2), weight_decay=0.0)
    schedule = TrainConfig(steps=steps, lr=lr, warmup=base_tc.warmup)
    rng = np.random.default_rng(seed)

    settings = {"steps": steps, "lr": lr, "batch_size": batch_size, "gen_weight": gen_weight, "patience": patience,
                "eval_every": eval_every, "augment": bool(augment), "seed": seed, "base_step": base_step,
                "max_train": max_train, "warmup": base_tc.warmup, "beta2": base_tc.beta2, "grad_clip": 1.0}
    metrics: list[dict] = []
    # Step 0 (the zero head: the majority-of-ties class) is the baseline every evaluation must beat.
    best = {"val_acc": _accuracy(clf, val_ids, val_y), "step": 0, "state": copy.deepcopy(clf.state_dict())}
    metrics.append({"step": 0, "val_acc": best["val_acc"]})
    bad_evals, stopped_early, done = 0, False, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"fine-tuning {base.name} on {dataset}", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    perm, pos = rng.permutation(n), 0
    try:
        for it in range(1, steps + 1):
            if pos + batch_size > n:
                perm, pos = rng.permutation(n), 0
            idx = perm[pos : pos + batch_size]
            pos += batch_size
            if augment:
                batch = torch.from_numpy(palette.encode(augment_batch(train_images[idx], rng), size))
            else:
                batch = train_ids[idx]
            batch, y = batch.to(dev), train_y_t[idx].to(dev)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it, schedule)
            torch.manual_seed(seed * 1_000_003 + it)  # BERT masks of L_GEN, reproducible
            clf_loss = F.cross_entropy(clf(batch), y)
            loss = clf_loss
            gen_loss = None
            if gen_weight:
                _, gen_loss = model(batch, targets=batch)
                loss = clf_loss + gen_weight * gen_loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clf.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = it
            row = {"step": it, "loss": loss.item(), "clf_loss": clf_loss.item(),
                   "gen_loss": None if gen_loss is None else gen_loss.item(), "lr": lr_at(it, schedule)}
            if it % eval_every == 0 or it == steps:
                acc = _accuracy(clf, val_ids, val_y)
                row["val_acc"] = acc
                if acc > best["val_acc"]:
                    best = {"val_acc": acc, "step": it, "state": copy.deepcopy(clf.state_dict())}
                    bad_evals = 0
                else:
                    bad_evals += 1
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", val_acc=f"{acc:.3f}", best=f"{best['val_acc']:.3f}")
            metrics.append(row)
            if bar is not None:
                bar.update(1)
            if bad_evals >= patience and it < steps:
                stopped_early = True
                break
    finally:
        if bar is not None:
            bar.close()
    clf.load_state_dict(best["state"])
    clf.eval()
    test_acc = _accuracy(clf, test_ids, test_y)
    val_acc = best["val_acc"]
    seconds = time.perf_counter() - t0

    run_info = {
        "kind": "classifier",
        "base_run": base.name,
        "base_step": base_step,
        "dataset": dataset,
        "classes": classes,
        "preset": info.get("preset"),
        "model_config": config.to_dict(),
        "train_config": settings,
        "data_dir": str(data_dir) if data_dir else (info.get("data_dir") if dataset == info.get("dataset") else None),
        "best_step": best["step"],
        "val_acc": val_acc,
        "test_acc": test_acc,
        "note": note,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = _save_classifier(runs_root, name, run_info, palette, clf, classes, metrics, best["step"], overwrite)
    return {
        "run": name, "path": str(path), "base_run": base.name, "base_step": base_step, "dataset": dataset,
        "best_step": best["step"], "steps_run": done, "stopped_early": stopped_early,
        "val_acc": val_acc, "test_acc": test_acc, "augment": bool(augment), "lr": lr, "seconds": seconds, "note": note,
    }


def _save_classifier(runs_root: Path, name: str, info: dict, palette, clf: _Classifier, classes, metrics,
                     best_step: int, overwrite: bool) -> Path:
    """Assemble the classifier run in a temporary folder, then rename it into place."""
    runs_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=runs_root, prefix=f".{name}.ft-"))
    try:
        run = create_run(staging, name, info, palette)
        atomic_write(run.path / "metrics.jsonl",
                     lambda tmp: Path(tmp).write_text("".join(json.dumps(row) + "\n" for row in metrics)))
        save_checkpoint(run.checkpoint_path(best_step), clf.model, palette, step=best_step,
                        val_acc=info["val_acc"], base_run=info["base_run"], base_step=info["base_step"])
        folded = clf.folded_head()
        head = {"weight": folded.weight.detach().cpu().float().contiguous(),
                "bias": folded.bias.detach().cpu().float().contiguous()}
        metadata = {"format": HEAD_FORMAT, "classes": json.dumps(classes), "layer": str(clf.model.config.n_layer),
                    "pool": "mean"}
        atomic_write(run.path / HEAD_FILE, lambda tmp: save_file(head, tmp, metadata=metadata))
        final = runs_root / name
        if final.exists():
            if not overwrite:
                raise RunError(f"a run named {name!r} appeared at {final} while fine-tuning; choose another --name")
            shutil.rmtree(final)
        os.replace(run.path, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def load_classifier(run_name, *, runs_dir=None, device="cpu"):
    """(backbone, head nn.Linear, palette, classes) of a classifier run made by `finetune`."""
    run = _as_run(run_name, runs_dir)
    info = run.info
    if info.get("kind") != "classifier":
        raise IgptError(f"run {run.name!r} is not a classifier: fine-tune it first with "
                        f"`igpt finetune {run.name} --dataset digits` and classify with the run that makes")
    path = run.path / HEAD_FILE
    if not path.is_file():
        raise RunError(f"classifier run {run.name!r} has no {HEAD_FILE}: it is incomplete; fine-tune again with --overwrite")
    model, palette, _ = run.load(device=device)
    try:
        from safetensors.torch import safe_open

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
