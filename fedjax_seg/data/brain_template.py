"""A multi-site brain MRI cohort made from a real image: the ICBM 2009a template.

The source is one real image: the MNI ICBM 2009a nonlinear symmetric T1
template (an average of 152 adult brains, 1 mm isotropic, 197x233x189 voxels)
with its gray- and white-matter probability maps (Fonov et al., NeuroImage
2011), as shipped inside the `nilearn` wheel (`pip install
fedjax_seg[templates]`; read from the installed files, nilearn is never
imported and nothing is downloaded). Any T1 + GM + WM triple of NIfTI files on
one grid can stand in (`load_template(t1=..., gm=..., wm=...)`).

Every patient is the template under its own anatomy: a random affine (small
rotation, per-axis scale, shift) and a smooth elastic displacement. Every site
is a scanner profile: its voxel size and slice thickness (point spread
function), T1 contrast (gamma), bias field, Rician noise, intensity units and
the orientation its files are stored in. The labels are 0 background (incl.
CSF), 1 gray matter, 2 white matter: the argmax of the warped probability maps
at each voxel centre. The axial slab is MNI z in `CohortConfig.z_range_mm`
(basal ganglia to the centrum semiovale by default).

What this is and is not: real brain anatomy and contrast, a real annotation,
and real acquisition effects simulated per site; not a cohort of real
patients (one brain, deformed), so inter-subject variability is what the
warps give. Deterministic in (seed, site name, patient index): adding sites
or patients never changes existing ones.

    >>> profile = SITES[0]
    >>> profile.name, profile.num_patients, CLASS_NAMES[1:]
    ('siemens_3t_mprage', 120, ('gray_matter', 'white_matter'))
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import tempfile
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from fedjax_seg.data import nifti

CLASS_NAMES = ("background", "gray_matter", "white_matter")
MODALITY = "MRI"

# Files inside the nilearn distribution (nilearn/datasets/data/).
_NILEARN_FILES = {
    "t1": "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
SOURCE = ("MNI ICBM 2009a nonlinear symmetric T1 template with GM/WM "
          "probability maps (Fonov et al. 2011), from the nilearn wheel")

# Axis codes of the orientations sites store their files in.
_ORIENTATIONS = ("RAS", "LPS", "LAS")


@dataclasses.dataclass(frozen=True)
class ScannerProfile:
  """One site's scanner and protocol.

  Attributes:
    name: site name.
    num_patients: patients at this site (before `CohortConfig.patients_scale`).
    spacing_mm: acquired voxel size (x, y, z) in mm; z is the slice thickness
      (the point spread function is a Gaussian of this FWHM per axis).
    gamma: T1 contrast exponent on template intensities in [0, 1].
    bias_std: std of the log bias field (smooth, multiplicative).
    noise_std: Rician noise std, as a fraction of the template's maximum.
    extra_blur_mm: extra Gaussian blur (sigma, mm) for a soft scanner.
    intensity_scale: scanner units per template unit (stored as int16).
    orientation: axis codes of the stored voxel order (RAS, LPS or LAS).
  """

  name: str
  num_patients: int
  spacing_mm: tuple[float, float, float]
  gamma: float = 1.0
  bias_std: float = 0.05
  noise_std: float = 0.02
  extra_blur_mm: float = 0.0
  intensity_scale: float = 1000.0
  orientation: str = "RAS"

  def __post_init__(self):
    if self.num_patients < 1:
      raise ValueError(f"site {self.name!r}: num_patients must be >= 1.")
    if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
      raise ValueError(f"site {self.name!r}: spacing_mm must be three "
                       f"positive numbers, got {self.spacing_mm}.")
    if self.orientation not in _ORIENTATIONS:
      raise ValueError(f"site {self.name!r}: orientation must be one of "
                       f"{_ORIENTATIONS}, got {self.orientation!r}.")


# Four hospitals: a research 3T, a clinical 1.5T (other vendor, other storage
# order), a 3T with a flatter contrast, and a noisy low-field scanner.
SITES = (
    ScannerProfile("siemens_3t_mprage", 120, (1.0, 1.0, 5.0), gamma=1.0,
                   bias_std=0.05, noise_std=0.015, intensity_scale=1000.0),
    ScannerProfile("ge_1p5t_spgr", 100, (1.25, 1.25, 5.0), gamma=1.3,
                   bias_std=0.12, noise_std=0.03, intensity_scale=800.0,
                   orientation="LPS"),
    ScannerProfile("philips_3t_tfe", 80, (1.0, 1.0, 5.0), gamma=0.75,
                   bias_std=0.08, noise_std=0.02, intensity_scale=2500.0,
                   orientation="LAS"),
    ScannerProfile("lowfield_0p5t", 60, (2.0, 2.0, 5.0), gamma=1.1,
                   bias_std=0.25, noise_std=0.07, extra_blur_mm=1.0,
                   intensity_scale=300.0),
)


@dataclasses.dataclass(frozen=True)
class CohortConfig:
  """Anatomy of the patients and extent of the slab.

  Attributes:
    z_range_mm: MNI z extent (mm) of the acquired axial slab.
    rotation_deg: max rotation about each axis (uniform), degrees.
    scale_range: per-axis scale is 1 + U(-scale_range, scale_range).
    shift_mm: max shift along each axis (uniform), mm.
    warp_mm: std of the elastic displacement per axis, mm.
    warp_spacing_mm: control-point spacing of the displacement (its
      correlation length), mm.
    patients_scale: multiplies every site's num_patients (>= 1 each).
    seed: root seed of every patient's anatomy and acquisition.
  """

  z_range_mm: tuple[float, float] = (-8.0, 32.0)
  rotation_deg: float = 6.0
  scale_range: float = 0.08
  shift_mm: float = 4.0
  warp_mm: float = 2.5
  warp_spacing_mm: float = 24.0
  patients_scale: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if not self.z_range_mm[0] < self.z_range_mm[1]:
      raise ValueError(f"z_range_mm must be (low, high), got "
                       f"{self.z_range_mm}.")
    if self.patients_scale <= 0:
      raise ValueError("patients_scale must be > 0.")
    if self.warp_spacing_mm <= 0:
      raise ValueError("warp_spacing_mm must be > 0.")


@dataclasses.dataclass(frozen=True)
class Template:
  """T1 intensities and GM/WM probabilities on one grid.

  Attributes:
    t1, gm, wm: float32 [X, Y, Z], each scaled to [0, 1], RAS voxel order.
    affine: [4, 4] voxel -> world (mm).
    source: where the files came from.
  """

  t1: np.ndarray
  gm: np.ndarray
  wm: np.ndarray
  affine: np.ndarray
  source: str

  @functools.cached_property
  def brain_centre_mm(self) -> np.ndarray:
    """[3] world position (mm) of the GM + WM centre of mass (computed once:
    every patient's rotation and scaling is about it)."""
    voxel = np.array(ndimage.center_of_mass(self.gm + self.wm))
    return (self.affine @ np.append(voxel, 1.0))[:3]


def template_files() -> dict[str, pathlib.Path]:
  """Paths of the template inside the installed nilearn distribution.

  Raises:
    FileNotFoundError: if nilearn is not installed or lacks the files.
  """
  try:
    dist = importlib.metadata.distribution("nilearn")
  except importlib.metadata.PackageNotFoundError as e:
    raise FileNotFoundError(
        "The ICBM 2009a template ships in the nilearn wheel: pip install "
        "'fedjax_seg[templates]' (or pass --template_t1/--template_gm/"
        "--template_wm).") from e
  paths = {k: pathlib.Path(dist.locate_file(v))
           for k, v in _NILEARN_FILES.items()}
  missing = [str(p) for p in paths.values() if not p.is_file()]
  if missing:
    raise FileNotFoundError(f"nilearn {dist.version} lacks {missing}.")
  return paths


def load_template(t1: str | os.PathLike | None = None,
                  gm: str | os.PathLike | None = None,
                  wm: str | os.PathLike | None = None) -> Template:
  """Reads the template (default: nilearn's ICBM 2009a), reoriented to RAS.

  Raises:
    nifti.DataError: naming the file, if one is unreadable, not 3D, not on
      the T1's grid, or the probabilities are outside [0, 1] after scaling.
  """
  given = [t1, gm, wm]
  if any(p is not None for p in given) and not all(p is not None
                                                    for p in given):
    raise ValueError("Give all of t1, gm and wm, or none (nilearn's).")
  if t1 is None:
    files = template_files()
    source = f"{SOURCE} {importlib.metadata.version('nilearn')}"
  else:
    files = {"t1": pathlib.Path(t1), "gm": pathlib.Path(gm),
             "wm": pathlib.Path(wm)}
    source = f"T1 {files['t1'].name}, GM {files['gm'].name}, WM " \
             f"{files['wm'].name}"
  arrays, affine = {}, None
  for key, path in files.items():
    data, aff, _ = nifti.read_nifti(path)
    if data.ndim != 3:
      raise nifti.DataError(f"{path}: expected a 3D volume, got shape "
                            f"{data.shape}.")
    if not np.isfinite(data).all():
      raise nifti.DataError(f"{path}: NaN or infinite voxels.")
    if affine is None:
      affine, shape = aff, data.shape
    elif data.shape != shape or not np.allclose(aff, affine, atol=1e-3):
      raise nifti.DataError(f"{path}: not on the grid of {files['t1']}.")
    peak = data.max()
    if peak <= 0:
      raise nifti.DataError(f"{path}: empty volume.")
    # uint8 maps (nilearn's) scale by 255; float maps in [0, 1] stay.
    arrays[key] = (data / (255.0 if peak > 1.0 else 1.0)).astype(np.float32)
  for key in ("gm", "wm"):
    if arrays[key].min() < 0 or arrays[key].max() > 1.0 + 1e-6:
      raise nifti.DataError(f"{files[key]}: probabilities outside [0, 1].")
  arrays["t1"] = arrays["t1"] / arrays["t1"].max()
  return Template(arrays["t1"], arrays["gm"], arrays["wm"],
                  np.asarray(affine, np.float64), source)


def _rng(seed: int, site: str, index: int, purpose: int) -> np.random.Generator:
  site_key = int.from_bytes(hashlib.sha256(site.encode()).digest()[:4],
                            "little")
  return np.random.default_rng([seed, site_key, index, purpose])


_ANATOMY, _ACQUISITION = 0, 1


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
  cx, cy, cz = np.cos(angles_rad)
  sx, sy, sz = np.sin(angles_rad)
  rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
  ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
  return rz @ ry @ rx


def _smooth_field(rng, shape, spacing_mm, control_mm, std, components):
  """[components, *shape] smooth Gaussian field: cubic spline of a coarse grid.

  The coarse grid has one control point per `control_mm` (at least 2 per
  axis); values ~ N(0, std).
  """
  extent = np.asarray(shape) * np.asarray(spacing_mm)
  coarse = tuple(max(2, int(np.ceil(e / control_mm)) + 1) for e in extent)
  values = rng.normal(0.0, std, (components,) + coarse)
  coords = np.meshgrid(*[np.linspace(0, c - 1, n)
                         for c, n in zip(coarse, shape)], indexing="ij")
  return np.stack([ndimage.map_coordinates(v, coords, order=3, mode="nearest")
                   for v in values])


def _slab_grid(template: Template, profile: ScannerProfile,
               config: CohortConfig):
  """Output grid: (shape [3], affine [4, 4]) covering the template's x/y and
  the configured z slab at the profile's spacing (RAS)."""
  # The template's field of view: its outer voxel edges.
  corners = np.array([[i, j, k, 1.0] for i in (-0.5, template.t1.shape[0] - 0.5)
                      for j in (-0.5, template.t1.shape[1] - 0.5)
                      for k in (-0.5, template.t1.shape[2] - 0.5)])
  world = (template.affine @ corners.T).T[:, :3]
  low = world.min(axis=0)
  high = world.max(axis=0)
  low[2], high[2] = config.z_range_mm
  spacing = np.asarray(profile.spacing_mm, np.float64)
  shape = np.maximum(1, np.floor((high - low) / spacing + 1e-6)).astype(int)
  # Voxel centres sit half a voxel inside the slab.
  affine = np.diag(list(spacing) + [1.0])
  affine[:3, 3] = low + spacing / 2
  return tuple(int(n) for n in shape), affine


def _blurred_t1(template: Template, profile: ScannerProfile) -> np.ndarray:
  """The template T1 through the site's point spread function."""
  voxel_mm = np.abs(np.diag(template.affine)[:3])
  fwhm_to_sigma = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
  sigma_mm = np.sqrt((np.asarray(profile.spacing_mm) * fwhm_to_sigma) ** 2
                     + profile.extra_blur_mm ** 2)
  return ndimage.gaussian_filter(template.t1, sigma_mm / voxel_mm,
                                 mode="constant").astype(np.float32)


def make_patient(template: Template, profile: ScannerProfile, index: int,
                 config: CohortConfig = CohortConfig(),
                 blurred_t1: np.ndarray | None = None):
  """One patient's acquisition at one site.

  Args:
    template: the source image and maps.
    profile: the site's scanner.
    index: the patient's index at the site (0-based).
    config: anatomy and slab.
    blurred_t1: `template.t1` through the site's PSF (computed if None; pass
      it to reuse it over a site's patients).

  Returns:
    (image int16 [X, Y, Z] in scanner units, label uint8 [X, Y, Z] in
    {0, 1, 2}, affine [4, 4]), all in RAS voxel order.
  """
  if blurred_t1 is None:
    blurred_t1 = _blurred_t1(template, profile)
  shape, out_affine = _slab_grid(template, profile, config)
  anatomy = _rng(config.seed, profile.name, index, _ANATOMY)
  acquisition = _rng(config.seed, profile.name, index, _ACQUISITION)

  ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"),
                 axis=0).reshape(3, -1).astype(np.float64)
  world = out_affine[:3, :3] @ ijk + out_affine[:3, 3:4]
  # The patient's anatomy: where in the template each scanner voxel lands.
  centre = template.brain_centre_mm
  rotation = _rotation(np.deg2rad(anatomy.uniform(
      -config.rotation_deg, config.rotation_deg, 3)))
  scale = 1.0 + anatomy.uniform(-config.scale_range, config.scale_range, 3)
  shift = anatomy.uniform(-config.shift_mm, config.shift_mm, 3)
  warp = _smooth_field(anatomy, shape, profile.spacing_mm,
                       config.warp_spacing_mm, config.warp_mm, 3)
  source = (rotation * scale) @ (world - centre[:, None]) + centre[:, None] \
      + shift[:, None] + warp.reshape(3, -1)
  voxel = np.linalg.solve(template.affine,
                          np.vstack([source, np.ones(source.shape[1])]))[:3]

  def sample(volume, order=1):
    return ndimage.map_coordinates(volume, voxel, order=order, mode="constant",
                                   cval=0.0).reshape(shape)

  gm, wm = sample(template.gm), sample(template.wm)
  background = np.clip(1.0 - gm - wm, 0.0, 1.0)
  label = np.argmax(np.stack([background, gm, wm]), axis=0).astype(np.uint8)

  t1 = np.clip(sample(blurred_t1), 0.0, 1.0) ** profile.gamma
  bias = np.exp(_smooth_field(acquisition, shape, profile.spacing_mm, 80.0,
                              profile.bias_std, 1)[0])
  signal = t1 * bias
  real = signal + acquisition.normal(0.0, profile.noise_std, shape)
  imag = acquisition.normal(0.0, profile.noise_std, shape)
  magnitude = np.sqrt(real ** 2 + imag ** 2) * profile.intensity_scale
  image = np.clip(np.rint(magnitude), 0, np.iinfo(np.int16).max).astype(
      np.int16)
  return image, label, out_affine


