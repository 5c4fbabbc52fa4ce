"""Runs over a consortium of many sites (`--num_sites`): cohorts, samples,
summaries.

With `--num_sites=N` the simulator never stacks all N sites. What it keeps
per site is small and public: the site's name, profile, unit counts (what
the privacy plan needs), its ledger and its `SiteState` (adaptive clipping,
FedBN parameters). Each round:

1. the cohort is drawn over all N sites (`--sites_per_round`, or Poisson
   under site-level DP), from the seed alone;
2. `CohortSource.round_inputs` renders (or takes from its cache) just the
   cohort's training data, stacked at the consortium's fixed capacity and
   padded to a fixed number of cohort slots with non-participating filler
   slots, so the round's shapes do not change with the cohort and it compiles
   once (a larger Poisson cohort than any before widens the slots: one more
   compilation, never a truncation);
3. the trainer runs the round with the cohort's consortium ids
   (`FederatedTrainer.run_round(site_ids=...)`), so site k derives its keys
   from k whichever cohort it is in;
4. `scatter` writes the cohort's new states and metrics back at their ids.

Validation during training covers a fixed, seeded sample of sites
(`--eval_sites`); the final test evaluation a seeded sample of
`--test_sites` sites (all when N is not larger), evaluated a block of sites
at a time, so memory stays flat in N.
"""

import csv
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as scipy_stats

from fedjax_seg.data import consortium as consortium_lib
from fedjax_seg.run import config as config_lib
from fedjax_seg.segmentation import task as segmentation_task

# Above this many sites the report, CSV and plots give distributions and a
# per-site table (sites.csv) instead of one column or curve per site.
PER_SITE_OUTPUTS_MAX = 64
HISTOGRAM_BINS = 20
# Separates the evaluation samples' draws from everything else.
_EVAL_SAMPLE_TAG, _TEST_SAMPLE_TAG = 7_001, 7_002


@dataclasses.dataclass(frozen=True)
class SiteCounts:
  """What the privacy plan reads of the training split: per-site counts and
  vocabularies (public by the report's stated assumption), no images."""

  num_examples: np.ndarray
  num_patients: np.ndarray
  site_names: tuple[str, ...]
  site_modalities: tuple[str, ...]


def site_counts(consortium: consortium_lib.Consortium) -> SiteCounts:
  counts = consortium.counts("train")
  return SiteCounts(counts["num_examples"], counts["num_patients"],
                    consortium.site_names, consortium.site_modalities)


def sample_sites(num_sites: int, size: int, seed: int, tag: int
                 ) -> np.ndarray:
  """Sorted ids of a seeded sample of min(size, N) of N sites (host)."""
  if size >= num_sites:
    return np.arange(num_sites)
  rng = np.random.default_rng([seed, tag])
  return np.sort(rng.choice(num_sites, size, replace=False))


def eval_sample(num_sites: int, size: int, seed: int) -> np.ndarray:
  return sample_sites(num_sites, size, seed, _EVAL_SAMPLE_TAG)


def test_sample(num_sites: int, size: int, seed: int) -> np.ndarray:
  return sample_sites(num_sites, size, seed, _TEST_SAMPLE_TAG)


