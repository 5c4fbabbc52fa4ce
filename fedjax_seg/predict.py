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
from scipy import ndimage
import tqdm

from fedjax_seg import config as config_lib
from fedjax_seg import metrics
from fedjax_seg import models
from fedjax_seg.data import nifti
from fedjax_seg.data import synthetic
from fedjax_seg.data import tfds_io
from fedjax_seg.federated import client as client_lib

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CHECKPOINTS = "checkpoints"
LABEL_MAP_SUFFIX = "_seg.nii.gz"
PROBABILITIES_SUFFIX = "_probabilities.nii.gz"
METRICS_FILE = "metrics.json"


class PredictError(ValueError):
  """Bad input to prediction; the message names the file or flag."""


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


def _checkpoint_manager(workdir: pathlib.Path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = (workdir / CHECKPOINTS).absolute()
  if not directory.is_dir():
    raise PredictError(f"--workdir={workdir}: no {CHECKPOINTS}/ there; give "
                       "the --workdir of a simulate run that completed at "
                       "least one checkpointed round.")
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # Orbax warns that read-only is so.
  try:
    return ocp, ocp.CheckpointManager(directory, options=(
        ocp.CheckpointManagerOptions(read_only=True, create=False,
                                     save_interval_steps=0)))
  finally:
    logging.set_verbosity(level)


def _restore(workdir: pathlib.Path, round_index: int | None):
  """(state as nested dicts of numpy arrays, meta) of a committed
  checkpoint: the latest, or that of `round_index` rounds."""
  ocp, manager = _checkpoint_manager(workdir)
  steps = sorted(manager.all_steps())
  if not steps:
    raise PredictError(f"--workdir={workdir}: no finished checkpoint in "
                       f"{CHECKPOINTS}/ (the run has not completed a "
                       "checkpointed round, or its only save was cut off).")
  step = steps[-1] if round_index is None else round_index
  if step not in steps:
    raise PredictError(f"--round={round_index}: {workdir}/{CHECKPOINTS} has "
                       f"checkpoints of rounds {steps} only.")
  level = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO.
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  except Exception as e:  # Orbax raises many types for damaged files.
    raise PredictError(f"--workdir={workdir}: checkpoint {step} does not "
                       f"restore ({type(e).__name__}: {e}).") from e
  finally:
    logging.set_verbosity(level)
  return restored["state"], restored["meta"], step


def _evaluated(state, meta, config, template, what: str):
  """(the evaluated global model in `template`'s structure, rounds done):
  the debiased EMA with --ema_decay after a round, else the last model."""
  from fedjax_seg import experiment  # pylint: disable=g-import-not-at-top
  decay, rounds = config.federated.ema_decay, int(meta["rounds_completed"])
  if decay and rounds and "averaged" not in state:
    raise PredictError(f"{what}: the run averages its models (--ema_decay="
                       f"{decay}) but the checkpoint holds no average.")
  if decay and rounds:
    return experiment.debiased_average(
        _like(template, state["averaged"], what), decay, rounds), rounds
  return _like(template, state["server"]["params"], what), rounds


def restore_evaluated_params(workdir: pathlib.Path, config, like):
  """(the evaluated global model of the run in `workdir`, shaped like
  `like` (numpy leaves), rounds done) from its latest checkpoint, without
  setting the run up (its data, trainer and noise root are not needed).
  Raises PredictError naming what is missing or does not match."""
  state, meta, step = _restore(workdir, None)
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          like)
  return _evaluated(state, meta, config, template,
                    f"--workdir={workdir} checkpoint {step}")


