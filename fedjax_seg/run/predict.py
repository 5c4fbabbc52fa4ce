"""Segment new NIfTI scans with the model of a finished (or checkpointed) run.

The library behind `python -m experiments.predict`. `load_trained(workdir)`
restores a run's evaluated model (the debiased EMA with `--ema_decay`, else
the global model; for FedBN one site's own normalisation parameters) from
its orbax checkpoint, with the preprocessing its training data went through:

* a run on a prepared dataset: the `data_prep.prepare` settings stored in
  the dataset's stats file (reorientation to RAS, `target_spacing`,
  normalisation by modality with its CT window and percentiles,
  `slice_axis`, crop/pad to `image_size`, `label_map` for labels);
* a run on the built-in synthetic data: the settings under which
  `data_prep.export_synthetic` + `data_prep.prepare` give back its slices
  (no resampling, normalisation by modality, crop/pad to `--image_size`).

`predict_volume` applies the forward preprocessing, segments every slice
(2D models, in batches) or the volume in tiles of the training depth (3D
models), and maps the class probabilities back through crop/pad,
resampling and reorientation onto the input's voxel grid, so the label map
has the input's shape and affine. `predict_cases` does this for many cases,
writes label maps (uint8) and optional probability maps atomically, and
with labels scores each case (Dice, IoU, HD95 in mm on the input's grid).

Privacy: the parameters are the run's released model (DP output of
training when the run was private), so predictions are post-processing and
cost no privacy. A FedBN site's normalisation parameters were trained at
that site only, by its noised local steps.
"""

import dataclasses
import functools
import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import tqdm

from fedjax_seg.run import artifacts
from fedjax_seg.run import config as config_lib
from fedjax_seg.run import scans
from fedjax_seg.run.scans import load_image
from fedjax_seg.run.scans import preprocess
from fedjax_seg.run.scans import restore_geometry
from fedjax_seg.run import setup as setup_lib
from fedjax_seg import models
from fedjax_seg.data import nifti
from fedjax_seg.data import synthetic
from fedjax_seg.data import tfds_io
from fedjax_seg.federated import client as client_lib

# The scans' side of prediction, re-exported (one API for a user).
Case, find_cases = scans.Case, scans.find_cases
LABEL_MAP_SUFFIX = "_seg.nii.gz"
PROBABILITIES_SUFFIX = "_probabilities.nii.gz"
METRICS_FILE = "metrics.json"


