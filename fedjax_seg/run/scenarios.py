"""Distributions that change over rounds: scanner replacements, intensity
drift, sites joining and leaving (the `--scanner_changes`,
`--intensity_drift`, `--site_joins` and `--site_leaves` flags).

A `Scenario` is public: it is part of the configuration, fixed before the
run, and depends on no data. What it changes:

* **A scanner replaced** (`SITE:ROUND:PROFILE`, built-in data only): from
  round ROUND on (1-based, as the log counts), site SITE's patients are
  acquired with another of the built-in scanner profiles of the same
  modality (`synthetic.DEFAULT_SITES`: noise, blur, resolution, field of
  view, calibration, lesion contrast). The same patients (each drawn from
  its own seed) are rendered a second time with the new profile, so the
  anatomy stays and the acquisition changes; training, validation and the
  final test all see the site's data as of their round.
* **A slow intensity drift** (`SITE:GAIN_RATE[:OFFSET_RATE]`): in round r
  (0-based) the site's image intensities (after normalisation) become
  x (1 + GAIN_RATE r) + OFFSET_RATE r, e.g. a coil whose gain ages, or a
  CT whose calibration drifts by a few HU a round (in the [0, 1] CT window
  of 400 HU, 0.01 is 4 HU). A gain alone barely reaches a U-Net whose
  normalisation layers divide out each example's scale (ours: GroupNorm):
  measured, the drifting site's validation Dice stayed within 0.0004 of
  the run without drift (README).
* **A site joining** (`SITE:ROUND`): the site trains from round ROUND on;
  before, it is never sampled and its ledger is never charged, so its
  privacy budget starts then. Its noise is calibrated for the rounds it
  will train (`active_windows`), not for the whole run.
* **A site leaving** (`SITE:ROUND`): the site trains up to round ROUND - 1
  and never after; its noise is calibrated for those rounds.

Validation runs on every site, in or out of the federation (held-out
patients of the site's data as of that round), so the per-site Dice curve
shows what a change does to the global model.
"""

import dataclasses
from typing import Sequence

import numpy as np

from fedjax_seg.run import config as config_lib
from fedjax_seg.run import config_syntax
from fedjax_seg.data import sites as sites_lib
from fedjax_seg.data import synthetic


