"""Episodic training of the IRIS in-context model (``irisseg train``).

Each step samples one task: K supports and Q queries of N classes (see :mod:`irisseg.data.episodes`),
encodes the task from the supports, segments the queries, and minimises Dice + BCE. After each step the
task embedding of every class updates the class memory bank (EMA). Validation: one-shot Dice on a fixed
set of held-out tasks. Best and last models are exported as ``RUN/best`` and ``RUN/last`` folders
(``config.json`` + ``model.safetensors`` + ``memory.safetensors``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, IterableDataset

from irisseg.data.episodes import AugmentConfig, DatasetEpisodes, SyntheticEpisodes
from irisseg.errors import InputError
from irisseg.losses import dice_bce_loss
from irisseg.models.iris import IrisConfig, IrisModel, build_iris, transfer_weights
from irisseg.training.engine import ListDataset, YamlConfig, make_trainer, resume_path


@dataclass
class IncontextTrainConfig(YamlConfig):
    """Settings of ``irisseg train`` (a YAML file with these keys; unknown keys are an error).

    Attributes:
      model: registry name (``iris-small``, ``iris-base``); model_overrides: IrisConfig fields to change.
      shape: side (voxels) of the grid synthetic tasks are generated on (and dataset cases resampled to).
      crop: side of the training grid when synthetic views are cropped from ``shape^3`` (None: no crop).
      max_support: largest K; n_query: queries per step; max_classes: largest N per episode.
      families / holdout_families: shape families for synthetic training / held out for validation.
      synthetic_fraction: share of synthetic episodes when datasets are given too.
      lr, weight_decay, warmup_steps, max_steps, grad_clip: optimisation (AdamW + cosine schedule).
      val_every, val_tasks: validation period (steps) and number of held-out validation tasks.
      checkpoint_every: save the resumable checkpoint every this many steps.
      num_workers: DataLoader workers generating episodes; num_threads: torch threads of the training
        process (None: torch's default; 1 avoids thread thrashing on a busy 2-core machine); seed: base seed.
      init_from: a model folder (config.json + model.safetensors) whose weights and memory bank start the
        run (e.g. to continue training the starter weights); its architecture, with ``model_overrides``
        applied, replaces ``model``, and weights that no longer fit are grown or re-initialised
        (:func:`irisseg.models.iris.transfer_weights`).
      match_dropout: probability of training a step without the dense support memory (matching), so that
        the model also segments from a memory-bank embedding alone.
      val_crop: side of the validation views' crop (None: validate on the whole ``shape^3`` views, as the
        model is used at inference).
    """

    model: str = "iris-small"
    model_overrides: dict = field(default_factory=dict)
    shape: int = 32
    crop: int | None = None
    max_support: int = 3
    n_query: int = 2
    max_classes: int = 3
    families: list[str] | None = None
    holdout_families: list[str] = field(default_factory=list)
    synthetic_fraction: float = 0.5
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_steps: int = 100
    max_steps: int = 5000
    grad_clip: float = 1.0
    val_every: int = 250
    val_tasks: int = 16
    checkpoint_every: int = 100
    num_workers: int = 1
    num_threads: int | None = None
    seed: int = 0
    augment: bool = True
    init_from: str | None = None
    match_dropout: float = 0.2
    val_crop: int | None = None

    def __post_init__(self):
        for name in ("max_steps", "val_every", "val_tasks", "checkpoint_every", "max_support", "n_query", "max_classes"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.synthetic_fraction <= 1.0:
            raise InputError(f"synthetic_fraction must be in [0, 1], got {self.synthetic_fraction}")


class _Mixture(IterableDataset):
    """Draws from several infinite episode streams with given probabilities (deterministic by seed)."""

    def __init__(self, streams: list[IterableDataset], weights: list[float], seed: int):
        super().__init__()
        self.streams, self.weights, self.seed = streams, np.asarray(weights) / np.sum(weights), seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        its = [iter(s) for s in self.streams]
        while True:
            yield next(its[int(rng.choice(len(its), p=self.weights))])


def _dice_per_class(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice per (query, class) at threshold 0.5; both empty counts as 1. (Q, N)."""
    pred = (logits > 0).float()
    inter = (pred * target).sum((-3, -2, -1))
    denom = pred.sum((-3, -2, -1)) + target.sum((-3, -2, -1))
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1e-6), torch.ones_like(denom))


