"""Share of lesion voxels that the 0.5-99.5 percentile clip of ``normalization: clip_zscore`` flattens.

For the first 40 cases of a lesion dataset (nnU-Net layout, first channel), the fraction of each case's
lesion voxels at or above the 99.5th intensity percentile of its body mask (:func:`irisseg.lesion.body_mask`),
and at or below the 0.5th: the voxels the clip sets to one value, together with the brightest (darkest)
non-lesion voxels. Bright lesions (FLAIR-like) lose the upper tail, dark ones (T1-like) the lower.

    python clip_check.py data/lesions_7
"""

import glob
import sys

import numpy as np

from irisseg.io import read_volume
from irisseg.lesion import body_mask

root = sys.argv[1]
upper, lower, lesion_share = [], [], []
for path in sorted(glob.glob(f"{root}/imagesTr/*_0000.nii.gz"))[:40]:
    image = read_volume(path).array.astype(np.float32)
    lesion = read_volume(path.replace("imagesTr", "labelsTr").replace("_0000.nii.gz", ".nii.gz")).array > 0
    body = body_mask([image])
    bottom, top = np.percentile(image[body], [0.5, 99.5])
    upper.append(float((image[lesion] >= top).mean()))
    lower.append(float((image[lesion] <= bottom).mean()))
    lesion_share.append(float(lesion[body].mean()))
for name, shares in (("at or above the body's 99.5th", upper), ("at or below the body's 0.5th", lower)):
    print(f"lesion voxels {name} percentile: mean {np.mean(shares):.3f}, median {np.median(shares):.3f}, "
          f"max {np.max(shares):.3f}")
print(f"lesion share of the body: mean {np.mean(lesion_share):.4f}")