# Bad input to prediction (a run directory, a scan, a flag); the message
# names the file or flag.
PredictError = artifacts.RunDirError


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A run's model, ready to segment volumes.

  Attributes:
    workdir: the run's --workdir.
    round_index: rounds completed by the restored checkpoint.
    rounds_planned: the run's --rounds.
    config: the run's `ExperimentConfig`.
    model: the U-Net.
    params: the parameters applied (for FedBN: with `site`'s normalisation
      parameters).
    site: the FedBN site whose normalisation parameters are used, or None.
    preprocess: how volumes are turned into model inputs (see module doc).
    class_names: [K] output classes (0 background).
    site_names, site_modalities: the run's training sites.
    source: where `preprocess` came from (for the record).
    privacy: what the model's release is covered by (from report.json when
      the run finished: epsilon label and max), for the output's record.
  """

  workdir: pathlib.Path
  round_index: int
  rounds_planned: int
  config: config_lib.ExperimentConfig
  model: models.SegmentationModel
  params: Any
  site: str | None
  preprocess: nifti.PreprocessConfig
  class_names: tuple[str, ...]
  site_names: tuple[str, ...]
  site_modalities: tuple[str, ...]
  source: str
  privacy: dict

  @functools.cached_property
  def softmax(self) -> Callable:
    """Jitted `(params, x [N, ...]) -> class probabilities [N, ..., K]`
    (compiled once per input shape)."""
    model = self.model
    return jax.jit(lambda p, x: jax.nn.softmax(
        model.apply(p, x).astype(jnp.float32), axis=-1))

  @property
  def spatial_dims(self) -> int:
    return self.model.config.spatial_dims

  @property
  def in_channels(self) -> int:
    return self.model.config.in_channels

  @property
  def num_classes(self) -> int:
    return self.model.config.num_classes

  def modality_of(self, modality: str | None) -> str:
    """The modality a case is normalised as: its own (a CSV column or
    --modality), else the FedBN --site's, else the run's only one.

    Raises:
      PredictError: for a modality whose normalisation none of the run's
        sites had, or none given when the run's sites differ.
    """
    if self.preprocess.normalization is not None:
      return modality or self.preprocess.normalization  # Fixed scheme.
    schemes = {nifti.normalization_for(m): m for m in self.site_modalities}
    if modality:
      if nifti.normalization_for(modality) not in schemes:
        trained_on = sorted(set(self.site_modalities))
        raise PredictError(
            f"modality {modality!r}: the run trained on {trained_on} only; "
            f"its inputs were normalised as {sorted(schemes)}, not as "
            f"{modality!r} would be.")
      return modality
    if self.site is not None:
      return self.site_modalities[self.site_names.index(self.site)]
    if len(schemes) == 1:
      return next(iter(schemes.values()))
    raise PredictError(
        f"--modality: the run's sites have several modalities "
        f"{sorted(set(self.site_modalities))}, so a scan's normalisation "
        "depends on its modality: give --modality, or a CSV with a modality "
        "column.")


# -- the run ------------------------------------------------------------------


def _data_description(config: config_lib.ExperimentConfig,
                      data_dir: str | None):
  """(preprocess, class names, site names, site modalities, source)."""
  d = config.data
  if d.dataset == "synthetic":
    if d.num_sites is not None:
      from fedjax_seg.data import consortium  # pylint: disable=g-import-not-at-top
      # Site k's profile is drawn from (data seed, k), as the run drew it.
      specs = consortium.Consortium(num_sites=d.num_sites,
                                    seed=config.data_seed).specs
    else:
      specs = synthetic.SyntheticConfig().sites
    prep = nifti.PreprocessConfig(image_size=(d.image_size, d.image_size),
                                  target_spacing=None)
    return (prep, synthetic.CLASS_NAMES, tuple(s.name for s in specs),
            tuple(s.modality for s in specs),
            "the built-in synthetic data (as data_prep.export_synthetic + "
            f"data_prep.prepare at {d.image_size}x{d.image_size} give it)")
  directory = data_dir or d.data_dir
  try:
    stats = tfds_io.read_stats(d.dataset, directory)
  except FileNotFoundError as e:
    raise PredictError(
        f"the run's dataset {d.dataset!r} is not in {directory} (its stats "
        "file holds the preprocessing to repeat); pass --data_dir=<the "
        "folder data_prep.prepare wrote it to>.") from e
  c = dict(stats["settings"]["config"])
  for key in ("image_size", "target_spacing", "ct_window", "percentiles"):
    if c.get(key) is not None:
      c[key] = tuple(c[key])
  if c.get("label_map"):
    c["label_map"] = {int(k): int(v) for k, v in c["label_map"].items()}
  prep = nifti.PreprocessConfig(**c)
  modality = stats["settings"].get("modality")
  return (prep, tuple(stats["class_names"]), tuple(stats["site_names"]),
          tuple(stats["site_modalities"]),
          f"dataset {d.dataset!r} prepared by data_prep.prepare "
          f"({pathlib.Path(directory) / d.dataset}"
          f"{', modality ' + modality if modality else ''})")


def load_trained(workdir: str | os.PathLike, round_index: int | None = None,
                 site: str | None = None,
                 data_dir: str | None = None) -> TrainedModel:
  """Restores a run's evaluated model and its preprocessing.

  Args:
    workdir: the run's --workdir (with `checkpoints/`).
    round_index: the checkpoint after this many rounds (default: the
      latest); a run keeps its last two checkpoints.
    site: for FedBN runs (required there), the site whose normalisation
      parameters are used; refused for other runs.
    data_dir: where the run's prepared dataset is now (default: the run's
      --data_dir).

  Raises:
    PredictError: naming the flag, for a workdir without a finished
      checkpoint, an unknown round or site, FedBN without --site.
  """
  from fedjax_seg.run import config_flags  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  state, meta, step = artifacts.restore(workdir, round_index)
  try:
    config = config_flags.config_from_dict(meta["config"])
  except (config_lib.ConfigError, KeyError, TypeError) as e:
    raise PredictError(f"--workdir={workdir}: its checkpoint's configuration "
                       f"does not load ({e}).") from e
  prep, class_names, site_names, modalities, source = _data_description(
      config, data_dir)
  # Channels, classes and dimensions from the stored parameters.
  stored = state["server"]["params"]
  head = np.asarray(stored["head"]["kernel"])
  first = np.asarray(stored["down"]["0"]["conv1"]["kernel"])
  spatial_dims = first.ndim - 2
  model = models.SegmentationModel(setup_lib.unet_config(
      config.model,
      in_channels=int(first.shape[-2]), num_classes=int(head.shape[-1]),
      spatial_dims=spatial_dims))
  shape = (1,) + (16,) * spatial_dims + (int(first.shape[-2]),)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), shape))
  what = f"--workdir={workdir} checkpoint {step}"
  fedbn = config.federated.algorithm == "fedbn"
  if fedbn and site is None:
    raise PredictError(
        f"--site: {workdir} is a FedBN run, whose sites keep their own "
        "normalisation parameters; name the site whose parameters to use "
        f"(one of {list(site_names)}).")
  if site is not None and not fedbn:
    raise PredictError(f"--site={site}: only for FedBN runs (this run's "
                       f"algorithm is {config.federated.algorithm}).")
  if site is not None and site not in site_names:
    raise PredictError(f"--site={site}: not a site of this run; its sites "
                       f"are {list(site_names)}.")
  run_sites = list(meta.get("charged_rounds", {}))
  if run_sites and run_sites != list(site_names):
    raise PredictError(
        f"--data_dir: the dataset found there lists sites {list(site_names)},"
        f" the run trained on {run_sites} (in that order); point --data_dir "
        "at the dataset the run was prepared from.")
  if len(class_names) != model.config.num_classes:
    raise PredictError(
        f"--data_dir: the dataset found there has {len(class_names)} classes "
        f"{list(class_names)}, the run's model {model.config.num_classes}.")
  params, _ = artifacts.evaluated_from_checkpoint(
      state, meta, config.federated.ema_decay, template, what)
  if fedbn:
    if site in meta.get("charged_rounds", {}) and not meta[
        "charged_rounds"][site]:
      logging.warning("--site=%s never trained in this run: its "
                      "normalisation parameters are the initial ones.", site)
    k = site_names.index(site)
    local = jax.tree.map(lambda x: x[k], artifacts.shaped_like(
        template, state["sites"]["local_params"], what))
    params = client_lib.merge_local(params, local,
                                    models.norm_param_mask(template))
  privacy_record = {"dp": config.privacy.enabled}
  report_path = workdir / artifacts.REPORT
  if report_path.is_file():
    p = json.loads(report_path.read_text()).get("privacy", {})
    if p.get("enabled"):
      privacy_record.update(epsilon_label=p.get("epsilon_label"),
                            epsilon_max=p.get("epsilon_max"),
                            delta=p.get("delta"))
  return TrainedModel(
      workdir=workdir, round_index=step, rounds_planned=config.federated.rounds,
      config=config, model=model,
      params=jax.tree.map(jnp.asarray, params), site=site, preprocess=prep,
      class_names=tuple(class_names), site_names=tuple(site_names),
      site_modalities=tuple(modalities), source=source,
      privacy=privacy_record)


def _softmax_in_batches(apply: Callable, params, inputs: np.ndarray,
                        batch_size: int) -> np.ndarray:
  """[N, ...] -> [N, ..., K] probabilities, in batches of `batch_size` (the
  last one zero-padded, so every call has one shape)."""
  out = []
  for start in range(0, inputs.shape[0], batch_size):
    chunk = inputs[start:start + batch_size]
    n = chunk.shape[0]
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros(
          (batch_size - n,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(apply(params, jnp.asarray(chunk)))[:n])
  return np.concatenate(out)


def _batch_size(slices: int, spatial_shape, batch_size: int | None) -> int:
  """The given size, else the evaluation batch for the image size, capped
  at the next power of two above the volume's slices (few shapes, hence few
  compilations, and little padding for short volumes)."""
  from fedjax_seg.segmentation import evaluation  # pylint: disable=g-import-not-at-top
  if batch_size:
    return batch_size
  return min(evaluation.evaluation_batch_size(spatial_shape),
             1 << max(0, (slices - 1).bit_length()))


def segment(trained: TrainedModel, slices: np.ndarray,
            batch_size: int | None = None) -> np.ndarray:
  """Class probabilities [D, H, W, K] of preprocessed slices [D, H, W, C]:
  slice by slice for 2D models (in batches), in tiles of the training depth
  along D for 3D models (the last tile zero-padded)."""
  if trained.spatial_dims == 2:
    return _softmax_in_batches(
        trained.softmax, trained.params, slices,
        _batch_size(slices.shape[0], slices.shape[1:3], batch_size))
  depth = trained.config.data.num_slices
  tiles = -(-slices.shape[0] // depth)
  padded = np.zeros((tiles * depth,) + slices.shape[1:], slices.dtype)
  padded[:slices.shape[0]] = slices
  volumes = padded.reshape((tiles, depth) + slices.shape[1:])
  probs = _softmax_in_batches(trained.softmax, trained.params, volumes, 1)
  return probs.reshape((tiles * depth,) + probs.shape[2:])[:slices.shape[0]]


def predict_volume(trained: TrainedModel, img: nib.Nifti1Image,
                   data: np.ndarray, modality: str | None = None,
                   batch_size: int | None = None) -> np.ndarray:
  """Class probabilities [X, Y, Z, K] float32 on `img`'s voxel grid."""
  slices, geometry = preprocess(img, data, trained.preprocess,
                                trained.modality_of(modality))
  probs = segment(trained, slices, batch_size)
  return restore_geometry(probs, geometry, trained.preprocess).astype(
      np.float32)