class IrisLightning(L.LightningModule):
    """LightningModule wrapping :class:`IrisModel` for episodic training (one episode per step)."""

    def __init__(self, model: IrisModel, config: IncontextTrainConfig):
        super().__init__()
        self.model = model
        self.cfg = config
        self.best_val = -math.inf
        self._t0 = time.time()

    def _step(self, ep: dict) -> tuple[torch.Tensor, torch.Tensor]:
        task = self.model.encode_task(ep["support_images"][None], ep["support_masks"][None])
        if self.training and task.has_matching and torch.rand(()).item() < self.cfg.match_dropout:
            task = task.without_matching()
        logits = self.model.decode(ep["query_images"], task)  # (Q, N, D, H, W)
        return logits, task

    def training_step(self, ep: dict, batch_idx: int) -> torch.Tensor:
        logits, task = self._step(ep)
        loss = dice_bce_loss(logits.float(), ep["query_masks"])
        for i, name in enumerate(ep["names"]):
            self.model.memory.update(name, task.select([i]))
        self.log("train/loss", loss, prog_bar=True, batch_size=1)
        self.log("train/dice", _dice_per_class(logits.detach(), ep["query_masks"]).mean(), prog_bar=True, batch_size=1)
        return loss

    def validation_step(self, ep: dict, batch_idx: int) -> None:
        logits, _ = self._step(ep)
        self.log("val/loss", dice_bce_loss(logits.float(), ep["query_masks"]), batch_size=1)
        self.log("val/dice", _dice_per_class(logits, ep["query_masks"]).mean(), prog_bar=True, batch_size=1)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        warm, total = max(1, self.cfg.warmup_steps), max(self.cfg.max_steps, 1)

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # The memory bank is not a parameter: carry it in the resumable checkpoint as plain tensors.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        bank = self.model.memory
        checkpoint["irisseg_memory"] = {
            "names": bank.names(),
            "counts": [bank.counts[n] for n in bank.names()],
            "tensors": [[t.clone() for t in bank.entries[n].tensors()] for n in bank.names()],
        }
        checkpoint["irisseg_best_val"] = float(self.best_val)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from irisseg.models.task_encoding import TaskEmbedding

        mem = checkpoint.get("irisseg_memory")
        if mem:
            bank = self.model.memory
            for name, count, tensors in zip(mem["names"], mem["counts"], mem["tensors"]):
                bank.entries[name] = TaskEmbedding.from_tensors(list(tensors))
                bank.counts[name] = int(count)
        self.best_val = float(checkpoint.get("irisseg_best_val", -math.inf))


class ExportModels(L.Callback):
    """After each validation, export ``RUN/last`` and, when validation Dice improves, ``RUN/best``."""

    def __init__(self, run_dir: Path, config: IncontextTrainConfig):
        self.run_dir, self.cfg = Path(run_dir), config

    def _extra(self, trainer: L.Trainer, module: IrisLightning, val: float) -> dict:
        return {"train": self.cfg.to_dict(), "step": int(trainer.global_step), "val_dice": val,
                "holdout_families": list(self.cfg.holdout_families)}

    def on_validation_end(self, trainer: L.Trainer, module: IrisLightning) -> None:
        if trainer.sanity_checking:
            return
        val = float(trainer.callback_metrics.get("val/dice", torch.tensor(float("nan"))))
        module.model.save(self.run_dir / "last", extra=self._extra(trainer, module, val))
        if val > module.best_val:
            module.best_val = val
            module.model.save(self.run_dir / "best", extra=self._extra(trainer, module, val))

    def on_train_end(self, trainer: L.Trainer, module: IrisLightning) -> None:
        """The final weights always end up in ``RUN/last`` (and in ``RUN/best`` if nothing was validated)."""
        val = float(trainer.callback_metrics.get("val/dice", torch.tensor(float("nan"))))
        module.model.save(self.run_dir / "last", extra=self._extra(trainer, module, val))
        if not (self.run_dir / "best").is_dir():
            module.model.save(self.run_dir / "best", extra=self._extra(trainer, module, val))