@dataclasses.dataclass(frozen=True)
class Scenario:
  """The run's changes over rounds (public), resolved against its sites.

  Attributes:
    site_names: [S] the run's sites.
    rounds: R.
    active: [R, S] bool, True where the site is in the federation.
    change_round: [S] int, the 0-based round from which the site's new
      scanner acquires its data (R where it never changes).
    new_profile: [S] the replacing profile's name, or None.
    drift_rate: [S] float, gain drift per round (0 where none).
    drift_offset: [S] float, offset drift per round (0 where none).
    events: [(round 1-based, site, description)], for the report and plots.
  """

  site_names: tuple[str, ...]
  rounds: int
  active: np.ndarray
  change_round: np.ndarray
  new_profile: tuple
  drift_rate: np.ndarray
  drift_offset: np.ndarray
  events: tuple

  @classmethod
  def build(cls, data: config_lib.DataConfig, site_names: Sequence[str],
            site_modalities: Sequence[str], rounds: int) -> "Scenario":
    """Resolves the flags against the run's sites and rounds.

    Raises:
      ConfigError: naming the flag, for an unknown site or profile, a round
        past --rounds, a profile of another modality, a scanner change or
        join/leave given twice for a site, a site leaving before it joins,
        or a round with no site in the federation.
    """
    names = list(site_names)
    num = len(names)

    def site(flag, entry, name):
      if name not in names:
        raise config_lib.ConfigError(
            f"--{flag}: entry {entry!r}: unknown site {name!r} (sites: "
            f"{names}).")
      return names.index(name)

    def within(flag, entry, r):
      if r > rounds:
        raise config_lib.ConfigError(
            f"--{flag}: entry {entry!r}: round {r} is past --rounds="
            f"{rounds}.")
      return r

    events = []
    change = np.full(num, rounds, np.int64)
    profile = [None] * num
    profiles = {s.name: s for s in synthetic.DEFAULT_SITES}
    for entry in data.scanner_changes:
      name, r, new = config_syntax.scenario_fields(entry, "scanner_changes", 3)
      k = site("scanner_changes", entry, name)
      r = within("scanner_changes", entry,
                 config_syntax.scenario_round(r, "scanner_changes", entry))
      if data.dataset != "synthetic":
        raise config_lib.ConfigError(
            "--scanner_changes: re-acquiring patients with another scanner "
            "needs the built-in synthetic data (a prepared dataset holds "
            "fixed images); use --intensity_drift or joins/leaves there.")
      if new not in profiles:
        raise config_lib.ConfigError(
            f"--scanner_changes: entry {entry!r}: unknown profile {new!r} "
            f"(profiles: {sorted(profiles)}).")
      if profiles[new].modality != site_modalities[k]:
        raise config_lib.ConfigError(
            f"--scanner_changes: entry {entry!r}: {new!r} is a "
            f"{profiles[new].modality} scanner, {name!r} a "
            f"{site_modalities[k]} site.")
      if profile[k] is not None:
        raise config_lib.ConfigError(
            f"--scanner_changes: site {name!r} given twice.")
      change[k], profile[k] = r - 1, new
      events.append((r, name, f"scanner replaced by {new}"))
    drift, offset = np.zeros(num), np.zeros(num)
    for entry in data.intensity_drift:
      name, rate, shift = config_syntax.drift_rates(entry)
      k = site("intensity_drift", entry, name)
      if 1.0 + rate * (rounds - 1) <= 0:
        raise config_lib.ConfigError(
            f"--intensity_drift: entry {entry!r}: the gain 1 + {rate:g} r "
            f"reaches {1.0 + rate * (rounds - 1):g} by round {rounds}.")
      drift[k], offset[k] = rate, shift
      events.append((1, name, f"intensity x (1 + {rate:g} r) + {shift:g} r "
                              "in round r"))
    first, last = np.zeros(num, np.int64), np.full(num, rounds, np.int64)
    for flag, bound in (("site_joins", first), ("site_leaves", last)):
      seen = set()
      for entry in getattr(data, flag):
        name, r = config_syntax.scenario_fields(entry, flag, 2)
        k = site(flag, entry, name)
        r = within(flag, entry, config_syntax.scenario_round(r, flag, entry))
        if k in seen:
          raise config_lib.ConfigError(f"--{flag}: site {name!r} given "
                                       "twice.")
        seen.add(k)
        bound[k] = r - 1
        events.append((r, name, "joins" if flag == "site_joins" else
                       "leaves"))
    bad = [names[k] for k in range(num) if last[k] <= first[k]]
    if bad:
      raise config_lib.ConfigError(
          f"--site_leaves: sites {bad} leave before (or when) they join.")
    r = np.arange(rounds)[:, None]
    active = (r >= first[None, :]) & (r < last[None, :])
    empty = np.flatnonzero(~active.any(axis=1))
    if empty.size:
      raise config_lib.ConfigError(
          f"--site_joins/--site_leaves: no site is in the federation in "
          f"round {int(empty[0]) + 1}.")
    return cls(tuple(names), rounds, active, change, tuple(profile), drift,
               offset, tuple(sorted(events)))

  @property
  def has_data_changes(self) -> bool:
    return bool(any(self.new_profile) or np.any(self.drift_rate)
                or np.any(self.drift_offset))

  def active_windows(self) -> np.ndarray:
    """[S, 2] (first round, end round) 0-based, end exclusive, of each
    site's membership (joins and leaves leave one window per site)."""
    out = np.zeros((len(self.site_names), 2), np.int64)
    for k in range(len(self.site_names)):
      rounds = np.flatnonzero(self.active[:, k])
      out[k] = (rounds[0], rounds[-1] + 1)
    return out

  def replaced_config(self, config: synthetic.SyntheticConfig
                      ) -> synthetic.SyntheticConfig:
    """The synthetic data with every replaced site's new profile (same
    name, same number of patients, so the same patients and split)."""
    profiles = {s.name: s for s in synthetic.DEFAULT_SITES}
    specs = tuple(
        spec if new is None else dataclasses.replace(
            profiles[new], name=spec.name, num_patients=spec.num_patients)
        for spec, new in zip(config.sites, self.new_profile))
    return dataclasses.replace(config, sites=specs)

  def gain(self, round_index: int) -> np.ndarray:
    """[S] intensity gain of round `round_index` (0-based)."""
    return 1.0 + self.drift_rate * round_index

  def offset(self, round_index: int) -> np.ndarray:
    """[S] intensity offset of round `round_index` (0-based)."""
    return self.drift_offset * round_index

  def key(self, round_index: int) -> tuple:
    """What the data of a round depend on: equal keys, equal data."""
    changed = tuple(bool(round_index >= c) for c in self.change_round)
    return (changed, tuple(self.gain(round_index).tolist()),
            tuple(self.offset(round_index).tolist()))


