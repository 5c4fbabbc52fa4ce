"""Tests for fedjax_seg.centralized: per-site evaluation."""

import jax
import numpy as np

from fedjax_seg import centralized
from fedjax_seg import models
from fedjax_seg.data import sites
from fedjax_seg.data import synthetic


def test_evaluation_batch_size_changes_no_figure():
  data = sites.stack_sites(synthetic.generate(synthetic.SyntheticConfig(
      image_size=16, num_slices=2, patients_scale=0.05)))
  model = models.SegmentationModel(models.preset("tiny", widths=(4,)))
  params = model.init(jax.random.key(0), (1, 16, 16, 1))
  default = centralized.evaluate(model, params, data, with_hd95=True)
  chunked = centralized.evaluate(model, params, data, batch_size=3,
                                 with_hd95=True)
  for key in ("dice_per_site", "iou_per_site", "hd95_per_site",
              "dice_per_modality"):
    np.testing.assert_allclose(default[key], chunked[key], rtol=1e-5,
                               atol=1e-6, err_msg=key)
  # On CPU, about CPU_EVAL_PIXELS pixels per batch, 1 to EVAL_BATCH_MAX.
  assert centralized.evaluation_batch_size((16, 16)) == 64
  assert centralized.evaluation_batch_size((64, 64)) == 8
  assert centralized.evaluation_batch_size((128, 128)) == 2
  assert centralized.evaluation_batch_size((8, 256, 256)) == 1
