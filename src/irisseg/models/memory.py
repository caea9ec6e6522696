"""Class memory bank: an exponential moving average of task embeddings per named class."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from irisseg.errors import InputError
from irisseg.models.task_encoding import TaskEmbedding


class ClassMemoryBank:
    """Stores one task embedding per class name, updated as ``m <- momentum * m + (1 - momentum) * e``.

    The first observation of a class is stored as is. Entries are single-class embeddings: tokens
    (1, 1, m+1, C) and prototypes (1, 1, 2, C_s); they live on the CPU in float32.

    Arguments:
      momentum (float): EMA momentum (0.999 by default, as in IRIS).
    """

    def __init__(self, momentum: float = 0.999):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.entries: dict[str, TaskEmbedding] = {}
        self.counts: dict[str, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def names(self) -> list[str]:
        return sorted(self.entries)

    @torch.no_grad()
    def update(self, name: str, task: TaskEmbedding) -> None:
        """Fold one observation into the class's EMA.

        Arguments:
          name (str): class name, e.g. ``"liver"`` or ``"Dataset003_Liver/liver"``.
          task (TaskEmbedding): a single-class embedding (batch and class dims of size 1, or averaged first).
        """
        obs = task.without_matching().map(lambda t: t.detach().float().cpu().mean(dim=(0, 1), keepdim=True))
        if name not in self.entries:
            self.entries[name] = obs
            self.counts[name] = 1
            return
        m = self.momentum
        self.entries[name] = TaskEmbedding.from_tensors(
            [m * old + (1.0 - m) * new for old, new in zip(self.entries[name].tensors(), obs.tensors())]
        )
        self.counts[name] += 1

    def get(self, names: str | list[str]) -> TaskEmbedding:
        """The stored embeddings of one or more classes, concatenated along classes: (1, N, ...)."""
        names = [names] if isinstance(names, str) else list(names)
        missing = [n for n in names if n not in self.entries]
        if missing:
            known = ", ".join(self.names()) or "none"
            raise InputError(f"class {missing[0]!r} is not in the memory bank (stored classes: {known})")
        return TaskEmbedding.cat([self.entries[n] for n in names], dim=1)

    def remove(self, name: str) -> None:
        if name not in self.entries:
            raise InputError(f"class {name!r} is not in the memory bank")
        del self.entries[name]
        del self.counts[name]

    def save(self, path: str | Path) -> None:
        """Write ``memory.safetensors`` (tensors ``class{i}.t{j}``; names, counts, momentum in metadata)."""
        names = self.names()
        tensors = {f"class{i}.t{j}": t.contiguous() for i, n in enumerate(names)
                   for j, t in enumerate(self.entries[n].tensors())}
        meta = {"names": json.dumps(names), "counts": json.dumps([self.counts[n] for n in names]),
                "momentum": str(self.momentum)}
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> ClassMemoryBank:
        """Read a bank written by :meth:`save` (safetensors only: no pickle is ever loaded)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        bank = cls(float(meta.get("momentum", 0.999)))
        names = json.loads(meta.get("names", "[]"))
        counts = json.loads(meta.get("counts", "[]")) or [1] * len(names)
        for i, (name, count) in enumerate(zip(names, counts)):
            parts = sorted((k for k in tensors if k.startswith(f"class{i}.")), key=lambda k: int(k.split(".t")[1]))
            bank.entries[name] = TaskEmbedding.from_tensors([tensors[k] for k in parts])
            bank.counts[name] = int(count)
        return bank
