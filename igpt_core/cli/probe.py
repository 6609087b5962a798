"""What the layers know: `igpt probe` (linear probes), `igpt paper` (the paper's probe figures from them),
`igpt finetune` and `igpt classify`."""

from __future__ import annotations

import sys

from .common import (add_data_dir, add_device, add_json, add_precision, command, emit, int_list, runs_dir,
                     steps_or_all)


def already_probed(args) -> bool:
    """--skip-existing: stored results cover the checkpoints asked for (then says so)."""
    from igpt_core import open_run
    from igpt_core import load_probe_results

    run = open_run(args.run, runs_dir(args))
    stored = load_probe_results(run, args.dataset)
    wanted = {"all": run.checkpoints(), "last": run.checkpoints()[-1:]}.get(str(args.checkpoints), args.checkpoints)
    if stored is None or not set(wanted) <= {row["step"] for row in stored.rows}:
        return False
    print(f"{args.run} is already probed at checkpoints {sorted(wanted)} ({stored.path}); nothing to do")
    return True


def cmd_probe(args) -> None:
    from igpt_core import probe_run

    if args.skip_existing and already_probed(args):
        return
    table = probe_run(args.run, args.dataset, checkpoints=args.checkpoints, layers=args.layers, concat=args.concat,
                      runs_dir=runs_dir(args), data_dir=args.data_dir, bert_masks=args.bert_masks,
                      max_train=args.max_train, progress=not args.json, device=args.device, workers=args.workers,
                      precision=args.precision)
    if table is None:  # under torchrun, a process other than rank 0: it helped extract, rank 0 reports
        return
    if table.note:
        print(f"note: {table.note}", file=sys.stderr)
    if args.json:
        emit(args, table.to_dict(), "")
        return
    print_probes(args.run, table)
    if table.concat:
        print_concat(table.concat)
    print(f"saved in {table.path}")


def cmd_paper(args) -> None:
    from igpt_core import make_paper, paper_plan

    plan = paper_plan(args.runs, args.dataset, checkpoints=args.checkpoints, layers=args.layers,
                      max_train=args.max_train, precision=args.precision, device=args.device, runs_dir=runs_dir(args),
                      data_dir=args.data_dir, loss_dataset=args.loss_dataset, val_images=args.val_images)
    print(plan.describe(), file=sys.stderr if args.json else sys.stdout, flush=True)
    result = make_paper(plan, progress=not args.json, workers=args.workers)
    if result.note:
        print(f"note: {result.note}", file=sys.stderr)
    best = {name: [r for r in rows if r["best"]] for name, rows in result.rows.items()}
    text = [f"best layer per checkpoint on {result.dataset} (test accuracy; validation loss in nats per token):"]
    for name, rows in best.items():
        text += [f"  {name} step {r['step']:>8}: layer {r['layer']:>3}  {r['test_acc'] * 100:5.1f}%  "
                 f"val loss {'-' if r['val_loss'] is None else format(r['val_loss'], '.4f')}" for r in rows]
    text += [f"wrote {path}" for path in result.files]
    emit(args, {"dataset": result.dataset, "rows": result.rows, "files": [str(p) for p in result.files],
                "note": result.note}, "\n".join(text))


def print_probes(name: str, table) -> None:
    """Test accuracy by checkpoint (rows) and layer (columns), the best layer starred, then the references."""
    print(f"linear probes of {name} on {table.dataset} (test accuracy; * = best layer by val accuracy)")
    layers = sorted({row["layer"] for row in table.rows})
    by_key = {(row["step"], row["layer"]): row for row in table.rows}
    print(f"{'step':>8} {'val loss':>9} " + " ".join(f"{'L' + str(layer):>6}" for layer in layers))
    for step in sorted({row["step"] for row in table.rows}):
        best = table.best(step)
        cells = []
        for layer in layers:
            row = by_key.get((step, layer))
            mark = "*" if best and row is best else " "
            cells.append(f"{row['test_acc'] * 100:5.1f}{mark}" if row else f"{'-':>6}")
        loss = next((r["val_loss"] for r in table.rows if r["step"] == step and r["val_loss"] is not None), None)
        print(f"{step:>8} {'-' if loss is None else f'{loss:.3f}':>9} " + " ".join(cells))
    refs = table.references or {}
    if refs.get("raw_pixels"):
        print(f"reference, raw pixels: {refs['raw_pixels']['test_acc'] * 100:.1f}")
    if refs.get("random_init"):
        best_random = max(refs["random_init"], key=lambda r: r["val_acc"])
        print(f"reference, random init (best layer {best_random['layer']}): {best_random['test_acc'] * 100:.1f}")


def print_concat(rows: list[dict]) -> None:
    """The probes of joined layers: one column per set of layers, one row per checkpoint."""
    sets = sorted({tuple(row["layers"]) for row in rows})
    names = ["+".join(f"L{layer}" for layer in layers) for layers in sets]
    by_key = {(row["step"], tuple(row["layers"])): row for row in rows}
    print("layers joined end to end, probed as one feature (test accuracy):")
    print(f"{'step':>8} " + " ".join(f"{name:>{max(6, len(name))}}" for name in names))
    for step in sorted({row["step"] for row in rows}):
        cells = [f"{by_key[(step, layers)]['test_acc'] * 100:.1f}" if (step, layers) in by_key else "-"
                 for layers in sets]
        print(f"{step:>8} " + " ".join(f"{cell:>{max(6, len(name))}}" for cell, name in zip(cells, names)))