class ScenarioData:
  """One split's arrays as the sites see them in each round.

  Args:
    scenario: the run's scenario.
    base: the split as generated (rounds before any change).
    replaced: the same split with the replaced sites' new scanners (same
      shapes and positions), or None without scanner changes.
  """

  def __init__(self, scenario: Scenario, base: sites_lib.SiteArrays,
               replaced: sites_lib.SiteArrays | None):
    if replaced is not None and (replaced.image.shape != base.image.shape or
                                 not np.array_equal(replaced.mask, base.mask)):
      raise AssertionError("the re-rendered sites do not line up with the "
                           "original ones.")
    self.scenario, self.base, self.replaced = scenario, base, replaced
    self._cache_key, self._cache = None, None

  def at(self, round_index: int) -> sites_lib.SiteArrays:
    """The split in round `round_index` (0-based): the replaced sites'
    new scanner from their change round on, times each site's gain."""
    key = self.scenario.key(round_index)
    if key == self._cache_key:
      return self._cache
    changed, gain, offset = key
    image, label = self.base.image, self.base.label
    if any(changed) or any(g != 1.0 for g in gain) or any(offset):
      image, label = image.copy(), label.copy()
      for k, is_changed in enumerate(changed):
        if is_changed:
          image[k], label[k] = self.replaced.image[k], self.replaced.label[k]
        if gain[k] != 1.0:
          image[k] *= np.float32(gain[k])
        if offset[k]:  # Real slices only: padding stays 0.
          image[k][self.base.mask[k]] += np.float32(offset[k])
    self._cache_key = key
    self._cache = dataclasses.replace(self.base, image=image, label=label)
    return self._cache


def report_section(scenario: Scenario, evals: list,
                   training_sites: np.ndarray | None = None) -> dict:
  """The scenario's events and, for each, the changed site's validation
  Dice at the last evaluation before and the first after it."""
  out = []
  for r, name, what in scenario.events:
    before = [e for e in evals if e["round"] < r]
    after = [e for e in evals if e["round"] >= r]
    out.append({
        "round": r, "site": name, "change": what,
        "val_dice_before": (before[-1]["dice_per_site"].get(name)
                            if before else None),
        "val_dice_after": (after[0]["dice_per_site"].get(name)
                           if after else None),
        "evaluated_rounds": [before[-1]["round"] if before else None,
                             after[0]["round"] if after else None]})
  windows = scenario.active_windows()
  training = (np.ones(len(scenario.site_names), bool)
              if training_sites is None else training_sites)
  return {
      "events": out,
      # Held-out sites (--held_out_sites) never train: no membership.
      "membership": {name: {"first_round": int(a) + 1, "last_round": int(b)}
                     for name, (a, b), t in zip(scenario.site_names, windows,
                                                training) if t},
      "note": ("public: fixed by the configuration before the run; "
               "validation Dice is on held-out patients of each site's data "
               "as of that round"),
  }
