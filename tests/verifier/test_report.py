"""Tests for fedjax_seg.verifier: epsilons recomputed from the ledger.

The command is run under its former name, `python -m
fedjax_seg.privacy.verify` (`verify.main`), which forwards to the package.

Reports use a PLD discretisation interval of 1e-2 (read from the report) so
that the tests stay fast: at 1e-4 dp_accounting needs seconds per distinct
truncated event. The MNIST golden case uses the default 1e-4.
"""

import ast
import copy
import json
import os
import pathlib
import subprocess
import sys

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
import numpy as np
import pytest
from scipy import stats

from fedjax_seg.privacy import PrivacyLedger
from fedjax_seg.privacy import verify
from fedjax_seg import verifier
from fedjax_seg.verifier import epsilons

DELTA = 1e-5
INTERVAL = 1e-2
LOCAL_STEPS = 3
MAX_BATCH = 30
ROUNDS = 4
# N_k (units): "a" and "b" sample with q < 1 (truncated), "c" has q = 1.
SIZES = {"a": 120, "b": 40, "c": 8}
BATCH = 8
ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
REPO = pathlib.Path(__file__).resolve().parents[2]
VERIFIER = REPO / "fedjax_seg" / "verifier"


def _f32(x):
  return float(np.float32(x))


def _claims(ledger, interval):
  return {"ledger": ledger.to_dict(),
          "epsilon_per_site": ledger.epsilons(),
          "epsilon_pld_per_site": {s: ledger.epsilon_pld(s, interval)
                                   for s in ledger.site_names},
          "epsilon_max": ledger.max_epsilon()}


def _site_level_section(names, z, q, rounds, interval):
  ledger = PrivacyLedger(names, delta=DELTA, unit="site")
  for _ in rounds:
    ledger.record_all(_f32(z), q, 1)
  return {**_claims(ledger, interval),
          "plan": {"noise_multiplier": z, "sampling_rate": q,
                   "rounds": list(rounds)}}


def make_report(*, site_level=False, interval=INTERVAL):
  """A report of the runner's shape, with honest claims from the ledger.

  Record-level: site "b" skips round 1; sigma is constant per site (each
  site has one distinct event, which keeps PLD cheap) except site "c".
  """
  rates = {s: min(1.0, BATCH / n) for s, n in SIZES.items()}
  sigmas = {"a": [_f32(1.0)] * ROUNDS, "b": [_f32(1.3)] * ROUNDS,
            "c": [_f32(2.0 - 0.1 * r) for r in range(ROUNDS)]}
  trained = {s: [r for r in range(ROUNDS) if (s, r) != ("b", 1)]
             for s in SIZES}
  ledger = PrivacyLedger(list(SIZES), delta=DELTA, unit="example")
  for r in range(ROUNDS):
    for s, n in SIZES.items():
      if r in trained[s]:
        # The device reports the float32 sampling rate it used.
        ledger.record(s, sigmas[s][r], _f32(rates[s]), LOCAL_STEPS,
                      dataset_size=n, max_batch_size=MAX_BATCH)
  privacy = {
      "enabled": True, "unit": "example", "delta": DELTA, "accountant": "rdp",
      **_claims(ledger, interval),
      "pld_value_discretization_interval": interval,
      "plan": {"local_steps": LOCAL_STEPS, "max_batch_size": MAX_BATCH,
               "dataset_size_per_site": dict(SIZES),
               "sampling_rate_per_site": rates,
               "rounds_trained_per_site": trained,
               "accounted_sigma_per_round": sigmas},
  }
  if site_level:
    privacy["site_level"] = _site_level_section(list(SIZES), 1.5, 0.5,
                                                range(ROUNDS), interval)
  # Through JSON, as the verifier reads it from report.json.
  return json.loads(json.dumps({"rounds_completed": ROUNDS,
                                "privacy": privacy}))


@pytest.fixture(scope="module")
def honest():
  return make_report(site_level=True)


def _write(tmp_path, report):
  (tmp_path / "report.json").write_text(json.dumps(report))
  return str(tmp_path)


