"""PNG plots of a run (matplotlib, Agg backend): written atomically."""

import os
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

PLOTS = ("dice_per_site.png", "epsilon_per_site.png", "sigma_and_clip.png",
         "dice_vs_epsilon.png")


def _save(fig, path: pathlib.Path) -> None:
  tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
  fig.savefig(tmp, dpi=100, bbox_inches="tight")
  plt.close(fig)
  os.replace(tmp, path)


def write_all(workdir: pathlib.Path, report: dict, history: list) -> None:
  """Dice per site vs round, epsilon per site vs round, sigma and C vs round,
  final Dice vs epsilon per site."""
  sites = list(report["sites"])
  rounds = [row["round"] for row in history]
  evals = report["metrics"]["validation_history"]

  fig, ax = plt.subplots(figsize=(7, 4))
  for s in sites:
    ax.plot([e["round"] for e in evals],
            [e["dice_per_site"][s] for e in evals], marker="o", label=s)
  ax.set(xlabel="round", ylabel="validation Dice (foreground mean)",
         title="Dice per site")
  ax.legend(fontsize=7, ncol=2)
  _save(fig, workdir / PLOTS[0])

  fig, ax = plt.subplots(figsize=(7, 4))
  enabled = report["privacy"]["enabled"]
  for s in sites:
    eps = [row["epsilon"][s] for row in history]
    ax.plot(rounds, [np.nan if e is None else e for e in eps], label=s)
  label = report["privacy"]["epsilon_label"]  # e.g. "epsilon per patient"
  ax.set(xlabel="round", ylabel=f"{label} (delta={report['privacy']['delta']:g})",
         title=f"{label}, each site" if enabled else "NOT PRIVATE: no epsilon")
  ax.legend(fontsize=7, ncol=2)
  _save(fig, workdir / PLOTS[1])

  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
  for s in sites:
    a1.plot(rounds, [row["sigma"][s] for row in history], label=s)
    if all("clip" in row for row in history):
      a2.plot(rounds, [row["clip"][s] for row in history], label=s)
  if history and all("site_level_clip" in row for row in history):
    a2.plot(rounds, [row["site_level_clip"] for row in history], "k--",
            label="site-level S")
  a1.set(xlabel="round", ylabel="noise multiplier sigma (accounted)",
         title="sigma per site")
  a2.set(xlabel="round", ylabel="clip norm (C: last local step; S: site)",
         title="clip norm")
  a1.legend(fontsize=7)
  _save(fig, workdir / PLOTS[2])

  fig, ax = plt.subplots(figsize=(6, 4))
  dice = report["metrics"]["dice_per_site"]
  eps = report["privacy"]["epsilon_per_site"]
  for s in sites:
    if dice[s] is not None:
      x = eps[s] if eps[s] is not None else np.nan
      ax.scatter([x], [dice[s]], label=s)
  ax.set(xlabel=f"final {label}", ylabel="test Dice (foreground mean)",
         title=f"Dice vs {label}")
  ax.legend(fontsize=7)
  _save(fig, workdir / PLOTS[3])
