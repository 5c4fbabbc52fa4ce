"""Federated training: sites as stacked data, DP-SGD clients, servers, rounds.

Builds on fedjax_seg.privacy; knows nothing about images: a `Task` record
(any per-example loss, optional faster per-example gradients and batch
transform) is passed in.
"""

from fedjax_seg.federated.client import ClientConfig
from fedjax_seg.federated.client import ClientMetrics
from fedjax_seg.federated.client import init_site_state
from fedjax_seg.federated.client import LocalDPConfig
from fedjax_seg.federated.client import make_client_update
from fedjax_seg.federated.client import SiteConfig
from fedjax_seg.federated.client import SiteData
from fedjax_seg.federated.client import SiteState
from fedjax_seg.federated.rounds import BACKENDS
from fedjax_seg.federated.rounds import FederatedTrainer
from fedjax_seg.federated.rounds import resolve_backend
from fedjax_seg.federated.rounds import RoundOutput
from fedjax_seg.federated.sampling import poisson_sample
from fedjax_seg.federated.sampling import sample_participants
from fedjax_seg.federated.sampling import server_groups
from fedjax_seg.federated.server import ServerConfig
from fedjax_seg.federated.server import ServerState
from fedjax_seg.federated.server import SiteLevelDPConfig
from fedjax_seg.federated.task import SettingError
from fedjax_seg.federated.task import Task
