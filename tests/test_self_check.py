"""The fused kernels' self-check on first use (kernels/self_check.py), run on CPU by Triton's interpreter: a
wrong kernel (a launch whose output or gradient is perturbed) is caught, warned about once and replaced by
the reference for its shape class, eagerly and inside a compiled UNet; a right one passes and stays in use."""

import logging
from collections import Counter

import pytest
import torch

import kernels.dispatch
from kernels import (
    group_norm_silu,
    group_norm_silu_reference,
    qkv_attention,
    qkv_attention_reference,
    self_check,
)


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """The interpreter on, and a process that has checked nothing yet."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("KERNELS_FORCE_REFERENCE", raising=False)
    monkeypatch.delenv("KERNELS_SELF_CHECK", raising=False)
    monkeypatch.setattr(kernels.dispatch, "_broken", set())
    monkeypatch.setattr(kernels.dispatch, "_verdicts", {})
    monkeypatch.setattr(kernels.dispatch, "launches", Counter())
    monkeypatch.setattr(self_check, "results", [])


@pytest.fixture
def group_norm_triton():
    """Imported under the interpreter: a module of Triton kernels imported without it would need a GPU."""
    from kernels import group_norm_triton

    return group_norm_triton


@pytest.fixture
def attention_triton():
    from kernels import attention_triton

    return attention_triton


def perturbed(fn):
    """fn with its (first) output scaled by 1.01: a kernel launch that is wrong by 1%."""

    def wrong(*args):
        out = fn(*args)
        if not isinstance(out, tuple):
            return out * 1.01
        return (out[0] * 1.01, *out[1:])

    return wrong


def gn_inputs(B=2, C=8, H=4, W=4, seed=0):
    torch.manual_seed(seed)
    x = (torch.randn(B, C, H, W) * 2 + 1).requires_grad_()
    return (
        x,
        torch.randn(C).requires_grad_(),
        torch.randn(C).requires_grad_(),
        torch.randn(B, C).requires_grad_(),
    )


def gn_values_and_grads(fn, x, w, b, scale):
    y = fn(x, w, b, 4, scale=scale)
    return [y.detach(), *torch.autograd.grad(y, [x, w, b, scale], torch.ones_like(y))]


def test_a_right_kernel_passes_its_check_once_and_stays_in_use(caplog):
    caplog.set_level(logging.INFO, logger="kernels")
    inputs = gn_inputs()
    before = torch.get_rng_state()
    for _ in range(3):
        got = gn_values_and_grads(group_norm_silu, *inputs)
    assert torch.equal(
        torch.get_rng_state(), before
    )  # the check's cotangent leaves the training streams alone
    assert [r.op for r in self_check.results] == ["group_norm_silu"] and self_check.results[0].ok
    assert (
        "kernel self-check group_norm_silu on cpu torch.float32 [2, 8, 4, 4] (4 groups): passed"
        in caplog.text
    )
    assert kernels.dispatch.launches["group_norm_silu"] == 6  # 3 forward + 3 backward launches: no fallback
    assert kernels.dispatch.fallbacks() == []
    want = gn_values_and_grads(group_norm_silu_reference, *inputs)
    assert all(torch.allclose(g, r, rtol=1e-4, atol=1e-5) for g, r in zip(got, want))
    # A new shape class (another plan, another dtype) is checked on its own.
    group_norm_silu(torch.randn(2, 8, 40, 40), torch.ones(8), torch.zeros(8), 4)
    group_norm_silu(torch.randn(2, 8, 4, 4).half(), torch.ones(8).half(), torch.zeros(8).half(), 4)
    assert len(self_check.results) == 3 and all(r.ok for r in self_check.results)


def attention_inputs(seed=0):
    torch.manual_seed(seed)
    return torch.randn(1, 3 * 2 * 16, 20).requires_grad_()


def attention_values_and_grads(fn, qkv):
    y = fn(qkv, 2)
    return [y.detach(), *torch.autograd.grad(y, qkv, torch.ones_like(y))]


# op -> (its kernels' module, the op, its reference, inputs, what the check names it with)
WRONG_KERNEL_CASES = {
    "group_norm_silu": (
        "group_norm_triton", group_norm_silu, group_norm_silu_reference, gn_inputs, "[2, 8, 4, 4] (4 groups)"
    ),
    "qkv_attention": (
        "attention_triton", qkv_attention, qkv_attention_reference, lambda: (attention_inputs(),),
        "[1, 96, 20] (2 heads, legacy order)",
    ),
}  # fmt: skip


def values_and_grads(op, fn, inputs):
    if op == "group_norm_silu":
        return gn_values_and_grads(fn, *inputs)
    return attention_values_and_grads(fn, *inputs)


@pytest.mark.parametrize("broken", ["forward", "backward"])
@pytest.mark.parametrize("op", list(WRONG_KERNEL_CASES))
def test_a_wrong_kernel_is_caught_warned_about_once_and_replaced_by_the_reference(
    monkeypatch, caplog, request, broken, op
):
    module_name, fn, reference, make_inputs, shape = WRONG_KERNEL_CASES[op]
    module = request.getfixturevalue(module_name)
    monkeypatch.setattr(module, broken, perturbed(getattr(module, broken)))
    inputs = make_inputs()
    with caplog.at_level(logging.WARNING, logger="kernels"):
        got = values_and_grads(op, fn, inputs) + values_and_grads(op, fn, inputs)
    want = values_and_grads(op, reference, inputs)
    assert all(torch.equal(g, r) for g, r in zip(got, want + want))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once, not per call
    assert f"kernel self-check {op} on cpu torch.float32 {shape}: MISMATCH" in warnings[0]
    assert "uses the PyTorch reference from now on" in warnings[0]
    result = self_check.results[0]
    error = result.output_error if broken == "forward" else result.gradient_error
    assert error == pytest.approx(0.01, rel=0.05)  # the injected 1% is what the check measured
    assert kernels.dispatch.launches[op] == 0 and len(kernels.dispatch.fallbacks()) == 1


def test_a_right_attention_kernel_passes_and_a_new_shape_class_is_checked_anew():
    qkv = attention_inputs()
    attention_values_and_grads(qkv_attention, qkv)
    attention_values_and_grads(qkv_attention, qkv)
    qkv_attention(torch.randn(1, 3 * 2 * 16, 32), 2)  # T a multiple of 16: Triton compiles other code
    assert [r.ok for r in self_check.results] == [True, True]
    assert kernels.dispatch.launches["qkv_attention"] == 5


def test_the_check_can_be_turned_off(monkeypatch, group_norm_triton):
    monkeypatch.setenv("KERNELS_SELF_CHECK", "0")
    monkeypatch.setattr(group_norm_triton, "forward", perturbed(group_norm_triton.forward))
    x, w, b, scale = gn_inputs()
    y = group_norm_silu(x, w, b, 4, scale=scale)
    assert self_check.results == [] and kernels.dispatch.launches["group_norm_silu"] == 1
    assert not torch.allclose(y, group_norm_silu_reference(x, w, b, 4, scale=scale))  # unchecked: wrong


def tiny_unet():
    from conftest import ONE_LEVEL, tiny_flags

    from iddpm_ds.script_util import create_model_and_diffusion

    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(
        **tiny_flags(learn_sigma=True, use_fused_kernels=True, **ONE_LEVEL)
    )
    for p in model.parameters():  # zero-initialised output convs would hide the blocks they gate
        torch.nn.init.normal_(p, std=0.1)
    return model, diffusion


def train_steps(model, diffusion, steps=3):
    """Losses of a few SGD steps on fixed batches."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = []
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x, noise = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
        loss = diffusion.training_losses(model, x, torch.tensor([3, 15]), noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("compiled", [False, True])
def test_training_goes_on_with_the_reference_where_a_kernel_is_wrong(
    monkeypatch, caplog, compiled, group_norm_triton, attention_triton
):
    """Both ops wrong in the backward (the forward is right, so only the check can tell): a UNet, eager or
    compiled (the kernels are custom ops inside the graph), trains exactly as with the kernels off, and every
    shape class it met was warned about."""
    model_off, diffusion = tiny_unet()
    monkeypatch.setenv("KERNELS_FORCE_REFERENCE", "1")
    want = train_steps(model_off, diffusion)
    monkeypatch.delenv("KERNELS_FORCE_REFERENCE")

    monkeypatch.setattr(group_norm_triton, "backward", perturbed(group_norm_triton.backward))
    monkeypatch.setattr(attention_triton, "backward", perturbed(attention_triton.backward))
    model, diffusion = tiny_unet()
    if compiled:
        torch._dynamo.reset()
        model = torch.compile(model, backend="aot_eager", fullgraph=True)
    with caplog.at_level(logging.WARNING, logger="kernels"):
        got = train_steps(model, diffusion)
    assert got == pytest.approx(want, rel=1e-5)
    ops = {r.op for r in self_check.results}
    assert ops == {"group_norm_silu", "qkv_attention"} and not any(r.ok for r in self_check.results)
    assert caplog.text.count("MISMATCH") == len(self_check.results) == len(kernels.dispatch.fallbacks())
    assert sum(kernels.dispatch.launches.values()) == 0
