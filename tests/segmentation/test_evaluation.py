"""Tests for fedjax_seg.segmentation.evaluation: per-site evaluation, in
memory or a block of sites at a time."""

import jax
import numpy as np
import pytest

from fedjax_seg import models
from fedjax_seg.data import consortium as consortium_lib
from fedjax_seg.data import sites
from fedjax_seg.data import synthetic
from fedjax_seg.segmentation import evaluation


@pytest.mark.slow
def test_evaluation_batch_size_changes_no_figure():
  data = sites.stack_sites(synthetic.generate(synthetic.SyntheticConfig(
      image_size=16, num_slices=2, patients_scale=0.05)))
  model = models.SegmentationModel(models.preset("tiny", widths=(4,)))
  params = model.init(jax.random.key(0), (1, 16, 16, 1))
  default = evaluation.evaluate(model, params, data, with_hd95=True)
  chunked = evaluation.evaluate(model, params, data, batch_size=3,
                                 with_hd95=True)
  for key in ("dice_per_site", "iou_per_site", "hd95_per_site",
              "dice_per_modality"):
    np.testing.assert_allclose(default[key], chunked[key], rtol=1e-5,
                               atol=1e-6, err_msg=key)
  # On CPU, about CPU_EVAL_PIXELS pixels per batch, 1 to EVAL_BATCH_MAX.
  assert evaluation.evaluation_batch_size((16, 16)) == 64
  assert evaluation.evaluation_batch_size((64, 64)) == 8
  assert evaluation.evaluation_batch_size((128, 128)) == 2
  assert evaluation.evaluation_batch_size((8, 256, 256)) == 1


def test_blockwise_evaluation_is_the_all_sites_evaluation(monkeypatch):
  consortium = consortium_lib.Consortium(num_sites=5, image_size=16,
                                         num_slices=2, patients_scale=0.5)
  model = models.SegmentationModel(models.preset("tiny", widths=(4,)))
  params = model.init(jax.random.key(0), (1, 16, 16, 1))
  ids = np.array([4, 0, 2, 3])
  monkeypatch.setattr(evaluation, "EVAL_BLOCK", 3)  # Blocks of 3 and 1.
  got = evaluation.evaluate_in_blocks(
      model, params, lambda block: consortium.site_arrays(block, "test"), ids,
      with_hd95=True)
  want = evaluation.evaluate(model, params,
                              consortium.site_arrays(ids, "test"),
                              with_hd95=True)
  for key in ("dice_per_site", "iou_per_site", "hd95_per_site",
              "dice_per_modality"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
