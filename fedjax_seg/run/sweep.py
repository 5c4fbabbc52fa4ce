"""Sweeps: many configurations of one simulation, run together.

A sweep is a list of members, each a set of flag overrides on a common base
configuration (`experiments/sweep.py` builds them from `--sweep=NAME:V1,V2`,
the grid being the product, or from a JSON list of flag dicts). Each member
is exactly the simulation `experiments.simulate` would run with the member's
flags (`members/<name>/flags.txt`; it includes `--sweep_member=<index>` and
`--data_seed`): the same plan, ledger, keys, checkpoints and report, written
to `members/<name>/`.

What is shared:
  * the data: loaded once (every member has the same data and split, so a
    sweep over --seed varies training randomness, not data);
  * the compiled round: members whose static settings are equal
    (`setup.trainer_signature`; they may differ in noise schedule,
    target epsilon, noise multiplier, clip norm, local and server learning
    rates and seed, which the round reads as arrays) share one
    `FederatedTrainer`. Members that differ in a static setting (e.g. --nodp,
    the adaptive clipping quantile, the optimizer) form separate groups.

Member backends (a performance choice; results are equal within float
tolerance, and bit-identical to `experiments.simulate` under "loop"):
  * "loop": each member's round in turn, through its group's compiled
    program;
  * "vmap": all members of a group in one program, `jax.vmap` over a
    leading member axis, with the site backend inside (see
    `FederatedTrainer.run_member_rounds`), on one device;
  * "shard": as "vmap", with the member axis split over all devices
    (`jax.shard_map`; each device holds the data and vmaps over its block
    of members);
  * "auto": "loop" on CPU (measured faster there; see BENCHMARKS.md),
    "shard" on several accelerators, else "vmap".

Keys: each member's noise root is its own secret, drawn when the member
starts and kept in its checkpoint directory (`fedjax_seg.run.noise_secret`); with
--noise_seed, member i folds i into the seed's root (`--sweep_member`), so no
two members share a key even with equal seeds. Member i's model
initialisation folds i into --seed's root likewise.

Privacy: each member's epsilons are those of that member run alone, per
site. A sweep releases every member (their reports, validation Dice and
models), and each member's training touched the same patients, so the
figure that covers the sweep is the composition of all private members'
ledgers: `sweep.json`'s `release_all_members` gives it per site (RDP and
PLD, at the smallest member delta), with the composed ledger for the
verifier (`python -m fedjax_seg.verifier SWEEP_DIR`). The best member per
target epsilon is chosen by its mean Dice on the VALIDATION patients
(held-out patients in no training set) at the last validated round, never
by test Dice: choosing it is post-processing of the released members, so
releasing the chosen member is covered by `release_all_members`, and its
test figures stay an unbiased estimate. Quote that figure, not the member's
own, for a tuned model. Non-private members are left out of it and must not
be released with the private ones.
"""

import csv
import dataclasses
import io
import itertools
import json
import os
import pathlib
import time
from typing import Any, Mapping, Sequence

from absl import logging
import jax

from fedjax_seg.run import artifacts
from fedjax_seg.run import config as config_lib
from fedjax_seg.run import config_flags
from fedjax_seg.run import data as data_lib
from fedjax_seg.run import loop
from fedjax_seg.run import report as report_lib
from fedjax_seg.run import round as round_lib

SWEEP_JSON = "sweep.json"
SWEEP_CSV = "sweep.csv"

MEMBER_BACKENDS = ("auto", "loop", "vmap", "shard")

# Settings that change array shapes or the data: one sweep, one shape.
SHAPE_FLAGS = frozenset({
    "dataset", "data_dir", "image_size", "num_slices", "patients_scale",
    "split_fractions", "held_out_sites", "volumes", "data_seed", "model",
    "widths", "norm", "residual", "batch_size", "unit",
    # Scenarios change the data round by round, which members share.
    "scanner_changes", "intensity_drift", "site_joins", "site_leaves"})
# Settings every member shares by construction.
SHARED_FLAGS = frozenset({
    "rounds", "backend", "microbatch_size", "local_loop", "chunk_size",
    "per_example_grads",
    "eval_every", "checkpoint_every", "stop_after_rounds",
    "release_training_diagnostics", "sweep_member", "tensorboard"})


def check_sweepable(name: str) -> None:
  """Raises ConfigError naming --name if it may not differ between members."""
  if name not in config_flags.SPECS:
    raise config_lib.ConfigError(f"--sweep: no such flag --{name}.")
  if name in SHAPE_FLAGS:
    raise config_lib.ConfigError(
        f"--sweep: --{name} changes array shapes or the data, which all "
        "members share; run a separate sweep per value.")
  if name in SHARED_FLAGS:
    raise config_lib.ConfigError(
        f"--sweep: --{name} is shared by all members of a sweep (set it "
        "once, outside --sweep).")


