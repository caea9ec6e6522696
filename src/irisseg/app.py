"""``irisseg app``: segmentation by example in the browser (Gradio; the optional ``app`` extra).

A page where a user uploads a query scan and one to three labelled supports (NIfTI, NRRD, MHA, or a zip of
a DICOM series), or loads the built-in example, picks a strategy and a label, runs the in-context model,
looks at the prediction on axial, coronal and sagittal slices (overlay opacity adjustable, beside the first
support and its mask), sees Dice and HD95 when a reference mask is given, and downloads the prediction as
NIfTI in the query's geometry. Stored memory-bank classes segment without any support. With a case index
(``--index``) a second tab searches similar cases.

Safety: the server binds to 127.0.0.1 unless told otherwise; uploads are limited in size (512 MB by
default, enforced by Gradio's upload route); bad files give a one-line message in the page (``#status``)
and the server keeps serving; uploaded files are copied into a per-connection temporary folder under fixed
names (``query.nii.gz``, ``support_1_mask.nrrd``, ...), so no user-supplied name becomes a server path;
each connection's folder is removed when its browser tab closes (and every folder when the server stops).
"""

import atexit
import logging
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from irisseg.errors import InputError
from irisseg.viz import intensity_window

log = logging.getLogger(__name__)

#: Upload formats the page accepts, matched against the end of the uploaded file's name (lower case).
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".zip")
#: A DICOM zip may hold at most this many files, and expand to at most this many times the upload limit.
ZIP_MAX_FILES = 10000
ZIP_EXPANSION = 4
#: Longest side of a rendered slice, pixels.
VIEW_SIZE = 320
#: Overlay colours (RGB): prediction, reference outline, support mask.
PRED_RGB = (255, 90, 30)
REF_RGB = (40, 220, 90)
SUPPORT_RGB = (40, 150, 255)
STRATEGY_CHOICES = [
    ("one-shot: the first support", "one-shot"),
    ("ensemble: embeddings averaged over the supports", "ensemble"),
    ("tuning: in-context tuning on the supports", "tune"),
    ("memory class: a class stored in the model (no support)", "memory"),
]


# ---------------------------------------------------------------------------------------------------
# per-connection sessions
# ---------------------------------------------------------------------------------------------------
@dataclass
class Session:
    """One browser connection's files and last result.

    Attributes:
      folder (Path): the connection's own temporary folder (created with ``tempfile.mkdtemp``); uploads
        are copied into ``folder/inputs`` under fixed names, outputs written under fixed names.
      view (dict | None): what the viewer shows: ``query`` (D, H, W) float32, ``prediction`` and
        ``reference`` (D, H, W) bool or None, ``support`` / ``support_mask`` (D', H', W') or None, the
        spacings (z, y, x) mm ``spacing`` / ``support_spacing``, intensity windows ``window`` /
        ``support_window`` (low, high), and the initial slices (z, y, x) ``centre`` (prediction's centre)
        / ``support_centre`` (support mask's centre).
    """

    folder: Path
    view: dict | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class SessionStore:
    """The sessions of all connections, keyed by Gradio's session hash, each in its own folder under ``root``.

    Arguments:
      root (str | Path | None): parent of the session folders; a new ``tempfile.mkdtemp`` folder if None
        (removed by :meth:`close_all`).
    """

    def __init__(self, root: str | Path | None = None):
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="irisseg-app-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def folders(self) -> dict[str, Path]:
        """The folder of each open session, by session key."""
        with self._lock:
            return {key: session.folder for key, session in self._sessions.items()}

    def get(self, key: str) -> Session:
        """The session of connection ``key`` (created, with a fresh folder, on first use)."""
        with self._lock:
            session = self._sessions.get(key)
            if session is None or not session.folder.is_dir():
                session = Session(Path(tempfile.mkdtemp(prefix="session-", dir=self.root)))
                self._sessions[key] = session
            return session

    def close(self, key: str) -> None:
        """Forget connection ``key`` and delete its folder (nothing happens for an unknown key)."""
        with self._lock:
            session = self._sessions.pop(key, None)
        if session is not None:
            shutil.rmtree(session.folder, ignore_errors=True)

    def close_all(self) -> None:
        """Delete every session folder (and ``root`` when this store created it)."""
        for key in list(self._sessions):
            self.close(key)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)


