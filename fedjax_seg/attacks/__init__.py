"""Privacy attacks for evaluation: gradient inversion and image metrics."""

from fedjax_seg.attacks.gradient_inversion import invert_gradients
from fedjax_seg.attacks.gradient_inversion import InversionConfig
from fedjax_seg.attacks.gradient_inversion import InversionResult
from fedjax_seg.attacks.image_metrics import matched_metrics
from fedjax_seg.attacks.image_metrics import psnr
from fedjax_seg.attacks.image_metrics import ssim