def parse_sweep_flags(sweeps: Sequence[str]) -> list[dict[str, Any]]:
  """`["NAME:V1,V2", ...]` -> the product grid as a list of override dicts
  (typed values, in the order given)."""
  axes = []
  for text in sweeps:
    name, sep, values = text.partition(":")
    name = name.strip().lstrip("-")
    if not sep or not values.strip():
      raise config_lib.ConfigError(
          f"--sweep={text!r}: expected NAME:V1,V2,... .")
    if name == "nodp":  # --sweep=dp:true,false is the same.
      raise config_lib.ConfigError(
          "--sweep: write the DP switch as dp:true,false.")
    check_sweepable(name)
    axes.append([(name, config_flags.parse_value(name, v.strip()))
                 for v in values.split(",")])
  names = [axis[0][0] for axis in axes]
  if len(set(names)) != len(names):
    raise config_lib.ConfigError(f"--sweep: a flag appears twice in {names}.")
  return [dict(combo) for combo in itertools.product(*axes)] if axes else []


def load_members_file(path: str | os.PathLike) -> list[dict[str, Any]]:
  """A JSON list of {flag: value} dicts (flag names without dashes)."""
  try:
    members = json.loads(pathlib.Path(path).read_text())
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(f"--sweep_file={path}: {e}") from e
  if not isinstance(members, list) or not all(isinstance(m, dict)
                                              for m in members):
    raise config_lib.ConfigError(
        f"--sweep_file={path}: expected a JSON list of flag dicts.")
  out = []
  for m in members:
    for name in m:
      check_sweepable(name)
    out.append({name: config_flags.parse_value(name, v)
                for name, v in m.items()})
  return out


def member_name(index: int, overrides: Mapping[str, Any]) -> str:
  """A readable, file-safe member name, e.g. "03_noise_schedule-cosine"."""
  parts = [f"{k}-{v}" for k, v in overrides.items()]
  text = "_".join(parts) or "base"
  safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
  return f"{index:02d}_{safe}"[:120]


@dataclasses.dataclass(frozen=True)
class Member:
  """One configuration of the sweep."""

  index: int
  name: str
  overrides: dict
  config: config_lib.ExperimentConfig


def build_members(base: config_lib.ExperimentConfig,
                  overrides: Sequence[Mapping[str, Any]]) -> list[Member]:
  """Each member's full config: base flags, then its overrides, then
  --sweep_member=index and --data_seed fixed to the base's data seed."""
  if not overrides:
    raise config_lib.ConfigError(
        "--sweep: no members (give --sweep=NAME:V1,V2 or --sweep_file).")
  base_values = config_flags.config_to_values(base)
  members = []
  for index, over in enumerate(overrides):
    values = dict(base_values, **over)
    values["sweep_member"] = index
    values["data_seed"] = base.data_seed
    try:
      config = config_flags.config_from_values(values)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(
          f"sweep member {index} ({dict(over)}): {e}") from e
    members.append(Member(index, member_name(index, over), dict(over), config))
  return members


def resolve_member_backend(member_backend: str) -> str:
  if member_backend not in MEMBER_BACKENDS:
    raise config_lib.ConfigError(
        f"--member_backend: must be one of {MEMBER_BACKENDS}, got "
        f"{member_backend!r}.")
  if member_backend != "auto":
    return member_backend
  if jax.default_backend() == "cpu":
    return "loop"
  return "shard" if jax.device_count() > 1 else "vmap"


