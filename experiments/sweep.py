r"""Sweep noise schedules, clip norms, learning rates... of one simulation.

Every flag of `experiments.simulate` sets the base configuration; each
--sweep=NAME:V1,V2 (repeatable; the grid is the product) or --sweep_file (a
JSON list of {flag: value} dicts) gives the members. Flags that change array
shapes or the data (model, image size, batch size, unit, sites) are refused.

  python -m experiments.sweep --workdir=runs/sweep \
      --sweep=noise_schedule:constant,cosine --sweep=target_epsilon:1,8
  python -m experiments.sweep --flagfile=experiments/flags/sweep_schedules.flags \
      --workdir=runs/sweep_schedules

Outputs in --workdir: sweep.json (every member's config, per-site epsilons
RDP and PLD, test Dice/IoU/HD95, validation Dice over rounds; the best
member per target epsilon), sweep.csv (one row per member), frontier.png,
dice_per_site_per_member.png, sigma_schedules.png, and members/<name>/ with
each member's own simulate outputs and flags.txt (run
`python -m experiments.simulate --flagfile=members/<name>/flags.txt` to
reproduce one alone). A rerun resumes.
"""

from absl import app
from absl import flags
from absl import logging

from fedjax_seg.run import config as config_lib
from fedjax_seg.run import config_flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/sweep",
                               "Output directory (resumes if it has a sweep).")
_SWEEP = flags.DEFINE_multi_string(
    "sweep", [], "NAME:V1,V2,... (repeatable; the members are the product).")
_SWEEP_FILE = flags.DEFINE_string(
    "sweep_file", None, "JSON list of {flag: value} dicts, one per member "
    "(instead of --sweep).")
_NONPRIVATE_REFERENCE = flags.DEFINE_bool(
    "nonprivate_reference", False, "Add one member with --nodp and the base "
    "settings (the non-private reference line of the frontier).")
_MEMBER_BACKEND = flags.DEFINE_enum(
    "member_backend", "auto", ["auto", "loop", "vmap", "shard"],
    "How members' rounds run (performance only): loop, vmap (one program "
    "over a member axis, one device), shard (the member axis split over all "
    "devices), auto (loop on CPU, shard on several accelerators, else "
    "vmap).")
config_flags.define_config_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from fedjax_seg.run import sweep  # pylint: disable=g-import-not-at-top
  try:
    base = config_flags.config_from_flags()
    if _SWEEP.value and _SWEEP_FILE.value:
      raise config_lib.ConfigError(
          "--sweep_file: give --sweep or --sweep_file, not both.")
    overrides = (sweep.load_members_file(_SWEEP_FILE.value)
                 if _SWEEP_FILE.value else
                 sweep.parse_sweep_flags(_SWEEP.value))
    if _NONPRIVATE_REFERENCE.value:
      overrides.append({"dp": False})
    members = sweep.build_members(base, overrides)
    summary = sweep.run_sweep(members, _WORKDIR.value,
                              member_backend=_MEMBER_BACKEND.value)
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from e
  if summary.get("stopped_reason") == "interrupted":
    return
  for target, best in sorted(summary["best_per_target_epsilon"].items(),
                             key=lambda kv: float(kv[0])):
    logging.info("best at target epsilon %s (by validation Dice %.3f): %s "
                 "(test Dice %.3f)", target, best["validation_dice_mean"],
                 best["member"], best["dice_mean"])
  print(f"{len(summary['members'])} members in {summary['seconds']:.0f} s | "
        "best per target epsilon (by validation Dice): " + ", ".join(
            f"{t}: {b['member']} (test Dice {b['dice_mean']:.3f})" for t, b in
            sorted(summary["best_per_target_epsilon"].items(),
                   key=lambda kv: float(kv[0])))
        + f" | {_WORKDIR.value}/sweep.json")


if __name__ == "__main__":
  app.run(main)
