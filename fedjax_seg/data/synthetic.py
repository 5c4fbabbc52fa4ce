"""Deterministic synthetic multi-site, multi-modality segmentation data.

Every patient is a small 3D phantom: a body outline with a fat layer and a
spine, an organ with an irregular boundary and texture, and, with a
site-dependent probability, one or two lesions inside the organ. Labels are
0 background, 1 organ, 2 lesion. Each site renders its patients as its
modality and scanner would:

* CT: Hounsfield-like values (air -1000, fat -100, soft tissue 30, organ 85,
  lesion hypo- or hyper-dense, bone 700), a site calibration error (scale and
  offset in HU), noise in HU (dose), blur, then the abdominal window
  [-160, 240] HU mapped to [0, 1].
* MRI: T1- or T2-like tissue contrasts (lesion dark on T1, bright on T2), a
  smooth multiplicative bias field, Rician noise (magnitude of complex
  Gaussian noise), then a z-score over the body foreground.
* X-ray: a 2D projection of a 3D attenuation volume (with ribs), so organ,
  lesion, spine and ribs overlap; detector gamma, quantum-like noise, blur,
  then percentile scaling to [0, 1]. One image per patient.

Sites also differ in field of view (anatomy size in the image), resolution
(block-downsampling), lesion prevalence and size, and number of patients
(ragged). Every patient is drawn from its own seed (root seed, site, patient),
so adding patients or sites never changes existing ones.
"""

import dataclasses

import numpy as np
from scipy import ndimage

from fedjax_seg.data import dataset as dataset_lib

MODALITIES = ("CT", "MRI", "XRAY")
CLASS_NAMES = ("background", "organ", "lesion")
CT_WINDOW = (-160.0, 240.0)
# Samples along each X-ray's ray (anterior-posterior) when projecting the
# phantom; images smaller than this use one sample per pixel.
XRAY_RAY_SAMPLES = 32


@dataclasses.dataclass(frozen=True)
class SiteSpec:
  """How one simulated hospital site acquires its images.

  Attributes:
    name: site name.
    modality: "CT", "MRI" or "XRAY".
    num_patients: number of patients (before `SyntheticConfig.patients_scale`).
    intensity_scale, intensity_offset: scanner calibration: HU scale/offset
      (CT) or detector gain/offset (X-ray). Unused for MRI (z-scored).
    gamma: contrast curve exponent applied to the normalised image (X-ray,
      MRI).
    noise_std: noise level (HU for CT; fraction of signal for MRI / X-ray).
    blur_sigma: Gaussian blur in pixels (scanner point-spread function).
    downsample: integer factor of block-downsampling then upsampling
      (acquisition resolution); 1 = full resolution.
    fov_scale: anatomy size relative to the image (> 1: zoomed in).
    lesion_probability: probability that a patient has lesions.
    lesion_size: relative lesion radius.
    lesion_hu: lesion attenuation in HU (CT only; < 85 hypodense).
    contrast: "T1" or "T2" (MRI only).
    bias_field: strength of the MRI bias field (0 = none).
  """

  name: str
  modality: str
  num_patients: int
  intensity_scale: float = 1.0
  intensity_offset: float = 0.0
  gamma: float = 1.0
  noise_std: float = 0.05
  blur_sigma: float = 0.0
  downsample: int = 1
  fov_scale: float = 1.0
  lesion_probability: float = 0.6
  lesion_size: float = 1.0
  lesion_hu: float = 20.0
  contrast: str = "T1"
  bias_field: float = 0.0

  def __post_init__(self):
    if self.modality not in MODALITIES:
      raise ValueError(f"site {self.name!r}: modality must be one of "
                       f"{MODALITIES}, got {self.modality!r}.")
    if self.num_patients < 1:
      raise ValueError(f"site {self.name!r}: num_patients must be >= 1.")
    if self.contrast not in ("T1", "T2"):
      raise ValueError(f"site {self.name!r}: contrast must be T1 or T2.")
    if self.downsample < 1:
      raise ValueError(f"site {self.name!r}: downsample must be >= 1.")


