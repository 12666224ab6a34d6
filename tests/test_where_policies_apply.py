"""Regression tests, one per case of issue 8: a policy stays exact (or says loudly that
it cannot apply) through in-place ops, views, output mutation, checkpointing,
TorchScript, threads, odd tensors, and every spelling of an op."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kinkgrad as kg
from kinkgrad.at_kinks import force_lazy


def grad_of(fn, x, **policy):
    x = x.detach().clone().requires_grad_(True)
    with kg.policy(**policy):
        out = fn(x)
    out.sum().backward()
    return x.grad


# 1. in-place change of a tie op's output ----------------------------------------------


@pytest.mark.parametrize("lazy", [False, True])
def test_tie_output_modified_in_place(lazy):
    with force_lazy(lazy):
        x = torch.zeros(1, 1, 2, 2, requires_grad=True)
        with kg.policy(max_pool2d="split"):
            p = F.max_pool2d(x, 2)
            p += 1.0
        p.sum().backward()
        assert x.grad.flatten().tolist() == [0.25] * 4
        x = torch.tensor([2.0, 1.0, 1.0], requires_grad=True)
        with kg.policy(sort="first"):
            s = torch.sort(x).values
        s.mul_(torch.tensor([1.0, 2.0, 3.0]))
        s.sum().backward()
        assert x.grad.tolist() == [3.0, 1.0, 2.0]  # plain PyTorch's, and the "first" rule's


@pytest.mark.parametrize(
    "op,expected",
    [
        (lambda x: torch.topk(x, 2).values, [1.0, 2.0, 0.0]),
        # sorted [1, 3, 3]: the 2nd smallest and the (lower) median are a tied 3
        (lambda x: torch.kthvalue(x, 2, 0, keepdim=True).values, [1.0, 0.0, 0.0]),
        (lambda x: torch.median(x, 0, keepdim=True).values, [1.0, 0.0, 0.0]),
        (lambda x: torch.max(x, 0, keepdim=True).values, [1.0, 0.0, 0.0]),
    ],
)
def test_other_tie_outputs_modified_in_place(op, expected):
    x = torch.tensor([3.0, 3.0, 1.0], requires_grad=True)
    with kg.policy(topk="first", kthvalue="first", median="first", max="first"):
        v = op(x)
    v.mul_(torch.arange(1.0, v.numel() + 1).reshape(v.shape))
    v.sum().backward()
    exp = torch.tensor(expected)
    assert torch.equal(x.grad, exp)


# 2. in-place elementwise ops on views --------------------------------------------------


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize(
    "inplace_on_view,expected",
    [
        (lambda z: z[1:].relu_(), [1.0, 1.0, 1.0, 1.0]),
        (lambda z: F.relu(z.view(2, 2)[:, 0], inplace=True), [1.0, 1.0, 1.0, 1.0]),
        (lambda z: nn.ReLU(inplace=True)(z[:2]), [1.0, 1.0, 1.0, 1.0]),
        (lambda z: z[::2].abs_(), [0.5, 1.0, 0.5, 1.0]),
        (lambda z: z[2:].clamp_(0.0, 1.0), [1.0, 1.0, 0.0, 0.0]),
    ],
)
def test_inplace_on_views(lazy, inplace_on_view, expected):
    y = torch.zeros(4, requires_grad=True)
    with force_lazy(lazy), kg.policy(relu=1.0, abs=0.75, clamp=0.0):
        z = y * 1
        inplace_on_view(z)
    z.sum().backward()
    assert y.grad.tolist() == expected


def test_inplace_on_a_leaf_is_pytorchs_error():
    x = torch.zeros(3, requires_grad=True)
    with kg.policy(relu=1.0), pytest.raises(RuntimeError, match="leaf Variable"):
        torch.relu_(x)


# 3. the lazy (accelerator) path with in-place ops ---------------------------------------


def test_lazy_path_builds_the_mask_before_an_inplace_op():
    y = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], requires_grad=True)
    with force_lazy(), kg.policy(relu=1.0):
        z = y * 1
        nn.ReLU(inplace=True)(z)
    z.sum().backward()
    assert y.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_lazy_path_reads_no_value_on_the_host(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("host sync on the lazy path")

    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "__bool__", refuse)
    x = torch.tensor([-1.0, 0.0, 1.0], requires_grad=True)
    with force_lazy(), kg.policy(relu=1.0, clamp=0.5):
        out = torch.relu(x) + torch.clamp(x, 0.0, 1.0)
    out.sum().backward()
    monkeypatch.undo()
    assert x.grad.tolist() == [0.0, 1.5, 1.5]


# 4. checkpoint, reentrant and not: the recomputation runs under the forward's policy ----


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("backward_inside", [True, False])
def test_checkpoint_recomputes_under_the_policy(reentrant, backward_inside):
    x = torch.zeros(3, requires_grad=True)
    with kg.policy(relu=1.0):
        y = checkpoint(lambda t: torch.relu(t * 1), x, use_reentrant=reentrant)
        if backward_inside:
            y.sum().backward()
    if not backward_inside:
        y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]
    x.grad = None
    checkpoint(lambda t: torch.relu(t * 1), x, use_reentrant=reentrant).sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 0.0]  # no policy captured: plain


# 5. TorchScript: loud -------------------------------------------------------------------


def test_scripted_and_traced_modules_warn_and_attach_refuses():
    scripted = torch.jit.script(nn.ReLU())
    with pytest.raises(TypeError, match="kinkgrad.attach.*TorchScript"):
        kg.attach(scripted, relu=1.0)
    traced = torch.jit.trace(nn.Sequential(nn.ReLU()), torch.zeros(2))
    for module in (scripted, traced):
        with kg.policy(relu=1.0), pytest.warns(UserWarning, match="kinkgrad: TorchScript"):
            module(torch.zeros(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scripted(torch.zeros(2))  # no policy: nothing to say


@torch.jit.script
def _scripted_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x)


def _relu_twice(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) * 2


def test_scripted_and_traced_functions_warn_naming_the_function():
    traced = torch.jit.trace(_relu_twice, torch.ones(2))
    for fn, name in ((_scripted_relu, "_scripted_relu"), (traced, "_relu_twice")):
        x = torch.zeros(2, requires_grad=True)
        with kg.policy(relu=1.0), pytest.warns(UserWarning, match=f"kinkgrad: .*{name}"):
            fn(x).sum().backward()
        assert x.grad.tolist() == [0.0, 0.0]  # PyTorch's own: the policy did not reach it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _scripted_relu(torch.zeros(2))  # no policy: nothing to say


# 6. threads -----------------------------------------------------------------------------


def test_threads_policy_is_per_thread_and_attach_works_in_workers():
    model = kg.attach(nn.Sequential(nn.ReLU()), relu=1.0)
    plain = nn.ReLU()

    def work(m):
        x = torch.zeros(3, requires_grad=True)
        m(x).sum().backward()
        return x.grad.tolist()

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(work, [model] * 8)) == [[1.0, 1.0, 1.0]] * 8
        with kg.policy(relu=1.0):  # a block is per thread, like torch.no_grad
            assert pool.submit(work, plain).result() == [0.0, 0.0, 0.0]
    kg.detach(model)


# 7. odd but valid tensors -----------------------------------------------------------------


@pytest.mark.parametrize("lazy", [False, True])
def test_zero_dim_sort_and_topk(lazy):
    for op in (lambda t: torch.sort(t).values, lambda t: torch.topk(t, 1).values):
        x = torch.tensor(3.0, requires_grad=True)
        with force_lazy(lazy), kg.policy(sort="first", topk="split"):
            op(x).sum().backward()
        assert x.grad.item() == 1.0


def test_meta_tensors_pass_through():
    x = torch.zeros(1, 1, 4, 4, device="meta", requires_grad=True)
    with kg.policy(max_pool2d="split", relu=1.0):
        out = F.max_pool2d(torch.relu(x), 2)
    out.sum().backward()
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"


def test_sparse_relu_runs_plain_and_says_so():
    x = torch.tensor([0.0, -1.0, 2.0]).to_sparse().requires_grad_()
    with kg.policy(relu=1.0), pytest.warns(UserWarning, match="kinkgrad: policies do not apply"):
        y = torch.relu(x)
    assert torch.equal(y.to_dense(), torch.tensor([0.0, 0.0, 2.0]))


# 8. one op, every spelling ------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        lambda x: torch.clamp(x, 0.0, 1.0),
        lambda x: x.clamp(min=0.0),
        lambda x: torch.clip(x, 0.0),
        lambda x: x.clip(0.0, 2.0),
        lambda x: torch.clamp_min(x, 0.0),
        lambda x: x.clamp_min(0.0),
        lambda x: (x * 1).clamp_min_(0.0),
        lambda x: torch.clamp_min_(x * 1, 0.0),
        lambda x: (x * 1).clamp_(min=0.0),
        lambda x: (x * 1).clip_(0.0),
    ],
)
def test_clamp_reaches_every_spelling(spelling):
    assert grad_of(spelling, torch.zeros(3), clamp="right").tolist() == [1.0] * 3
    assert grad_of(spelling, torch.zeros(3), clamp="left").tolist() == [0.0] * 3


def test_clamp_max_spellings_and_more_specific_name_wins():
    assert grad_of(lambda x: x.clamp_max(0.0), torch.zeros(2), clamp=0.0).tolist() == [1.0] * 2
    assert grad_of(lambda x: x.clamp_max(0.0), torch.zeros(2), clamp=1.0).tolist() == [0.0] * 2
    both = {"clamp": "right", "clamp_min": "left"}
    assert grad_of(lambda x: torch.clamp_min(x, 0.0), torch.zeros(2), **both).tolist() == [0.0] * 2
    assert grad_of(lambda x: torch.clamp(x, 0.0), torch.zeros(2), **both).tolist() == [1.0] * 2


@pytest.mark.parametrize(
    "call", [lambda x: F.hardtanh(x, 0.0, 6.0), lambda x: nn.Hardtanh(0.0, 6.0)(x)]
)
def test_hardtanh_reaches_calls_routed_to_relu6(call):
    assert grad_of(call, torch.zeros(2), hardtanh=1.0).tolist() == [1.0] * 2
    assert grad_of(call, torch.zeros(2), hardtanh=1.0, relu6=0.5).tolist() == [0.5] * 2
    assert grad_of(call, torch.zeros(2), relu6=0.25).tolist() == [0.25] * 2
    # F.relu6 is not a hardtanh spelling: a hardtanh policy leaves it alone
    assert grad_of(F.relu6, torch.zeros(2), hardtanh=1.0).tolist() == [0.0] * 2


@pytest.mark.parametrize(
    "value", [np.float32(0.5), np.float64(0.5), np.float16(0.5), torch.tensor(0.5), np.int64(1)]
)
def test_numpy_and_zero_dim_tensor_values(value):
    expected = float(value)
    assert grad_of(torch.relu, torch.zeros(2), relu=value).tolist() == [expected] * 2


@pytest.mark.parametrize("value", [np.bool_(True), torch.tensor([0.5]), np.array([0.5])])
def test_non_scalar_values_are_refused(value):
    with pytest.raises(ValueError, match="kinkgrad policy for 'relu'"):
        kg.policy(relu=value).__enter__()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inplace_relu_and_ties_match_cpu():
    """On a GPU the lazy path is the real one: nn.ReLU(inplace=True) as in torchvision."""
    for device in ("cpu", "cuda"):
        y = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], device=device, requires_grad=True)
        with kg.policy(relu=1.0, max_pool1d="split"):
            z = y * 1
            nn.ReLU(inplace=True)(z)
            p = F.max_pool1d(z.reshape(1, 1, 5)[..., 1:], 2)
            p += 1.0
        (z.sum() + p.sum()).backward()
        assert y.grad.cpu().tolist() == [0.0, 0.5, 1.5, 2.0, 1.0]
