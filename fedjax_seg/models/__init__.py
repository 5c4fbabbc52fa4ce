"""Segmentation models (Flax NNX U-Nets) behind a pure `init`/`apply` API.

Knows nothing about privacy or federation.
"""

from fedjax_seg.models.independence import check_per_example_independence
from fedjax_seg.models.independence import NotPerExampleError
from fedjax_seg.models.unet import count_params
from fedjax_seg.models.unet import norm_param_mask
from fedjax_seg.models.unet import PARAM_GROUPS
from fedjax_seg.models.unet import trainable_mask
from fedjax_seg.models.unet import preset
from fedjax_seg.models.unet import PRESETS
from fedjax_seg.models.unet import SegmentationModel
from fedjax_seg.models.unet import UNetConfig