def predict_cases(trained: TrainedModel, cases: Sequence[Case],
                  output_dir: str | os.PathLike, probabilities: bool = False,
                  batch_size: int | None = None, progress: bool = True,
                  modality: str | None = None) -> dict:
  """Segments every case, writes `<case>_seg.nii.gz` (uint8 labels on the
  input's grid, its affine and header), with `probabilities` also
  `<case>_probabilities.nii.gz` (float32 [X, Y, Z, K]), and, when any case
  has a label, `metrics.json`. All or nothing: the files are written to a
  temporary folder in `output_dir` and moved into place once every case
  succeeded, so a failure leaves no output behind.

  Returns:
    The summary: {"cases", "seconds", "dice_mean_foreground" (None without
    labels), "metrics" (per case, when labelled), "outputs"}.

  Raises:
    PredictError: naming the file, for any case that cannot be read or does
      not fit the model.
  """
  start = time.perf_counter()
  cases = [dataclasses.replace(c, modality=c.modality or modality)
           for c in cases]
  for case in cases:  # Refuse an unknown or ambiguous modality up front.
    try:
      trained.modality_of(case.modality)
    except PredictError as e:
      raise PredictError(f"{case.image}: {e}") from e
  if trained.config.data.dataset == "synthetic" and any(
      nifti.normalization_for(trained.modality_of(c.modality)) == "MRI"
      for c in cases):
    logging.warning(
        "segmenting MRI with a model trained on the built-in synthetic "
        "data: prepare's MRI z-score (over non-zero voxels) is not the "
        "generator's (over the body), so these inputs differ from what the "
        "model was trained on. Train on a prepared dataset to segment MRI.")
  output_dir = pathlib.Path(output_dir)
  if output_dir.exists() and not output_dir.is_dir():
    raise PredictError(f"--output_dir={output_dir}: exists and is not a "
                       "folder.")
  # Staged next to --output_dir (same file system: the moves are renames),
  # which is made only when every case has succeeded.
  output_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(
      dir=output_dir.absolute().parent,
      prefix=f".{output_dir.name}.predict-incomplete-"))
  per_case, outputs = {}, []
  try:
    for case in tqdm.tqdm(cases, desc="segmenting", unit="case",
                          disable=not progress):
      try:
        img, data = load_image(case.image, trained.in_channels)
        label = (scans.read_label(case, img, trained.preprocess,
                             trained.num_classes) if case.label else None)
        probs = predict_volume(trained, img, data, case.modality, batch_size)
      except PredictError as e:
        if case.image in str(e) or (case.label or "\0") in str(e):
          raise
        raise PredictError(f"{case.image}: {e}") from e
      except Exception as e:  # Name the file whatever went wrong.
        raise PredictError(f"{case.image}: {type(e).__name__}: {e}") from e
      pred = np.argmax(probs, axis=-1).astype(np.uint8)
      names = [f"{case.case_id}{LABEL_MAP_SUFFIX}"]
      nib.save(scans.output_image(pred, img, np.uint8), str(staging / names[0]))
      if probabilities:
        names.append(f"{case.case_id}{PROBABILITIES_SUFFIX}")
        nib.save(scans.output_image(probs, img, np.float32),
                 str(staging / names[1]))
      outputs += names
      if label is not None:
        per_case[case.case_id] = {
            "image": case.image, "label": case.label,
            **scans.score(pred, label, np.abs(img.header.get_zooms()[:3]),
                    trained.class_names)}
    seconds = time.perf_counter() - start
    summary = {"cases": len(cases), "seconds": seconds,
               "dice_mean_foreground": (
                   float(np.mean([m["dice_mean_foreground"]
                                  for m in per_case.values()]))
                   if per_case else None)}
    if per_case:
      record = {
          **summary, "class_names": list(trained.class_names),
          "labelled_cases": len(per_case),
          "mean": {
              key: {c: float(np.mean([m[key][c] for m in per_case.values()]))
                    for c in next(iter(per_case.values()))[key]}
              for key in ("dice", "iou", "hd95_mm")},
          "cases_metrics": per_case, "model": _model_record(trained)}
      (staging / METRICS_FILE).write_text(json.dumps(record, indent=1))
      outputs.append(METRICS_FILE)
    output_dir.mkdir(parents=True, exist_ok=True)
    taken = [n for n in outputs if (output_dir / n).is_dir()]
    if taken:
      raise PredictError(f"--output_dir={output_dir}: {taken[0]} is a "
                         "folder there; nothing was written.")
    stale = output_dir / METRICS_FILE
    if not per_case and stale.is_file():
      # It scored an earlier prediction, not these label maps.
      stale.unlink()
      logging.warning("removed %s: it described an earlier prediction",
                      stale)
    for name in outputs:  # Everything succeeded: move into place.
      os.replace(staging / name, output_dir / name)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return {**summary, "metrics": per_case, "outputs": outputs}


def _model_record(trained: TrainedModel) -> dict:
  return {"workdir": str(trained.workdir), "round": trained.round_index,
          "rounds_planned": trained.rounds_planned, "site": trained.site,
          "preprocessing": source_record(trained),
          "privacy": {**trained.privacy, "predictions": (
              "post-processing of the released model: no privacy cost"
              if trained.privacy["dp"] else
              "the run was NOT PRIVATE: the model carries no guarantee")}}


def source_record(trained: TrainedModel) -> dict:
  return {"from": trained.source,
          "settings": json.loads(json.dumps(
              dataclasses.asdict(trained.preprocess), default=str))}
