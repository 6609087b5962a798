"""Training: one loop (loop.Trainer) driven by pre-training (pretrain.py) and fine-tuning (finetune.py).

    loop.py         Trainer: batches -> forward/backward (micro-batches, autocast) -> clip -> step -> callbacks
    schedule.py     warm-up + cosine learning rate, when to save the resume state
    config.py       TrainConfig, and the checks before a run starts or resumes
    pretrain.py     start_run, train: runs, checkpoints, evaluation, stop signals
    metrics.py      validation loss, metrics.jsonl, the progress bar
    resume.py       the resume state (kill -9 safe)
    distributed.py  torchrun set-up, DDP/FSDP placement, stop signals, lost-peer errors
    finetune.py     fine-tuning into a classifier (L_CLF + L_GEN), classify, load_classifier
"""

from .config import RUNTIME_SETTINGS, TrainConfig, check_processes, check_resume
from ..distributed import StopSignals, init_from_env, is_peer_failure, lost_peers_message, patient_group
from .finetune import augment_batch, classifier_loss, classify, finetune, load_classifier
from .loop import Callback, Trainer, copy_state, forward_backward, generative_loss, make_optimizer, optimizer_update
from .metrics import evaluate, model_flops_per_token
from .pretrain import start_run, token_ids, train, unigram_loss, unigram_loss_from_counts
from .schedule import SaveSchedule, lr_at, parse_save_every, set_lr

__all__ = [
    "RUNTIME_SETTINGS", "Callback", "SaveSchedule", "StopSignals", "TrainConfig", "Trainer", "augment_batch",
    "check_processes", "check_resume", "classifier_loss", "classify", "copy_state", "evaluate", "finetune",
    "forward_backward", "generative_loss", "init_from_env", "is_peer_failure", "load_classifier",
    "lost_peers_message", "lr_at", "make_optimizer", "model_flops_per_token", "optimizer_update",
    "parse_save_every", "patient_group", "set_lr", "start_run", "token_ids", "train", "unigram_loss",
    "unigram_loss_from_counts",
]