def _session_key(request) -> str:
    """Gradio's per-connection session hash (``"local"`` when called outside a browser session)."""
    return str(getattr(request, "session_hash", None) or "local")


# ---------------------------------------------------------------------------------------------------
# uploads
# ---------------------------------------------------------------------------------------------------
def upload_suffix(filename: str) -> str:
    """The accepted format of an uploaded file, from the end of its name: one of :data:`UPLOAD_SUFFIXES`.

    Raises:
      InputError: any other file type.
    """
    lower = filename.lower()
    for suffix in UPLOAD_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    raise InputError(f"{filename}: unsupported file type (upload .nii, .nii.gz, .nrrd, .mha, or a .zip of a "
                     f"DICOM series)")


def safe_extract_zip(archive: str | Path, dest: str | Path, max_bytes: int, name: str = "zip") -> Path:
    """Extract a zip of a DICOM series into ``dest``; return the folder holding the most extracted files.

    Every member is written under ``dest`` by its own relative path; absolute paths, ``..`` components,
    drive letters and symbolic links are refused, as are archives of more than :data:`ZIP_MAX_FILES` files
    or expanding to more than ``max_bytes`` bytes.

    Arguments:
      archive: the uploaded zip file. dest: an empty folder of the session. max_bytes (int): expansion limit.
      name (str): how to name the archive in error messages.

    Raises:
      InputError: not a zip, an unsafe member, too many files or bytes, no file at all.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError):
        raise InputError(f"{name}: not a readable zip archive") from None
    counts: dict[Path, int] = {}
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > ZIP_MAX_FILES:
            raise InputError(f"{name}: the zip holds {len(members)} files (at most {ZIP_MAX_FILES})")
        for m in zf.infolist():
            parts = PurePosixPath(m.filename.replace("\\", "/")).parts
            if (m.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0])
                    or (m.external_attr >> 16) & 0o170000 == 0o120000):
                raise InputError(f"{name}: unsafe path in the zip archive: {m.filename!r}")
        written = 0
        for m in members:
            parts = [p for p in PurePosixPath(m.filename.replace("\\", "/")).parts if p not in ("", ".")]
            if not parts or parts[0] == "__MACOSX" or parts[-1].startswith("."):
                continue
            target = dest.joinpath(*parts)
            if not target.resolve().is_relative_to(root):
                raise InputError(f"{name}: unsafe path in the zip archive: {m.filename!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > max_bytes:
                        raise InputError(f"{name}: the zip expands to more than {max_bytes // 2**20} MB")
                    out.write(chunk)
            counts[target.parent] = counts.get(target.parent, 0) + 1
    if not counts:
        raise InputError(f"{name}: the zip archive holds no file")
    return max(counts, key=lambda p: (counts[p], -len(p.parts)))


def _display_name(upload: str | Path, role: str) -> str:
    """``role (file name)`` for messages; the name is only shown, never used as a path."""
    shown = "".join(c for c in Path(str(upload)).name if c.isprintable())[:80]
    return f"{role} ({shown})" if shown else role


def stage_upload(upload: str | Path, session: Session, stem: str, role: str, max_bytes: int) -> tuple[Path, str]:
    """Copy an uploaded file into the session folder under a fixed name (unzipping a DICOM zip).

    Arguments:
      upload: the temporary path Gradio gave the upload (its name is used only for the format suffix).
      session (Session): the connection's session. stem (str): fixed file stem, e.g. ``"query"``.
      role (str): how to name the file in messages, e.g. ``"query"``. max_bytes (int): size limit.

    Returns:
      tuple[Path, str]: the staged file (or DICOM folder) inside ``session.folder/inputs``, and the name to
      use in messages.

    Raises:
      InputError: unsupported type, a file over the limit, a bad zip.
    """
    shown = _display_name(upload, role)
    suffix = upload_suffix(Path(str(upload)).name)
    src = Path(str(upload))
    if not src.is_file():
        raise InputError(f"{shown}: the upload is missing; upload the file again")
    if src.stat().st_size > max_bytes:
        raise InputError(f"{shown}: file is larger than the upload limit of {max_bytes // 2**20} MB")
    inputs = session.folder / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    if suffix == ".zip":
        dest = inputs / f"{stem}_dicom"
        shutil.rmtree(dest, ignore_errors=True)
        return safe_extract_zip(src, dest, ZIP_EXPANSION * max_bytes, shown), shown
    dest = inputs / f"{stem}{suffix}"
    shutil.copyfile(src, dest)
    return dest, shown


def _read_staged(path: Path, shown: str, reader, **kwargs):
    """Read a staged file with ``reader``, naming it ``shown`` (not its server path) in any error."""
    try:
        return reader(path, **kwargs)
    except InputError as exc:
        raise InputError(str(exc).replace(str(path), shown)) from None
    except (OSError, RuntimeError, ValueError) as exc:
        raise InputError(f"{shown}: cannot read the file ({' '.join(str(exc).split())[:160]})") from None


# ---------------------------------------------------------------------------------------------------
# slice rendering
# ---------------------------------------------------------------------------------------------------
def plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One slice of a (D, H, W) volume as shown on screen (rows top to bottom).

    ``axis`` 0 (axial): ``volume[index]``, rows y, columns x. 1 (coronal): ``volume[:, index, :]`` and
    2 (sagittal): ``volume[:, :, index]``, both with z pointing up.
    """
    index = int(np.clip(index, 0, volume.shape[axis] - 1))
    if axis == 0:
        return volume[index]
    out = volume[:, index, :] if axis == 1 else volume[:, :, index]
    return out[::-1]