def run_sweep(members: Sequence[Member], workdir: str | os.PathLike, *,
              member_backend: str = "auto") -> dict:
  """Runs (or resumes) every member in lockstep; writes each member's outputs
  to `workdir/members/<name>/` and the sweep's to `workdir`. Returns the
  sweep summary (also `sweep.json`), or {"stopped_reason": "interrupted"}
  when --stop_after_rounds stopped it."""
  workdir = pathlib.Path(workdir)
  backend = resolve_member_backend(member_backend)
  artifacts.enable_compilation_cache()
  start = time.time()
  base = members[0].config
  if base.data.cohorts:
    # Each member renders its own cohorts; members cannot share one batched
    # program over different cohorts.
    if member_backend == "auto":
      backend = "loop"
    if backend != "loop":
      raise config_lib.ConfigError(
          "--member_backend: with --num_sites the members run one after the "
          "other (--member_backend=loop).")
    splits = None
  else:
    splits = data_lib.load(base.data, base.data_seed)
  trainers: dict = {}
  sims = []
  for m in members:
    mdir = workdir / "members" / m.name
    sims.append(loop.Simulation(m.config, mdir, splits=splits,
                                      trainers=trainers))
    # The Simulation has made mdir.
    artifacts.atomic_write(mdir / "flags.txt",
                            config_flags.to_flagfile(m.config).encode())
  groups = {}
  for i, sim in enumerate(sims):
    groups.setdefault(id(sim.run.trainer), []).append(i)
  logging.info("sweep: %d members in %d program group(s), member backend %s",
               len(sims), len(groups), backend)
  interrupted = False
  rounds = base.federated.rounds
  while not interrupted:
    pending = [i for i, s in enumerate(sims) if not s.stopped]
    if not pending:
      break
    r = min(sims[i].next_round for i in pending)
    if r >= rounds:
      break
    due = [i for i in pending if sims[i].next_round == r]
    if backend == "loop":
      # Each member's round as simulate runs it: begin, device, end.
      for i in due:
        part = sims[i].begin_round()
        if part is not None and not sims[i].end_round(
            part, *sims[i].run_round(part)):
          interrupted = True
      continue
    active = {i: part for i in due
              if (part := sims[i].begin_round()) is not None}
    results = {}
    for members_of_group in groups.values():
      ids = [i for i in members_of_group if i in active]
      if ids:  # One program for the group's members (one entry point).
        results.update(zip(ids, round_lib.device_round(
            [sims[i].run for i in ids], [sims[i].state for i in ids], r,
            [active[i] for i in ids], shard_members=backend == "shard")))
    for i in sorted(results):
      if not sims[i].end_round(active[i], *results[i]):
        interrupted = True
  if interrupted:
    return {"stopped_reason": "interrupted"}
  reports = [sim.finish() for sim in sims]
  summary = summarize(members, reports, time.time() - start, backend,
                      len(groups))
  write_outputs(workdir, summary, reports)
  return summary


def _member_entry(member: Member, report: dict) -> dict:
  p, metrics = report["privacy"], report["metrics"]
  entry = {
      "index": member.index, "name": member.name,
      "overrides": member.overrides,
      "flags": {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                config_flags.config_to_values(member.config).items()},
      "workdir": f"members/{member.name}",
      "private": p["enabled"],
      "epsilon_label": p["epsilon_label"],
      "delta": p["delta"],
      "target_epsilon": p.get("target_epsilon"),
      "epsilon_per_site": p.get("epsilon_per_site"),
      "epsilon_pld_per_site": p.get("epsilon_pld_per_site"),
      "epsilon_max": p.get("epsilon_max"),
      "epsilon_pld_max": (max(v for v in p["epsilon_pld_per_site"].values())
                          if p["enabled"] and p.get("epsilon_pld_per_site")
                          else None),
      "verified": p.get("verified", {}).get("ok") if p["enabled"] else None,
      "noise_multiplier_per_site": p.get("noise_multiplier_per_site"),
      "accounted_sigma_per_round": p.get("plan", {}).get(
          "accounted_sigma_per_round"),
      "dice_mean": metrics["dice_mean"],
      "dice_per_modality": metrics["dice_per_modality"],
      "dice_per_site": metrics["dice_per_site"],
      "iou_per_site": metrics["iou_per_site"],
      "hd95_per_site": metrics["hd95_per_site"],
      "validation_history": metrics["validation_history"],
      "validation_dice_mean": _last_validation_mean(report["history"]),
      "rounds_completed": report["rounds_completed"],
      "stopped_reason": report["stopped_reason"],
      "seconds": report["timing"]["total_seconds"],
      "final_params_sha256": report["final_params_sha256"],
  }
  return entry


def _last_validation_mean(history: Sequence[dict]) -> float | None:
  """The run's own `val_dice_mean` (mean over sites of the validation Dice)
  at its last validated round; None when it was never validated or that
  mean is undefined."""
  value = next((row["val_dice_mean"] for row in reversed(history)
                if "val_dice_mean" in row), None)
  return None if value is None or value != value else float(value)


