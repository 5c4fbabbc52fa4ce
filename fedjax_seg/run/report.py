"""What a run writes: its history rows, report.json, rounds.csv, sites.csv.

Every value written is released under DP and accounted, public by a stated
assumption (`assumptions`), or computed on held-out patients; un-noised
training statistics only with --release_training_diagnostics, marked NOT
COVERED (`NOT_COVERED_KEY`). `build` assembles the report (privacy section
with the ledgers, plan and assumptions; test metrics; history; config;
versions; timing), `write_outputs` writes it with the CSVs and plots.
"""

import csv
import io
import json
import math
import os
import pathlib
import platform
import sys
import warnings

import jax
import numpy as np

from fedjax_seg import privacy
from fedjax_seg.privacy import auditing
from fedjax_seg.run import artifacts
from fedjax_seg.run import many_sites
from fedjax_seg.run import noise_secret
from fedjax_seg.run import scenarios as scenarios_lib
from fedjax_seg.run import setup as setup_lib
from fedjax_seg.run import state as state_lib


# History rows keep un-noised training diagnostics (only with
# --release_training_diagnostics) under this key.
NOT_COVERED_KEY = "NOT_COVERED_BY_THE_GUARANTEE"


DIAGNOSTICS_WARNING = (
    "NOT COVERED BY THE GUARANTEE: --release_training_diagnostics wrote the "
    "training loss and the clipped fraction over the realised sampled units "
    "(and, under site-level DP, the realised sampled sites), computed from "
    "private training data without noise.")


# The report's and README's one sentence on public site sizes.
SITE_SIZES_ASSUMPTION = (
    "each site's number of training units N_k is public (it sets the "
    "sampling rate q_k, the noise multiplier and the FedAvg weights, and "
    "this report gives it); the epsilons are for adding or removing one "
    "unit, so against an adversary who knows N_k and that one unit was "
    "replaced rather than added or removed, the loss is up to about twice "
    "epsilon (add/remove composed with remove/add).")


# PLD discretisation of the report's epsilons (the verifier uses the same).
# 1e-3 gives a valid (pessimistic) bound within about 1e-5 of 1e-4's on the
# default run, ten times faster (10 s per distinct event at 1e-4).
PLD_DISCRETIZATION = 1e-3


def versions() -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import fedjax_seg  # pylint: disable=g-import-not-at-top
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  return {"fedjax_seg": fedjax_seg.__version__, "jax": jax.__version__,
          "jaxlib": metadata.version("jaxlib"), "flax": flax.__version__,
          "optax": optax.__version__,
          "dp_accounting": metadata.version("dp-accounting"),
          "jax_privacy": metadata.version("jax-privacy"),
          "numpy": np.__version__, "python": sys.version.split()[0]}