def validation_episodes(cfg: IncontextTrainConfig, families: list[str]) -> list[dict]:
    """A fixed list of one-shot episodes (K = 1, one query) from ``families``, the same every run."""
    stream = SyntheticEpisodes(shape=cfg.shape, max_support=1, n_query=1, max_classes=1, families=families,
                               seed=cfg.seed + 10_000, augment=None, crop=cfg.val_crop)
    it = iter(stream)
    return [next(it) for _ in range(cfg.val_tasks)]


def train_incontext(cfg: IncontextTrainConfig, out: str | Path, data: list[str] | None = None, synthetic: bool = True,
                    resume: bool = False, device: str = "auto", progress: bool = True) -> Path:
    """Train an IRIS model; returns the run folder (``best/``, ``last/``, ``logs/``, ``checkpoints/``).

    Arguments:
      cfg (IncontextTrainConfig): settings. out: run folder. data: nnU-Net-style dataset folders.
      synthetic (bool): stream synthetic tasks (alone, or mixed with ``data`` at ``cfg.synthetic_fraction``).
      resume (bool): continue from ``out/checkpoints/last.ckpt``.
      device: ``cpu``, ``cuda`` or ``auto``.
    """
    from irisseg.data.synthetic import FAMILIES, resolve_families
    from irisseg.incontext import resolve_device

    resolve_device(device)  # a bad device fails here, before the run folder is made
    out = Path(out)
    for grid in (cfg.crop or cfg.shape, cfg.val_crop or cfg.shape):
        if grid % 8:
            raise InputError(f"the training and validation grids must be multiples of 8, got {grid}")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if not data and not synthetic:
        raise InputError("nothing to train on: give --data DIR and/or --synthetic")
    ckpt = resume_path(out, resume)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    train_families = list(resolve_families(cfg.families, cfg.holdout_families))
    val_families = list(resolve_families(cfg.holdout_families)) if cfg.holdout_families else train_families
    augment = AugmentConfig() if cfg.augment else None
    streams, weights = [], []
    if synthetic:
        streams.append(SyntheticEpisodes(cfg.shape, cfg.max_support, cfg.n_query, cfg.max_classes,
                                         families=train_families, seed=cfg.seed, augment=augment, crop=cfg.crop))
        weights.append(cfg.synthetic_fraction if data else 1.0)
    if data:
        streams.append(DatasetEpisodes(data, cfg.shape, cfg.max_support, cfg.n_query, seed=cfg.seed + 1, augment=augment))
        weights.append(1.0 - cfg.synthetic_fraction if synthetic else 1.0)
    train_ds = streams[0] if len(streams) == 1 else _Mixture(streams, weights, cfg.seed)
    workers = cfg.num_workers
    train_dl = DataLoader(train_ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                          worker_init_fn=lambda _: torch.set_num_threads(1))
    val_dl = DataLoader(ListDataset(validation_episodes(cfg, val_families)), batch_size=None)
    if cfg.init_from:
        start = IrisModel.load(cfg.init_from)
        model = IrisModel(IrisConfig.from_dict({**start.config.to_dict(), **cfg.model_overrides}))
        transfer_weights(model, start.state_dict())
        model.memory = start.memory
    else:
        model = build_iris(cfg.model, **cfg.model_overrides)
    module = IrisLightning(model, cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "all_families": list(FAMILIES)}))
    trainer = make_trainer(out, max_steps=cfg.max_steps, device=device, val_check_interval=cfg.val_every,
                           checkpoint_every_n_steps=cfg.checkpoint_every, gradient_clip_val=cfg.grad_clip,
                           callbacks=[ExportModels(out, cfg)], progress=progress)
    trainer.fit(module, train_dl, val_dl, ckpt_path=ckpt, weights_only=True)
    return out
