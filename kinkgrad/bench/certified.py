"""Certified training step (`kg.certified_backward`) vs plain forward + backward + SGD.

Cases, interleaved in one process, as ratios to the plain step on the same model:

* certified step on an ordinary batch (no element exactly on a kink: the usual case);
* certified step on a batch with one element on a kink (one sample's input is zero
  and a first-layer bias is zero), so the forward-mode tangent pass runs every step;
* the textbook one-pass form (forward and reverse mode recorded together under
  `torch.autograd.forward_ad`, the "directional" policy deciding inline), for reference;
* on the small MLP, the two ways a user gets a Clarke element today: forward-mode
  directional derivatives along all n coordinate directions of the parameters
  (lexicographic differentiation; timed as n jvps, vectorised in chunks), and gradients
  at n + 1 nearby points (timed on a sample of points, scaled to n + 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import kinkgrad as kg

from .timing import MODELS, interleaved, mlp, report

GOAL = 1.6  # the extra work is one tangent pass, and it runs only at a kink


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def _data(sizes: tuple[int, ...], batch: int, kink: bool):
    model = mlp(sizes)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, sizes[0], generator=gen)
    y = torch.randint(0, sizes[-1], (batch,), generator=gen)
    if kink:  # sample 0 is all zeros and unit 0 has bias 0: relu input exactly 0
        x[0] = 0.0
        with torch.no_grad():
            model[0].bias[0] = 0.0
    return model, x, y


def _plain(sizes: tuple[int, ...], batch: int) -> Callable[[], None]:
    model, x, y = _data(sizes, batch, False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        opt.step()

    return step


def _certified(sizes: tuple[int, ...], batch: int, kink: bool) -> Callable[[], None]:
    model, x, y = _data(sizes, batch, kink)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step meets the kink

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        res = kg.certified_backward(_loss, model, x, y, seed=0)
        assert (res.kinks_hit > 0) == kink
        opt.step()

    return step


def _one_pass(sizes: tuple[int, ...], batch: int) -> Callable[[], None]:
    """Forward and reverse mode together: params made dual, policy "directional"."""
    model, x, y = _data(sizes, batch, True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    named = list(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    dirs = [torch.randn(p.shape, generator=gen) for _, p in named]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with kg.policy(default="directional"), fwAD.dual_level():
            params = {n: fwAD.make_dual(p, d) for (n, p), d in zip(named, dirs, strict=True)}
            loss = F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
            loss.backward()
        opt.step()

    return step


def _coordinate_jvps(sizes: tuple[int, ...], batch: int, chunk: int = 1024) -> Callable[[], None]:
    """n forward-mode directional derivatives along the coordinate directions."""
    model, x, y = _data(sizes, batch, True)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    sizes_ = [p.numel() for p in params]
    n = sum(sizes_)

    def loss_of(*ps: torch.Tensor) -> torch.Tensor:
        return _loss_functional(model, names, ps, x, y)

    def jvp_of(*ts: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(loss_of, tuple(params), ts)[1]

    batched = torch.func.vmap(jvp_of)

    def step() -> None:
        out = []
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(start + chunk, n))
            basis = torch.zeros(len(idx), n)
            basis[torch.arange(len(idx)), idx] = 1.0
            ts = [
                t.reshape(len(idx), *p.shape)
                for t, p in zip(basis.split(sizes_, 1), params, strict=True)
            ]
            out.append(batched(*ts))
        torch.cat(out)

    return step


def _loss_functional(model, names, ps, x, y) -> torch.Tensor:  # noqa: ANN001
    return _loss_call(model, dict(zip(names, ps, strict=True)), x, y)


def _loss_call(model, params, x, y) -> torch.Tensor:  # noqa: ANN001
    return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)


def _sampled_gradient(sizes: tuple[int, ...], batch: int) -> Callable[[], None]:
    """One gradient at a random nearby point (a gradient-sampling method needs n + 1)."""
    model, x, y = _data(sizes, batch, True)
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    gen = torch.Generator().manual_seed(2)

    def step() -> None:
        params = {
            n: (p + 1e-4 * torch.randn(p.shape, generator=gen)).requires_grad_() for n, p in named
        }
        loss = _loss_call(model, params, x, y)
        torch.autograd.grad(loss, list(params.values()))

    return step


def main(steps: int = 40, extra: list[str] | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    for title, (sizes, batch) in MODELS.items():
        variants = {
            "plain PyTorch": _plain(sizes, batch),
            "certified, no kink met": _certified(sizes, batch, False),
            "certified, a kink met (tangent pass)": _certified(sizes, batch, True),
            "one-pass forward+reverse AD (reference)": _one_pass(sizes, batch),
        }
        medians = interleaved(variants, steps=steps)
        ratios = report(f"certified step, {title}", medians, "plain PyTorch")
        goal_names = ("certified, no kink met", "certified, a kink met (tangent pass)")
        for name in goal_names:
            mark = "met" if ratios[name] <= GOAL else "NOT met"
            print(f"  goal <= {GOAL:.2f} for {name!r}: {mark}")
        for name, r in ratios.items():
            if name != "plain PyTorch":
                out[f"{title}: {name}"] = r
    # The alternatives, on the small MLP only (their cost grows with n), each timed
    # interleaved with the plain step it is compared with.
    title, (sizes, batch) = list(MODELS.items())[-1]
    n = sum(p.numel() for p in mlp(sizes).parameters())
    reps = max(3, steps // 10)
    cert = interleaved(
        {"plain": _plain(sizes, batch), "cert": _certified(sizes, batch, True)}, steps=steps
    )
    ld = interleaved(
        {"plain": _plain(sizes, batch), "ld": _coordinate_jvps(sizes, batch)}, steps=reps, warmup=1
    )
    sample = interleaved(
        {"plain": _plain(sizes, batch), "sample": _sampled_gradient(sizes, batch)}, steps=steps
    )
    print(f"Clarke element on the {title} (n = {n} parameters), ratio to one plain step")
    alt = {
        "certified step, a kink met": cert["cert"] / cert["plain"],
        f"forward-mode LD, {n} coordinate jvps (vmap, chunks of 1024)": ld["ld"] / ld["plain"],
        f"gradient sampling, {n + 1} gradients (1 timed x {n + 1})": sample["sample"]
        * (n + 1)
        / sample["plain"],
    }
    for name, r in alt.items():
        print(f"  {name:<62} {r:10.1f}x")
        out[f"{title}: {name}"] = r
    return out