def _key_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _like(template, restored, what: str):
  """`restored` (nested dicts as orbax gives them back without a target)
  in the structure of `template`, matched leaf by leaf by key path."""
  flat = {_key_str(p): np.asarray(v) for p, v in
          jax.tree_util.tree_flatten_with_path(restored)[0]}

  def leaf(path, t):
    key = _key_str(path)
    if key not in flat:
      raise PredictError(f"{what}: the checkpoint has no parameter {key}.")
    value = flat[key]  # FedBN's site-local leaves have a site axis first.
    if value.shape[value.ndim - len(t.shape):] != tuple(t.shape):
      raise PredictError(f"{what}: parameter {key} has shape "
                         f"{flat[key].shape}, the model wants {t.shape}.")
    return value

  return jax.tree_util.tree_map_with_path(leaf, template)


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
  from fedjax_seg import config_flags  # pylint: disable=g-import-not-at-top
  from fedjax_seg import experiment  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  state, meta, step = _restore(workdir, round_index)
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
  model = models.SegmentationModel(config.model.unet_config(
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
  params, _ = _evaluated(state, meta, config, template, what)
  if fedbn:
    if site in meta.get("charged_rounds", {}) and not meta[
        "charged_rounds"][site]:
      logging.warning("--site=%s never trained in this run: its "
                      "normalisation parameters are the initial ones.", site)
    k = site_names.index(site)
    local = jax.tree.map(lambda x: x[k], _like(
        template, state["sites"]["local_params"], what))
    params = client_lib.merge_local(params, local,
                                    models.norm_param_mask(template))
  privacy_record = {"dp": config.privacy.enabled}
  report_path = workdir / experiment.REPORT
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


# -- one volume -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Geometry:
  """What the forward preprocessing did to a volume, to undo it.

  Attributes:
    shape: the file's spatial shape [3].
    orientation: the file's axis orientation (nibabel ornt) relative to RAS.
    canonical_shape: spatial shape after reorientation to RAS.
    sliced_shape: [D, H, W] slices before crop/pad.
  """

  shape: tuple[int, ...]
  orientation: np.ndarray
  canonical_shape: tuple[int, ...]
  sliced_shape: tuple[int, ...]


def load_image(path: str | os.PathLike, in_channels: int
               ) -> tuple[nib.Nifti1Image, np.ndarray]:
  """The NIfTI image and its data [X, Y, Z, C] float64 (file orientation).

  Raises:
    PredictError: naming the file, if it is unreadable, not 3D/4D, a 4D
      image where the model wants one channel, a channel count other than
      the model's, or holds NaN/inf.
  """
  path = str(path)
  if not os.path.isfile(path):
    raise PredictError(f"{path}: file not found.")
  try:
    img = nib.load(path)
    data = np.asarray(img.get_fdata(dtype=np.float64))
  except Exception as e:  # nibabel raises many types for corrupt files.
    raise PredictError(f"{path}: not a readable NIfTI file "
                       f"({type(e).__name__}: {e}).") from e
  if data.ndim == 4 and in_channels == 1 and data.shape[-1] != 1:
    raise PredictError(f"{path}: a 4D image (shape {data.shape}) where the "
                       "model wants a 3D volume (one channel).")
  if data.ndim not in (3, 4) or data.size == 0:
    raise PredictError(f"{path}: expected a 3D volume (or 4D with channels "
                       f"last), got shape {data.shape}.")
  data = data if data.ndim == 4 else data[..., None]
  if data.shape[-1] != in_channels:
    raise PredictError(f"{path}: {data.shape[-1]} channel(s), the model "
                       f"takes {in_channels}.")
  if not np.isfinite(data).all():
    raise PredictError(f"{path}: {int((~np.isfinite(data)).sum())} voxels "
                       "are NaN or infinite.")
  return img, data


def preprocess(img: nib.Nifti1Image, data: np.ndarray,
               prep: nifti.PreprocessConfig, modality: str
               ) -> tuple[np.ndarray, Geometry]:
  """`data_prep.prepare`'s preprocessing of one image, all slices kept.

  Args:
    img: the NIfTI image (for its affine and zooms).
    data: its data [X, Y, Z, C] in the file's orientation.
    prep: the run's preprocessing settings.
    modality: the case's modality (its normalisation scheme).

  Returns:
    (slices float32 [D, H, W, C] along `prep.slice_axis`, Geometry).
  """
  orientation = nib.orientations.io_orientation(img.affine)
  # As `nifti.read_nifti` reads a file: nibabel's closest canonical image,
  # whose voxel sizes come from the header for a file already in RAS and
  # from the reoriented affine otherwise (they differ when a tool wrote a
  # pixdim that disagrees with the sform).
  canonical_img = nib.as_closest_canonical(
      img.__class__(data, img.affine, img.header))
  canonical = np.asarray(canonical_img.dataobj, np.float64)
  canonical_zooms = np.asarray(canonical_img.header.get_zooms()[:3],
                               np.float64)
  if prep.target_spacing is not None:
    factors = canonical_zooms / np.asarray(prep.target_spacing, np.float64)
    if np.any(np.round(np.asarray(canonical.shape[:3]) * factors) < 1):
      raise PredictError(
          f"voxels of {tuple(canonical_zooms)} mm over a grid of "
          f"{canonical.shape[:3]} leave an axis with no voxel at the run's "
          f"target spacing {prep.target_spacing} mm.")
  image, sliced_shape = nifti.preprocess_image(
      canonical, canonical_zooms, prep,
      prep.normalization or nifti.normalization_for(modality))
  geometry = Geometry(
      shape=tuple(data.shape[:3]), orientation=orientation,
      canonical_shape=tuple(canonical.shape[:3]),
      sliced_shape=sliced_shape)
  return image, geometry


def _uncrop_or_pad(probs: np.ndarray, sliced_shape: Sequence[int]
                   ) -> np.ndarray:
  """Inverse of `nifti._crop_or_pad` on axes 1, 2 of [D, H, W, K]
  probabilities: padding cut off, cropped-away borders back as background
  (probability 1 of class 0; the model never saw them)."""
  for axis in (1, 2):
    current, original = probs.shape[axis], sliced_shape[axis]
    if original < current:  # Was padded: take the centre back.
      start = (current - original) // 2
      probs = np.take(probs, np.arange(start, start + original), axis=axis)
    elif original > current:  # Was cropped: restore the borders.
      before = (original - current) // 2
      pad_shape = list(probs.shape)
      pad_shape[axis] = before
      head = np.zeros(pad_shape, probs.dtype)
      head[..., 0] = 1.0
      pad_shape[axis] = original - current - before
      tail = np.zeros(pad_shape, probs.dtype)
      tail[..., 0] = 1.0
      probs = np.concatenate([head, probs, tail], axis=axis)
  return probs


def restore_geometry(probs: np.ndarray, geometry: Geometry,
                     prep: nifti.PreprocessConfig) -> np.ndarray:
  """Class probabilities [D, H, W, K] of the preprocessed slices ->
  [X, Y, Z, K] on the input file's voxel grid (crop/pad, slicing,
  resampling and reorientation undone; linear interpolation of the
  probabilities when resampling back)."""
  probs = _uncrop_or_pad(probs, geometry.sliced_shape)
  probs = np.moveaxis(probs, 0, prep.slice_axis)
  if tuple(probs.shape[:3]) != geometry.canonical_shape:
    # ndimage.zoom maps corner voxel centres onto each other (grid_mode
    # False), as the forward resampling did, so this is its inverse map.
    factors = [c / r for c, r in zip(geometry.canonical_shape,
                                     probs.shape[:3])]
    # mode="nearest": with the default constant mode the last output
    # voxel, a rounding error past the input's edge, would read zeros.
    probs = np.stack([ndimage.zoom(probs[..., k], factors, order=1,
                                   mode="nearest")
                      for k in range(probs.shape[-1])], axis=-1)
    if tuple(probs.shape[:3]) != geometry.canonical_shape:
      raise AssertionError(f"resampled back to {probs.shape[:3]}, expected "
                           f"{geometry.canonical_shape}.")
  back = nib.orientations.ornt_transform(
      nib.orientations.axcodes2ornt(("R", "A", "S")), geometry.orientation)
  return nib.orientations.apply_orientation(probs, back)


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
  from fedjax_seg import centralized  # pylint: disable=g-import-not-at-top
  if batch_size:
    return batch_size
  return min(centralized.evaluation_batch_size(spatial_shape),
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


# -- cases ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  """One scan to segment: its id (output file stem), image, optional label
  and modality."""

  case_id: str
  image: str
  label: str | None = None
  modality: str | None = None


def _stem(path: pathlib.Path) -> str:
  name = path.name
  for suffix in NIFTI_SUFFIXES:
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return path.stem


def _is_nifti(path: pathlib.Path) -> bool:
  return path.is_file() and path.name.endswith(NIFTI_SUFFIXES)


def find_cases(input_path: str | os.PathLike) -> list[Case]:
  """The cases of --input: one NIfTI file, a folder of them, an MSD task
  folder (imagesTr with labelsTr, and imagesTs), or a CSV with an image
  column (optional label, modality and case columns; paths relative to the
  CSV).

  Raises:
    PredictError: naming the path, for a missing input, a CSV without an
      image column, a listed file that does not exist, an empty input, or
      two cases with the same id.
  """
  path = pathlib.Path(input_path)
  if not path.exists():
    raise PredictError(f"--input={path}: not found.")
  if path.is_file() and path.suffix.lower() == ".csv":
    cases = _csv_cases(path)
  elif path.is_file():
    if not _is_nifti(path):
      raise PredictError(f"--input={path}: not a .nii/.nii.gz file, a "
                         "folder or a .csv.")
    cases = [Case(_stem(path), str(path))]
  elif (path / "dataset.json").is_file() or (path / "imagesTr").is_dir():
    cases = []
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", None)):
      for image in sorted(p for p in (path / images).glob("*")
                          if _is_nifti(p)):
        if image.name.startswith("._"):
          continue  # macOS resource forks ship inside MSD archives.
        label = path / labels / image.name if labels else None
        cases.append(Case(_stem(image), str(image),
                          str(label) if label and label.is_file() else None))
  else:
    cases = [Case(_stem(p), str(p)) for p in sorted(path.iterdir())
             if _is_nifti(p)]
  if not cases:
    raise PredictError(f"--input={path}: no NIfTI scan there.")
  seen = {}
  for case in cases:
    if case.case_id in seen:
      raise PredictError(f"--input={path}: two scans would be written as "
                         f"{case.case_id!r} ({seen[case.case_id]} and "
                         f"{case.image}); give them distinct names (or a "
                         "CSV case column).")
    seen[case.case_id] = case.image
  return cases


def _csv_cases(path: pathlib.Path) -> list[Case]:
  import csv  # pylint: disable=g-import-not-at-top
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  if not rows:
    raise PredictError(f"--input={path}: no cases (empty CSV).")
  if "image" not in rows[0]:
    raise PredictError(f"--input={path}: needs an image column (optional: "
                       "label, modality, case).")
  cases = []
  for line, row in enumerate(rows, start=2):
    image = path.parent / (row["image"] or "").strip()
    if not _is_nifti(image):
      raise PredictError(f"{path}:{line}: {image} is not a NIfTI file.")
    label = (row.get("label") or "").strip()
    label = str(path.parent / label) if label else None
    if label is not None and not os.path.isfile(label):
      raise PredictError(f"{path}:{line}: {label} not found.")
    case_id = (row.get("case") or "").strip() or _stem(image)
    cases.append(Case(case_id, str(image), label,
                      (row.get("modality") or "").strip() or None))
  return cases


def _read_label(case: Case, img: nib.Nifti1Image,
                prep: nifti.PreprocessConfig, num_classes: int) -> np.ndarray:
  """The case's label volume on the image's grid, remapped like the
  training labels (`label_map`); PredictError naming the file if it does
  not fit."""
  try:
    label_img = nib.load(case.label)
    label = np.asarray(label_img.get_fdata(dtype=np.float64))
  except Exception as e:  # nibabel raises many types for corrupt files.
    raise PredictError(f"{case.label}: not a readable NIfTI file "
                       f"({type(e).__name__}: {e}).") from e
  try:
    nifti.check_label(nifti.CaseRef(case.image, case.label, case.case_id),
                      img.shape, img.affine, label, label_img.affine)
  except nifti.DataError as e:
    raise PredictError(str(e)) from e
  label = nifti.remap_labels(label.astype(np.int64), prep.label_map)
  if label.min() < 0 or label.max() >= num_classes:
    raise PredictError(f"{case.label}: label values {sorted(np.unique(label))}"
                       f" outside the model's classes 0..{num_classes - 1}.")
  return label


def score(pred: np.ndarray, label: np.ndarray, zooms: Sequence[float],
          class_names: Sequence[str]) -> dict:
  """Dice, IoU and HD95 (mm) per class of one case on its voxel grid.

  A class absent from both prediction and label scores Dice/IoU 1.0 and
  HD95 0 (as in training's metrics); HD95 with exactly one of them empty is
  the volume's diagonal in mm.
  """
  out = {"dice": {}, "iou": {}, "hd95_mm": {}}
  for k, name in enumerate(class_names):
    p, t = pred == k, label == k
    inter, ps, ts = int(np.sum(p & t)), int(p.sum()), int(t.sum())
    out["dice"][name] = 1.0 if ps + ts == 0 else 2 * inter / (ps + ts)
    union = ps + ts - inter
    out["iou"][name] = 1.0 if union == 0 else inter / union
    if k:  # HD95 of the foreground classes.
      out["hd95_mm"][name] = metrics.hd95(p, t, zooms)
  fg = list(class_names[1:])
  out["dice_mean_foreground"] = float(np.mean([out["dice"][c] for c in fg]))
  return out


def _output_image(data: np.ndarray, img: nib.Nifti1Image, dtype
                  ) -> nib.Nifti1Image:
  """`data` with the input's affine and header (its dtype and scaling
  replaced: a label map is stored as plain uint8)."""
  header = img.header.copy()
  header.set_data_dtype(dtype)
  out = nib.Nifti1Image(np.asarray(data, dtype), img.affine, header)
  out.header.set_slope_inter(1.0, 0.0)
  out.header["cal_min"], out.header["cal_max"] = 0, 0
  return out


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
        label = (_read_label(case, img, trained.preprocess,
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
      nib.save(_output_image(pred, img, np.uint8), str(staging / names[0]))
      if probabilities:
        names.append(f"{case.case_id}{PROBABILITIES_SUFFIX}")
        nib.save(_output_image(probs, img, np.float32),
                 str(staging / names[1]))
      outputs += names
      if label is not None:
        per_case[case.case_id] = {
            "image": case.image, "label": case.label,
            **score(pred, label, np.abs(img.header.get_zooms()[:3]),
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
