"""The study: does the derivative at the kink matter? (`kinkgrad study`)

Modules: `config` (grid, TOML, validation), `data` (digits, MNIST-1D), `models` (ReLU
MLP and CNN), `policies` (what is compared; pluggable), `train` (paired runs in
lockstep), `counts` (the adapter to `kinkgrad.watch`), `results` (atomic files, resume,
lock), `runner` (jobs, torchrun), `analysis`, `plots`, `report`, `cli`.
"""

from .config import StudyConfig as StudyConfig
from .config import build as build
from .policies import REGISTRY as REGISTRY
from .policies import Policy as Policy
