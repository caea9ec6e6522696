"""Model folders: ``config.json`` + ``model.safetensors``, the one on-disk format of every irisseg network.

Writes are atomic (a temporary file, then a rename), and reading never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from irisseg.errors import InputError

__all__ = ["save_model_folder", "read_model_config", "load_model_weights", "resolve_run_model"]


def save_model_folder(model: nn.Module, config: dict, folder: str | Path, extra: dict | None = None) -> Path:
    """Write ``model``'s weights and ``config`` into ``folder`` (created).

    Arguments:
      model (nn.Module): its ``state_dict`` goes to ``model.safetensors`` (CPU, contiguous).
      config (dict): the architecture, JSON-ready, written to ``config.json``.
      extra (dict | None): merged into ``config["extra"]`` (training settings, validation scores...).

    Returns:
      Path: ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(folder / "model.safetensors")
    config = dict(config)
    if extra:
        config["extra"] = {**config.get("extra", {}), **extra}
    tmp_cfg = folder / ".config.json.tmp"
    tmp_cfg.write_text(json.dumps(config, indent=2))
    tmp_cfg.replace(folder / "config.json")
    return folder


def read_model_config(folder: str | Path) -> dict:
    """The parsed ``config.json`` of a model folder that also holds ``model.safetensors``.

    Raises:
      InputError: a file is missing, or ``config.json`` is not a JSON object.
    """
    folder = Path(folder)
    cfg_path = folder / "config.json"
    for p in (cfg_path, folder / "model.safetensors"):
        if not p.is_file():
            raise InputError(f"{folder}: not a model folder ({p.name} is missing)")
    try:
        data = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{cfg_path}: unreadable model config ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{cfg_path}: unreadable model config (not a JSON object)")
    return data


def load_model_weights(model: nn.Module, folder: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load ``folder/model.safetensors`` into ``model`` (strict) and move it to ``map_location``.

    Raises:
      InputError: unreadable weights, or tensors missing / extra / of the wrong shape for this architecture.
    """
    weights = Path(folder) / "model.safetensors"
    try:
        model.load_state_dict(load_file(str(weights), device=str(map_location)))
    except Exception as exc:  # safetensors errors, missing or mis-shaped tensors
        raise InputError(f"{weights}: cannot load weights ({' '.join(str(exc).split())[:200]})") from None
    return model.to(map_location)


def resolve_run_model(path: str | Path, section: str, kind: str, train_command: str) -> Path:
    """The model folder of a trained pipeline: ``path`` itself when it holds ``config.json``, else ``path/best``.

    Arguments:
      path (str | Path): a model folder or a run folder (whose ``best/`` is used).
      section (str): the key the pipeline writes under ``extra`` in ``config.json`` (``lesion``, ``territories``).
      kind (str): how to name the model in messages (``lesion``, ``territory``).
      train_command (str): the command that trains one, for the message when the folder holds another kind.

    Raises:
      InputError: no such folder, no model in it, an unreadable config, or a model of another kind.
    """
    path = Path(path)
    for folder in (path, path / "best"):
        cfg = folder / "config.json"
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
            except (OSError, ValueError) as exc:
                raise InputError(f"{cfg}: unreadable model config ({exc})") from None
            if section not in data.get("extra", {}):
                raise InputError(f"{folder}: not a {kind} model (train one with '{train_command}')")
            return folder
    if not path.exists():
        raise InputError(f"{path}: no such model folder")
    raise InputError(f"{path}: no {kind} model here (expected config.json, or a run folder with best/)")
