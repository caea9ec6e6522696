"""Quick-look figures: tri-planar mid-slices of a volume with coloured mask overlays.

Works without a display and without touching pyplot's global state: figures are built on a
``matplotlib.figure.Figure`` with the Agg canvas and written straight to PNG. Volumes are ``(D, H, W)``
arrays (SimpleITK order z, y, x); spacing is in mm, ``(x, y, z)`` order, and only sets the aspect ratio.

Views: *axial* shows ``image[z]`` (rows y, columns x), *coronal* shows ``image[:, y]`` (rows z, columns
x) and *sagittal* shows ``image[:, :, x]`` (rows z, columns y); in the last two z increases upwards.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from irisseg.errors import InputError

__all__ = ["triplanar_overlay", "triplanar_overlays", "draw_triplanar", "as_mask_dict", "mask_centre", "line_plot",
           "bar_chart", "intensity_window"]

#: Overlay colours: masks of a dict in their order, label ``k`` of a label map gets ``COLOURS[k - 1]``.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")

_VIEWS = ("axial", "coronal", "sagittal")

MaskInput = Mapping[str, np.ndarray] | np.ndarray | None


def as_mask_dict(masks: MaskInput, shape: Sequence[int], label_names: Mapping[int, str] | None = None
                 ) -> dict[str, np.ndarray]:
    """Normalise overlays to ``{name: bool (D, H, W)}``.

    Arguments:
      masks: ``{name: array (D, H, W)}`` (non-zero, or > 0.5 for float arrays, is inside), an integer label
        map (D, H, W) (one overlay per non-zero label, named by ``label_names`` or ``"label k"``), or None.
      shape (Sequence[int]): the image shape (D, H, W) every mask must have.
      label_names (Mapping[int, str] | None): names of the labels of a label map.

    Returns:
      dict[str, np.ndarray]: bool masks in the given (or label) order.

    Raises:
      InputError: a mask whose shape differs from ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    if masks is None:
        return {}
    if isinstance(masks, np.ndarray):
        if masks.shape != shape:
            raise InputError(f"label map shape {masks.shape} does not match the image shape {shape}")
        values = [int(v) for v in np.unique(masks) if v != 0]
        names = dict(label_names or {})
        return {names.get(v, f"label {v}"): masks == v for v in values}
    out = {}
    for name, mask in masks.items():
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise InputError(f"mask {name!r} has shape {mask.shape}, expected the image shape {shape}")
        out[str(name)] = mask > 0.5 if mask.dtype.kind == "f" else mask != 0
    return out