# Site sizes (patients before the train/val/test split) are chosen for
# patient-level DP: tens to hundreds of patients per site, 808 in all, unequal
# (ratio 7.5 between the largest and the smallest), the smallest still small
# (32 patients: 22 for training at the default split), as in a consortium of
# a few large university hospitals and smaller regional ones. Per-patient
# epsilon depends on these numbers (q = B / N_k), so they are public settings
# of the dataset; `SyntheticConfig.patients_scale` scales them all.
DEFAULT_SITES = (
    SiteSpec("ct_scanner_a", "CT", 160, noise_std=12.0, blur_sigma=0.5,
             lesion_probability=0.6, lesion_hu=25.0),
    SiteSpec("ct_scanner_b", "CT", 96, intensity_scale=1.05,
             intensity_offset=-25.0, noise_std=20.0, blur_sigma=0.9,
             fov_scale=0.85, lesion_probability=0.45, lesion_hu=100.0),
    SiteSpec("ct_low_dose", "CT", 48, intensity_offset=15.0, noise_std=38.0,
             blur_sigma=0.3, fov_scale=1.15, lesion_probability=0.75,
             lesion_size=1.3, lesion_hu=15.0),
    SiteSpec("mri_t1_1p5t", "MRI", 120, contrast="T1", noise_std=0.05,
             blur_sigma=0.6, bias_field=0.25, lesion_probability=0.55),
    SiteSpec("mri_t2_3t", "MRI", 72, contrast="T2", noise_std=0.04,
             blur_sigma=0.4, bias_field=0.4, fov_scale=0.9,
             lesion_probability=0.65, lesion_size=0.9),
    SiteSpec("mri_t1_lowfield", "MRI", 32, contrast="T1", noise_std=0.10,
             blur_sigma=1.0, downsample=2, bias_field=0.6, fov_scale=1.1,
             lesion_probability=0.5, lesion_size=1.2),
    SiteSpec("xray_digital", "XRAY", 240, gamma=0.8, noise_std=0.03,
             blur_sigma=0.5, lesion_probability=0.5, lesion_size=1.2),
    SiteSpec("xray_film", "XRAY", 80, intensity_scale=0.8,
             intensity_offset=0.1, gamma=1.4, noise_std=0.06, blur_sigma=1.2,
             downsample=2, fov_scale=0.9, lesion_probability=0.35,
             lesion_size=1.4),
)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Sizes and sites of the synthetic dataset.

  Attributes:
    image_size: side of each 2D image, in pixels.
    num_slices: slices per CT/MRI patient volume (X-ray: one projection).
    patients_scale: multiplies every site's `num_patients` (rounded, >= 1).
    sites: the `SiteSpec`s.
    seed: root seed; the dataset is a pure function of the config.
  """

  image_size: int = 32
  num_slices: int = 8
  patients_scale: float = 1.0
  sites: tuple[SiteSpec, ...] = DEFAULT_SITES
  seed: int = 0

  def __post_init__(self):
    if self.image_size < 16:
      raise ValueError(f"image_size must be >= 16, got {self.image_size}.")
    if self.num_slices < 1:
      raise ValueError(f"num_slices must be >= 1, got {self.num_slices}.")
    if not self.patients_scale > 0:
      raise ValueError(
          f"patients_scale must be > 0, got {self.patients_scale}.")
    if not self.sites:
      raise ValueError("need at least one site.")
    names = [s.name for s in self.sites]
    if len(set(names)) != len(names):
      raise ValueError(f"site names must be unique, got {names}.")

  def num_patients(self, site: int) -> int:
    return max(1, round(self.sites[site].num_patients * self.patients_scale))


def _smooth_field(rng, shape, sigma):
  """Zero-mean, unit-std Gaussian random field with correlation `sigma` px."""
  field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma,
                                  mode="wrap")
  return (field - field.mean()) / (field.std() + 1e-8)


def _phantom(rng, spec: SiteSpec, shape, z_extent: float = 0.6):
  """Tissue maps of one patient on a [D, H, W] grid over [-1, 1]^3.

  `z_extent` is the fraction of the organ's z range the D slices span: a
  CT/MRI stack covers the middle of the organ (0.6), an X-ray's volume all
  of it (1.0). Returns (tissue, label, texture): tissue codes 0 air, 1 fat,
  2 soft tissue, 3 organ, 4 lesion, 5 bone; labels 0/1/2; a smooth texture
  field.
  """
  d, h, w = shape
  z, y, x = np.meshgrid(np.linspace(-1, 1, d) * z_extent,
                        np.linspace(-1, 1, h), np.linspace(-1, 1, w),
                        indexing="ij")
  fov = spec.fov_scale
  body_rx, body_ry = fov * rng.uniform(0.78, 0.9), fov * rng.uniform(0.55, 0.68)
  body_r = (x / body_rx) ** 2 + (y / body_ry) ** 2
  body = body_r <= 1.0
  fat = body & (body_r > 0.8 ** 2)
  spine = (x / (0.1 * fov)) ** 2 + ((y - 0.42 * fov) / (0.1 * fov)) ** 2 <= 1

  # Organ: a rotated ellipsoid with a boundary perturbed by low harmonics.
  cx, cy, cz = rng.uniform(-0.3, 0.1) * fov, rng.uniform(-0.2, 0.05) * fov, \
      rng.uniform(-0.15, 0.15)
  rx, ry, rz = fov * rng.uniform(0.36, 0.5), fov * rng.uniform(0.26, 0.36), \
      rng.uniform(0.45, 0.85)
  angle = rng.uniform(-0.6, 0.6)
  xr = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
  yr = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
  theta = np.arctan2(yr, xr)
  wobble = 1.0 + sum(rng.uniform(-0.08, 0.08) * np.cos(k * theta
                                                       + rng.uniform(0, 6.3))
                     for k in (2, 3, 5))
  organ = ((xr / rx) ** 2 + (yr / ry) ** 2) / wobble ** 2 + (
      (z - cz) / rz) ** 2 <= 1.0
  organ &= body & ~fat & ~spine

  lesion = np.zeros(shape, bool)
  if organ.any() and rng.uniform() < spec.lesion_probability:
    inside = np.argwhere(organ)
    for _ in range(rng.integers(1, 3)):
      cd, ch, cw = inside[rng.integers(len(inside))]
      r = spec.lesion_size * fov * rng.uniform(0.1, 0.18)
      lesion |= ((x - x[cd, ch, cw]) ** 2 + (y - y[cd, ch, cw]) ** 2
                 + ((z - z[cd, ch, cw]) * 0.6) ** 2) <= r ** 2
    lesion &= organ

  tissue = np.zeros(shape, np.int8)
  tissue[body] = 2
  tissue[fat] = 1
  tissue[spine & body] = 5
  tissue[organ] = 3
  tissue[lesion] = 4
  label = np.zeros(shape, np.uint8)
  label[organ] = 1
  label[lesion] = 2
  texture = _smooth_field(rng, shape, sigma=(0.0 if d == 1 else 1.0, 1.5, 1.5))
  return tissue, label, texture


def _resolution(image, spec: SiteSpec):
  """Scanner point-spread (blur) and acquisition resolution (block average)."""
  if spec.blur_sigma > 0:
    image = ndimage.gaussian_filter(image, (0, spec.blur_sigma,
                                            spec.blur_sigma))
  f = spec.downsample
  if f > 1:
    d, h, w = image.shape
    hc, wc = h - h % f, w - w % f
    blocks = image[:, :hc, :wc].reshape(d, hc // f, f, wc // f, f).mean((2, 4))
    image = image.copy()
    image[:, :hc, :wc] = np.repeat(np.repeat(blocks, f, 1), f, 2)
  return image


def _render_ct(rng, spec, tissue, texture):
  hu = np.array([-1000.0, -100.0, 30.0, 85.0, spec.lesion_hu, 700.0])[tissue]
  hu = hu + np.where(tissue >= 2, 8.0 * texture, 0.0)
  hu = hu * spec.intensity_scale + spec.intensity_offset
  hu = _resolution(hu, spec) + spec.noise_std * rng.standard_normal(hu.shape)
  lo, hi = CT_WINDOW
  return np.clip((hu - lo) / (hi - lo), 0.0, 1.0)


def _render_mri(rng, spec, tissue, texture):
  if spec.contrast == "T1":
    values = [0.0, 1.0, 0.3, 0.62, 0.22, 0.6]
  else:
    values = [0.0, 0.7, 0.18, 0.45, 0.9, 0.4]
  signal = np.array(values)[tissue] * (1.0 + np.where(tissue >= 2,
                                                      0.08 * texture, 0.0))
  if spec.bias_field > 0:
    bias = _smooth_field(rng, tissue.shape, sigma=(2.0, 8.0, 8.0))
    signal = signal * np.exp(spec.bias_field * 0.5 * bias)
  signal = _resolution(signal, spec)
  noise = spec.noise_std * rng.standard_normal((2,) + signal.shape)
  magnitude = np.sqrt((signal + noise[0]) ** 2 + noise[1] ** 2)  # Rician.
  magnitude = magnitude ** spec.gamma
  foreground = tissue > 0
  mean, std = magnitude[foreground].mean(), magnitude[foreground].std() + 1e-6
  return (magnitude - mean) / std


def _render_xray(rng, spec, tissue, texture):
  """Projects the [S, R, S] phantom along the anterior-posterior axis (R
  samples per ray over [-1, 1])."""
  mu = np.array([0.0, 0.15, 0.2, 0.34, 0.6, 1.0])[tissue]
  mu = mu * (1.0 + np.where(tissue >= 2, 0.05 * texture, 0.0))
  # Ribs: thin bands across the body, overlapping the organ in projection.
  d = tissue.shape[0]
  zz = np.linspace(-1, 1, d)[:, None, None]
  phase = rng.uniform(0, 2 * np.pi)
  ribs = (np.sin(zz * 9.0 * spec.fov_scale + phase) > 0.75) & (tissue == 2)
  mu = np.where(ribs, 0.8, mu)
  path = mu.sum(axis=1) * (4.0 / mu.shape[1])  # Line integral along y.
  image = 1.0 - np.exp(-path)
  image = _resolution(image[None], spec)[0]
  image = image * spec.intensity_scale + spec.intensity_offset
  image = image + spec.noise_std * np.sqrt(np.clip(image, 1e-3, None)) * \
      rng.standard_normal(image.shape)
  lo, hi = np.percentile(image, [0.5, 99.5])
  image = np.clip((image - lo) / (hi - lo + 1e-8), 0.0, 1.0) ** spec.gamma
  return image[None]


def _xray_label(label):
  """Projection of the 3D labels: lesion if any lesion on the ray, else organ."""
  organ = (label >= 1).any(axis=1)
  lesion = (label == 2).any(axis=1)
  return np.where(lesion, 2, np.where(organ, 1, 0)).astype(np.uint8)[None]


def render_patient(spec: SiteSpec, image_size: int, num_slices: int,
                   rng: np.random.Generator):
  """One patient of a site with acquisition `spec`, drawn from `rng`.

  Returns:
    (image, label): float32 [D, S, S] and uint8 [D, S, S], S = image_size,
    D = num_slices for CT/MRI and 1 for X-ray.
  """
  size = image_size
  if spec.modality == "XRAY":
    # The projection only needs the line integral along each ray, so the
    # volume is sampled at most XRAY_RAY_SAMPLES times along y: at 128x128 a
    # full cube took 0.57 s per patient (90% of the run's setup); up to 32
    # pixels the volume is the full cube, as before.
    rays = min(size, XRAY_RAY_SAMPLES)
    tissue, label, texture = _phantom(rng, spec, (size, rays, size),
                                      z_extent=1.0)
    image = _render_xray(rng, spec, tissue, texture)
    label = _xray_label(label)
  else:
    # As when the cube test was `d == h`: a stack as deep as it is wide spans
    # the whole organ (the data of such configurations stay the same).
    tissue, label, texture = _phantom(
        rng, spec, (num_slices, size, size),
        z_extent=1.0 if num_slices == size else 0.6)
    render = _render_ct if spec.modality == "CT" else _render_mri
    image = render(rng, spec, tissue, texture)
  return image.astype(np.float32), label


def patient_volume(config: SyntheticConfig, site: int, patient: int):
  """One patient's rendered volume, from the seed (config.seed, site,
  patient): see `render_patient` for the shapes."""
  return render_patient(config.sites[site], config.image_size,
                        config.num_slices,
                        np.random.default_rng([config.seed, site, patient]))


def slice_dataset(specs, patients, shape) -> dataset_lib.SliceDataset:
  """A `SliceDataset` of rendered patients.

  Args:
    specs: the sites' `SiteSpec`s (the site axis, in order).
    patients: per site, a list of (patient name, image, label) with image
      float32 [D, ...] and label uint8 [D, ...]: D examples of that patient.
    shape: one example's image shape without channels (for no patients).
  """
  images, labels, site_ids, patient_ids, slices, names = [], [], [], [], [], []
  for index, site_patients in enumerate(patients):
    for name, image, label in site_patients:
      n = image.shape[0]
      images.append(image)
      labels.append(label)
      site_ids += [index] * n
      patient_ids += [len(names)] * n
      slices += list(range(n))
      names.append(name)
  site = np.asarray(site_ids, np.int32)
  return dataset_lib.SliceDataset(
      image=(np.concatenate(images) if images
             else np.zeros((0,) + tuple(shape), np.float32))[..., None],
      label=(np.concatenate(labels) if labels
             else np.zeros((0,) + tuple(shape), np.uint8)),
      site=site,
      patient=np.asarray(patient_ids, np.int32),
      modality=np.asarray([MODALITIES.index(spec.modality) for spec in specs],
                          np.int32)[site],
      slice_index=np.asarray(slices, np.int32),
      site_names=tuple(spec.name for spec in specs),
      site_modalities=tuple(spec.modality for spec in specs),
      modality_names=MODALITIES,
      class_names=CLASS_NAMES,
      patient_names=tuple(names),
  )


def _build(config: SyntheticConfig, sites: list[int],
           volumes: bool) -> dataset_lib.SliceDataset:
  """The patients of `sites` as slices, or as one volume each."""
  patients = []
  for s in sites:
    site_patients = []
    for p in range(config.num_patients(s)):
      image, label = patient_volume(config, s, p)
      if volumes:  # One example per patient: [1, D, S, S].
        image, label = image[None], label[None]
      site_patients.append((f"{config.sites[s].name}/patient{p:03d}", image,
                            label))
    patients.append(site_patients)
  size = config.image_size
  shape = (config.num_slices, size, size) if volumes else (size, size)
  return slice_dataset([config.sites[s] for s in sites], patients, shape)


def generate(config: SyntheticConfig = SyntheticConfig()
             ) -> dataset_lib.SliceDataset:
  """All sites' 2D slices as one `SliceDataset` (deterministic in config).

  Example:
    >>> data = generate(SyntheticConfig(image_size=16, num_slices=2,
    ...                                 patients_scale=0.1))
    >>> data.image.shape[1:], data.site_names[0], data.site_modalities[-1]
    ((16, 16, 1), 'ct_scanner_a', 'XRAY')
  """
  return _build(config, list(range(len(config.sites))), volumes=False)


def generate_volumes(config: SyntheticConfig = SyntheticConfig()
                     ) -> dataset_lib.SliceDataset:
  """One 3D volume per CT/MRI patient ([N, D, S, S, 1]) for 3D models.

  X-ray sites are left out (their images are 2D projections).

  Example:
    >>> vols = generate_volumes(SyntheticConfig(image_size=16, num_slices=4,
    ...                                         patients_scale=0.1))
    >>> vols.image.shape[1:], "XRAY" in vols.site_modalities
    ((4, 16, 16, 1), False)
  """
  return _build(config, [s for s, spec in enumerate(config.sites)
                         if spec.modality != "XRAY"], volumes=True)
