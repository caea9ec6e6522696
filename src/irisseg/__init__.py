"""irisseg: 3D medical image segmentation by example, and similar-case retrieval.

Top-level API::

    import irisseg
    vol = irisseg.read_volume("ct.nii.gz")        # Volume(array (D, H, W), spacing, origin, direction)
    irisseg.write_volume(vol, "copy.nrrd")

    model = irisseg.load_model("starter")              # or a trained model folder
    seg = irisseg.InContextSegmenter(model, strategy="ensemble")
    seg.set_support([support_image], [support_mask])   # Volumes; masks in their image's geometry
    mask = seg.segment(vol)                            # uint8 Volume in vol's geometry
"""

from irisseg.errors import InputError, IrissegError
from irisseg.io import Volume, read_volume, write_volume

__version__ = "0.1.0"

__all__ = [
    "Volume",
    "read_volume",
    "write_volume",
    "load_model",
    "InContextSegmenter",
    "InputError",
    "IrissegError",
    "__version__",
]

# Imported on first use, so `import irisseg` (and every CLI command) does not pay for importing torch.
_LAZY = {"load_model": "irisseg.incontext", "InContextSegmenter": "irisseg.incontext"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'irisseg' has no attribute {name!r}")