def summarize(members: Sequence[Member], reports: Sequence[dict],
              seconds: float, backend: str, num_groups: int) -> dict:
  """The sweep's JSON: every member, and the best member per target epsilon
  (highest mean VALIDATION Dice at the last validated round among members
  with that --target_epsilon; its test Dice is reported, not used)."""
  entries = [_member_entry(m, r) for m, r in zip(members, reports)]
  best = {}
  for e in entries:
    if (not e["private"] or e["target_epsilon"] is None
        or e["validation_dice_mean"] is None):
      continue
    key = f"{e['target_epsilon']:g}"
    if (key not in best or e["validation_dice_mean"]
        > best[key]["validation_dice_mean"]):
      best[key] = {"member": e["name"],
                   "validation_dice_mean": e["validation_dice_mean"],
                   "dice_mean": e["dice_mean"],
                   "dice_per_modality": e["dice_per_modality"],
                   "epsilon_max": e["epsilon_max"],
                   "epsilon_pld_max": e["epsilon_pld_max"],
                   "overrides": e["overrides"]}
  nonprivate = [e["name"] for e in entries if not e["private"]]
  release = release_all_members(members, reports)
  for entry in best.values():
    entry["epsilon_max_release_all_members"] = (
        None if release is None else release["epsilon_max"])
  return {
      "format": "fedjax_seg.Sweep/1",
      "members": entries,
      "best_per_target_epsilon": best,
      "nonprivate_members": nonprivate,
      "member_backend": backend,
      "program_groups": num_groups,
      "seconds": seconds,
      "release_all_members": release,
      "privacy_note": (
          "Each member's epsilons are those of that member run alone (per "
          "site, the unit and delta given). Releasing the sweep (every "
          "member's outputs) costs the composition of all private members' "
          "ledgers: release_all_members. The best member is chosen by "
          "validation Dice on held-out patients (test Dice is reported, not "
          "used), post-processing of the released members, so a tuned "
          "model's figure is release_all_members.epsilon_max. Non-private "
          "members are outside it: do not release them."),
  }


def release_all_members(members: Sequence[Member],
                        reports: Sequence[dict]) -> dict | None:
  """The epsilon of releasing every private member together: per site, all
  private members' main-ledger events composed (member order) into one
  ledger, at the smallest member delta; None if no member is private."""
  from fedjax_seg import privacy  # pylint: disable=g-import-not-at-top
  private = [(m, r) for m, r in zip(members, reports)
             if r["privacy"]["enabled"]]
  if not private:
    return None
  ledgers = [privacy.PrivacyLedger.from_dict(r["privacy"]["ledger"])
             for _, r in private]
  delta = min(r["privacy"]["delta"] for _, r in private)
  units = {ledger.unit for ledger in ledgers}
  if len(units) != 1:
    raise config_lib.ConfigError(
        f"--sweep: the private members' epsilons are in units {units}; "
        "a sweep's members must share one unit to compose.")
  composed = privacy.PrivacyLedger(ledgers[0].site_names, delta=delta,
                                   unit=ledgers[0].unit)
  for ledger in ledgers:
    for site in composed.site_names:
      for event in ledger.events(site):
        composed.record_event(site, event)
  pld = composed.epsilons_pld(report_lib.PLD_DISCRETIZATION, workers="auto")
  return {
      "members": [m.name for m, _ in private],
      "delta": delta, "unit": composed.unit,
      "epsilon_label": privacy.PrivacyUnit(composed.unit).epsilon_label,
      "epsilon_per_site": composed.epsilons(),
      "epsilon_max": composed.max_epsilon(),
      "epsilon_pld_per_site": pld,
      "epsilon_pld_max": max(pld.values()),
      "pld_value_discretization_interval": report_lib.PLD_DISCRETIZATION,
      "ledger": composed.to_dict(),
      "covers": "releasing every private member's outputs together, and so "
                "the best member chosen by validation Dice on held-out "
                "patients",
  }


def write_outputs(workdir: pathlib.Path, summary: dict,
                  reports: Sequence[dict]) -> None:
  """sweep.json, sweep.csv (one row per member) and the plots."""
  del reports
  artifacts.atomic_write(workdir / SWEEP_JSON,
                          json.dumps(summary, indent=1).encode())
  entries = summary["members"]
  modalities = sorted({m for e in entries for m in e["dice_per_modality"]})
  keys = sorted({k for e in entries for k in e["overrides"]})
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(["member"] + keys + [
      "private", "target_epsilon", "epsilon_max_rdp", "epsilon_max_pld",
      "validation_dice_mean", "dice_mean"] + [
          f"dice_{m}" for m in modalities] + ["seconds"])
  for e in entries:
    writer.writerow([e["name"]] + [e["overrides"].get(k, "") for k in keys] + [
        e["private"], e["target_epsilon"], e["epsilon_max"],
        e["epsilon_pld_max"], e["validation_dice_mean"], e["dice_mean"]] + [
            e["dice_per_modality"].get(m) for m in modalities] + [
                f"{e['seconds']:.1f}"])
  artifacts.atomic_write(workdir / SWEEP_CSV, buf.getvalue().encode())
  from fedjax_seg.run import plots  # pylint: disable=g-import-not-at-top
  plots.write_sweep(workdir, summary)
