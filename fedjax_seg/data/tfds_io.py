"""Writing and reading slice datasets as TFDS array_record datasets.

No TensorFlow: the builder uses `tfds.features.Tensor` features only and the
array_record file format, and reading goes through `tfds.data_source`, which
gives random access to records (the simulator's streaming reader gathers only
the sampled indices of each round).

Features of every record: image float32 [H, W, C], label uint8 [H, W],
patient (str), site (str), modality (str), slice_index int32.
"""

import json
import os
import pathlib
import re
import types
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from fedjax_seg.data import dataset as dataset_lib

VERSION = "1.0.0"
STATS_FILE = "fedjax_seg_stats.json"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def check_name(name: str) -> str:
  if not _NAME.match(name):
    raise ValueError(f"dataset name {name!r} must be lower_snake_case "
                     "(letters, digits, underscores; starting with a letter).")
  return name


class _SliceBuilderBase(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the per-dataset builders made by `build`."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): "fedjax_seg slice dataset."}
  _image_shape: tuple[int, int, int]
  _split_examples: Mapping[str, Callable[[], Iterator]]
  _description: str

  def _info(self):
    h, w, c = self._image_shape
    return tfds.core.DatasetInfo(
        builder=self,
        description=self._description,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(h, w, c), dtype=np.float32),
            "label": tfds.features.Tensor(shape=(h, w), dtype=np.uint8),
            "patient": tfds.features.Tensor(shape=(), dtype=np.str_),
            "site": tfds.features.Tensor(shape=(), dtype=np.str_),
            "modality": tfds.features.Tensor(shape=(), dtype=np.str_),
            "slice_index": tfds.features.Tensor(shape=(), dtype=np.int32),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: make() for split, make in self._split_examples.items()}

  def _generate_examples(self):  # Not used: splits bring their generators.
    raise AssertionError("unreachable")


def build(name: str, data_dir: str | os.PathLike,
          image_shape: tuple[int, int, int],
          split_examples: Mapping[str, Callable[[], Iterator[tuple[str, dict]]]],
          description: str = "") -> pathlib.Path:
  """Builds dataset `name` under `data_dir` (array_record, no TensorFlow).

  Args:
    name: lower_snake_case dataset name.
    data_dir: TFDS data dir; the dataset lands in data_dir/name/1.0.0.
    image_shape: (H, W, C) of every image.
    split_examples: {split: () -> iterator of (unique key, example dict)}.
    description: free text stored in dataset_info.json.

  Returns:
    The dataset's version directory.
  """
  check_name(name)
  camel = "".join(part.title() for part in name.split("_"))
  builder_cls = types.new_class(
      camel, (_SliceBuilderBase,), {"skip_registration": True},
      lambda ns: ns.update(name=name, _image_shape=tuple(image_shape),
                           _split_examples=dict(split_examples),
                           _description=description))
  builder = builder_cls(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(verify_ssl=False))
  return pathlib.Path(builder.data_dir)


def data_source(name: str, data_dir: str | os.PathLike):
  """{split: random-access source} of a prepared dataset."""
  return tfds.data_source(check_name(name), data_dir=str(data_dir))


def text(value) -> str:
  """A string feature as str (array_record gives bytes)."""
  return value.decode() if isinstance(value, bytes) else str(value)


def read_stats(name: str, data_dir: str | os.PathLike) -> dict:
  path = pathlib.Path(data_dir) / name / STATS_FILE
  if not path.is_file():
    raise FileNotFoundError(
        f"{path}: not found; is {name!r} a dataset made by data_prep.prepare "
        f"in {data_dir}?")
  return json.loads(path.read_text())


def load(name: str, data_dir: str | os.PathLike,
         splits: Sequence[str] | None = None
         ) -> dict[str, dataset_lib.SliceDataset]:
  """Reads a prepared dataset into memory: {split: SliceDataset}.

  Site, modality and patient vocabularies are shared by all splits and come
  from the stats file written by `data_prep.prepare` (so site order is the
  one of the preparation, not of the records).
  """
  stats = read_stats(name, data_dir)
  sources = data_source(name, data_dir)
  site_names = tuple(stats["site_names"])
  site_modalities = tuple(stats["site_modalities"])
  modality_names = tuple(sorted(set(site_modalities)))
  class_names = tuple(stats["class_names"])
  wanted = list(splits or sources)
  for split in wanted:
    if split not in sources:
      raise KeyError(f"dataset {name!r} has no split {split!r}; it has "
                     f"{sorted(sources)}.")
  records = {split: sources[split].__getitems__(
      list(range(len(sources[split])))) for split in wanted}
  # Patient ids are ranks of the sorted names, so every reader (in memory or
  # streaming) numbers patients, and hence splits them, the same way.
  names = tuple(sorted({text(r["patient"]) for rs in records.values()
                        for r in rs}))
  patient_id = {p: i for i, p in enumerate(names)}
  out = {}
  for split, rs in records.items():
    site = np.array([site_names.index(text(r["site"])) for r in rs], np.int32)
    out[split] = dataset_lib.SliceDataset(
        image=np.stack([r["image"] for r in rs]).astype(np.float32),
        label=np.stack([r["label"] for r in rs]).astype(np.uint8),
        site=site,
        patient=np.array([patient_id[text(r["patient"])] for r in rs],
                         np.int32),
        modality=np.array([modality_names.index(site_modalities[s])
                           for s in site], np.int32),
        slice_index=np.array([int(r["slice_index"]) for r in rs], np.int32),
        site_names=site_names, site_modalities=site_modalities,
        modality_names=modality_names, class_names=class_names,
        patient_names=names,
    )
  return out
