"""The tiny run the host-side tests share: 16x16 images, 2 slices per
patient, 1/16 of the default patients, a one-level U-Net of width 4, one
local step on batches of 4 (fast on 2 CPU cores)."""

from fedjax_seg.run import config as C


def config(*, rounds: int, eval_every: int, checkpoint_every: int,
           privacy: C.PrivacyConfig = C.PrivacyConfig(),
           noise_seed: int | None = None) -> C.ExperimentConfig:
  """The tiny run with `rounds` rounds (default privacy unless given)."""
  return C.ExperimentConfig(
      data=C.DataConfig(image_size=16, num_slices=2, patients_scale=0.0625),
      model=C.ModelConfig(widths=(4,)),
      privacy=privacy,
      federated=C.FederatedConfig(rounds=rounds, local_steps=1, batch_size=4,
                                  learning_rate=0.5, ema_decay=0.0),
      eval_every=eval_every, checkpoint_every=checkpoint_every,
      noise_seed=noise_seed)