def cohort_slots(num_sites: int, sites_per_round: int,
                 site_sampling_rate: float | None) -> int:
  """Cohort slots of a round: --sites_per_round (at most N); under
  site-level DP's Poisson sampling, the 1 - 1e-6 quantile of the cohort
  size Binomial(N, q) rounded up to a multiple of 8, so the slots never
  depend on the realised draws (one compilation, and a resumed run uses the
  same program); else all N sites, refused above PER_SITE_OUTPUTS_MAX sites
  (every slot holds the largest possible site)."""
  if sites_per_round:
    return min(sites_per_round, num_sites)
  if site_sampling_rate is not None:
    quantile = scipy_stats.binom.ppf(1 - 1e-6, num_sites, site_sampling_rate)
    return int(min(num_sites, -(-max(1, int(quantile)) // 8) * 8))
  if num_sites > PER_SITE_OUTPUTS_MAX:
    raise config_lib.ConfigError(
        f"--sites_per_round: with --num_sites={num_sites} every site would "
        "train every round, stacked at the largest site's capacity; give a "
        "cohort size (--sites_per_round) or site-level DP's "
        "--site_sampling_rate.")
  return num_sites


def _take(tree, ids):
  ids = jnp.asarray(ids)
  return jax.tree.map(lambda x: x[ids], tree)


class CohortSource:
  """The training data of each round's cohort, at fixed shapes.

  Args:
    consortium: the sites.
    slots: initial number of cohort slots (e.g. --sites_per_round); it grows
      (to a multiple of 8) when a cohort is larger.
  """

  def __init__(self, consortium: consortium_lib.Consortium, slots: int):
    self.consortium = consortium
    self.slots = max(1, int(slots))

  def round_inputs(self, cohort: np.ndarray, site_states, site_config):
    """(data, site_states, site_config, participating, site_ids) of a
    round over `cohort` (consortium ids), padded to the slots.

    `site_states` and `site_config` have a leading [N] axis; filler slots
    get site 0's data, state and config (they do not take part, so nothing
    of theirs is kept; site 0 stays in the render cache).
    """
    cohort = np.asarray(cohort, np.int64)
    n = len(cohort)
    if n > self.slots:
      self.slots = -(-n // 8) * 8
    pad = self.slots - n
    gather = np.concatenate([cohort, np.zeros(pad, np.int64)])
    data = self.consortium.site_arrays(gather, "train", fixed_capacity=True)
    participating = np.arange(self.slots) < n
    # Filler ids are outside 0..N-1, so never a real site's keys.
    site_ids = np.concatenate([cohort, self.consortium.num_sites
                               + np.arange(pad)])
    return (segmentation_task.site_data(data), _take(site_states, gather),
            _take(site_config, gather), participating, site_ids)

  @staticmethod
  def scatter(site_states, new_states, cohort, client_metrics, num_sites):
    """([N] site states with the cohort's rows replaced, [N] numpy client
    metrics: zeros for sites not in the cohort)."""
    cohort = np.asarray(cohort, np.int64)
    n = len(cohort)
    if n:
      ids = jnp.asarray(cohort)
      site_states = jax.tree.map(lambda old, new: old.at[ids].set(new[:n]),
                                 site_states, new_states)
    def full(x):
      x = np.asarray(x)
      out = np.zeros((num_sites,) + x.shape[1:], x.dtype)
      out[cohort] = x[:n]
      return out
    return site_states, jax.tree.map(full, client_metrics)


def histogram(values, bins: int = HISTOGRAM_BINS) -> dict:
  """{"edges", "counts", "count", "min", "median", "max"} of the finite
  values (JSON-ready)."""
  v = np.asarray([x for x in values if x is not None], np.float64)
  v = v[np.isfinite(v)]
  if not len(v):
    return {"count": 0}
  counts, edges = np.histogram(v, bins=bins)
  return {"count": int(len(v)), "min": float(v.min()),
          "median": float(np.median(v)), "max": float(v.max()),
          "edges": edges.tolist(), "counts": counts.tolist()}


def summary(report: dict, names, modalities, units,
            rounds_charged: dict) -> dict:
  """The report's "sites_summary": distributions of epsilon, rounds charged
  in the record-level ledger (the rounds a site trained, or every round
  under site-level DP, which hides who trained) and test Dice (per
  modality) over the consortium. `rounds_charged`: {site: count}."""
  eps = report["privacy"].get("epsilon_per_site") or {}
  dice = report["metrics"]["dice_per_site"]
  by_modality = {}
  for name, modality in zip(names, modalities):
    if dice.get(name) is not None:
      by_modality.setdefault(modality, []).append(dice[name])
  charged = [rounds_charged.get(s, 0) for s in names]
  return {
      "num_sites": len(names),
      "sites_charged": int(np.sum(np.asarray(charged) > 0)),
      "sites_evaluated": len([v for v in dice.values() if v is not None]),
      "train_units": histogram(units),
      "rounds_charged": histogram(charged),
      "epsilon": histogram(eps.get(s) for s in names),
      # Sites never charged are at 0; the distribution of the others.
      "epsilon_charged_sites": histogram(
          eps.get(s) for s, c in zip(names, charged) if c),
      "test_dice_per_modality": {m: histogram(v)
                                 for m, v in sorted(by_modality.items())},
      "per_site_table": "sites.csv",
  }


def sites_csv(report: dict, names, modalities, units, rounds_charged) -> str:
  """One row per site: name, modality, training units, rounds charged,
  epsilon (RDP and PLD), test Dice (empty if not in the test sample)."""
  privacy = report["privacy"]
  eps = privacy.get("epsilon_per_site") or {}
  pld = privacy.get("epsilon_pld_per_site") or {}
  dice = report["metrics"]["dice_per_site"]
  label = privacy["epsilon_label"].replace(" ", "_")
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(["site", "modality", "train_units", "rounds_charged",
                   label, f"{label}_pld", "test_dice"])
  for name, modality, n in zip(names, modalities, units):
    blank = lambda v: "" if v is None else v
    writer.writerow([name, modality, int(n),
                     rounds_charged.get(name, 0), blank(eps.get(name)),
                     blank(pld.get(name)), blank(dice.get(name))])
  return buf.getvalue()
