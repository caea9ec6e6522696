"""irisseg: 3D medical image segmentation by example, and similar-case retrieval.

Top-level API::

    import irisseg
    vol = irisseg.read_volume("ct.nii.gz")        # Volume(array (D, H, W), spacing, origin, direction)
    irisseg.write_volume(vol, "copy.nrrd")
"""

from irisseg.errors import InputError, IrissegError
from irisseg.io import Volume, read_volume, write_volume

__version__ = "0.1.0"

__all__ = ["Volume", "read_volume", "write_volume", "InputError", "IrissegError", "__version__"]
