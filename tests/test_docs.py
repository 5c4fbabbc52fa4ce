"""Every code block of README.md and docs/ runs, or is checked as a command.

`python` blocks are executed. In `bash` blocks, every `python -m
experiments.X` or `python -m data_prep.X` command has its flags parsed by
that entry point's own flag definitions and, for the simulation commands,
built into the run's configuration (every flag known, every value valid,
every flagfile found), without running the job; other Python modules and
scripts must exist; installers and cluster launchers are named, not run.
`text` blocks are output and layouts, not code.
"""

import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
# Commands that are not this project's and are not run here.
OTHERS = {"pip", "python3", ".", "source", "cd", "export", "sbatch", "gcloud",
          "tensorboard", "#!/bin/bash", "exec"}
# Entry points whose flags are the run's configuration.
CONFIG_ENTRY_POINTS = {"experiments.simulate", "experiments.sweep",
                       "experiments.audit", "experiments.attack"}

_CHECK_FLAGS = r"""
import importlib, json, sys
from absl import flags
module = sys.argv[1]
importlib.import_module(module)
config = module in json.loads(sys.argv[2])
problems = []
for args in json.load(sys.stdin):
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(["prog", *args])
    if config:
      from fedjax_seg.run import config_flags
      config_flags.config_from_flags()
    if module == "experiments.sweep":
      from fedjax_seg.run import sweep
      sweep.parse_sweep_flags(flags.FLAGS.sweep)
  except (Exception, SystemExit) as e:  # pylint: disable=broad-except
    problems.append(f"{module} {' '.join(args)}: {type(e).__name__}: {e}")
print(json.dumps(problems))
"""


def blocks(path: pathlib.Path):
  """[(language, code, line)] of the fenced blocks of a page."""
  out, lines = [], path.read_text().split("\n")
  i = 0
  while i < len(lines):
    if lines[i].startswith("```"):
      language, start = lines[i][3:].strip(), i
      j = i + 1
      while not lines[j].startswith("```"):
        j += 1
      out.append((language, "\n".join(lines[i + 1:j]), start + 1))
      i = j
    i += 1
  return out


def commands(code: str):
  """Each shell command of a bash block, as tokens (continuations joined,
  comments, `&&` chains and leading VAR=value assignments split off)."""
  code = code.replace("\\\n", " ")
  for line in code.split("\n"):
    line = re.sub(r"(^|\s)#(?!!).*$", "", line)
    for part in line.split("&&"):
      tokens = [os.path.expandvars(t) for t in shlex.split(part)
                if t != "..."]
      while tokens and re.match(r"^[A-Z_]+=", tokens[0]):
        tokens = tokens[1:]
      if tokens:
        yield tokens


def _classify(tokens, entry_points: dict, where: str) -> None:
  if tokens[0] == "srun":
    return _classify(tokens[1:], entry_points, where)
  if tokens[0] == "python" and tokens[1] == "-m":
    module = tokens[2]
    if module.split(".")[0] in ("experiments", "data_prep"):
      entry_points.setdefault(module, []).append(tokens[3:])
    else:
      assert importlib.util.find_spec(module) is not None, (where, tokens)
    return None
  if tokens[0] == "python" and tokens[1].endswith(".py"):
    assert (REPO / tokens[1]).is_file(), (where, tokens)
    return None
  assert tokens[0] in OTHERS, f"{where}: an unclassified command {tokens}"
  return None


def test_every_code_block_is_known_and_the_pages_link_to_each_other():
  languages = {lang for page in PAGES for lang, _, _ in blocks(page)}
  assert languages <= {"python", "bash", "text"}, languages
  readme = (REPO / "README.md").read_text()
  assert len(readme.splitlines()) <= 250
  for page in PAGES[1:]:
    assert f"(docs/{page.name})" in readme, page.name


# README.md's one python block (the privacy transforms in the user's own JAX
# code) is executed, its figures checked, by tests/privacy/test_public_api.py.
README_BLOCKS_RUN_ELSEWHERE = 1


def test_the_readme_has_only_the_python_block_run_elsewhere():
  python = [b for b in blocks(REPO / "README.md") if b[0] == "python"]
  assert len(python) == README_BLOCKS_RUN_ELSEWHERE


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for language, code, line in blocks(page):
    if language == "python":
      exec(compile(code, f"{page.name}:{line}", "exec"), {})  # pylint: disable=exec-used


@pytest.mark.slow
def test_commands_parse_with_their_entry_points_flags():
  entry_points = {}
  for page in PAGES:
    for language, code, line in blocks(page):
      if language == "bash":
        for tokens in commands(code):
          _classify(tokens, entry_points, f"{page.name}:{line}")
  assert "experiments.simulate" in entry_points
  problems = []
  for module, arg_lists in sorted(entry_points.items()):
    done = subprocess.run(
        [sys.executable, "-c", _CHECK_FLAGS, module,
         json.dumps(sorted(CONFIG_ENTRY_POINTS))],
        input=json.dumps(arg_lists), cwd=REPO, capture_output=True,
        text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    problems += json.loads(done.stdout.strip().splitlines()[-1])
  assert not problems, "\n".join(problems)