def _run_main(tmp_path, report, capsys):
  code = verify.main([_write(tmp_path, report), "--no-plan"])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_honest_report_verifies_in_process(honest):
  # The honest report exercises the truncation coupling (P_T > 0).
  assert stats.binom.sf(MAX_BATCH, SIZES["a"] + 1, BATCH / SIZES["a"]) > 0
  result = verifier.verify_report(honest, rederive=False)
  assert result.ok and result.private, result.problems
  assert result.problems == []
  assert [(r.ledger, r.site) for r in result.rows] == (
      [("privacy.ledger", s) for s in SIZES]
      + [("privacy.site_level.ledger", s) for s in SIZES])
  assert result.num_events == (ROUNDS * 3 - 1) + ROUNDS * 3
  for row in result.rows:
    assert row.ok
    assert row.rdp == pytest.approx(row.claimed_rdp, rel=1e-6)
    assert row.pld == pytest.approx(row.claimed_pld, rel=1e-6)
    assert row.rdp > 0 and row.pld > 0


def test_honest_report_main_prints_table(tmp_path, honest, capsys):
  code, out, _ = _run_main(tmp_path, honest, capsys)
  assert code == 0, out
  lines = out.strip().splitlines()
  assert lines[0].split(" | ")[0].strip() == "ledger"
  assert [c.strip() for c in lines[0].split("|")] == [
      "ledger", "site", "unit", "events", "claimed RDP", "recomputed RDP",
      "claimed PLD", "recomputed PLD", "ok"]
  assert len(lines) == 1 + 6 + 1
  # A hand-made report has no config: the plan is the report's own.
  assert lines[-1].startswith("verified: all 6 epsilons recompute (RDP and "
                              "PLD) from 23 events; plan NOT re-derived")


@pytest.mark.slow
@pytest.mark.parametrize("module", ["fedjax_seg.verifier",
                                    "fedjax_seg.privacy.verify"])
