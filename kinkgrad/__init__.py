"""kinkgrad: explicit, measurable and correct backpropagation through nonsmooth ops.

>>> import torch, kinkgrad as kg
>>> x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
>>> with kg.policy(relu=1.0):          # ReLU'(0) = 1 for any model, unmodified
...     y = torch.relu(x).sum()
>>> y.backward(); x.grad
tensor([0., 1., 1.])
"""

from . import nn as nn
from .catalog import OpSpec as OpSpec
from .catalog import Probe as Probe
from .catalog import catalog as catalog
from .catalog import targets as _targets
from .certify import CertifiedGrad as CertifiedGrad
from .certify import CertifiedStep as CertifiedStep
from .certify import Linearization as Linearization
from .certify import certified_backward as certified_backward
from .certify import certified_grad as certified_grad
from .certify import kink_crossings as kink_crossings
from .certify import linearization as linearization
from .check import CheckReport as CheckReport
from .check import check as check
from .dynamo_reach import install as _reach_dynamo
from .functional import *  # noqa: F403  (one function per catalog op: kg.relu, kg.max_pool2d, ...)
from .intercept import attach as attach
from .intercept import attached as attached
from .intercept import detach as detach
from .policy import policy as policy
from .replay import install as _install_replay
from .watch import Watcher as Watcher
from .watch import watch as watch

_install_replay()  # checkpoint recomputes under the captured policy; scripts warn
_reach_dynamo(_targets())  # torch.compile dispatches torch.relu_ & co. to kinkgrad too

__version__ = "0.1.0"
