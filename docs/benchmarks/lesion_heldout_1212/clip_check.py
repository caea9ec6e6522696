"""Share of lesion voxels that the 0.5-99.5 percentile clip of ``normalization: clip_zscore`` flattens.

For the first 40 cases of a lesion dataset (nnU-Net layout, first channel), the fraction of each case's
lesion voxels that the pipeline's own clip (:func:`irisseg.preprocess.clip_percentiles` over the body mask of
:func:`irisseg.lesion.body_mask`, 0.5-99.5 percentiles) lowers or raises: the voxels it sets to one value,
together with the brightest (darkest) non-lesion voxels. Bright lesions (FLAIR-like) lose the upper tail,
dark ones (T1-like) the lower.

    python clip_check.py data/lesions_7
"""

import glob
import sys

import numpy as np

from irisseg.io import read_volume
from irisseg.lesion import body_mask
from irisseg.preprocess import clip_percentiles

root = sys.argv[1]
upper, lower, lesion_share = [], [], []
for path in sorted(glob.glob(f"{root}/imagesTr/*_0000.nii.gz"))[:40]:
    image = read_volume(path).array.astype(np.float32)
    lesion = read_volume(path.replace("imagesTr", "labelsTr").replace("_0000.nii.gz", ".nii.gz")).array > 0
    body = body_mask([image])
    clipped = clip_percentiles(image, mask=body)[lesion]
    upper.append(float((clipped < image[lesion]).mean()))
    lower.append(float((clipped > image[lesion]).mean()))
    lesion_share.append(float(lesion[body].mean()))
for name, shares in (("lowered to the body's 99.5th", upper), ("raised to the body's 0.5th", lower)):
    print(f"lesion voxels {name} percentile: mean {np.mean(shares):.3f}, median {np.median(shares):.3f}, "
          f"max {np.max(shares):.3f}")
print(f"lesion share of the body: mean {np.mean(lesion_share):.4f}")
