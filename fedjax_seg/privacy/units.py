"""The unit of privacy: what one neighbouring dataset adds or removes.

One vocabulary for the whole project (configuration, ledger, client, report):

* `EXAMPLE`: one training example, a 2D slice (or one volume when a 3D model
  trains on whole volumes).
* `PATIENT`: all of one patient's slices, clipped as one group. The unit a
  hospital needs: a patient contributes many slices, and a per-slice epsilon
  says little about a patient.
* `SITE`: one whole site (hospital), for DP-FedAvg: each site's model update
  is clipped and the server adds noise.
"""

import enum


class PrivacyUnit(str, enum.Enum):
  """The unit of privacy; its value is the string used in flags and JSON."""

  EXAMPLE = "example"
  PATIENT = "patient"
  SITE = "site"

  def __str__(self) -> str:
    return self.value

  @property
  def epsilon_label(self) -> str:
    """How an epsilon of this unit is named in logs, tables and plots."""
    return {"example": "epsilon per slice", "patient": "epsilon per patient",
            "site": "epsilon per site"}[self.value]


UNITS = tuple(u.value for u in PrivacyUnit)
# Units of record-level DP-SGD inside a site (site-level DP is at the server).
RECORD_UNITS = (PrivacyUnit.EXAMPLE.value, PrivacyUnit.PATIENT.value)
