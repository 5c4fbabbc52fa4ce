"""NIfTI cases -> a TFDS slice dataset, atomically and idempotently.

The library behind `python -m data_prep.prepare`. The dataset is built in a
temporary folder next to the output and renamed into place only when every
case has been read, checked and written, so a crash or a bad file leaves no
half-written dataset. A fingerprint of the inputs (paths, sizes, modification
times) and of the settings is stored in the stats file; preparing again with
the same inputs and settings does nothing. The stats file also holds a
random `preparation_id`, drawn when the dataset is written: runs' reports
publish it to name the preparation they trained on (it is no function of the
data, unlike the fingerprint, which stays in the data directory).
"""

import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Sequence
import uuid

from absl import logging
import numpy as np
import tqdm

from fedjax_seg.data import nifti
from fedjax_seg.data import partition
from fedjax_seg.data import tfds_io

SITE_RULES = ("csv", "hash", "dirichlet")


@dataclasses.dataclass(frozen=True)
class SiteRule:
  """How cases get their site.

  Attributes:
    rule: "csv" (the CSV's site column), "hash" (sha256 of the patient id
      modulo `num_sites`) or "dirichlet" (non-IID over patient label classes).
    num_sites: number of sites for "hash" and "dirichlet".
    dirichlet_alpha: concentration for "dirichlet" (small = skewed).
    seed: seed of the Dirichlet draw.
  """

  rule: str = "csv"
  num_sites: int = 4
  dirichlet_alpha: float = 0.5
  seed: int = 0

  def __post_init__(self):
    if self.rule not in SITE_RULES:
      raise ValueError(f"site rule must be one of {SITE_RULES}, got "
                       f"{self.rule!r}.")
    if self.num_sites < 1:
      raise ValueError(f"num_sites must be >= 1, got {self.num_sites}.")
    if not self.dirichlet_alpha > 0:
      raise ValueError(
          f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha}.")


def _fingerprint(files: Sequence[str], settings: dict) -> str:
  h = hashlib.sha256()
  for path in sorted(set(files)):
    st = os.stat(path)
    h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
  h.update(json.dumps(settings, sort_keys=True, default=str).encode())
  return h.hexdigest()


def _check_patients_at_one_site(cases: Sequence[nifti.CaseRef]) -> None:
  """Refuses a patient listed at two sites.

  Each site keeps its own privacy ledger, which is only valid if the sites'
  patients are disjoint: a patient at two sites would be protected by neither
  site's epsilon alone (their budgets add up).
  """
  _check_one_per_patient(
      cases, lambda c: c.site, "sites",
      "per-site privacy budgets assume every patient belongs to one site. "
      "Give each patient one site, or distinct patient ids if they are "
      "different people.")


def _check_patients_in_one_split(cases: Sequence[nifti.CaseRef]) -> None:
  """Refuses a patient in two splits (a case without a split is train).

  Validation and test metrics are reported as computed on held-out patients
  who are in no training set; a patient in train and in val or test would
  make them a statistic of private training data.
  """
  _check_one_per_patient(
      cases, lambda c: c.split or "train", "splits",
      "validation and test patients must be in no training set (and a "
      "patient in one split only). Give each of the patient's rows the same "
      "split.")


def _check_one_per_patient(cases, value_of, what: str, why: str) -> None:
  values_of = collections.defaultdict(list)
  for c in cases:
    if value_of(c) not in values_of[c.patient]:
      values_of[c.patient].append(value_of(c))
  shared = {p: v for p, v in values_of.items() if len(v) > 1}
  if shared:
    patient, names = next(iter(shared.items()))
    raise nifti.DataError(
        f"patient {patient!r} appears in {what} {names} (and "
        f"{len(shared) - 1} more patients in several {what}): {why}")


