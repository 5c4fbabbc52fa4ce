"""Augmentations keep image and mask aligned; augmentation multiplicity is
the mean over K copies inside one unit (so one clipped contribution)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_seg import privacy
from fedjax_seg.data import augment
from fedjax_seg.run import config_syntax


def _blob(size=24):
  yy, xx = np.mgrid[:size, :size]
  blob = np.exp(-((yy - 9) ** 2 / 30.0 + (xx - 14) ** 2 / 12.0))
  return blob[..., None].astype(np.float32), (blob > 0.5).astype(np.int32)


@pytest.mark.parametrize("seed", range(2))
def test_geometry_moves_image_and_mask_together(seed):
  image, label = _blob()
  config = augment.AugmentConfig(augmentations=("flip", "affine"),
                                 max_rotation_degrees=30, max_scale=0.2)
  out, out_label = jax.jit(augment.augment_slice, static_argnums=3)(
      image, label, jax.random.key(seed), config)
  assert out.shape == image.shape and out_label.dtype == label.dtype
  # The mask is still the thresholded image, up to interpolation at the
  # boundary.
  agree = np.mean(np.asarray(out_label) == (np.asarray(out[..., 0]) > 0.5))
  assert agree > 0.97, agree
  assert set(np.unique(out_label)) <= {0, 1}


def test_intensity_transforms_leave_the_mask_and_follow_the_key():
  image, label = _blob()
  config = augment.AugmentConfig(augmentations=("intensity", "gamma",
                                                "noise"))
  a, la = augment.augment_slice(image, label, jax.random.key(0), config)
  b, _ = augment.augment_slice(image, label, jax.random.key(0), config)
  c, _ = augment.augment_slice(image, label, jax.random.key(1), config)
  np.testing.assert_array_equal(la, label)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  noise_only = augment.AugmentConfig(augmentations=("noise",), noise_std=0.1)
  big = np.zeros((64, 64, 1), np.float32)
  n, _ = augment.augment_slice(big, np.zeros((64, 64), np.int32),
                               jax.random.key(2), noise_only)
  assert abs(float(np.std(n)) - 0.1) < 0.01
  identity = augment.AugmentConfig(augmentations=())
  same, _ = augment.augment_slice(image, label, jax.random.key(3), identity)
  np.testing.assert_array_equal(same, image)


def _loss(w, example):
  return jnp.mean((example["image"][..., 0] * w - example["label"]) ** 2)


@pytest.mark.slow
def test_multiplicity_is_the_mean_over_copies_and_one_clipped_unit():
  image, label = _blob(16)
  config = augment.AugmentConfig(max_rotation_degrees=20)
  loss = jax.jit(augment.multiplicity_loss(_loss, 3, config))
  w = jnp.float32(0.7)
  example = {"image": jnp.asarray(image), "label": jnp.asarray(label)}
  # Without the key leaf (evaluation): the plain loss.
  assert float(loss(w, example)) == pytest.approx(float(_loss(w, example)))
  keyed = augment.with_augment_keys(
      {k: v[None] for k, v in example.items()}, jax.random.key(5))
  one = {k: v[0] for k, v in keyed.items()}
  copies = jax.random.split(jax.random.wrap_key_data(one[augment.KEY_LEAF]),
                            3)
  augment_one = jax.jit(augment.augment_slice, static_argnums=3)
  want = np.mean([float(_loss(w, dict(zip(("image", "label"),
                                          augment_one(image, label, k,
                                                      config)))))
                  for k in copies])
  assert float(loss(w, one)) == pytest.approx(want, rel=1e-5)
  # Through DP clipping: each unit (with all its copies) contributes at most
  # C, and a padding unit nothing.
  batch = jax.tree.map(lambda x: jnp.concatenate([x, x]), keyed)
  clipped, stats = jax.jit(privacy.clipped_grad(loss, l2_clip_norm=0.01))(
      w, batch, jnp.array([False, True]))
  assert abs(float(clipped)) <= 0.01 * (1 + 1e-6)
  assert int(stats.num_real) == 1
  with pytest.raises(ValueError, match="copies"):
    augment.multiplicity_loss(_loss, 0)
  with pytest.raises(ValueError, match="unknown augmentations"):
    augment.AugmentConfig(augmentations=("mixup",))


def test_transforms_chosen_per_site_by_modality():
  image, label = _blob()
  key = jax.random.key(4)
  only_flip = jnp.array([op == "flip" for op in augment.AUGMENTATIONS])
  got = jax.jit(augment.augment_slice, static_argnums=3)(
      image, label, key, augment.AugmentConfig(), only_flip)
  want = augment.augment_slice(image, label, key, augment.AugmentConfig(
      augmentations=("flip",)))
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  none, _ = augment.augment_slice(image, label, key, augment.AugmentConfig(),
                                  jnp.zeros(len(augment.AUGMENTATIONS), bool))
  np.testing.assert_array_equal(none, image)
  by = config_syntax.parse_by_modality(["xray:intensity+noise", "MRI:"])
  assert by == {"XRAY": ("intensity", "noise"), "MRI": ()}
  table = augment.ops_table(("CT", "XRAY", "MRI"), ("flip", "noise"), by)
  assert table == ((True, False, False, False, True),
                   (False, False, True, False, True),
                   (False,) * 5)
  with pytest.raises(ValueError, match="MODALITY:op"):
    config_syntax.parse_by_modality(["XRAY=flip"])