def cmd_finetune(args) -> None:
    from igpt_core import finetune

    summary = finetune(args.run, args.dataset, name=args.name, steps=args.steps, lr=args.lr,
                       batch_size=args.batch_size, gen_weight=args.gen_weight, patience=args.patience,
                       runs_dir=runs_dir(args), data_dir=args.data_dir, step=args.step, seed=args.seed,
                       progress=not args.json, overwrite=args.overwrite, max_train=args.max_train, device=args.device)
    emit(args, summary, f"fine-tuned {args.run} on {summary['dataset']}: test accuracy {summary['test_acc'] * 100:.1f}% "
                        f"(val {summary['val_acc'] * 100:.1f}% at step {summary['best_step']}); classifier run "
                        f"{summary['run']!r} at {summary['path']}")


def cmd_classify(args) -> None:
    from igpt_core import classify

    probs = classify(args.run, args.image, runs_dir=runs_dir(args))
    emit(args, {"run": args.run, "image": args.image, "probabilities": dict(probs)},
         "\n".join(f"{name:>16} {p * 100:5.1f}%  {'#' * round(p * 40)}" for name, p in probs[: args.top]))


def add_probe(sub) -> None:
    p = command(sub, "probe", cmd_probe, "linear probes of every layer across checkpoints (the paper's central measurement)",
                "Features = mean over positions of each block's input norm, one forward pass for all layers, cached "
                "per checkpoint; L-BFGS logistic regression on standardised features, C chosen on the val split, "
                "accuracy on the test split. Saved in the run (probes/DATASET.json) with raw-pixel and random-init "
                "references. Fits are single-threaded, several at once in separate processes: the numbers do not "
                "depend on thread settings. Under torchrun (`torchrun --nproc_per_node=N -m igpt_core.cli probe RUN`) "
                "the processes share the feature extraction; rank 0 fits and writes.")
    p.add_argument("run", help="run name")
    p.add_argument("--dataset", help="labelled dataset (default: the run's own)")
    p.add_argument("--checkpoints", type=steps_or_all, default="all", help="all, last, or comma-separated steps")
    p.add_argument("--layers", type=steps_or_all, default="all", help="all, or comma-separated layers (0 = embeddings)")
    p.add_argument("--concat", type=int_list, metavar="L1,L2,...",
                   help="also probe these layers' features joined end to end (its own row; the paper's best "
                        "ImageNet probe joins five layers)")
    p.add_argument("--workers", type=int, help="processes fitting probes at once (default: one per core)")
    p.add_argument("--bert-masks", type=int, default=4, help="BERT runs: random masks averaged with no mask (default 4)")
    p.add_argument("--max-train", type=int, help="probe on at most N training images")
    p.add_argument("--skip-existing", action="store_true",
                   help="do nothing if stored results already cover the checkpoints asked for")
    add_device(p)
    add_precision(p)
    add_data_dir(p)
    add_json(p, "print the table as JSON")


def add_paper(sub) -> None:
    p = command(sub, "paper", cmd_paper, "the paper's probe figures (Figure 3) for one or more runs: PNG + CSV",
                "Draws (1) linear-probe accuracy by layer, one line per checkpoint, and (2) each checkpoint's "
                "best-layer accuracy against its validation loss, one line per run, as iGPT-S/M/L in the paper's "
                "Figure 3. The probes are `igpt probe`'s: features are cached per checkpoint, so a stopped call "
                "resumes. Validation losses come from the run's metrics log, else are computed (first "
                "--val-images images of the val split, stored in the run). Prints what it will compute and a time "
                "estimate measured on a first batch before it starts. Writes RUN/paper/DATASET.csv and .png "
                "(the PNG needs matplotlib); `igpt dashboard` shows the same charts.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run names (e.g. imported s, m and l)")
    p.add_argument("--dataset", help="labelled probe dataset, e.g. openai:cifar10, cifar10, digits "
                                     "(default: the first run's own)")
    p.add_argument("--checkpoints", type=steps_or_all, default="all", help="all, last, or comma-separated steps")
    p.add_argument("--layers", type=steps_or_all, default="all", help="all, or comma-separated layers (0 = embeddings)")
    p.add_argument("--max-train", type=int, help="probe on at most N training images (a seeded subset)")
    p.add_argument("--loss-dataset", help="where validation losses are computed when a run logged none "
                                          "(default: the probe dataset; the paper's is its pre-training data, "
                                          "e.g. openai:imagenet)")
    p.add_argument("--val-images", type=int, default=256, help="images scored for a computed validation loss (default 256)")
    p.add_argument("--workers", type=int, help="processes fitting probes at once (default: one per core)")
    add_device(p)
    add_precision(p)
    add_data_dir(p)
    add_json(p, "print the rows and files as JSON (the plan goes to stderr)")


def add_finetune(sub) -> None:
    p = command(sub, "finetune", cmd_finetune, "fine-tune a run into a classifier (L_CLF + L_GEN, early stopping)")
    p.add_argument("run", help="pre-trained run")
    p.add_argument("--dataset", help="labelled dataset (default: the run's own)")
    p.add_argument("--name", help="classifier run name (default RUN-ft-DATASET)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, help="default: pre-training lr / 10")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--gen-weight", type=float, default=1.0, help="weight of the generative loss (0: L_CLF alone)")
    p.add_argument("--patience", type=int, default=5, help="evaluations without improvement before stopping")
    p.add_argument("--step", type=int, help="checkpoint to start from (default: the last)")
    p.add_argument("--max-train", type=int, help="at most N training images")
    p.add_argument("--seed", type=int, default=0)
    add_device(p)
    p.add_argument("--overwrite", action="store_true")
    add_data_dir(p)
    add_json(p)


def add_classify(sub) -> None:
    p = command(sub, "classify", cmd_classify, "class probabilities of an image under a fine-tuned classifier run")
    p.add_argument("run", help="classifier run (made by igpt finetune)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--top", type=int, default=5, help="classes to show (default 5)")
    add_json(p)