def nanmean(values, axis=None):
  """Mean ignoring NaN (sites without validation patients); NaN if none."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return np.nanmean(values, axis=axis)


def _nan_to_none(x):
  return None if x is None or (isinstance(x, float) and not math.isfinite(x)) \
      else x


def round_row(run: setup_lib.Run, state: state_lib.RunState, round_index: int,
               part: np.ndarray, out, seconds: float) -> dict:
  """The history row of a round: covered, public or held-out values only,
  plus the NOT COVERED diagnostics when --release_training_diagnostics."""
  config, plan = run.config, run.plan
  p = config.privacy
  names = plan.site_names
  epsilon = (state.main_ledger(plan).epsilons() if p.enabled
             else {s: None for s in names})
  row = {
      "round": round_index + 1, "device_seconds": seconds,
      "epsilon": epsilon,
      "sigma": dict(zip(names, map(
          float, plan.noise.accounted_sigma[round_index]))),
  }
  if p.use_site_level:
    # The realised set of sampled sites is hidden by site-level DP: neither
    # the participants nor anything that depends on them is written.
    row["site_level_clip"] = float(out.server.l2_clip_norm)
    if p.record_level:
      row["clip"] = {s: p.l2_clip_norm for s in names}
  else:
    row["participants"] = [names[k] for k in np.flatnonzero(part)]
    row["clip"] = dict(zip(names, map(float, np.where(
        part, out.client.l2_clip_norm if p.record_level else np.inf,
        np.nan))))
  if run.many:
    # Per-site values only for the sites that trained (the whole table is
    # in the report's privacy section and sites.csv); distributions for all.
    shown = [] if p.use_site_level else row["participants"]
    for key in ("epsilon", "sigma", "clip"):
      if key in row:
        row[key] = {s: row[key][s] for s in shown}
    values = [v for v in epsilon.values() if v is not None]
    row["sigma_max"] = float(plan.noise.accounted_sigma[round_index].max())
    row["epsilon_max"] = max(values) if values else None
    row["epsilon_median"] = float(np.median(values)) if values else None
  if config.release_training_diagnostics:
    m = out.client
    units = int(m.num_real.sum())
    diagnostics = {
        "train_loss": float(m.loss_sum.sum() / max(units, 1)),
        "clipped_fraction": float(m.num_clipped.sum() / max(units, 1)),
    }
    if p.use_site_level:
      diagnostics["participants"] = [names[k] for k in np.flatnonzero(part)]
      diagnostics["sites_clipped"] = int(out.server.num_clipped)
    row[NOT_COVERED_KEY] = diagnostics
  return row


def rounds_charged(state: state_lib.RunState,
                   plan: setup_lib.RunPlan) -> dict:
  """{site: rounds charged in the main ledger}: the rounds a site trained,
  or every round under site-level DP (one event per charged round, after
  the events a composed --init_from source brought)."""
  ledger = state.main_ledger(plan)
  prior = plan.init_source.prior_events if plan.init_source else {}
  return {s: len(ledger.events(s)) - len(prior.get(s, ()))
          for s in ledger.site_names}


def diagnostics_released(config, history) -> bool:
  """Whether any output holds NOT COVERED diagnostics (this run's flag, or
  rows of an earlier part of a resumed run)."""
  return config.release_training_diagnostics or any(
      NOT_COVERED_KEY in row for row in history)


def assumptions(config, plan: setup_lib.RunPlan,
                diagnostics_released: bool) -> dict:
  """What the epsilons cover and what is public, for report.json."""
  p = config.privacy
  public = [
      "site names and modalities",
      "the number of training units of each site (slices and patients) and "
      "the sampling rates and maximum batch size derived from them",
      "the configuration (every flag) and the noise plan derived from it and "
      "from the unit counts (sigma per round and site, clip norms unless "
      "adaptive)",
  ]
  if not p.use_site_level:
    public.append(
        "which sites train in each round: drawn from the noise root, "
        "independently of the data (under site-level DP this is hidden and "
        "never written)")
  not_covered = [
      "validation and test metrics (Dice, IoU, HD95): computed on held-out "
      "patients who are in no training set; they describe those patients and "
      "are not covered by the training guarantee",
      "wall-clock timings (seconds per round, ETA): they follow how much was "
      "sampled and, under site-level DP, how many sites were sampled and how "
      "large they are (the loop backend runs only sampled sites; with "
      "--num_sites a round renders its cohort); a simulation runs on data "
      "you hold, but do not publish per-round timings of a real deployment",
      "checkpoint state files (parameters, optimizer and site-local states, "
      "for resumption): the simulator's internal state, not a release; the "
      "final parameters are covered",
  ]
  if diagnostics_released:
    not_covered.append(DIAGNOSTICS_WARNING)
  if plan.dataset_preparation is not None:
    public.append("the prepared dataset's preparation id: random, drawn when "
                  "it was prepared, no function of the data")
  if plan.init_source is not None:
    public.append(plan.init_source.assumption())
  covered = ("the trained parameters and everything computed from them "
             "(post-processing), every epsilon, the noised adaptive-clipping "
             "releases (clip norms)")
  return {
      "unit": plan.unit.value,
      "unit_meaning": {
          "example": "one training slice (one volume with --volumes)",
          "patient": "all training slices of one patient",
          "site": "all data of one site (DP-FedAvg)"}[plan.unit.value],
      "neighbouring_relation": "add or remove one unit",
      "covered": covered if p.enabled else "nothing: --nodp (NOT PRIVATE)",
      "public": public,
      "not_covered": not_covered,
      "secret": noise_secret.statement(config),
      "patients_at_one_site": "each patient's data are at one site only "
                              "(per-site ledgers assume disjoint patients)",
      "site_sizes": SITE_SIZES_ASSUMPTION,
  }


def _ledger_section(ledger: privacy.PrivacyLedger, names) -> dict:
  epsilon_pld = ledger.epsilons_pld(PLD_DISCRETIZATION, workers="auto")
  return {"ledger": ledger.to_dict(), "epsilon_per_site": ledger.epsilons(),
          "epsilon_max": ledger.max_epsilon(),
          "epsilon_pld_per_site": {s: epsilon_pld[s] for s in names},
          "epsilon_label": privacy.PrivacyUnit(ledger.unit).epsilon_label}


def mechanism_section(mech, rounds: int, sigma, names) -> dict:
  """`privacy.noise_mechanism`: the correlated noise's strategy and what it
  buys (public: functions of the settings and site sizes)."""
  ratio = mech.model_noise_ratio(rounds, sigma)
  return {
      "kind": mech.kind,
      "strategy_per_site": dict(zip(
          names, (c.to_dict() for c in mech.strategies))),
      "state_copies_of_parameters_per_site": mech.stream.copies,
      "cycles_per_site": dict(zip(names, map(int, mech.cycles))),
      "noise_multiplier_per_site": dict(zip(names, map(float, sigma))),
      "independent_noise_multiplier_per_site": dict(zip(
          names, map(float, mech.independent_sigma))),
      "model_noise_vs_independent_per_site": dict(zip(
          names, map(float, ratio))),
      "note": ("noise_multiplier is the fresh noise z's; the ledger's "
               "events carry the matrix mechanism's (see docs/privacy.md)."
               " model_noise_vs_independent: RMS noise accumulated in the "
               "model over DP-SGD's at the same target (< 1: less)."),
  }


def server_mechanism_section(noise, rounds: int) -> dict:
  """`privacy.noise_mechanism` of correlated noise at the server (--unit=
  site): the strategy, its groups and the noise it leaves on the model's
  mean update against independent DP-FedAvg at the same target (public:
  functions of the settings and the number of sites)."""
  mech, z = noise.site_mechanism, noise.site_applied_sigma
  ratio = float(mech.model_noise_ratio(rounds, np.array([z]))[0]) * (
      noise.site_sampling_rate * int(noise.training_sites.sum())
      / noise.expected_sites)
  return {
      "kind": mech.kind, "at": "server",
      "strategy": mech.strategies[0].to_dict(),
      "state_copies_of_parameters": mech.stream.copies,
      "cycles": int(mech.cycles[0]),
      "group_sampling_rate": noise.site_group_rate,
      "expected_sites": noise.expected_sites,
      "noise_multiplier": float(z),
      "independent_noise_multiplier": float(mech.independent_sigma[0]),
      "model_noise_vs_independent": ratio,
      "note": ("noise_multiplier is the fresh noise z's; the ledger's "
               "events carry the matrix mechanism's. model_noise_vs_"
               "independent: RMS noise accumulated in the model's mean "
               "update over independent DP-FedAvg's with q K expected "
               "sites, at the same --site_target_epsilon (without one, at "
               "the same z) (< 1: less)."),
  }


def privacy_section(run: setup_lib.Run, state: state_lib.RunState) -> dict:
  config, plan = run.config, run.plan
  p, f = config.privacy, config.federated
  names = plan.site_names
  section = {"enabled": p.enabled, "unit": plan.unit.value, "delta": p.delta,
             "accountant": "rdp", "pld_accountant": "pld",
             "pld_value_discretization_interval": PLD_DISCRETIZATION,
             "epsilon_label": plan.unit.epsilon_label,
             "assumptions": assumptions(
                 config, plan, diagnostics_released(config, state.history))}
  if not p.enabled:
    section.update(
        warning="NOT PRIVATE: trained without clipping or noise.",
        epsilon_per_site={s: None for s in names}, epsilon_max=None,
        epsilon_pld_per_site={s: None for s in names}, ledger=None)
    return section
  rounds_done = state.rounds_completed
  site_plan = {"noise_multiplier": plan.noise.site_recorded_sigma,
               "sampling_rate": p.site_sampling_rate,
               "rounds": list(range(rounds_done)),
               "charged_sites": [names[k] for k in
                                 np.flatnonzero(plan.noise.training_sites)]}
  site_mech = plan.noise.site_mechanism
  if site_mech is not None:
    site_plan["noise_mechanism"] = dict(
        site_mech.to_dict(), group_sampling_rate=plan.noise.site_group_rate,
        expected_sites=plan.noise.expected_sites)
  if p.record_level:
    section.update(_ledger_section(state.ledger, names))
    section["plan"] = {
        "local_steps": f.local_steps,
        "max_batch_size": plan.noise.max_batch_size,
        "dataset_size_per_site": dict(zip(names, map(int, plan.noise.units))),
        "sampling_rate_per_site": dict(
            zip(names, map(float, plan.noise.sampling_rates))),
        "rounds_trained_per_site": state.charged_rounds,
        "accounted_sigma_per_round": {
            s: plan.noise.recorded_sigma[:, k].tolist() for k, s in
            enumerate(names)},
    }
    section["noise_multiplier_per_site"] = dict(zip(names, map(
        float, plan.noise.base_sigma)))
    mech = plan.noise.mechanism
    if mech is not None:
      section["plan"]["noise_mechanism"] = mech.to_dict()
      section["noise_mechanism"] = mechanism_section(mech, f.rounds,
                                                     plan.noise.base_sigma,
                                                     names)
    if p.use_site_level:
      section["site_level"] = dict(_ledger_section(state.site_ledger, names),
                                   plan=site_plan)
  else:
    section.update(_ledger_section(state.site_ledger, names))
    section["plan"] = site_plan
    if site_mech is not None:
      section["noise_mechanism"] = server_mechanism_section(plan.noise,
                                                            f.rounds)
  source = plan.init_source
  if source is not None:
    section["init_from"] = {"workdir": source.workdir,
                            "report_sha256": source.report_sha256,
                            "relation": source.relation}
  composed = None if source is None else source.report_section()
  if composed is not None:
    section["composed_from"] = composed
  composed_site_level = (None if source is None
                         else source.report_section(site_level=True))
  if composed_site_level:
    section["site_level"]["composed_from"] = composed_site_level
  section.update(sampling_rate_per_site=dict(zip(
      names, map(float, plan.noise.sampling_rates))),
                 max_batch_size=plan.noise.max_batch_size,
                 epsilon_budget=p.epsilon_budget,
                 target_epsilon=p.target_epsilon)
  audit = setup_lib.audit_config(config, plan)
  if audit is not None:
    section["audit"] = audit_section(run, state, audit, section)
  return section


def audit_section(run: setup_lib.Run, state: state_lib.RunState,
                  audit: auditing.AuditConfig,
                  privacy_section: dict) -> dict:
  """`privacy.audit` of the report: the one-run canary audit's figures,
  claimed epsilons read from `privacy_section` (computed once)."""
  config, plan = run.config, run.plan
  site = plan.site_names[audit.site]
  claimed = privacy_section["epsilon_per_site"][site]
  observed = np.asarray(state.site_states.audit.observed[audit.site])
  included = np.asarray(auditing.inclusion(run.root, audit))
  result = auditing.audit_from_scores(
      auditing.scores(run.root, audit, observed), included,
      config.privacy.delta, audit.significance)
  return {
      "method": "one-run white-box audit (Steinke, Nasr, Jagielski 2023) "
                "with gradient canaries; bound from jax_privacy.auditing."
                "CanaryScoreAuditor.epsilon_one_run (Bonferroni thresholds)",
      "site": site, "unit": plan.unit.value,
      "epsilon_label": plan.unit.epsilon_label,
      "claimed_epsilon": claimed,
      "claimed_epsilon_pld": privacy_section["epsilon_pld_per_site"][site],
      "canary_kind": audit.kind,
      "canaries_per_step_max": audit.max_per_step,
      "canary_contributions": int(state.site_states.audit.sampled[
          audit.site]),
      "canary_contributions_cut": int(state.site_states.audit.cut[
          audit.site]),
      "noise_seed": config.noise_seed,
      "contradicts_claim": result.epsilon_lower_bound > claimed,
      **result.to_dict(),
      **({} if result.epsilon_gdp_estimate is not None else {
          "epsilon_gdp_estimate_withheld":
              "the installed jax_privacy's epsilon_from_gdp is positive on "
              "scores without signal (its |mu| shortcut, fixed upstream in "
              "jax_privacy pull request 270)"}),
      "released": "post-processing of the audited site's released (noised) "
                  "gradients and the canary inclusion bits; the canaries "
                  "changed that site's clipped sums (and through its "
                  "updates the global model), nothing else",
  }


def build(run: setup_lib.Run, state: state_lib.RunState, result,
          stopped_reason, seconds, round_times) -> dict:
  config, plan = run.config, run.plan
  names = plan.site_names
  # With --num_sites the test pass covers a sample of sites; `run.data.val` has
  # the vocabularies.
  test = run.data.test if run.data.cohorts is None else run.data.val
  tested = (names if run.data.cohorts is None
            else tuple(names[k] for k in run.data.test_ids))
  def fg(a):  # Mean over foreground classes; NaN for sites without data.
    a = np.asarray(a, np.float64)[..., 1:]
    count = np.sum(~np.isnan(a), axis=-1)
    return np.where(count > 0, np.nansum(a, axis=-1) / np.maximum(count, 1),
                    np.nan)

  dice_site = fg(result["dice_per_site"])
  report = {
      "rounds_completed": state.rounds_completed,
      "stopped_reason": stopped_reason,
      "privacy": privacy_section(run, state),
      "metrics": {
          "split": "test (held-out patients; not covered by the guarantee)",
          "dice_per_site": {s: _nan_to_none(float(v)) for s, v in
                            zip(tested, dice_site)},
          "dice_per_modality": {m: _nan_to_none(float(v)) for m, v in zip(
              test.modality_names, fg(result["dice_per_modality"]))},
          "dice_mean": _nan_to_none(float(nanmean(dice_site))),
          "dice_per_site_per_class": {
              s: dict(zip(test.class_names, map(float, row)))
              for s, row in zip(tested, result["dice_per_site"])},
          "iou_per_site": {s: _nan_to_none(float(v)) for s, v in
                           zip(tested, fg(result["iou_per_site"]))},
          "hd95_per_site": {s: _nan_to_none(float(np.mean(v)))
                            for s, v in zip(tested, result["hd95_per_site"])},
          "validation_history": state.evals,
      },
      "history": state.history,
      "config": config.to_dict(),
      # Which preparation of the dataset (a composed --init_from compares):
      # a random id drawn when it was prepared, public.
      "dataset": {"name": config.data.dataset,
                  "preparation_id": plan.dataset_preparation},
      "sites": {s: {"modality": m, "train_units": int(n)} for s, m, n in
                zip(names, plan.site_modalities, plan.noise.units)},
      "versions": versions(),
      "device": {"platform": jax.default_backend(),
                 "devices": [str(d) for d in jax.devices()],
                 "machine": platform.machine(),
                 "cpu_count": os.cpu_count(),
                 "backend": config.performance.backend},
      "timing": _timing(seconds, state.history[-len(round_times):]
                        if round_times else []),
  }
  if run.data.cohorts is not None:
    report["metrics"]["sites_evaluated"] = (
        f"{len(tested)} of {len(names)} sites (seeded sample, --test_sites)"
        if len(tested) < len(names) else f"all {len(names)} sites")
    report["metrics"]["validation_sites"] = list(run.data.val.site_names)
  if run.data.scenario is not None:
    report["scenario"] = scenarios_lib.report_section(
        run.data.scenario, state.evals, plan.noise.training_sites)
    if run.data.scenario_data is not None:
      report["metrics"]["split"] += (
          f" as the sites' scanners acquire them in the last round run "
          f"({max(state.rounds_completed, 1)})")
  if run.many:
    report["sites_summary"] = many_sites.summary(
        report, names, plan.site_modalities, plan.noise.units,
        rounds_charged(state, run.plan))
  if diagnostics_released(config, state.history):
    report["training_diagnostics"] = {
        "warning": DIAGNOSTICS_WARNING,
        "where": f"history[*].{NOT_COVERED_KEY}"}
  return report


def _timing(total_seconds: float, rows: list) -> dict:
  """Whole-run and per-round timing of this run's rounds (public)."""
  timing = {"total_seconds": total_seconds, "rounds_this_run": len(rows),
            "first_round_wall_seconds": (rows[0]["wall_seconds"] if rows
                                         else None)}
  later = rows[1:]  # The first round compiles.
  for key in ("wall_seconds", "device_seconds", "host_seconds"):
    timing[f"median_round_{key}"] = (
        float(np.median([r[key] for r in later])) if later else None)
  if later:
    # Host share of a round without validation (what a round costs on top
    # of the device work); validation rounds are reported apart.
    plain = [r for r in later if not r["evaluation_seconds"]] or later
    timing["median_host_fraction"] = float(np.median(
        [r["host_seconds"] / r["wall_seconds"] for r in plain]))
  return timing


