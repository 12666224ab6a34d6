"""kinkgrad.watch under torch.func transforms and torch.compile.

vmap: one-input elementwise and jump ops are counted on the tensor below the batching
(every vmapped instance), so the counts equal those of the same batch run eagerly;
other ops are not counted there, and the watcher says so. torch.compile: the counts
equal eager's (the watcher's Python runs at graph breaks; see the report for how many).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import kinkgrad as kg


def _batch() -> torch.Tensor:
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    x[0, :3] = 0.0
    x[3, 1] = 1.0  # hardtanh's kink
    x[4, 2] = torch.finfo(torch.float32).tiny / 4  # subnormal
    x[2, 5] = 1e-9  # near 0, not on it
    return x


FUNCS = {
    "relu": torch.relu,
    "abs": torch.abs,
    "hardtanh": nn.functional.hardtanh,
    "sign": torch.sign,  # a jump op
}


def _records(fn, x: torch.Tensor) -> list[dict]:
    with kg.watch(nn.Identity()) as w:
        fn(x)
    return w.records()


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_vmap_counts_equal_the_eager_batch(name):
    f = FUNCS[name]
    x = _batch()
    eager = _records(f, x)
    assert eager and eager[0]["exact"] > 0
    assert _records(torch.func.vmap(f), x) == eager
    # The batch along dim 1: samples count vmapped instances (columns here).
    by_columns = _records(torch.func.vmap(f, in_dims=1), x)
    assert by_columns[0]["exact"] == eager[0]["exact"]
    assert by_columns[0]["samples"] == _records(f, x.T.contiguous())[0]["samples"]
    # Nested vmaps: still every element once.
    nested = _records(torch.func.vmap(torch.func.vmap(f)), x)
    assert {k: nested[0][k] for k in ("exact", "near", "subnormal", "elements")} == {
        k: eager[0][k] for k in ("exact", "near", "subnormal", "elements")
    }


def test_per_sample_gradients_count_exact_and_say_effective_is_not_counted():
    x = _batch()

    def loss(v):
        return torch.relu(v).sum()

    with pytest.warns(RuntimeWarning, match="not effective hits"):
        with kg.watch(nn.Identity()) as w:
            torch.func.vmap(torch.func.grad(loss))(x)
    r = w.records()[0]
    eager = _records(torch.relu, x)[0]
    assert (r["exact"], r["near"], r["effective"]) == (eager["exact"], eager["near"], 0)


def test_ops_it_cannot_count_under_vmap_are_named():
    x = _batch()
    with pytest.warns(RuntimeWarning, match="cannot count 'maximum' inside torch.func"):
        with kg.watch(nn.Identity()) as w:
            out = torch.func.vmap(lambda a: torch.maximum(a, a.flip(0)))(x)
            torch.func.vmap(lambda a: torch.maximum(a, a.flip(0)))(x)
    assert torch.equal(out, torch.maximum(x, x.flip(1)))  # the op itself ran unchanged
    assert w.uncounted == {"maximum": 2} and w.records() == [] and w.errors == {}


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------


def _train(compiled: str | None) -> list[dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.MaxPool1d(2), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[:3].zero_()  # three ReLU inputs exactly 0, and tied windows
    f = torch.compile(model, backend=compiled) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    with kg.watch(model) as w:
        for _ in range(3):
            x = torch.randn(6, 4, generator=gen)
            x[0] = 0.0
            loss = f(x).square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch._dynamo.reset()
    return w.records()


# torch.compile(module) warns that the watcher's global module hooks fire once more, for
# the OptimizedModule wrapper: it is not a module of the model, so the watcher ignores it.
GLOBAL_HOOKS = "ignore:Using `torch.compile.module.` when there are global hooks"


@pytest.mark.filterwarnings(GLOBAL_HOOKS)
def test_compiled_counts_equal_eager():
    eager = _train(None)
    assert sum(r["exact"] for r in eager) > 0 and sum(r["effective"] for r in eager) > 0
    assert _train("eager") == eager


@pytest.mark.filterwarnings(GLOBAL_HOOKS)
@pytest.mark.parametrize("wrapped", [False, True])
def test_compiled_eager_backend_counts_once_either_way(monkeypatch, wrapped):
    """The eager backend's graph calls torch.relu itself. Graphs traced under the mode
    run without it (`dynamo_graphs`), so those calls never reach the watcher; where a
    graph may predate that patch the watcher recognises the graph's frames instead
    (`in_compiled_graph`). Both ways count each call once."""
    from kinkgrad import dynamo_graphs, watch_compiled

    monkeypatch.setattr(dynamo_graphs, "EVERY_GRAPH_WRAPPED", wrapped)
    if wrapped:  # the frame walk must not be what saves the count
        monkeypatch.setattr(watch_compiled, "in_compiled_graph", lambda depth: False)
    assert _train("eager") == _train(None)


@pytest.mark.slow
@pytest.mark.filterwarnings(GLOBAL_HOOKS)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_counts_equal_eager_other_backends(backend):
    assert _train(backend) == _train(None)


def _lrl() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.filterwarnings(GLOBAL_HOOKS)
def test_compiled_watch_adds_no_graph_break():
    model = _lrl()
    x = torch.randn(6, 4)
    torch._dynamo.reset()
    plain = torch._dynamo.explain(model)(x).graph_break_count
    with kg.watch(model):
        torch._dynamo.reset()
        watched = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    assert watched.graph_break_count <= plain
    assert watched.graph_count == 1


def _steps(f, model: nn.Module, make) -> list[dict]:
    gen = torch.Generator().manual_seed(2)
    with kg.watch(model) as w:
        for _ in range(3):
            f(make(gen)).sum().backward()
    torch._dynamo.reset()
    return w.records()


class _Ties(nn.Module):
    """Tie ops with tuple outputs, an in-place op, a two-input op and a jump op.
    (`torch.relu_` itself is left out: dynamo traces it without the interception mode,
    so nothing of kinkgrad sees it in a compiled graph.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v, _ = torch.max(x, dim=1)
        s = torch.sort(x, dim=1).values
        y = (x * 1.0).relu_() + torch.maximum(x, x.flip(0)) + torch.sign(x) * x
        return v.sum() + s[:, 0].sum() + torch.clamp(y, -0.5, 0.5).sum()


def _ties_input(gen: torch.Generator) -> torch.Tensor:
    x = torch.randint(-2, 3, (5, 4), generator=gen).float() / 2  # ties and kinks
    return x.requires_grad_()


@pytest.mark.filterwarnings(GLOBAL_HOOKS)
def test_compiled_fullgraph_counts_equal_eager_tie_and_inplace_ops():
    model = _Ties()
    eager = _steps(model, model, _ties_input)
    assert {r["op"] for r in eager} >= {"max", "sort", "relu", "maximum", "sign", "clamp"}
    assert sum(r["effective"] for r in eager if r["op"] in ("max", "sort")) > 0
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert _steps(compiled, model, _ties_input) == eager


@pytest.mark.slow
@pytest.mark.filterwarnings(GLOBAL_HOOKS)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_fullgraph_tie_ops_other_backends(backend):
    model = _Ties()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    assert _steps(compiled, model, _ties_input) == _steps(model, model, _ties_input)
