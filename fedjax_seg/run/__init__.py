"""The host side of a simulation (nothing in the library imports it).

Where things are:
  config, config_flags  settings (pure dataclasses) and their absl flags
  config_syntax         the flags' vocabularies and entry grammar, ConfigError
  data                  the run's splits, cohorts, data that change by round
  setup                 settings resolved once into the run's fixed pieces
  state                 what a run carries from round to round; resume
  round                 one round: participants, the device round, charging
  loop                  `train_and_evaluate`: the loop over one state
  callbacks             its side effects: budget, validation, log, checkpoint
  report, plots         what a run writes
  artifacts             the run directory, checkpoints, a run's model
  noise_secret          the secret noise root (or --noise_seed)
  init_source           --init_from and what it costs
  sweep, many_sites, scenarios, distributed
                        sweeps, consortia, changing data, several hosts
  predict, scans        segmenting new scans with a run's model
  attack_study          gradient inversion against a run's updates

The privacy planning it calls lives in `fedjax_seg.privacy.plan`; the
verifier of its reports in `fedjax_seg.verifier`.
"""
