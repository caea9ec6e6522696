"""Episodic sampling of in-context tasks: (support set, queries) of one or more classes.

An *episode* is a dict of tensors on one model grid (D, H, W):

* ``support_images`` (K, 1, D, H, W) and ``support_masks`` (K, N, D, H, W): K labelled examples of N classes;
* ``query_images`` (Q, 1, D, H, W) and ``query_masks`` (Q, N, D, H, W): the volumes to segment;
* ``names``: the N class names (used by the class memory bank).

Two sources: :class:`SyntheticEpisodes` streams freshly generated synthetic tasks (an infinite iterable,
seeded per DataLoader worker), and :class:`DatasetEpisodes` samples classes of nnU-Net-style datasets.
Images are normalised as at inference (percentile clipping then z-score, :class:`irisseg.preprocess.Preprocessor`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from irisseg.data.augment import random_affine
from irisseg.preprocess import Preprocessor

__all__ = ["AugmentConfig", "augment_episode", "SyntheticEpisodes", "DatasetEpisodes", "make_episode"]


@dataclass
class AugmentConfig:
    """Random augmentation of an episode.

    Attributes:
      flip: probability of flipping each axis (the same flips for the whole episode, so laterality is kept
        consistent between supports and queries).
      rotate_deg: maximum rotation per axis, degrees (independent per volume).
      scale: (min, max) isotropic scale factor (independent per volume).
      intensity: probability of a random intensity change (scale, shift, gamma, noise) per volume.
    """

    flip: float = 0.5
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    intensity: float = 0.8


def _random_affine(image: torch.Tensor, mask: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator):
    """Rotate/scale one volume and its mask about the centre. image (1, D, H, W), mask (N, D, H, W)."""
    return random_affine(image, mask, cfg.rotate_deg, cfg.scale, gen)


def _random_intensity(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random gamma, contrast scale, shift and Gaussian noise on a z-scored volume (1, D, H, W)."""
    lo, hi = image.min(), image.max()
    unit = (image - lo) / (hi - lo + 1e-6)
    gamma = math.exp((torch.rand(1, generator=gen).item() * 2 - 1) * 0.4)
    image = unit.pow(gamma) * (hi - lo) + lo
    image = image * (0.8 + 0.4 * torch.rand(1, generator=gen).item()) + (torch.rand(1, generator=gen).item() - 0.5) * 0.4
    image = image + torch.randn(image.shape, generator=gen) * 0.1 * torch.rand(1, generator=gen).item()
    return (image - image.mean()) / (image.std() + 1e-6)


def augment_episode(episode: dict, cfg: AugmentConfig, gen: torch.Generator) -> dict:
    """Augment every volume of an episode (see :class:`AugmentConfig`); masks stay binary."""
    keys = (("support_images", "support_masks"), ("query_images", "query_masks"))
    flips = [d for d in (-3, -2, -1) if torch.rand(1, generator=gen).item() < cfg.flip]
    out = dict(episode)
    for ik, mk in keys:
        images, masks = [], []
        for img, msk in zip(episode[ik], episode[mk]):
            if flips:
                img, msk = img.flip(flips), msk.flip(flips)
            if cfg.rotate_deg > 0 or cfg.scale != (1.0, 1.0):
                img, msk = _random_affine(img, msk, cfg, gen)
            if torch.rand(1, generator=gen).item() < cfg.intensity:
                img = _random_intensity(img, gen)
            images.append(img)
            masks.append(msk)
        out[ik], out[mk] = torch.stack(images), torch.stack(masks)
    return out


def make_episode(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], label_ids: Sequence[int],
                 names: Sequence[str], n_support: int) -> dict:
    """Build an episode from volumes on one grid.

    Arguments:
      images (Sequence[np.ndarray]): V volumes (D, H, W), raw intensities (normalised here).
      labels (Sequence[np.ndarray]): V label maps (D, H, W).
      label_ids (Sequence[int]): the N labels that are the episode's classes.
      names (Sequence[str]): the N class names.
      n_support (int): the first ``n_support`` volumes are supports, the rest queries.

    Returns:
      dict: the episode (see the module docstring).
    """
    norm = Preprocessor().normalize
    imgs = torch.stack([torch.from_numpy(norm(np.asarray(im, dtype=np.float32)))[None] for im in images])
    masks = torch.stack([torch.stack([torch.from_numpy(np.asarray(lab) == i) for i in label_ids]).float() for lab in labels])
    return {
        "support_images": imgs[:n_support], "support_masks": masks[:n_support],
        "query_images": imgs[n_support:], "query_masks": masks[n_support:],
        "names": list(names),
    }