def _pixel_mm(spacing_zyx: tuple[float, float, float], axis: int) -> tuple[float, float]:
    """(row, column) voxel size in mm of a slice along ``axis`` of a (D, H, W) volume."""
    sz, sy, sx = spacing_zyx
    return ((sy, sx), (sz, sx), (sz, sy))[axis]


def render_slice(image: np.ndarray, window: tuple[float, float], pixel_mm: tuple[float, float],
                 overlays: list[tuple[np.ndarray, tuple[int, int, int], float]], size: int = VIEW_SIZE) -> np.ndarray:
    """A grey slice with coloured masks, resized (nearest neighbour) to its physical aspect ratio.

    Arguments:
      image (np.ndarray): (rows, columns) intensities. window: (low, high) mapped to black and white.
      pixel_mm: (row, column) voxel size in mm.
      overlays: (mask (rows, columns) bool, RGB colour, fill opacity in [0, 1]); each mask is filled with
        its opacity and outlined in its colour (an opacity of 0 draws the outline only).
      size (int): length of the longer side of the output, pixels.

    Returns:
      np.ndarray: (h, w, 3) uint8 RGB.
    """
    rows, cols = image.shape
    height, width = rows * float(pixel_mm[0]), cols * float(pixel_mm[1])
    scale = size / max(height, width, 1e-6)
    out_h, out_w = max(1, round(height * scale)), max(1, round(width * scale))
    ri = np.minimum((np.arange(out_h) + 0.5) * rows / out_h, rows - 1).astype(int)
    ci = np.minimum((np.arange(out_w) + 0.5) * cols / out_w, cols - 1).astype(int)
    lo, hi = window
    grey = np.clip((np.nan_to_num(image[np.ix_(ri, ci)].astype(np.float32)) - lo) / (hi - lo), 0.0, 1.0)
    rgb = np.repeat(grey[..., None] * 255.0, 3, axis=2)
    for mask, colour, opacity in overlays:
        m = np.asarray(mask, bool)[np.ix_(ri, ci)]
        if not m.any():
            continue
        c = np.asarray(colour, np.float32)
        a = float(np.clip(opacity, 0.0, 1.0))
        rgb[m] = (1.0 - a) * rgb[m] + a * c
        inner = m.copy()
        inner[1:, :] &= m[:-1, :]
        inner[:-1, :] &= m[1:, :]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        rgb[m & ~inner] = c
    return rgb.round().astype(np.uint8)