def _stored(data: np.ndarray, affine: np.ndarray,
            orientation: str) -> nib.Nifti1Image:
  """`data` (RAS voxel order) as an image stored in voxel order
  `orientation`, same world coordinates (nibabel's reorientation)."""
  transform = nib.orientations.ornt_transform(
      nib.orientations.axcodes2ornt("RAS"),
      nib.orientations.axcodes2ornt(orientation))
  return nib.Nifti1Image(data, affine).as_reoriented(transform)


def patient_ids(profile: ScannerProfile, config: CohortConfig) -> list[str]:
  """The site's patient ids (unique over sites)."""
  count = max(1, int(round(profile.num_patients * config.patients_scale)))
  return [f"{profile.name}_{i:04d}" for i in range(count)]


def write_cohort(output_dir: str | os.PathLike,
                 template: Template,
                 sites: Sequence[ScannerProfile] = SITES,
                 config: CohortConfig = CohortConfig(),
                 progress=None) -> pathlib.Path:
  """Writes every site's patients as NIfTI files plus `cases.csv`.

  Layout: output_dir/SITE/PATIENT_t1.nii.gz and PATIENT_seg.nii.gz, and
  output_dir/cases.csv (image,label,site,patient,modality) for
  `python -m data_prep.prepare --input=output_dir/cases.csv`. Written into a
  temporary folder next to output_dir and renamed, so a failure leaves no
  partial cohort.

  Returns:
    The path of cases.csv.

  Raises:
    FileExistsError: if output_dir exists.
  """
  output_dir = pathlib.Path(output_dir)
  if output_dir.exists():
    raise FileExistsError(f"{output_dir} exists; choose a new --output_dir.")
  names = [s.name for s in sites]
  if len(set(names)) != len(names):
    raise ValueError(f"site names must be unique, got {names}.")
  output_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=output_dir.parent,
                                      prefix=f".{output_dir.name}.incomplete-"))
  try:
    rows = []
    for profile in sites:
      blurred = _blurred_t1(template, profile)
      (tmp / profile.name).mkdir()
      for index, patient in enumerate(patient_ids(profile, config)):
        image, label, affine = make_patient(template, profile, index, config,
                                            blurred)
        for suffix, data in (("t1", image), ("seg", label)):
          img = _stored(data, affine, profile.orientation)
          img.header.set_xyzt_units("mm")
          nib.save(img, str(tmp / profile.name / f"{patient}_{suffix}.nii.gz"))
        rows.append({"image": f"{profile.name}/{patient}_t1.nii.gz",
                     "label": f"{profile.name}/{patient}_seg.nii.gz",
                     "site": profile.name, "patient": patient,
                     "modality": MODALITY})
        if progress is not None:
          progress.update(1)
    with open(tmp / "cases.csv", "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
    with open(tmp / "SOURCE.txt", "w") as f:
      f.write(f"{template.source}\n{config}\n")
      for profile in sites:
        f.write(f"{profile}\n")
    os.replace(tmp, output_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return output_dir / "cases.csv"