def write_outputs(workdir: pathlib.Path, report: dict, history: list,
                   plan: setup_lib.RunPlan, charged: dict) -> None:
  """report.json, rounds.csv, plots and (many sites) sites.csv; `charged`
  is {site: number of rounds charged} (`rounds_charged`)."""
  artifacts.atomic_write(workdir / artifacts.REPORT,
                         json.dumps(report, indent=1).encode())
  many = "sites_summary" in report
  if many:
    artifacts.atomic_write(workdir / artifacts.SITES_CSV, many_sites.sites_csv(
        report, plan.site_names, plan.site_modalities, plan.noise.units,
        charged).encode())
  buf = io.StringIO()
  writer = csv.writer(buf)
  # Many sites: the distributions' summaries instead of a column per site.
  names = [] if many else list(plan.site_names)
  label = report["privacy"]["epsilon_label"].replace(" ", "_")
  has = lambda key: any(key in row for row in history)
  header = ["round", "wall_seconds", "device_seconds", "host_seconds",
            "evaluation_seconds", "val_dice_mean"]
  if many:
    header += [f"{label}_max", f"{label}_median"]
  header += [f"{label}_{s}" for s in names] + [f"sigma_{s}" for s in names]
  if has("clip") and names:
    header += [f"clip_{s}" for s in names]
  if has("site_level_clip"):
    header.append("site_level_clip")
  if has("participants"):
    header.append("sites_trained")
  diagnostics = has(NOT_COVERED_KEY)
  if diagnostics:
    header += [f"{k} [NOT COVERED BY THE GUARANTEE]" for k in
               ("train_loss", "clipped_fraction", "sites_sampled")]
  writer.writerow(header)
  for row in history:
    line = [row["round"]] + [
        f"{row[k]:.4f}" if k in row else "" for k in (
            "wall_seconds", "device_seconds", "host_seconds",
            "evaluation_seconds")] + [row.get("val_dice_mean", "")]
    if many:
      line += [row.get("epsilon_max", ""), row.get("epsilon_median", "")]
    line += [row["epsilon"][s] for s in names]
    line += [row["sigma"][s] for s in names]
    if has("clip") and names:
      line += [row.get("clip", {}).get(s, "") for s in names]
    if has("site_level_clip"):
      line.append(row.get("site_level_clip", ""))
    if has("participants"):
      line.append(len(row.get("participants", [])))
    if diagnostics:
      d = row.get(NOT_COVERED_KEY, {})
      line += [d.get("train_loss", ""), d.get("clipped_fraction", ""),
               len(d["participants"]) if "participants" in d else ""]
    writer.writerow(line)
  artifacts.atomic_write(workdir / artifacts.ROUNDS_CSV, buf.getvalue().encode())
  from fedjax_seg.run import plots  # pylint: disable=g-import-not-at-top
  if many:
    plots.write_many_sites(workdir, report, history)
  else:
    plots.write_all(workdir, report, history)