def render_views(view: dict, indices: tuple[int, int, int], opacity: float) -> list[np.ndarray]:
    """The six viewer images: query + prediction (+ reference outline), then support + its mask, per plane.

    Arguments:
      view (dict): a :attr:`Session.view`.
      indices: query slice indices (z, y, x). The support's slices are its own mask's centre
        (``view["support_centre"]``) moved by the query slices' distance in mm from ``view["centre"]``.
      opacity (float): fill opacity of the prediction and support mask, in [0, 1].

    Returns:
      list[np.ndarray]: axial, coronal, sagittal query images, then the same for the support (None when
      there is no support), each (h, w, 3) uint8.
    """
    query = view["query"]
    out: list[np.ndarray | None] = []
    for axis in range(3):
        overlays = []
        if view.get("prediction") is not None:
            overlays.append((plane(view["prediction"], axis, indices[axis]), PRED_RGB, opacity))
        if view.get("reference") is not None:
            overlays.append((plane(view["reference"], axis, indices[axis]), REF_RGB, 0.0))
        out.append(render_slice(plane(query, axis, indices[axis]), view["window"],
                                _pixel_mm(view["spacing"], axis), overlays))
    support = view.get("support")
    for axis in range(3):
        if support is None:
            out.append(None)
            continue
        offset_mm = (indices[axis] - view["centre"][axis]) * view["spacing"][axis]
        k = round(view["support_centre"][axis] + offset_mm / view["support_spacing"][axis])
        overlays = [(plane(view["support_mask"], axis, k), SUPPORT_RGB, opacity)]
        out.append(render_slice(plane(support, axis, k), view["support_window"],
                                _pixel_mm(view["support_spacing"], axis), overlays))
    return out