def mask_centre(masks: Mapping[str, np.ndarray], shape: Sequence[int]) -> tuple[int, int, int]:
    """Voxel (z, y, x) nearest the centre of mass of the union of ``masks``; the volume centre if empty.

    Arguments:
      masks (Mapping[str, np.ndarray]): masks (D, H, W), non-zero = inside.
      shape (Sequence[int]): volume shape (D, H, W).

    Returns:
      tuple[int, int, int]: slice indices (z, y, x).
    """
    union = np.zeros(tuple(shape), dtype=bool)
    for mask in masks.values():
        union |= np.asarray(mask) != 0
    if not union.any():
        return tuple(int(s) // 2 for s in shape)  # type: ignore[return-value]
    com = np.argwhere(union).mean(axis=0)
    return tuple(int(np.clip(round(c), 0, s - 1)) for c, s in zip(com, shape, strict=True))  # type: ignore[return-value]


def _slices(volume: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    z, y, x = centre
    return [volume[z], volume[:, y, :], volume[:, :, x]]


def intensity_window(image: np.ndarray) -> tuple[float, float]:
    """Display window (low, high) of an image: its 0.5th and 99.5th percentiles over finite voxels
    ((0, 1) when none is finite; high > low always)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def draw_triplanar(axes: Sequence, image: np.ndarray, masks: MaskInput = None, spacing: Sequence[float] | None = None,
                   *, centre: Sequence[int] | None = None, label_names: Mapping[int, str] | None = None,
                   fill: bool = True, alpha: float = 0.3, row_title: str | None = None, legend: bool = True,
                   channel: int = 0) -> tuple[int, int, int]:
    """Draw axial, coronal and sagittal slices with overlays on three existing matplotlib axes.

    Arguments:
      axes (Sequence): three matplotlib Axes (axial, coronal, sagittal).
      image (np.ndarray): (D, H, W) volume, or (C, D, H, W) of which ``channel`` is shown.
      masks: overlays, see :func:`as_mask_dict` (dict of (D, H, W) masks or a label map).
      spacing (Sequence[float] | None): voxel size in mm, (x, y, z), for the aspect ratio; isotropic if None.
      centre (Sequence[int] | None): slice indices (z, y, x); the masks' centre of mass if None.
      label_names (Mapping[int, str] | None): names of label-map values.
      fill (bool): draw translucent filled overlays under the contours.
      alpha (float): opacity of the fills.
      row_title (str | None): text above the axial view.
      legend (bool): put a legend of the overlays beside the sagittal view.
      channel (int): channel shown for a (C, D, H, W) image.

    Returns:
      tuple[int, int, int]: the slice indices (z, y, x) used.
    """
    from matplotlib.patches import Patch

    image = np.asarray(image)
    if image.ndim == 4:
        image = image[channel]
    if image.ndim != 3:
        raise InputError(f"image must be (D, H, W) or (C, D, H, W), got shape {image.shape}")
    overlays = as_mask_dict(masks, image.shape, label_names)
    if isinstance(masks, np.ndarray):  # a label map: the colour follows the label id, not the order
        values = [int(v) for v in np.unique(masks) if v != 0]
        colours = {name: COLOURS[(v - 1) % len(COLOURS)] for name, v in zip(overlays, values, strict=True)}
    else:
        colours = {name: COLOURS[k % len(COLOURS)] for k, name in enumerate(overlays)}
    centre = tuple(int(c) for c in centre) if centre is not None else mask_centre(overlays, image.shape)
    sx, sy, sz = (1.0, 1.0, 1.0) if spacing is None else (float(s) for s in spacing)
    aspects = (sy / sx, sz / sx, sz / sy)
    origins = ("upper", "lower", "lower")
    vmin, vmax = intensity_window(image.astype(np.float32, copy=False))
    names = [f"axial z={centre[0]}", f"coronal y={centre[1]}", f"sagittal x={centre[2]}"]
    mask_slices = {name: _slices(mask, centre) for name, mask in overlays.items()}
    for v, (ax, plane) in enumerate(zip(axes, _slices(image, centre), strict=True)):
        ax.imshow(plane, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspects[v], origin=origins[v],
                  interpolation="nearest")
        for name, planes in mask_slices.items():
            m = planes[v]
            if not m.any():
                continue
            colour = colours[name]
            if fill:
                rgba = np.zeros(m.shape + (4,), dtype=np.float32)
                rgba[m] = _rgba(colour, alpha)
                ax.imshow(rgba, aspect=aspects[v], origin=origins[v], interpolation="nearest")
            if m.all():
                continue
            # pixel centres sit at integer coordinates for either imshow origin
            ax.contour(np.arange(m.shape[1]), np.arange(m.shape[0]), m.astype(np.float32), levels=[0.5],
                       colors=[colour], linewidths=0.9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(names[v], fontsize=8)
    if row_title:
        axes[0].set_ylabel(row_title, fontsize=8)
    if legend and overlays:
        handles = [Patch(facecolor=colours[name], label=name) for name in overlays]
        axes[-1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, frameon=False)
    return centre  # type: ignore[return-value]


def _rgba(colour: str, alpha: float) -> tuple[float, float, float, float]:
    from matplotlib.colors import to_rgba

    r, g, b, _ = to_rgba(colour)
    return (r, g, b, alpha)


def save_figure(fig, out_png: str | os.PathLike) -> Path:
    """Render a matplotlib figure (no pyplot state) to ``out_png`` atomically; parent folders are created."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=fig.dpi, bbox_inches="tight")
    os.replace(tmp, out)
    return out


def triplanar_overlays(panels: Sequence[Mapping], out_png: str | os.PathLike, title: str | None = None,
                       *, dpi: int = 110) -> Path:
    """Several tri-planar rows in one PNG (one row per panel), e.g. cases side by side or channels.

    Arguments:
      panels (Sequence[Mapping]): one dict per row with the keyword arguments of :func:`draw_triplanar`:
        ``image`` (required), ``masks``, ``spacing``, ``centre``, ``label_names``, ``fill``, ``alpha``,
        ``row_title``, ``legend``, ``channel``.
      out_png (str | os.PathLike): output PNG path (parent folders are created; written atomically).
      title (str | None): figure title.
      dpi (int): resolution.

    Returns:
      Path: ``out_png``.
    """
    from matplotlib.figure import Figure

    if not panels:
        raise InputError("triplanar_overlays needs at least one panel")
    fig = Figure(figsize=(9.5, 3.0 * len(panels) + (0.4 if title else 0.0)), dpi=dpi)
    axes = fig.subplots(len(panels), 3, squeeze=False)
    for row, panel in zip(axes, panels, strict=True):
        panel = dict(panel)
        draw_triplanar(row, panel.pop("image"), **panel)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png)


def triplanar_overlay(image: np.ndarray, masks: MaskInput, out_png: str | os.PathLike, title: str | None = None,
                      spacing: Sequence[float] | None = None, **kwargs) -> Path:
    """Axial, coronal and sagittal slices through the masks' centre of mass, with coloured overlays, as PNG.

    Arguments:
      image (np.ndarray): (D, H, W) volume (or (C, D, H, W); ``channel=`` picks the one shown), gray.
      masks: ``{name: (D, H, W) mask}`` (e.g. ``{"reference": ref, "prediction": pred}``), an integer label
        map (D, H, W), or None; each overlay gets a colour, a translucent fill and a contour.
      out_png (str | os.PathLike): output PNG path (parent folders are created; written atomically).
      title (str | None): figure title.
      spacing (Sequence[float] | None): voxel size in mm, (x, y, z), used for the aspect ratio.
      **kwargs: further options of :func:`draw_triplanar` (``centre``, ``label_names``, ``fill``, ``alpha``,
        ``channel``, ``legend``).

    Returns:
      Path: ``out_png``.
    """
    return triplanar_overlays([{"image": image, "masks": masks, "spacing": spacing, **kwargs}], out_png, title)


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], out_png: str | os.PathLike, *,
              xlabel: str, ylabel: str, title: str | None = None, styles: Mapping[str, str] | None = None,
              dpi: int = 110) -> Path:
    """Curves (e.g. validation Dice per epoch, one per run) in one PNG.

    Arguments:
      series: ``{name: (x values, y values)}``, one line each, drawn in :data:`COLOURS` order; non-finite
        y values are skipped.
      out_png: output PNG path (written atomically). xlabel, ylabel, title: axis labels and title.
      styles: optional matplotlib line style per name (e.g. ``"--"``).

    Returns:
      Path: ``out_png``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=dpi)
    ax = fig.subplots()
    for i, (name, (x, y)) in enumerate(series.items()):
        x, y = np.asarray(x, float), np.asarray(y, float)
        ok = np.isfinite(y)
        ax.plot(x[ok], y[ok], (styles or {}).get(name, "-"), color=COLOURS[i % len(COLOURS)], marker=".", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png)


def bar_chart(values: Mapping[str, float], out_png: str | os.PathLike, *, ylabel: str, title: str | None = None,
              errors: Mapping[str, float] | None = None, ylim: tuple[float, float] | None = None,
              dpi: int = 110) -> Path:
    """One bar per name with its value printed above it (inside its top when it reaches the top of ``ylim``).

    Arguments:
      values: ``{name: value}`` in drawing order. errors: optional ``{name: error bar half-length}``.
      out_png: output PNG path (written atomically). ylabel, title: labels. ylim: y-axis range.

    Returns:
      Path: ``out_png``.
    """
    from matplotlib.figure import Figure

    names = list(values)
    heights = [float(values[n]) for n in names]
    fig = Figure(figsize=(1.2 + 1.1 * max(1, len(names)), 3.8), dpi=dpi)
    ax = fig.subplots()
    yerr = [float(errors.get(n, 0.0)) for n in names] if errors else None
    bars = ax.bar(names, heights, yerr=yerr, color=[COLOURS[i % len(COLOURS)] for i in range(len(names))], capsize=3)
    for bar, h in zip(bars, heights, strict=True):
        inside = bool(ylim) and h > ylim[1] - 0.08 * (ylim[1] - ylim[0])  # above the axes it would meet the title
        ax.annotate(f"{h:.3f}", (bar.get_x() + bar.get_width() / 2, h), ha="center", va="top" if inside else "bottom",
                    fontsize=8, xytext=(0, -2 if inside else 2), textcoords="offset points",
                    color="white" if inside else "black")
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png)
