"""Share of lesion voxels that the 0.5-99.5 percentile clip of ``normalization: clip_zscore`` flattens.

For the first 40 cases of a lesion dataset (nnU-Net layout), the fraction of each case's lesion voxels at or
above the 99.5th intensity percentile of its body mask (:func:`irisseg.lesion.body_mask`): the voxels the
clip sets to one value, together with the brightest non-lesion voxels.

    python clip_check.py data/lesions_7
"""

import glob
import sys

import numpy as np

from irisseg.io import read_volume
from irisseg.lesion import body_mask

root = sys.argv[1]
shares, lesion_share = [], []
for path in sorted(glob.glob(f"{root}/imagesTr/*_0000.nii.gz"))[:40]:
    image = read_volume(path).array.astype(np.float32)
    lesion = read_volume(path.replace("imagesTr", "labelsTr").replace("_0000.nii.gz", ".nii.gz")).array > 0
    body = body_mask([image])
    top = np.percentile(image[body], 99.5)
    shares.append(float((image[lesion] >= top).mean()))
    lesion_share.append(float(lesion[body].mean()))
print(f"lesion voxels at or above the body's 99.5th percentile: mean {np.mean(shares):.3f}, median "
      f"{np.median(shares):.3f}, max {np.max(shares):.3f}; lesion share of the body {np.mean(lesion_share):.4f}")