class _SeededStream(IterableDataset):
    """An infinite stream whose episode ``i`` of worker ``w`` depends only on (seed, w, i)."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = int(seed)

    def episode(self, rng: np.random.Generator, gen: torch.Generator) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        i = 0
        while True:
            ss = np.random.SeedSequence([self.seed, worker, i])
            rng = np.random.default_rng(ss)
            gen = torch.Generator().manual_seed(int(ss.generate_state(1)[0]))
            yield self.episode(rng, gen)
            i += 1


class SyntheticEpisodes(_SeededStream):
    """Streams synthetic in-context tasks from :func:`irisseg.data.synthetic.generate_task`.

    Each episode: a task of 1..``max_classes`` structures from the allowed shape families, a random subset
    of them kept as classes (class dropping), K in [1, ``max_support``] supports and ``n_query`` queries,
    all different views (deformed, re-rendered "patients") of the task, then augmented.

    Arguments:
      shape (int | tuple): grid (D, H, W) the tasks are generated on.
      crop (int | tuple | None): crop every view to this grid (multiples of 8 for the model), at a random
        offset that keeps the targets: structures fill more of the field of view than on the full grid.
      max_support (int): largest K. n_query (int): queries per episode. max_classes (int): largest N.
      families, exclude: shape families to use / hold out (see :mod:`irisseg.data.synthetic`).
      seed (int): base seed. augment (AugmentConfig | None): augmentation, None for none.
    """

    def __init__(self, shape: int | Sequence[int] = 32, max_support: int = 3, n_query: int = 2, max_classes: int = 3,
                 families: Sequence[str] | None = None, exclude: Sequence[str] | None = None, seed: int = 0,
                 augment: AugmentConfig | None = AugmentConfig(), crop: int | Sequence[int] | None = None):
        super().__init__(seed)
        from irisseg.data.synthetic import resolve_families

        self.shape = shape
        self.crop = None if crop is None else ((crop,) * 3 if isinstance(crop, int) else tuple(crop))
        self.max_support, self.n_query, self.max_classes = max_support, n_query, max_classes
        self.families = list(resolve_families(families, exclude))
        self.augment = augment

    def episode(self, rng: np.random.Generator, gen: torch.Generator) -> dict:
        from irisseg.data.synthetic import generate_task

        k = int(rng.integers(1, self.max_support + 1))
        task = generate_task(shape=self.shape, seed=int(rng.integers(2**31)), n_views=k + self.n_query,
                             families=self.families, n_classes=int(rng.integers(1, self.max_classes + 1)),
                             **({"crop": self.crop} if self.crop else {}))
        labels = sorted(task.families)
        keep = sorted(rng.choice(labels, size=int(rng.integers(1, len(labels) + 1)), replace=False).tolist())
        ep = make_episode(task.images, task.labels, keep, [task.families[i] for i in keep], k)
        return augment_episode(ep, self.augment, gen) if self.augment else ep


class DatasetEpisodes(_SeededStream):
    """Samples in-context tasks from labelled nnU-Net-style datasets.

    Every case is read once, normalised and resampled to ``shape`` (its whole field of view), and kept in
    memory (about ``4 * prod(shape)`` bytes per case and channel). An episode picks a dataset, one of its
    labels, and K + Q distinct cases that contain it; the class name is ``"<dataset name>/<label name>"``.

    Arguments:
      roots (Sequence[str | Path]): dataset folders (see :func:`irisseg.data.datasets.load_dataset`).
      shape (int | tuple): grid (D, H, W). max_support, n_query, seed, augment: as :class:`SyntheticEpisodes`.
      case_ids (dict[str, list[str]] | None): per dataset name, the cases to use (e.g. a training split).
    """

    def __init__(self, roots, shape: int | Sequence[int] = 32, max_support: int = 3, n_query: int = 2, seed: int = 0,
                 augment: AugmentConfig | None = AugmentConfig(), case_ids: dict | None = None):
        super().__init__(seed)
        from irisseg.data.datasets import load_dataset
        from irisseg.preprocess import PreprocessConfig

        shape = (shape,) * 3 if isinstance(shape, int) else tuple(shape)
        pre = Preprocessor(PreprocessConfig(clip_percentiles=None, normalize="none", target_shape=shape))
        self.max_support, self.n_query, self.augment = max_support, n_query, augment
        self.cases: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.label_names: dict[str, dict[int, str]] = {}
        self.with_label: dict[tuple[str, int], list[int]] = {}
        for root in roots:
            ds = load_dataset(root)
            wanted = set(case_ids.get(ds.name, ds.case_ids)) if case_ids else set(ds.case_ids)
            items = []
            for case in ds.cases:
                if case.case_id not in wanted:
                    continue
                images, label = case.load()
                out = pre(images[0], masks=[label])
                items.append((out.image[0], out.masks[0].array))
            self.cases[ds.name] = items
            self.label_names[ds.name] = {v: k for k, v in ds.labels.items() if isinstance(v, int) and v > 0}
            for value in self.label_names[ds.name]:
                holders = [i for i, (_, lab) in enumerate(items) if (lab == value).any()]
                if len(holders) >= 2:
                    self.with_label[(ds.name, value)] = holders
        if not self.with_label:
            raise ValueError("no label occurs in at least two cases: nothing to build episodes from")
        self.keys = sorted(self.with_label)

    def episode(self, rng: np.random.Generator, gen: torch.Generator) -> dict:
        name, value = self.keys[int(rng.integers(len(self.keys)))]
        holders = self.with_label[(name, value)]
        n_query = min(self.n_query, len(holders) - 1)
        k = int(rng.integers(1, min(self.max_support, len(holders) - n_query) + 1))
        picks = rng.choice(holders, size=k + n_query, replace=False)
        items = [self.cases[name][i] for i in picks]
        ep = make_episode([im for im, _ in items], [lab for _, lab in items], [value],
                          [f"{name}/{self.label_names[name][value]}"], k)
        return augment_episode(ep, self.augment, gen) if self.augment else ep
