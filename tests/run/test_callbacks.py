"""The loop's callbacks: TensorBoard writes what rounds.csv holds."""

import dataclasses
import struct

import pytest

from fedjax_seg.run import loop
from tests.run import tiny

TINY = tiny.config(rounds=2, eval_every=1, checkpoint_every=2, noise_seed=0)


def _scalars(path):
  """{tag: [(step, value)]} of a TensorBoard event file (TFRecord framing;
  the Event protos as tensorboardX defines them)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out, data = {}, path.read_bytes()
  i = 0
  while i < len(data):
    (length,) = struct.unpack("<Q", data[i:i + 8])
    event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
    i += 12 + length + 4
    for value in event.summary.value:
      out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


@pytest.mark.slow
def test_tensorboard_writes_the_rows_values_per_round(tmp_path):
  report = loop.train_and_evaluate(dataclasses.replace(TINY, tensorboard=True),
                                   tmp_path)
  files = list(tmp_path.glob("events.out.tfevents.*"))
  assert len(files) == 1
  scalars = _scalars(files[0])
  site = next(iter(report["privacy"]["epsilon_per_site"]))
  label = report["privacy"]["epsilon_label"].replace(" ", "_")
  assert [s for s, _ in scalars[f"{label}/{site}"]] == [1, 2]
  for row in report["history"]:
    r = row["round"]
    assert dict(scalars[f"{label}/{site}"])[r] == pytest.approx(
        row["epsilon"][site], rel=1e-6)
    assert dict(scalars[f"sigma/{site}"])[r] == pytest.approx(
        row["sigma"][site], rel=1e-6)
    assert dict(scalars["round/val_dice_mean"])[r] == pytest.approx(
        row["val_dice_mean"], rel=1e-5)
    assert r in dict(scalars["round/device_seconds"])
  # Nothing but the row's (covered, public or held-out) values.
  assert not any("loss" in tag or "clipped" in tag for tag in scalars)
