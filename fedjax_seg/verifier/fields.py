"""Reading a report's JSON fields, with errors that name the field."""

import hashlib
import json
import math
import numbers
import os
from typing import Mapping, Sequence

REL_TOL = 1e-6
ABS_TOL = 1e-9
MISSING = object()


class ReportError(ValueError):
  """The report cannot be read: a missing or malformed field (exit code 2)."""


def kind_ok(value, kind: str) -> bool:
  """Whether a JSON value is of `kind` (object, list, str, bool, int,
  number)."""
  if kind == "object":
    return isinstance(value, Mapping)
  if kind == "list":
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))
  if kind == "str":
    return isinstance(value, str)
  if kind == "bool":
    return isinstance(value, bool)
  if kind == "int":
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if kind == "number":
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
  raise AssertionError(kind)


def get(obj: Mapping, key: str, path: str, kind: str, default=MISSING):
  """obj[key], checked to be of `kind`; ReportError naming `path.key`."""
  where = f"{path}.{key}" if path else key
  if key not in obj or obj[key] is None:
    if default is not MISSING:
      return default
    raise ReportError(f"{where}: missing (or null).")
  value = obj[key]
  if not kind_ok(value, kind):
    raise ReportError(f"{where}: expected {kind}, got {type(value).__name__} "
                      f"{value!r:.60}.")
  return value


def site_map(obj: Mapping, key: str, path: str) -> Mapping:
  return get(obj, key, path, "object")


def site_value(mapping: Mapping, site: str, path: str, kind: str):
  return get(mapping, site, path, kind)


def close(a: float, b: float) -> bool:
  """Equal to a relative 1e-6 (absolute 1e-9 near zero)."""
  return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)



def load_report(path: str) -> dict:
  """The report at `path`: a workdir (its report.json) or a JSON file."""
  return read_report(path)[0]


def read_report(path: str) -> tuple[dict, str]:
  """(the report at `path`, sha256 of its bytes); `path` is a workdir (its
  report.json) or a JSON file."""
  file = os.path.join(path, "report.json") if os.path.isdir(path) else path
  try:
    with open(file, "rb") as f:
      raw = f.read()
    return json.loads(raw), hashlib.sha256(raw).hexdigest()
  except FileNotFoundError as e:
    raise ReportError(f"{file}: no such file.") from e
  except json.JSONDecodeError as e:
    raise ReportError(f"{file}: malformed JSON: {e}.") from e
  except (OSError, UnicodeDecodeError) as e:
    raise ReportError(f"{file}: cannot read: {e}.") from e
