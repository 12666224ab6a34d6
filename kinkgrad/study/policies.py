"""Policies the study compares: a name plus how to compute a gradient under it.

A policy is pluggable: most are a context manager around the forward (a
`kinkgrad.policy(...)` block), and `Policy.grad` runs forward and backward under it.
Registering one is a few lines, and `--extra-policies NAME` adds it to the study
(compared with the reference run like the default pair):

>>> import kinkgrad as kg
>>> REGISTRY["mid"] = lambda: Policy("relu'(0)=0.5", lambda: kg.policy(relu=0.5))
>>> _ = REGISTRY.pop("mid")

A policy with its own backward overrides `grad`; `step` (the global step) and `seed`
(the configuration's seed) are there for per-step seeds that keep the study
deterministic. `Certified` (registered as "certified") is one: it trains with
`kinkgrad.certified_backward`, and because it sets `certifies`, `train.py` also records
its certification counts and how many kinks each of its SGD steps crosses.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..policy import make_frame
from ..policy import policy as kg_policy

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Policy:
    """`name`: shown in results and reports. `context()`: a fresh context manager the
    forward runs in (policies are captured at forward time)."""

    name: str
    context: Callable[[], AbstractContextManager]
    #: True for policies whose `grad` returns a `kinkgrad.CertifiedStep` (with `.loss`)
    #: instead of the loss: the study then records certification and kink crossings.
    certifies: ClassVar[bool] = False

    def grad(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        step: int = 0,
        seed: int = 0,
    ) -> Any:
        """Forward and backward under this policy at training step `step` of the
        configuration seeded `seed`; leaves the gradients in `.grad` and returns the loss
        (detached)."""
        with self.context():
            loss = loss_fn(model(x), y)
        loss.backward()
        return loss.detach()


#: Use kinkgrad's "torch" value where it is the same choice as the requested one (see
#: `kink_policy`); False forces kinkgrad's own rule everywhere (the tests compare both).
SHORTCUT_NATIVE = True


def kink_policy(kink: float | str, ties: str) -> Policy:
    """ReLU'(0) = `kink` for every relu, and `ties` for max-pool windows with a tie.

    ReLU'(0) = 0 with ties to the first element is PyTorch's own choice. When a probe
    confirms that the installed PyTorch still makes it, the policy asks kinkgrad for
    "torch" instead: the same gradients bit for bit, without kinkgrad's kink handling
    (a quarter of the CNN's training time).
    """
    frame = {"relu": kink, "max_pool1d": ties, "max_pool2d": ties}
    canonical = make_frame(frame)  # validate now, not in the middle of training
    label = kink if isinstance(kink, str) else f"{float(kink):g}"
    if SHORTCUT_NATIVE and set(canonical.values()) <= {0.0, "first"} and torch_is_native():
        if canonical["relu"] == 0.0 and canonical["max_pool2d"] == "first":
            frame = dict.fromkeys(frame, "torch")
    return Policy(f"relu'(0)={label}/{ties}", lambda: kg_policy(**frame))


@functools.cache
def torch_is_native() -> bool:
    """Does plain PyTorch give ReLU'(0) = 0 and max-pool ties to the first element?"""
    import torch.nn.functional as F

    z = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    torch.relu(z).sum().backward()
    x2 = torch.zeros(1, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    F.max_pool2d(x2, 2).sum().backward()
    x1 = torch.zeros(1, 1, 2, dtype=torch.float64, requires_grad=True)
    F.max_pool1d(x1, 2).sum().backward()
    return (
        z.grad.eq(0).all().item()
        and x2.grad.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]
        and x1.grad.flatten().tolist() == [1.0, 0.0]
    )


def step_seed(seed: int, step: int) -> int:
    """The seed of a certified gradient's random directions at training step `step` of
    the configuration seeded `seed`: fixed, and different for every (seed, step)."""
    digest = hashlib.blake2b(f"kinkgrad-study:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Certified(Policy):
    """Certified generalized gradients (`kinkgrad.certified_backward`): at every kink the
    forward pass sits on, the piece entered along a random direction over the parameters,
    drawn from `step_seed(seed, step)`. Off the kinks the gradient is PyTorch's, bit for
    bit. `grad` returns the `CertifiedStep` (`.loss`, `.certified`, `.kinks_hit`, ...).

    Under DistributedDataParallel each rank certifies the gradient of its own shard with
    the same direction (the same seed), and the gradients are averaged over the ranks as
    DDP would: the average of the one-sided limits along d is the one-sided limit of the
    average loss along d, so the result is certified when every rank's is.
    """

    #: None: certify's default, 2 directions in float32/64 and 6 in float16/bfloat16
    #: (where rounding can make different tangents equal along two).
    max_directions: int | None = None
    certifies: ClassVar[bool] = True

    def grad(self, model, loss_fn, x, y, *, step=0, seed=0):
        from ..certify import certified_backward

        module = getattr(model, "module", model)  # DDP: certify the local module ...
        res = certified_backward(
            lambda m, x, y: loss_fn(m(x), y),
            module,
            x,
            y,
            seed=step_seed(seed, step),
            max_directions=self.max_directions,
        )
        if module is not model:  # ... and average the gradients as DDP does
            import torch.distributed as dist

            world = dist.get_world_size()
            for p in module.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)
        return res


#: Named policies selectable with `--extra-policies NAME`.
REGISTRY: dict[str, Callable[[], Policy]] = {
    "certified": lambda: Certified("certified", contextlib.nullcontext),
}
