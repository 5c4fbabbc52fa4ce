"""Tests for fedjax_seg.data.prepare and the data_prep.prepare CLI."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fedjax_seg.data import nifti
from fedjax_seg.data import prepare
from fedjax_seg.data import sites
from fedjax_seg.data import tfds_io
from tests.data import fixtures

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = nifti.PreprocessConfig(image_size=(32, 32),
                                background_slice_fraction=0.5)


def _tree(path):
  return sorted(str(p.relative_to(path)) for p in pathlib.Path(path).rglob("*"))


def test_msd_round_trip_equals_direct_reading(tmp_path):
  root = fixtures.write_msd(tmp_path / "msd", num_cases=4)
  out = prepare.prepare_dataset(root, tmp_path / "data", "toy_msd", CONFIG,
                                prepare.SiteRule("hash", num_sites=2))
  assert out == tmp_path / "data" / "toy_msd"
  loaded = tfds_io.load("toy_msd", tmp_path / "data")["train"]
  stats = tfds_io.read_stats("toy_msd", tmp_path / "data")
  assert loaded.class_names == ("background", "organ", "lesion")
  assert stats["site_modalities"] == ["CT"] * len(stats["site_names"])
  cases, _ = nifti.read_msd(root)
  for case in cases:
    image, label = nifti.load_case(case, CONFIG, [0, 1, 2])
    keep = nifti.select_slices(label, CONFIG, case.patient + case.image)
    pid = loaded.patient_names.index(case.patient)
    sel = np.flatnonzero(loaded.patient == pid)
    sel = sel[np.argsort(loaded.slice_index[sel])]
    np.testing.assert_array_equal(loaded.slice_index[sel], keep)
    np.testing.assert_array_equal(loaded.image[sel], image[keep])
    np.testing.assert_array_equal(loaded.label[sel], label[keep])
  assert sum(s["slices"] for s in stats["sites"].values()) == \
      loaded.num_examples
  assert 0 < stats["sites"]["site0"]["foreground_fraction"] < 1


def test_rerun_is_a_no_op_and_changes_need_overwrite(tmp_path):
  csv_path = fixtures.write_csv(tmp_path / "in")
  data = tmp_path / "data"
  prepare.prepare_dataset(csv_path, data, "hosp", CONFIG)
  stamp = os.stat(data / "hosp" / tfds_io.STATS_FILE).st_mtime_ns
  first_id = tfds_io.read_stats("hosp", data)["preparation_id"]
  prepare.prepare_dataset(csv_path, data, "hosp", CONFIG)
  assert os.stat(data / "hosp" / tfds_io.STATS_FILE).st_mtime_ns == stamp
  assert tfds_io.read_stats("hosp", data)["preparation_id"] == first_id
  other = nifti.PreprocessConfig(image_size=(24, 24))
  with pytest.raises(FileExistsError, match="--overwrite"):
    prepare.prepare_dataset(csv_path, data, "hosp", other)
  prepare.prepare_dataset(csv_path, data, "hosp", other, overwrite=True)
  assert tfds_io.load("hosp", data)["train"].image.shape[1:3] == (24, 24)
  # Each preparation gets its own random id (reports publish it; it is no
  # function of the data): the first settings again get a new one.
  second_id = tfds_io.read_stats("hosp", data)["preparation_id"]
  prepare.prepare_dataset(csv_path, data, "hosp", CONFIG, overwrite=True)
  ids = [first_id, second_id,
         tfds_io.read_stats("hosp", data)["preparation_id"]]
  assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
  assert len(set(ids)) == 3
  assert _tree(data) == _tree(data)  # Listing is stable ...
  assert not [p for p in os.listdir(data) if p.startswith(".")]  # no temp.


def test_bad_case_leaves_nothing_written(tmp_path):
  csv_path = fixtures.write_csv(tmp_path / "in")
  bad = tmp_path / "in" / "lbl" / "hospital_b_p2.nii.gz"
  image, label = fixtures.volume_pair(0)
  label[1, 1, 1] = 9
  fixtures.save(bad, label)
  data = tmp_path / "data"
  with pytest.raises(nifti.DataError, match="hospital_b_p2.nii.gz"):
    prepare.prepare_dataset(csv_path, data, "hosp", CONFIG,
                            class_names=["background", "organ", "lesion"])
  assert os.listdir(data) == []


def test_a_patient_at_two_sites_is_refused(tmp_path):
  csv_path = fixtures.write_csv(tmp_path / "in")
  text = csv_path.read_text().replace(",hospital_b,hospital_b_p1,",
                                      ",hospital_b,hospital_a_p1,")
  assert text.count(",hospital_a_p1,") == 2
  csv_path.write_text(text)
  data = tmp_path / "data"
  with pytest.raises(nifti.DataError,
                     match=r"'hospital_a_p1' appears in sites "
                           r"\['hospital_a', 'hospital_b'\]"):
    prepare.prepare_dataset(csv_path, data, "hosp", CONFIG)
  assert not data.exists() or os.listdir(data) == []


def test_a_patient_in_two_splits_is_refused(tmp_path):
  csv_path = fixtures.write_csv(tmp_path / "in", with_split=True)
  # hospital_a_p1 (val) gets a second scan, in train.
  lines = csv_path.read_text().splitlines()
  row = next(line for line in lines if ",hospital_a_p1," in line)
  assert row.endswith(",val")
  lines.append(row.replace("img/hospital_a_p1", "img/hospital_a_p0")
               .replace(",val", ",train"))
  csv_path.write_text("\n".join(lines) + "\n")
  data = tmp_path / "data"
  with pytest.raises(nifti.DataError,
                     match=r"'hospital_a_p1' appears in splits "
                           r"\['val', 'train'\].*no training set"):
    prepare.prepare_dataset(csv_path, data, "hosp", CONFIG)
  assert not data.exists() or os.listdir(data) == []


def test_csv_splits_and_site_names_are_kept(tmp_path):
  csv_path = fixtures.write_csv(tmp_path / "in", with_split=True)
  prepare.prepare_dataset(csv_path, tmp_path / "data", "hosp", CONFIG)
  parts = sites.load_splits("hosp", tmp_path / "data")
  assert set(parts) == {"train", "val", "test"}
  assert parts["train"].site_names == ("hospital_a", "hospital_b")
  patients = [set(parts[s].patient.tolist()) for s in ("train", "val", "test")]
  assert not (patients[0] & patients[1]) and not (patients[0] & patients[2])


@pytest.mark.slow
def test_cli_as_a_user_runs_it(tmp_path):
  root = fixtures.write_msd(tmp_path / "msd", num_cases=4)
  args = [sys.executable, "-m", "data_prep.prepare", f"--input={root}",
          f"--output_dir={tmp_path / 'data'}", "--name=cli_msd",
          "--image_size=32", "--site_rule=dirichlet", "--num_sites=2",
          "--dirichlet_alpha=5"]
  result = subprocess.run(args, cwd=REPO, capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().endswith("cli_msd")
  assert tfds_io.read_stats("cli_msd", tmp_path / "data")["site_names"]
  bad = subprocess.run(args[:-1] + ["--dirichlet_alpha=-1"], cwd=REPO,
                       capture_output=True, text=True, check=False)
  assert bad.returncode != 0 and "dirichlet_alpha" in bad.stderr
  missing = subprocess.run(args[:3] + [f"--output_dir={tmp_path}"], cwd=REPO,
                           capture_output=True, text=True, check=False)
  assert missing.returncode != 0 and "--name" in missing.stderr
