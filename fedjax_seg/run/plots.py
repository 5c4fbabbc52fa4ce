"""PNG plots of a run (matplotlib, Agg backend): written atomically."""

import os
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

PLOTS = ("dice_per_site.png", "epsilon_per_site.png", "sigma_and_clip.png",
         "dice_vs_epsilon.png")


def save_figure(fig, path: pathlib.Path) -> None:
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
  # The validated sites (with --num_sites, a sample of them).
  colors = {}
  for s in (list(evals[0]["dice_per_site"]) if evals else []):
    line, = ax.plot([e["round"] for e in evals],
                    [e["dice_per_site"][s] for e in evals], marker="o",
                    label=s)
    colors[s] = line.get_color()
  # Scenario events (scanner replaced, joins, leaves): a dotted line in the
  # site's colour at the first round that sees the change.
  for event in report.get("scenario", {}).get("events", []):
    if event["round"] > 1:
      ax.axvline(event["round"] - 0.5, color=colors.get(event["site"], "k"),
                 linestyle=":", linewidth=1)
      ax.annotate(f"{event['site']}: {event['change']}",
                  (event["round"] - 0.5, ax.get_ylim()[0]), rotation=90,
                  fontsize=6, va="bottom", ha="right")
  ax.set(xlabel="round", ylabel="validation Dice (foreground mean)",
         title="Dice per site")
  if ax.get_legend_handles_labels()[0]:  # None when no round was validated.
    ax.legend(fontsize=7, ncol=2)
  save_figure(fig, workdir / PLOTS[0])

  fig, ax = plt.subplots(figsize=(7, 4))
  enabled = report["privacy"]["enabled"]
  for s in sites:
    eps = [row["epsilon"][s] for row in history]
    ax.plot(rounds, [np.nan if e is None else e for e in eps], label=s)
  label = report["privacy"]["epsilon_label"]  # e.g. "epsilon per patient"
  ax.set(xlabel="round", ylabel=f"{label} (delta={report['privacy']['delta']:g})",
         title=f"{label}, each site" if enabled else "NOT PRIVATE: no epsilon")
  ax.legend(fontsize=7, ncol=2)
  save_figure(fig, workdir / PLOTS[1])

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
  save_figure(fig, workdir / PLOTS[2])

  fig, ax = plt.subplots(figsize=(6, 4))
  dice = report["metrics"]["dice_per_site"]
  eps = report["privacy"]["epsilon_per_site"]
  for s in sites:
    if dice.get(s) is not None:
      x = eps[s] if eps[s] is not None else np.nan
      ax.scatter([x], [dice[s]], label=s)
  ax.set(xlabel=f"final {label}", ylabel="test Dice (foreground mean)",
         title=f"Dice vs {label}")
  ax.legend(fontsize=7)
  save_figure(fig, workdir / PLOTS[3])


def write_many_sites(workdir: pathlib.Path, report: dict,
                     history: list) -> None:
  """The same four files for a consortium too large for a curve per site:
  validation Dice of the sampled sites over rounds (median and quartiles),
  the epsilon distribution (histogram, and max/median over rounds), the
  noise multipliers' distribution, and test Dice per modality
  (histograms) with Dice against epsilon for the tested sites."""
  summary = report["sites_summary"]
  label = report["privacy"]["epsilon_label"]
  evals = report["metrics"]["validation_history"]

  fig, ax = plt.subplots(figsize=(7, 4))
  if evals:
    rounds = [e["round"] for e in evals]
    grid = np.array([[np.nan if v is None else v
                      for v in e["dice_per_site"].values()] for e in evals])
    q = np.nanpercentile(grid, [25, 50, 75], axis=1)
    ax.fill_between(rounds, q[0], q[2], alpha=0.3, label="quartiles")
    ax.plot(rounds, q[1], marker="o", label="median")
  ax.set(xlabel="round", ylabel="validation Dice (foreground mean)",
         title=f"Dice of {len(evals[0]['dice_per_site']) if evals else 0} "
               f"sampled sites of {summary['num_sites']}")
  ax.legend(fontsize=7)
  save_figure(fig, workdir / PLOTS[0])

  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
  _histogram(a1, summary["epsilon_charged_sites"])
  a1.set(xlabel=f"final {label}", ylabel="sites",
         title=f"{summary['sites_charged']} of {summary['num_sites']} sites "
               "charged (the others: 0)")
  rounds = [row["round"] for row in history]
  for key, name in (("epsilon_max", "max"), ("epsilon_median", "median")):
    a2.plot(rounds, [np.nan if row.get(key) is None else row[key]
                     for row in history], label=name)
  a2.set(xlabel="round", ylabel=label, title=f"{label} over rounds")
  a2.legend(fontsize=7)
  save_figure(fig, workdir / PLOTS[1])

  fig, ax = plt.subplots(figsize=(6, 4))
  sigma = report["privacy"].get("noise_multiplier_per_site") or {}
  if sigma:
    ax.hist(list(sigma.values()), bins=20)
  ax.set(xlabel="noise multiplier sigma (before the schedule)",
         ylabel="sites", title="sigma per site (small sites: larger)")
  save_figure(fig, workdir / PLOTS[2])

  by_modality = summary["test_dice_per_modality"]
  fig, axes = plt.subplots(1, len(by_modality) + 1,
                           figsize=(4 * (len(by_modality) + 1), 4))
  axes = np.atleast_1d(axes)
  for ax, (modality, h) in zip(axes, by_modality.items()):
    _histogram(ax, h)
    ax.set(xlabel="test Dice (foreground mean)", ylabel="sites",
           title=f"{modality}: {h.get('count', 0)} sites")
  dice = report["metrics"]["dice_per_site"]
  eps = report["privacy"].get("epsilon_per_site") or {}
  pairs = [(eps.get(s), d) for s, d in dice.items() if d is not None]
  axes[-1].scatter([np.nan if e is None else e for e, _ in pairs],
                   [d for _, d in pairs], s=6)
  axes[-1].set(xlabel=f"final {label}", ylabel="test Dice",
               title=f"Dice vs {label}")
  save_figure(fig, workdir / PLOTS[3])


