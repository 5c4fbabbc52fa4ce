"""What the federated engine trains: a task record, passed in.

The engine knows nothing about images. A `Task` gives it the loss of one
unit's example and, optionally, faster ways to the same per-example
gradients and a transform of each step's sampled batch; the segmentation
task (`fedjax_seg.segmentation.task`) builds one for the U-Nets, with
augmentation as its batch transform.

Example:
  >>> import jax.numpy as jnp
  >>> task = Task.of(lambda params, example: jnp.sum(params * example))
  >>> task.batch_transform is None
  True
"""

import dataclasses
from typing import Any, Callable

import jax

PyTree = Any


class SettingError(ValueError):
  """An engine setting that this task or the other settings do not allow.

  `str(error)` starts with the setting as `name=value`; a front end names
  its own option for it (the runner: `--name`).
  """

  def __init__(self, setting: str, message: str):
    super().__init__(message)
    self.setting = setting


@dataclasses.dataclass(frozen=True)
class Task:
  """The engine's view of a learning task.

  Attributes:
    loss: `(params, example) -> scalar`, the loss of ONE example (no batch
      axis); a unit's gradient is clipped as a whole.
    per_example_value_and_grad: optional `(params, examples [B, ...]) ->
      (losses [B], grads [B, ...])` giving `jax.vmap(jax.value_and_grad(
      loss))`'s values from one batched pass (per_example_grads="layers").
    ghost_clipped_grad: optional `(trainable_mask) -> (params, examples,
      is_padding, *, l2_clip_norm) -> (clipped sum, ClipStats)`, the clipped
      sum of a batch of single examples by ghost norms
      (per_example_grads="ghost").
    batch_transform: optional `(examples, key, site_index) -> examples`,
      applied to every step's sampled batch before the loss (e.g. fresh
      augmentation keys per unit and step that `loss` reads); `key` is the
      step's own (`Purpose.AUGMENT`).
  """

  loss: Callable[[PyTree, PyTree], jax.Array]
  per_example_value_and_grad: Callable | None = None
  ghost_clipped_grad: Callable | None = None
  batch_transform: Callable | None = None

  @classmethod
  def of(cls, task_or_loss) -> "Task":
    """`task_or_loss` as a Task (a bare loss function is a Task of it)."""
    return task_or_loss if isinstance(task_or_loss, Task) else cls(
        loss=task_or_loss)
