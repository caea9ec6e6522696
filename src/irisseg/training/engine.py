"""The one training engine every irisseg pipeline uses: a Lightning Trainer with CSV (+ TensorBoard when
installed) logs, a progress bar, resumable checkpoints, and bf16 autocast on GPUs.

Resumable checkpoints (``RUN/checkpoints/last.ckpt``) are Lightning's own files for the run's own use;
they are loaded with ``weights_only=True``. What users share are the exported model folders
(``config.json`` + ``model.safetensors``), never these.
"""

from __future__ import annotations

import csv
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import Dataset

from irisseg.errors import InputError
from irisseg.incontext import resolve_device


class YamlConfig:
    """Mixin for training-config dataclasses: read from a YAML file (unknown keys are an error), dump to a dict."""

    @classmethod
    def from_yaml(cls, path: str | Path):
        """The config in ``path``: a YAML mapping of field names to values (missing fields keep their defaults).

        Raises:
          InputError: no such file, invalid YAML, not a mapping, or an unknown key (the message lists the known ones).
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: invalid YAML ({' '.join(str(exc).split())[:150]})") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{path}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**data)

    @classmethod
    def with_overrides(cls, path: str | Path | None = None, **overrides):
        """The config in ``path`` (defaults when None), with every override that is not None applied
        (command-line options left unset are None, so they keep the file's or the default value).

        Raises:
          InputError: see :meth:`from_yaml`, and invalid overridden values (the dataclass's own checks).
        """
        cfg = cls.from_yaml(path) if path else cls()
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**cfg.to_dict(), **given}) if given else cfg

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml_dict(self) -> dict:
        """The settings as plain YAML-ready values (tuples as lists), for ``train_config.yaml``."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.to_dict().items()}


class ListDataset(Dataset):
    """A map-style dataset over a list that is already in memory (validation episodes, prepared cases)."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class AnnealedModule(L.LightningModule):
    """Base LightningModule of the supervised trainers (lesion, territories): AdamW, 20 warm-up steps then a
    cosine to zero over the epochs or the wall-time budget, whichever runs out first, and the best
    validation score kept in the checkpoint (``best_val``) so a resumed run only exports real improvements.

    Subclasses set ``self.model`` and ``self.cfg``, a config with ``lr``, ``weight_decay``, ``epochs``,
    ``steps_per_epoch`` and ``max_minutes`` (None: no budget), and optionally ``compile`` (see
    :meth:`train_forward`).
    """

    best_val: float = -math.inf

    def train_forward(self, x: torch.Tensor):
        """``self.model(x)`` for a training step; compiled with ``torch.compile`` when ``cfg.compile`` is set.

        The compiled network shares ``self.model``'s parameters (checkpoints and exports are unchanged) and is
        used for training steps only: validation and prediction run the plain network, whose sliding-window
        batches change shape. Compiling takes from a few seconds (cached) to about half a minute on a 2-core
        CPU once per run, then a 32^3 x 4 lesion step takes about a fifth less time there. Where compiling
        is not possible (no C++ compiler for the CPU backend, say) the first step warns once and training
        carries on with the plain network.
        """
        compiled = self.__dict__.get("_compiled")  # None: not tried yet; False: failed; else the compiled net
        if not getattr(self.cfg, "compile", False) or compiled is False:
            return self.model(x)
        if compiled is not None:
            return compiled(x)
        compiled = torch.compile(self.model, dynamic=False)
        try:
            out = compiled(x)  # the first call compiles
        except Exception as err:  # noqa: BLE001 - any backend failure: fall back to the plain network
            first_line = (str(err).splitlines() or [""])[0]
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {first_line}); training without it",
                          RuntimeWarning, stacklevel=2)
            self.__dict__["_compiled"] = False
            return self.model(x)
        self.__dict__["_compiled"] = compiled  # a plain attribute, not a submodule: the state dict is unchanged
        return out

    def setup_ema(self) -> None:
        """Keep an exponential moving average of ``self.model``'s weights when ``cfg.ema_decay`` is set (> 0).

        After every optimiser step ``ema = decay * ema + (1 - decay) * weights`` (buffers too, if any);
        validation and the exported ``best`` / ``last`` folders then use the averaged copy
        (:attr:`eval_model`), which is smoother than the last step's weights in a short, noisy run. The copy
        is a submodule, so it is checkpointed and resumed with the rest. Call after ``self.model`` is set.
        """
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        decay = float(getattr(self.cfg, "ema_decay", 0.0) or 0.0)
        self.ema = (AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
                    if decay > 0 else None)

    @property
    def eval_model(self) -> torch.nn.Module:
        """The network validated and exported: the weight average when :meth:`setup_ema` made one, else ``model``."""
        ema = self._modules.get("ema")  # a submodule (not a plain attribute), so it is checkpointed
        return ema.module if ema is not None else self.model

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        ema = self._modules.get("ema")
        if ema is not None and (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:  # after a step
            ema.update_parameters(self.model)

    def budget_used(self) -> float:
        """Share of the wall-time budget ``max_minutes`` spent so far (0 without one), from Lightning's Timer,
        whose elapsed time is kept across a resume."""
        from lightning.pytorch.callbacks import Timer

        if not self.cfg.max_minutes or self._trainer is None:
            return 0.0
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        return 0.0 if timer is None else timer.time_elapsed("train") / (60.0 * self.cfg.max_minutes)

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at optimiser step ``step``: 20 warm-up steps, then a cosine from 1 to 0 over
        the run's progress, the larger of ``step / (epochs * steps_per_epoch)`` and :meth:`budget_used`
        (so a run cut by its time budget still ends annealed)."""
        total = max(1, self.cfg.epochs * self.cfg.steps_per_epoch)
        progress = min(1.0, max(step / total, self.budget_used()))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) * min(1.0, (step + 1) / 20)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["irisseg_best_val"] = float(self.best_val)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.best_val = float(checkpoint.get("irisseg_best_val", -math.inf))


def read_metrics_csv(path: str | Path) -> list[dict]:
    """Rows of a ``RUN/metrics.csv`` (numbers as floats, ``epoch`` / ``step`` as ints); [] if there is none."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (int(v) if k in ("epoch", "step") else float(v)) for k, v in r.items() if v != ""} for r in rows]


class RunRecorder(Callback):
    """After each validation: append a row to ``RUN/metrics.csv``, export ``RUN/last`` and, when the monitored
    validation score improves, ``RUN/best`` (then ``on_best(module)``). On (re)start, rows of epochs not yet
    reached are dropped (a resumed run repeats them) and the wall-clock column continues.

    Arguments:
      run_dir (Path): the run folder.
      columns (Sequence[str]): metrics.csv columns (``epoch``, ``step``, the module's ``epoch_summary`` keys,
        ``seconds``).
      monitor (str): the ``epoch_summary`` key whose increase means a better model (``best_val`` tracks it).
      model_extra (Callable[[dict], dict]): ``extra`` of the exported model folders, from
        ``{"epoch": int, "val": {val_* scores}}``.
      on_best (Callable | None): called with the module after ``RUN/best`` is written.
    """

    def __init__(self, run_dir: Path, columns: Sequence[str], monitor: str, model_extra: Callable[[dict], dict],
                 on_best: Callable[[L.LightningModule], None] | None = None):
        self.run_dir, self.columns, self.monitor = Path(run_dir), tuple(columns), monitor
        self.model_extra, self.on_best = model_extra, on_best
        self._t0 = time.time()
        self._elapsed = 0.0

    @property
    def csv_path(self) -> Path:
        return self.run_dir / "metrics.csv"

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from irisseg.io import write_csv

        rows = [r for r in read_metrics_csv(self.csv_path) if r["epoch"] < trainer.current_epoch]
        self._elapsed = rows[-1]["seconds"] if rows else 0.0
        self._t0 = time.time()
        write_csv(self.csv_path, rows, self.columns)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from irisseg.io import write_csv

        s = module.epoch_summary
        if trainer.sanity_checking or s is None:
            return
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step, **s,
               "seconds": self._elapsed + time.time() - self._t0}
        rows = [r for r in read_metrics_csv(self.csv_path) if r["epoch"] < trainer.current_epoch]
        write_csv(self.csv_path, [*rows, row], self.columns)
        extra = self.model_extra({"epoch": trainer.current_epoch, "val": {k: s[k] for k in s if k.startswith("val_")}})
        model = getattr(module, "eval_model", module.model)  # the weight average when the run keeps one
        model.save(self.run_dir / "last", extra=extra)
        if s[self.monitor] > module.best_val:
            module.best_val = s[self.monitor]
            model.save(self.run_dir / "best", extra=extra)
            if self.on_best is not None:
                self.on_best(module)


def loggers(run_dir: Path) -> list:
    """CSV logger always; TensorBoard too when the ``tensorboard`` package is installed."""
    # a new logs/version_N per (re)start, so resuming never overwrites earlier metrics
    out = [CSVLogger(str(run_dir), name="logs")]
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger

        out.append(TensorBoardLogger(str(run_dir), name="tensorboard"))
    except ImportError:
        pass
    return out


def training_precision(accelerator: str, precision: str = "auto", compiled: bool = False) -> str:
    """Lightning precision of the training steps: ``"bf16-mixed"`` (bf16 autocast; weights, gradients and
    optimiser state stay float32) or ``"32-true"``.

    Arguments:
      accelerator: ``"cpu"`` or ``"cuda"``.
      precision: ``fp32``, ``bf16`` (wherever it runs, emulated or not) or ``auto``: bf16 on CUDA; on the CPU
        bf16 only where it is native (:func:`irisseg.models.blocks.cpu_has_native_bf16`, AMX) and the steps
        are compiled (``compiled``). On 2 cores of such a CPU a compiled lesion U-Net step took 0.087 s in
        bf16 against 0.162 s in float32, while an uncompiled one was slower in bf16 (0.249 s against 0.191 s;
        ``benchmarks/lesion_speed.py``).

    Raises:
      InputError: an unknown precision.
    """
    from irisseg.models.blocks import uses_bf16

    if precision == "auto" and accelerator == "cpu" and not compiled:
        precision = "fp32"
    return "bf16-mixed" if uses_bf16(accelerator, precision) else "32-true"


def make_trainer(
    run_dir: str | Path,
    *,
    max_steps: int = -1,
    max_epochs: int | None = None,
    device: str = "auto",
    val_check_interval: int | float | None = None,
    checkpoint_every_n_steps: int | None = None,
    gradient_clip_val: float | None = 1.0,
    accumulate_grad_batches: int = 1,
    callbacks: list[Callback] | None = None,
    progress: bool = True,
    log_every_n_steps: int = 10,
    precision: str = "auto",
    compiled: bool = False,
    **trainer_kwargs,
) -> L.Trainer:
    """Build the Trainer every irisseg pipeline uses.

    Arguments:
      run_dir: output folder (logs in ``logs/version_N/metrics.csv``, a new version per start or resume, and
        ``tensorboard/``; resumable ``checkpoints/last.ckpt``).
      max_steps / max_epochs: training length.
      device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
      precision / compiled: precision of the training steps (``auto``, ``fp32`` or ``bf16``) and whether the
        module compiles them; :func:`training_precision` turns the two into Lightning's precision.
      val_check_interval: validate every this many steps (int) or fraction of an epoch (float).
      checkpoint_every_n_steps: save ``last.ckpt`` every this many steps (default: at each validation/epoch).
      gradient_clip_val: gradient-norm clipping (1.0 by default).
      callbacks: extra callbacks (e.g. model export, early stopping).
      trainer_kwargs: passed to ``lightning.Trainer`` as is (e.g. ``limit_train_batches``, ``max_time``).
    """
    run_dir = Path(run_dir)
    accelerator = resolve_device(device).type
    if checkpoint_every_n_steps:
        ckpt = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0,
                               every_n_train_steps=checkpoint_every_n_steps)
    else:
        # Lightning saves last.ckpt at an epoch's end only together with a top-k checkpoint: keep one
        # unmonitored "top-k" checkpoint named last.ckpt, overwritten every epoch.
        ckpt = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="last", save_top_k=1, monitor=None,
                               every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False)
    bar: list[Callback] = [RichProgressBar(leave=True)] if progress else []
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*Your `IterableDataset` has `__len__` defined.*")
    return L.Trainer(
        default_root_dir=str(run_dir),
        accelerator=accelerator,
        devices=1,
        precision=training_precision(accelerator, precision, compiled),
        max_steps=max_steps,
        max_epochs=max_epochs if max_epochs is not None else (-1 if max_steps > 0 else None),
        val_check_interval=val_check_interval,
        check_val_every_n_epoch=None if isinstance(val_check_interval, int) else 1,
        gradient_clip_val=gradient_clip_val,
        accumulate_grad_batches=accumulate_grad_batches,
        callbacks=[ckpt, *bar, *(callbacks or [])],
        logger=loggers(run_dir),
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=log_every_n_steps,
        num_sanity_val_steps=0,
        deterministic=False,
        **trainer_kwargs,
    )


def resume_path(run_dir: str | Path, resume: bool) -> str | None:
    """``RUN/checkpoints/last.ckpt`` when resuming (InputError if there is none), else None."""
    path = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not resume:
        return None
    if not path.is_file():
        raise InputError(f"{path}: nothing to resume (no last checkpoint in {run_dir})")
    return str(path)