def _histogram(ax, h: dict) -> None:
  if h.get("count"):
    edges = np.asarray(h["edges"])
    ax.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge")


SWEEP_PLOTS = ("frontier.png", "dice_per_site_per_member.png",
               "sigma_schedules.png")


_NOT_A_SETTING = ("target_epsilon", "seed", "noise_seed")


def _series(private: list) -> dict:
  """{label: members}: members grouped by their overrides other than the
  privacy target and the seeds (one series per setting)."""
  out: dict = {}
  for e in private:
    label = ", ".join(f"{k}={v}" for k, v in sorted(
        (e.get("overrides") or {}).items()) if k not in _NOT_A_SETTING)
    out.setdefault(label or "members", []).append(e)
  return out


def write_sweep(workdir: pathlib.Path, summary: dict) -> None:
  """A sweep's privacy-utility frontier (test Dice vs epsilon, mean and per
  modality, one marker per member, non-private members as lines), Dice per
  site per member (heat map), and each member's sigma over rounds (mean
  over sites)."""
  entries = summary["members"]
  private = [e for e in entries if e["private"]]
  public = [e for e in entries if not e["private"]]
  modalities = sorted({m for e in entries for m in e["dice_per_modality"]})
  panels = ["mean"] + modalities
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4),
                           squeeze=False)
  for ax, panel in zip(axes[0], panels):
    value = ((lambda e: e["dice_mean"]) if panel == "mean" else
             (lambda e, p=panel: e["dice_per_modality"].get(p)))
    # One series per setting (the overrides besides the privacy target and
    # the seeds), so that e.g. noise mechanisms sit side by side over epsilon.
    for label, members in _series(private).items():
      points = sorted((e["epsilon_max"], value(e), e["index"]) for e in members
                      if value(e) is not None and e["epsilon_max"] is not None)
      if not points:
        continue
      xs, ys, idx = zip(*points)
      line, = ax.plot(xs, ys, marker="o", ms=4, lw=1, label=label)
      for x, y, i in points:
        ax.annotate(str(i), (x, y), fontsize=6, color=line.get_color())
    eps = [e["epsilon_max"] for e in private if e["epsilon_max"] is not None]
    if eps and max(eps) - min(eps) < 1e-3 * max(eps):
      # Members calibrated to one target: do not zoom into float noise.
      ax.set_xlim(0.9 * min(eps), 1.1 * max(eps))
    ax.ticklabel_format(axis="x", useOffset=False)
    for e in public:
      v = value(e)
      if v is not None:
        ax.axhline(v, color="k", ls="--", lw=1,
                   label=f"non-private ({e['index']})")
    ax.set(xlabel=f"{private[0]['epsilon_label'] if private else 'epsilon'}"
           " (max over sites)", ylabel="test Dice",
           title=f"Dice ({panel})")
    ax.legend(fontsize=6)
  save_figure(fig, workdir / SWEEP_PLOTS[0])

  sites = list(entries[0]["dice_per_site"])
  grid = np.array([[np.nan if e["dice_per_site"][s] is None
                    else e["dice_per_site"][s] for s in sites]
                   for e in entries], float)
  fig, ax = plt.subplots(figsize=(1 + 0.8 * len(sites),
                                  1 + 0.3 * len(entries)))
  image = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
  ax.set_xticks(range(len(sites)), sites, rotation=45, ha="right",
                fontsize=7)
  ax.set_yticks(range(len(entries)), [e["name"][:40] for e in entries],
                fontsize=6)
  ax.set_title("test Dice per site per member")
  fig.colorbar(image, ax=ax)
  save_figure(fig, workdir / SWEEP_PLOTS[1])

  fig, ax = plt.subplots(figsize=(7, 4))
  for e in private:
    sigma = e.get("accounted_sigma_per_round") or {}
    if sigma:
      mean = np.mean(np.array(list(sigma.values()), float), axis=0)
      ax.plot(np.arange(1, len(mean) + 1), mean, label=e["name"][:40])
  ax.set(xlabel="round", ylabel="accounted sigma (mean over sites)",
         title="noise schedules")
  ax.legend(fontsize=5, ncol=2)
  save_figure(fig, workdir / SWEEP_PLOTS[2])