def _assign_sites(cases: list[nifti.CaseRef],
                  rule: SiteRule) -> list[nifti.CaseRef]:
  if rule.rule == "csv":
    missing = [c.image for c in cases if c.site is None]
    if missing:
      raise nifti.DataError(f"{missing[0]}: no site given; use a CSV with a "
                            "site column or --site_rule=hash|dirichlet.")
    _check_patients_at_one_site(cases)
    return cases
  patients = sorted({c.patient for c in cases})
  if rule.rule == "hash":
    sites = partition.hash_sites(patients, rule.num_sites)
  else:
    present = collections.defaultdict(set)
    for c in cases:  # Only labels are read here; images are read once, later.
      label, _, _ = nifti.read_nifti(c.label)
      present[c.patient] |= set(np.unique(label).astype(int).tolist())
    classes = [partition.patient_class(sorted(present[p])) for p in patients]
    sites = partition.dirichlet_sites(classes, rule.num_sites,
                                      rule.dirichlet_alpha, rule.seed)
  site_of = {p: f"site{s}" for p, s in zip(patients, sites)}
  return [dataclasses.replace(c, site=site_of[c.patient]) for c in cases]


def prepare_dataset(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    name: str,
    config: nifti.PreprocessConfig,
    site_rule: SiteRule | None = None,
    *,
    class_names: Sequence[str] | None = None,
    modality: str | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
  """Converts an MSD folder or a CSV of cases into TFDS dataset `name`.

  Args:
    input_path: an MSD task folder (with dataset.json) or a CSV file.
    output_dir: TFDS data dir; the dataset goes to output_dir/name.
    name: lower_snake_case dataset name.
    config: preprocessing settings.
    site_rule: how sites are assigned (default: "csv" for a CSV, "hash" with
      4 sites for an MSD folder).
    class_names: names of the output classes (index 0 background); default:
      the MSD labels, or class0..classK.
    modality: modality of cases that do not declare one (default: MSD's
      modality, else "generic").
    overwrite: replace an existing dataset built from other inputs.

  Returns:
    output_dir/name.

  Raises:
    nifti.DataError: naming the file, for any bad case; nothing is written.
    FileExistsError: if output_dir/name exists from other inputs or settings
      and `overwrite` is False.
  """
  tfds_io.check_name(name)
  input_path = pathlib.Path(input_path)
  output_dir = pathlib.Path(output_dir)
  if input_path.is_dir():
    cases, meta = nifti.read_msd(input_path)
    allowed = nifti.msd_labels(meta)
    declared_names = [str(meta["labels"].get(str(v), f"class{v}"))
                      if isinstance(meta["labels"], dict) else f"class{v}"
                      for v in allowed]
    extra_inputs = [str(input_path / "dataset.json")]
    site_rule = site_rule or SiteRule(rule="hash")
  elif input_path.is_file():
    cases, allowed, declared_names = nifti.read_csv(input_path), None, None
    extra_inputs = [str(input_path)]
    site_rule = site_rule or SiteRule(rule="csv")
  else:
    raise nifti.DataError(f"{input_path}: neither an MSD folder nor a CSV.")
  if class_names is not None:
    allowed = allowed if allowed is not None else list(range(len(class_names)))
  if config.label_map:
    out_values = {config.label_map.get(v, v) for v in (allowed or [])}
    num_classes = max(out_values | set(config.label_map.values())) + 1
  else:
    num_classes = (max(allowed) + 1) if allowed else None

  settings = {
      "name": name, "config": dataclasses.asdict(config),
      "site_rule": dataclasses.asdict(site_rule), "class_names": class_names,
      "modality": modality, "format": tfds_io.VERSION,
  }
  fingerprint = _fingerprint(
      [c.image for c in cases] + [c.label for c in cases] + extra_inputs,
      settings)
  final = output_dir / name
  if final.exists():
    try:
      old = tfds_io.read_stats(name, output_dir).get("fingerprint")
    except (FileNotFoundError, json.JSONDecodeError):
      old = None
    if old == fingerprint:
      logging.info("%s is up to date (same inputs and settings): nothing to "
                   "do.", final)
      return final
    if not overwrite:
      raise FileExistsError(f"{final} exists and was built from other inputs "
                            "or settings; pass --overwrite to replace it.")

  _check_patients_in_one_split(cases)
  cases = _assign_sites(cases, site_rule)
  default_modality = modality or (cases[0].modality if cases else None) or (
      "generic")
  site_names = list(dict.fromkeys(c.site for c in cases))
  site_modality = {}
  for c in cases:
    site_modality.setdefault(c.site, c.modality or default_modality)
  splits = collections.defaultdict(list)
  for c in cases:
    splits[c.split or "train"].append(c)

  output_dir.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=output_dir,
                                      prefix=f".{name}.incomplete-"))
  per_site = {s: {"cases": 0, "slices": 0, "class_voxels": collections.Counter()}
              for s in site_names}
  seen_max_label = [0]
  progress = tqdm.tqdm(total=len(cases), desc=f"preparing {name}",
                       unit="case", disable=None)

  def examples(split_cases):
    def generate():
      for case in split_cases:
        image, label = nifti.load_case(case, config, allowed,
                                       modality=default_modality)
        keep = nifti.select_slices(label, config, case.patient + case.image)
        stats = per_site[case.site]
        stats["cases"] += 1
        stats["slices"] += int(keep.size)
        seen_max_label[0] = max(seen_max_label[0], int(label.max()))
        for k in keep:
          stats["class_voxels"].update(
              dict(zip(*np.unique(label[k], return_counts=True))))
          yield f"{case.patient}|{case.image}|{k}", {
              "image": image[k], "label": label[k], "patient": case.patient,
              "site": case.site, "modality": site_modality[case.site],
              "slice_index": np.int32(k)}
        progress.update(1)
    return generate

  try:
    if not cases:
      raise nifti.DataError(f"{input_path}: no cases.")
    first_image, _ = nifti.load_case(cases[0], config, allowed,
                                     modality=default_modality)
    tfds_io.build(name, tmp, first_image.shape[1:],
                  {split: examples(c) for split, c in splits.items()},
                  description=f"Prepared by fedjax_seg from {input_path.name}.")
    progress.close()
    total_slices = sum(s["slices"] for s in per_site.values())
    if total_slices == 0:
      raise nifti.DataError(f"{input_path}: no slice kept (no foreground and "
                            "background_slice_fraction=0).")
    k = num_classes or seen_max_label[0] + 1
    names = list(class_names or declared_names or [f"class{i}"
                                                   for i in range(k)])
    if len(names) < k:
      raise ValueError(f"class_names {names} name fewer than the {k} classes "
                       "in the labels.")
    stats = {
        "name": name, "fingerprint": fingerprint, "settings": settings,
        "preparation_id": uuid.uuid4().hex,
        "input": str(input_path), "site_names": site_names,
        "site_modalities": [site_modality[s] for s in site_names],
        "class_names": names,
        "splits": {split: len(c) for split, c in splits.items()},
        "sites": {},
    }
    for s, st in per_site.items():
      voxels = sum(st["class_voxels"].values()) or 1
      stats["sites"][s] = {
          "modality": site_modality[s], "cases": st["cases"],
          "slices": st["slices"],
          "foreground_fraction": 1 - st["class_voxels"].get(0, 0) / voxels,
          "class_fraction": {names[int(c)]: n / voxels
                             for c, n in sorted(st["class_voxels"].items())},
      }
    (tmp / name / tfds_io.STATS_FILE).write_text(json.dumps(stats, indent=1))
    # Swap into place: rename is atomic within one file system.
    trash = None
    if final.exists():
      trash = output_dir / f".{name}.old-{os.getpid()}"
      os.rename(final, trash)
    os.rename(tmp / name, final)
    if trash is not None:
      shutil.rmtree(trash)
  finally:
    progress.close()
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info("prepared %s: %d cases, %d slices, sites %s", final,
               len(cases), total_slices, site_names)
  return final