def test_cli_subprocess_on_workdir(tmp_path, honest, module):
  workdir = _write(tmp_path, honest)
  proc = subprocess.run(
      [sys.executable, "-m", module, workdir, "--no-plan"],
      capture_output=True, text=True, timeout=120,
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "verified: all 6 epsilons recompute" in proc.stdout
  # A report.json path works as well as its workdir.
  assert verify.main([os.path.join(workdir, "report.json"), "--no-plan"]) == 0
  # Without --no-plan, a report without a config fails: its plan cannot be
  # re-derived.
  assert verify.main([workdir]) == 1


def _lower_claim(p):
  p["epsilon_per_site"]["a"] *= 0.99


def _raise_sigma(p):
  p["ledger"]["sites"]["a"]["events"][1]["event"]["noise_multiplier"] *= 1.1


def _remove_event(p):
  del p["ledger"]["sites"]["a"]["events"][2]


def _sampling_rate(p):
  p["plan"]["sampling_rate_per_site"]["a"] *= 1.05


def _wrong_delta(p):
  p["delta"] = 2e-5


def _lower_pld(p):
  p["epsilon_pld_per_site"]["b"] *= 0.99


def _ledger_own_epsilon(p):
  p["ledger"]["sites"]["b"]["epsilon"] *= 0.99


def _sigma_plan(p):
  p["plan"]["accounted_sigma_per_round"]["c"][2] *= 1.01


def _site_level_sampling(p):
  event = p["site_level"]["ledger"]["sites"]["b"]["events"][0]
  event["event"]["sampling_probability"] = 0.25


def _non_private_event(p):
  p["ledger"]["sites"]["c"]["events"][0] = {
      "module_name": "dp_accounting.dp_event",
      "class_name": "NonPrivateDpEvent"}


@pytest.mark.parametrize("tamper, site, expect", [
    (_lower_claim, "a", "claimed RDP epsilon"),
    (_raise_sigma, "a", "noise_multiplier"),
    (_remove_event, "a", "events recorded"),
    (_sampling_rate, "a", "sampling_probability"),
    (_wrong_delta, "a", "delta"),
    (_lower_pld, "b", "claimed PLD epsilon"),
    (_ledger_own_epsilon, "b", "ledger's own RDP epsilon"),
    (_sigma_plan, "c", "noise_multiplier"),
    (_site_level_sampling, "b", "privacy.site_level.ledger"),
    (_non_private_event, "c", "NonPrivateDpEvent"),
])
def test_tampering_fails_naming_the_site(tmp_path, honest, capsys, tamper,
                                         site, expect):
  report = copy.deepcopy(honest)
  tamper(report["privacy"])
  code, out, _ = _run_main(tmp_path, report, capsys)
  assert code == 1, out
  assert out.strip().splitlines()[-1].startswith("MISMATCH:")
  fails = [l for l in out.splitlines() if l.startswith("FAIL")]
  assert any(f"site {site!r}" in l and expect in l for l in fails), out
  rows = {(r.ledger, r.site): r
          for r in verifier.verify_report(report, rederive=False).rows}
  assert any(not r.ok for (_, s), r in rows.items() if s == site)


def test_raised_sigma_changes_the_recomputed_epsilon(honest):
  report = copy.deepcopy(honest)
  _raise_sigma(report["privacy"])
  result = verifier.verify_report(report, rederive=False)
  row = next(r for r in result.rows if r.site == "a"
             and r.ledger == "privacy.ledger")
  assert row.rdp < row.claimed_rdp and row.pld < row.claimed_pld
  assert any("claimed RDP epsilon" in p and "'a'" in p
             for p in result.problems)


def test_wrong_delta_also_flags_the_ledger_header(honest):
  report = copy.deepcopy(honest)
  _wrong_delta(report["privacy"])
  problems = verifier.verify_report(report, rederive=False).problems
  assert any(p.startswith("FAIL ledger privacy.ledger: delta") for p in
             problems)
  assert any(p.startswith("FAIL ledger privacy.site_level.ledger: delta")
             for p in problems)


@pytest.mark.parametrize("field, path", [
    (("ledger",), "privacy.ledger"),
    (("plan", "max_batch_size"), "privacy.plan.max_batch_size"),
    (("epsilon_per_site", "b"), "privacy.epsilon_per_site.b"),
    (("site_level", "plan"), "privacy.site_level.plan"),
])
def test_missing_field_exits_2_naming_it(tmp_path, honest, capsys, field,
                                         path):
  report = copy.deepcopy(honest)
  parent = report["privacy"]
  for key in field[:-1]:
    parent = parent[key]
  del parent[field[-1]]
  code, out, err = _run_main(tmp_path, report, capsys)
  assert code == 2, out + err
  assert path in err
  with pytest.raises(verifier.ReportError, match=path.replace(".", r"\.")):
    verifier.verify_report(report, rederive=False)


def test_unreadable_input_exits_2(tmp_path, honest, capsys):
  (tmp_path / "report.json").write_text("{not json")
  assert verify.main([str(tmp_path)]) == 2
  assert "malformed JSON" in capsys.readouterr().err
  assert verify.main([str(tmp_path / "nowhere")]) == 2
  report = copy.deepcopy(honest)
  report["privacy"]["ledger"]["sites"]["a"]["events"][0]["module_name"] = (
      "os")
  code, _, err = _run_main(tmp_path, report, capsys)
  assert code == 2 and "not a dp_accounting event" in err
  report = copy.deepcopy(honest)
  report["privacy"]["ledger"]["format"] = "fedjax_seg.PrivacyLedger/1"
  code, _, err = _run_main(tmp_path, report, capsys)
  assert code == 2 and "privacy.ledger.format" in err


def test_not_private_exits_0_loudly(tmp_path, capsys):
  report = {"privacy": {"enabled": False, "unit": "example", "delta": DELTA,
                        "ledger": None, "epsilon_max": None}}
  code, out, _ = _run_main(tmp_path, report, capsys)
  assert code == 0
  assert out.startswith("NOT PRIVATE: nothing to verify")
  result = verifier.verify_report(report, rederive=False)
  assert result.ok and not result.private and result.rows == []


def test_site_unit_report_with_default_interval():
  # unit == "site": the main ledger is the site-level one, plan in its form;
  # no pld interval in the report: 1e-4.
  section = _site_level_section(["x", "y"], 1.2, 0.3, [0, 1, 3], 1e-4)
  report = json.loads(json.dumps({"privacy": {
      "enabled": True, "unit": "site", "delta": DELTA, **section}}))
  result = verifier.verify_report(report, rederive=False)
  assert result.ok, result.problems
  assert [r.unit for r in result.rows] == ["site", "site"]
  assert [r.events for r in result.rows] == [3, 3]
  report["privacy"]["plan"]["rounds"] = [0, 1]
  problems = verifier.verify_report(report, rederive=False).problems
  assert any("site 'x'" in p and "3 events recorded" in p for p in problems)


def test_site_level_held_out_site_has_no_events():
  # plan.charged_sites: only those sites are charged; a held-out one has none.
  ledger = PrivacyLedger(["x", "y"], delta=DELTA, unit="site")
  for _ in range(2):
    ledger.record("x", _f32(1.2), 0.5, 1)
  section = {**_claims(ledger, INTERVAL),
             "plan": {"noise_multiplier": _f32(1.2), "sampling_rate": 0.5,
                      "rounds": [0, 1], "charged_sites": ["x"]}}
  report = json.loads(json.dumps({"privacy": {
      "enabled": True, "unit": "site", "delta": DELTA,
      "pld_value_discretization_interval": INTERVAL, **section}}))
  result = verifier.verify_report(report, rederive=False)
  assert result.ok, result.problems
  assert [(r.site, r.events, r.rdp) for r in result.rows][1] == ("y", 0, 0.0)
  report["privacy"]["plan"]["charged_sites"] = ["x", "y"]
  problems = verifier.verify_report(report, rederive=False).problems
  assert any("site 'y'" in p and "0 events recorded" in p for p in problems)


@pytest.mark.slow
def test_the_verifier_imports_no_project_code_and_no_jax():
  allowed = {"dp_accounting", "numpy", "scipy"} | set(
      sys.stdlib_module_names)
  for path in VERIFIER.glob("*.py"):
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        modules.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        assert node.level == 0, "no relative imports"
        modules.add(node.module)
    ours = {m for m in modules if m.split(".")[0] == "fedjax_seg"}
    assert all(m.startswith("fedjax_seg.verifier") for m in ours), path
    roots = {m.split(".")[0] for m in modules - ours}
    assert roots <= allowed, (path, roots - allowed)
  # Importing it (as python -m does) loads none of the rest, and no jax.
  proc = subprocess.run(
      [sys.executable, "-c", "import sys, fedjax_seg.verifier; "
       "print(sorted(m for m in sys.modules if m.startswith('fedjax_seg') "
       "or m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax')))"],
      capture_output=True, text=True, timeout=120, cwd=REPO, check=True)
  loaded = eval(proc.stdout)  # pylint: disable=eval-used
  assert loaded and all(m == "fedjax_seg" or m.startswith(
      "fedjax_seg.verifier") for m in loaded), loaded


def test_golden_tf_privacy_mnist_matches_plain_dp_accounting():
  q, sigma, steps = 256 / 60000, 1.1, 14062
  ledger = PrivacyLedger(["a"], delta=DELTA)
  ledger.record("a", sigma, q, steps)
  got_rdp, got_pld = epsilons.recompute_epsilons(
      json.loads(json.dumps(ledger.to_dict())), DELTA)["a"]
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(
          sigma)), steps)
  by_hand_rdp = rdp.RdpAccountant(neighboring_relation=ADD_REMOVE)
  by_hand_rdp.compose(event)
  by_hand_pld = pld.PLDAccountant(ADD_REMOVE, 1e-4)
  by_hand_pld.compose(event)
  assert round(got_rdp, 4) == 2.5966
  assert round(got_pld, 4) == 2.3817
  assert got_rdp == pytest.approx(by_hand_rdp.get_epsilon(DELTA), rel=1e-12)
  assert got_pld == pytest.approx(by_hand_pld.get_epsilon(DELTA), rel=1e-12)