def _centre(masks: list[np.ndarray | None], shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Slice indices (z, y, x) through the centre of mass of the first non-empty mask, else the volume centre."""
    for m in masks:
        if m is not None and m.any():
            return tuple(int(round(c)) for c in np.argwhere(m).mean(axis=0))  # type: ignore[return-value]
    return tuple(s // 2 for s in shape)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------
# the model side
# ---------------------------------------------------------------------------------------------------
def example_task(model):
    """The built-in example for ``model`` (as ``irisseg demo``): supports, query and reference Volumes.

    Arguments:
      model (IrisModel): its ``config.image_size`` is the example's grid and its held-out shape families
        (``config.extra["holdout_families"]``, else every family) the structure's family.

    Returns:
      irisseg.demo.Example: three supports with masks, the query and its reference, anisotropic and oblique.
    """
    from irisseg.demo import builtin_example

    holdout = list(model.config.extra.get("holdout_families") or [])
    if not holdout:
        from irisseg.data.synthetic import FAMILIES

        holdout = list(FAMILIES)
    return builtin_example(holdout, shape=tuple(model.config.image_size))


def _label_values(label) -> list[int] | None:
    """The support-mask label to segment: None (any non-zero voxel, for binary masks) or [label]."""
    if label is None or label == "":
        return None
    value = float(label)
    if value != int(value) or value < 0:
        raise InputError(f"label: expected a whole number >= 0, got {label}")
    return None if int(value) == 0 else [int(value)]


def _md_error(exc: Exception) -> str:
    """One line for ``#status``."""
    return "**Error:** " + " ".join(str(exc).split())


# ---------------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------------
def build_app(model="starter", device: str = "cpu", index=None, max_upload_mb: int = 512, store: SessionStore | None = None):
    """Build the web app (not launched).

    Arguments:
      model: ``"starter"``, a model or run folder (see :func:`irisseg.incontext.load_model`), or an already
        loaded IrisModel; loaded once here and shared by all connections (calls are serialised).
      device (str): ``"cpu"``, ``"cuda"`` or ``"auto"``.
      index: a case index folder (``irisseg retrieval index``); adds the "Similar cases" tab. None: no tab.
      max_upload_mb (int): upload limit in MB (applied by :func:`launch`; also checked when staging files).
      store (SessionStore | None): where connections keep their files (a new store in a temporary folder if None).

    Returns:
      gradio.Blocks: with attributes ``irisseg_store`` (the SessionStore) and ``irisseg_max_upload_mb``.

    Raises:
      InputError: the model or index cannot be loaded, gradio is missing, a bad upload limit.
    """
    try:
        import gradio as gr
    except ImportError:
        raise InputError("the web app needs the 'app' extra: pip install 'irisseg[app]'") from None
    from irisseg.incontext import InContextSegmenter, load_model
    from irisseg.io import read_mask, read_volume, write_volume
    from irisseg.metrics import dice, hd95

    if int(max_upload_mb) < 1:
        raise InputError(f"--max-upload-mb must be at least 1, got {max_upload_mb}")
    max_bytes = int(max_upload_mb) * 2**20
    net = load_model(model, device=device) if isinstance(model, (str, Path)) else model
    model_name = str(model) if isinstance(model, (str, Path)) else "custom"
    model_lock = threading.Lock()
    memory_classes = list(net.memory.names()) if getattr(net, "memory", None) is not None else []
    case_index = None
    if index is not None:
        from irisseg.retrieval import CaseIndex

        case_index = CaseIndex.load(index)
    if store is None:  # not `store or ...`: an empty store has length 0
        store = SessionStore()
        atexit.register(store.close_all)  # the app's own temporary folder goes when the process ends
    example_cache: dict[str, object] = {}

    def session_of(request) -> Session:
        return store.get(_session_key(request))

    # -- handlers ----------------------------------------------------------------------------------------
    def load_example(request: gr.Request):
        """Write the built-in example into the session folder and fill the upload boxes with it."""
        session = session_of(request)
        try:
            with model_lock:
                if "example" not in example_cache:
                    example_cache["example"] = example_task(net)
            ex = example_cache["example"]
            folder = session.folder / "example"
            files = [write_volume(ex.query, folder / "query.nii.gz"),
                     write_volume(ex.reference, folder / "reference.nii.gz")]
            for k in range(3):
                files.append(write_volume(ex.supports[k], folder / f"support_{k + 1}.nii.gz"))
                files.append(write_volume(ex.support_masks[k], folder / f"support_{k + 1}_mask.nii.gz"))
            status = (f"Built-in example loaded: a synthetic '{ex.family}' structure (a shape family the starter "
                      f"model never saw), three supports and a query with its reference. Press **Run**.")
            return [str(f) for f in files] + [status]
        except Exception as exc:  # keep serving whatever happens
            log.exception("load example failed")
            return [gr.skip()] * 8 + [_md_error(exc)]

    def run(query_file, reference_file, s1, m1, s2, m2, s3, m3, strategy, label, classes, tta, opacity,
            request: gr.Request, progress=gr.Progress()):
        """Segment the query; returns status, metrics, download, three sliders and six images."""
        n_out = 2 + 1 + 3 + 6
        session = session_of(request)
        try:
            with session.lock:
                result = _run(session, query_file, reference_file, [(s1, m1), (s2, m2), (s3, m3)], strategy,
                              label, classes, bool(tta), float(opacity), progress)
            return result
        except InputError as exc:
            return [_md_error(exc)] + [gr.skip()] * (n_out - 1)
        except Exception as exc:  # an unexpected failure: say so in the page and keep serving
            log.exception("run failed")
            return [_md_error(f"unexpected failure: {type(exc).__name__}: {exc}")] + [gr.skip()] * (n_out - 1)

    def _run(session, query_file, reference_file, pairs, strategy, label, classes, tta, opacity, progress):
        import time

        if not query_file:
            raise InputError("upload a query image first (or load the built-in example)")
        labels = _label_values(label)
        progress(0.05, desc="reading the files")
        path, shown = stage_upload(query_file, session, "query", "query", max_bytes)
        query = _read_staged(path, shown, read_volume)
        reference = None
        if reference_file:
            path, ref_shown = stage_upload(reference_file, session, "reference", "reference mask", max_bytes)
            reference = _read_staged(path, ref_shown, read_mask, reference=query, reference_name=shown,
                                     allow_empty=True)
        images, masks, names = [], [], []
        for k, (img_file, mask_file) in enumerate(pairs, start=1):
            if not img_file and not mask_file:
                continue
            if not img_file or not mask_file:
                raise InputError(f"support {k}: upload both the image and its mask")
            ipath, ishown = stage_upload(img_file, session, f"support_{k}", f"support {k} image", max_bytes)
            mpath, mshown = stage_upload(mask_file, session, f"support_{k}_mask", f"support {k} mask", max_bytes)
            images.append(_read_staged(ipath, ishown, read_volume))
            masks.append(_read_staged(mpath, mshown, read_volume))
            names.append((ishown, mshown))
        if strategy not in ("one-shot", "ensemble", "tune", "memory"):
            raise InputError(f"unknown strategy {strategy!r}")
        if strategy == "memory":
            chosen = [c for c in (classes or []) if c]
            if not chosen:
                raise InputError("the memory strategy needs a stored class: choose one under 'memory classes'"
                                 + ("" if memory_classes else " (this model has none stored)"))
        elif not images:
            raise InputError("upload at least one support image with its mask (or use the memory strategy)")

        progress(0.2, desc="encoding the supports")
        t0 = time.perf_counter()
        with model_lock:
            seg = InContextSegmenter(net, device=device, strategy=strategy, tta=tta and strategy != "memory")
            if strategy == "memory":
                seg.set_memory(chosen)
            else:
                seg.set_support(images, masks, labels=labels, names=names)
            progress(0.5, desc="segmenting the query")
            probs = seg.predict_probabilities(query, name=shown)
            pred = seg.labels_from_probabilities(probs)
        seconds = time.perf_counter() - t0
        progress(0.85, desc="writing the prediction")
        out_path = write_volume(pred, session.folder / "prediction.nii.gz")

        fg = pred.array > 0
        used = {"memory": 0, "one-shot": min(1, len(images))}.get(strategy, len(images))
        metrics = (f"Strategy **{strategy}**, {used} support(s), "
                   f"{seconds:.1f} s. Foreground: {int(fg.sum())} voxels, {fg.sum() * query.voxel_volume_ml:.2f} ml.")
        ref_bin = None
        if reference is not None:
            if labels is not None and labels[0] in reference.labels():
                ref_bin = reference.array == labels[0]
            else:
                ref_bin = reference.array > 0
            d = dice(fg, ref_bin)
            h = hd95(fg, ref_bin, query.spacing_zyx)
            metrics += f"\n\nAgainst the reference mask: **Dice {d:.3f}**, **HD95 {h:.2f} mm**."
        sup_img = images[0] if images else None
        view = {
            "query": query.array.astype(np.float32, copy=False),
            "prediction": fg,
            "reference": ref_bin,
            "spacing": query.spacing_zyx,
            "window": intensity_window(query.array.astype(np.float32, copy=False)),
            "support": None if sup_img is None else sup_img.array.astype(np.float32, copy=False),
            "support_mask": None if sup_img is None else (
                masks[0].array == labels[0] if labels else masks[0].array > 0),
            "support_spacing": None if sup_img is None else sup_img.spacing_zyx,
            "support_window": None if sup_img is None else intensity_window(sup_img.array.astype(np.float32)),
        }
        centre = _centre([fg, ref_bin], query.shape)
        view["centre"] = centre
        if sup_img is not None:
            view["support_centre"] = _centre([view["support_mask"]], sup_img.shape)
        session.view = view
        pictures = render_views(view, centre, opacity)
        sliders = [gr.Slider(minimum=0, maximum=query.shape[a] - 1, value=centre[a], step=1, interactive=True)
                   for a in range(3)]
        status = f"Done: prediction written in the query's geometry ({'x'.join(map(str, query.size_xyz))} voxels)."
        progress(1.0, desc="done")
        return [status, metrics, str(out_path), *sliders, *pictures]

    def redraw(z, y, x, opacity, request: gr.Request):
        """Re-render the six images at slices (z, y, x) with the given overlay opacity."""
        session = session_of(request)
        if session.view is None:
            return [gr.skip()] * 6
        try:
            return render_views(session.view, (int(z), int(y), int(x)), float(opacity))
        except Exception:  # a stale slider value after a new run: leave the images as they are
            log.exception("redraw failed")
            return [gr.skip()] * 6

    def search(files, k, request: gr.Request):
        """Embed the uploaded query channels and list the most similar indexed cases."""
        from irisseg.retrieval import search_cases

        session = session_of(request)
        try:
            if not files:
                raise InputError("upload the query image (one file per channel, in channel order)")
            files = files if isinstance(files, list) else [files]
            channels = []
            for c, f in enumerate(files):
                path, shown = stage_upload(f, session, f"retrieval_{c}", f"channel {c}", max_bytes)
                channels.append(_read_staged(path, shown, read_volume))
            with model_lock:
                hits = search_cases(case_index, None, channels, int(k), device=device)[0]
            rows = [[h.rank, h.case_id, round(float(h.score), 4), ", ".join(h.findings) or "-"] for h in hits]
            return f"{len(rows)} similar case(s).", rows
        except InputError as exc:
            return _md_error(exc), gr.skip()
        except Exception as exc:
            log.exception("search failed")
            return _md_error(f"unexpected failure: {type(exc).__name__}: {exc}"), gr.skip()

    def close_session(request: gr.Request):
        store.close(_session_key(request))

    # -- layout --------------------------------------------------------------------------------------------
    with gr.Blocks(title="irisseg: segment by example", analytics_enabled=False,
                   delete_cache=(900, 3600)) as demo:
        gr.Markdown(
            "# irisseg: segment by example\n"
            "Upload a scan (the *query*) and one to three labelled examples of the structure (*supports*: "
            "image + mask), or load the built-in example; choose a strategy and run. Formats: NIfTI, NRRD, "
            f"MHA, or a .zip of a DICOM series; at most {int(max_upload_mb)} MB per file. Model: "
            f"`{model_name}`. Research software: not for clinical use.")
        with gr.Tabs():
            with gr.Tab("Segment", id="segment"):
                with gr.Row():
                    with gr.Column(scale=1):
                        example_btn = gr.Button("Load the built-in example", elem_id="load-example")
                        query_in = gr.File(label="Query image", elem_id="query-file")
                        reference_in = gr.File(label="Reference mask (optional: Dice and HD95)",
                                               elem_id="reference-file")
                        support_ins = []
                        for k in range(1, 4):
                            with gr.Row():
                                support_ins.append(gr.File(label=f"Support {k} image", elem_id=f"support-{k}-file"))
                                support_ins.append(gr.File(label=f"Support {k} mask", elem_id=f"support-{k}-mask"))
                    with gr.Column(scale=1):
                        strategy_in = gr.Radio(STRATEGY_CHOICES, value="one-shot", label="Strategy",
                                               elem_id="strategy")
                        label_in = gr.Number(value=0, precision=0, minimum=0, elem_id="label",
                                             label="Label of the support masks (0: any non-zero voxel)")
                        classes_in = gr.Dropdown(memory_classes, multiselect=True, value=[], elem_id="classes",
                                                 label="Memory classes (strategy 'memory class'; no support needed)")
                        tta_in = gr.Checkbox(False, label="Mirror test-time augmentation (about 8x slower)",
                                             elem_id="tta")
                        run_btn = gr.Button("Run", variant="primary", elem_id="run")
                        status = gr.Markdown("Upload files or load the built-in example.", elem_id="status")
                        metrics_md = gr.Markdown("", elem_id="metrics")
                        download = gr.DownloadButton("Download the prediction (NIfTI)", elem_id="download")
                opacity_in = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="Overlay opacity", elem_id="opacity")
                sliders, query_views, support_views = [], [], []
                with gr.Row():
                    for name in ("axial", "coronal", "sagittal"):
                        with gr.Column():
                            sliders.append(gr.Slider(0, 63, value=32, step=1, label=f"{name} slice",
                                                     elem_id=f"{name}-slider"))
                            query_views.append(gr.Image(label=f"{name}: query + prediction", format="png",
                                                        interactive=False, elem_id=f"view-{name}"))
                            support_views.append(gr.Image(label=f"{name}: support 1 + its mask", format="png",
                                                          interactive=False, elem_id=f"support-{name}"))
            if case_index is not None:
                with gr.Tab("Similar cases", id="retrieval"):
                    gr.Markdown("Find the indexed cases most similar to a query (one file per channel, in "
                                "channel order).")
                    retrieval_in = gr.File(label="Query image", file_count="multiple", elem_id="retrieval-file")
                    k_in = gr.Slider(1, 50, value=10, step=1, label="Cases", elem_id="retrieval-k")
                    search_btn = gr.Button("Search", variant="primary", elem_id="search")
                    retrieval_status = gr.Markdown("", elem_id="retrieval-status")
                    results = gr.Dataframe(headers=["rank", "case", "score", "findings"], interactive=False,
                                           elem_id="retrieval-results")
                    search_btn.click(search, [retrieval_in, k_in], [retrieval_status, results])

        example_btn.click(load_example, None, [query_in, reference_in, *support_ins, status])
        run_btn.click(run, [query_in, reference_in, *support_ins, strategy_in, label_in, classes_in, tta_in,
                            opacity_in],
                      [status, metrics_md, download, *sliders, *query_views, *support_views])
        for control in (*sliders, opacity_in):
            control.input(redraw, [*sliders, opacity_in], [*query_views, *support_views],
                          trigger_mode="always_last", show_progress="hidden")
        demo.unload(close_session)
    demo.irisseg_store = store
    demo.irisseg_max_upload_mb = int(max_upload_mb)
    return demo


def launch(host: str = "127.0.0.1", port: int = 7860, model="starter", device: str = "cpu", index=None,
           max_upload_mb: int = 512, block: bool = True):
    """Build and serve the app.

    Arguments:
      host (str): interface to bind (127.0.0.1: this machine only; 0.0.0.0 exposes it to the network).
      port (int): TCP port. model, device, index, max_upload_mb: as :func:`build_app`.
      block (bool): serve until interrupted (True) or return at once with the server running in a thread.

    Returns:
      gradio.Blocks: the running app (``demo.local_url``; stop it with ``demo.close()``).
    """
    import gradio as gr

    demo = build_app(model=model, device=device, index=index, max_upload_mb=max_upload_mb)
    store = demo.irisseg_store
    system_fonts = ["ui-sans-serif", "system-ui", "sans-serif"]
    theme = gr.themes.Default(font=system_fonts, font_mono=["ui-monospace", "monospace"])  # no web fonts
    try:
        demo.launch(server_name=host, server_port=int(port), max_file_size=f"{int(max_upload_mb)}mb",
                    prevent_thread_lock=not block, share=False, ssr_mode=False, mcp_server=False,
                    run_history=False, quiet=not block, show_error=False, theme=theme)
    except OSError as exc:
        store.close_all()
        raise InputError(f"cannot serve on {host}:{port} ({exc})") from None
    finally:
        if block:
            store.close_all()
    return demo
