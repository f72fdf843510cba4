"""The Triton kernels themselves, run on CPU by Triton's interpreter, against float64 references."""

import pytest
import torch

from kernels import group_norm_silu, group_norm_silu_reference, qkv_attention, qkv_attention_reference


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("KERNELS_FORCE_REFERENCE", raising=False)
    # The kernels themselves: with the self-check on, a wrong kernel would give way to the reference and its
    # test would pass (test_self_check.py tests the check).
    monkeypatch.setenv("KERNELS_SELF_CHECK", "0")


def rel_err(a, ref):
    a, ref = a.detach().double(), ref.detach()
    return float((a - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


GN_CASES = [
    # B, C, H, W, groups, scale, shift, silu: the UNet's three patterns, odd sizes, group counts other than 32
    (2, 64, 4, 4, 32, True, True, True),  # norm + scale-shift + SiLU (ResBlock out_layers)
    (2, 64, 5, 3, 32, False, False, True),  # norm + SiLU (in_layers), odd H*W
    (1, 48, 7, 1, 16, False, False, False),  # plain norm (before attention), 1-D
    (1, 6, 30, 30, 3, True, False, True),  # H*W not a multiple of the split block
    (3, 10, 3, 3, 5, False, True, True),
]


@pytest.fixture(params=["resident", "split"])
def gn_path(request, monkeypatch):
    """Both GroupNorm paths at small shapes: "split" forces every group through the split kernels with
    16-element blocks."""
    from kernels import group_norm_triton

    if request.param == "split":
        monkeypatch.setattr(group_norm_triton, "RESIDENT_MAX", 0)
        monkeypatch.setattr(group_norm_triton, "SPLIT_BLOCK", 16)
    return request.param


@pytest.mark.parametrize("B,C,H,W,G,has_scale,has_shift,silu", GN_CASES)
def test_group_norm_silu_matches_float64_reference(B, C, H, W, G, has_scale, has_shift, silu, gn_path):
    from kernels.group_norm_triton import plan

    assert plan(C // G, H * W, 4).resident == (gn_path == "resident")
    torch.manual_seed(B * 1000 + C + H)
    x = (torch.randn(B, C, H, W) * 3 + 2).requires_grad_()  # offset mean: variance must not cancel
    w, b = torch.randn(C).requires_grad_(), torch.randn(C).requires_grad_()
    scale = torch.randn(B, C).requires_grad_() if has_scale else None
    shift = torch.randn(B, C).requires_grad_() if has_shift else None
    y = group_norm_silu(x, w, b, G, 1e-5, scale=scale, shift=shift, silu=silu)
    dy = torch.randn_like(y)
    inputs = [t for t in (x, w, b, scale, shift) if t is not None]
    grads = torch.autograd.grad(y, inputs, dy)

    doubles = {id(t): t.detach().double().requires_grad_() for t in inputs}
    d = lambda t: None if t is None else doubles[id(t)]  # noqa: E731
    y_ref = group_norm_silu_reference(d(x), d(w), d(b), G, 1e-5, scale=d(scale), shift=d(shift), silu=silu)
    grads_ref = torch.autograd.grad(y_ref, [doubles[id(t)] for t in inputs], dy.double())
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert rel_err(y, y_ref) < 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-4


@pytest.mark.parametrize("flatten", [False, True])
def test_group_norm_reads_channels_last_in_place(gn_path, flatten):
    """A channels_last map (and the [B, C, H*W] view attention takes of it) goes through the kernels with its
    own strides: same values and gradients as the float64 reference, the output and dx channels-last too."""
    from kernels.group_norm import rows_view

    torch.manual_seed(5)
    B, C, H, W, G = 2, 32, 5, 3, 8
    x4 = (torch.randn(B, C, H, W) * 2 + 1).to(memory_format=torch.channels_last).requires_grad_()
    x = x4.reshape(B, C, H * W) if flatten else x4
    assert rows_view(x)[1] == (1, C)  # read in place, no copy to NCHW
    w, b, scale, shift = (torch.randn(*shape).requires_grad_() for shape in ((C,), (C,), (B, C), (B, C)))
    y = group_norm_silu(x, w, b, G, scale=scale, shift=shift)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x4, w, b, scale, shift], dy)
    args64 = [t.detach().double().requires_grad_() for t in (x4, w, b, scale, shift)]
    x64 = args64[0].reshape(B, C, H * W) if flatten else args64[0]
    y_ref = group_norm_silu_reference(x64, *args64[1:3], G, scale=args64[3], shift=args64[4])
    grads_ref = torch.autograd.grad(y_ref, args64, dy.double())
    assert y.stride() == x.stride() and grads[0].is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, y_ref) < 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-4


def test_compiled_unet_with_kernels_traces_them_as_custom_ops():
    """torch.compile sees the fused kernels as custom ops (iddpm_kernels::*), not Python it must trace: the
    UNet compiles as one graph (fullgraph=True fails on any break) holding both ops, and the compiled
    forward and backward give eager's loss and gradients. aot_eager runs the same AOTAutograd graphs as
    inductor without code generation (minutes saved here)."""
    from conftest import ONE_LEVEL, tiny_flags

    from iddpm_ds.script_util import create_model_and_diffusion

    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(
        **tiny_flags(learn_sigma=True, use_fused_kernels=True, **ONE_LEVEL)
    )
    for p in model.parameters():  # zero-initialised output convs would hide the blocks they gate
        torch.nn.init.normal_(p, std=0.1)
    x, t, noise = torch.randn(1, 3, 8, 8), torch.tensor([7]), torch.randn(1, 3, 8, 8)
    ops = set()

    def recording_aot_eager(graph_module, example_inputs):
        ops.update(str(n.target) for n in graph_module.graph.nodes if n.op == "call_function")
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm))(graph_module, example_inputs)

    def loss_and_grads(net):
        loss = diffusion.training_losses(net, x, t, noise=noise)["loss"].sum()
        return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))

    torch._dynamo.reset()
    loss_eager, grads_eager = loss_and_grads(model)
    compiled = torch.compile(model, backend=recording_aot_eager, fullgraph=True)
    loss_compiled, grads_compiled = loss_and_grads(compiled)
    assert {"iddpm_kernels.group_norm_silu.default", "iddpm_kernels.qkv_attention.default"} <= ops
    assert torch.allclose(loss_compiled, loss_eager, rtol=1e-6)
    for g, g_ref in zip(grads_compiled, grads_eager):
        assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-7)


def test_group_norm_bf16_input_keeps_fp32_statistics():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 6, 6) * 4 + 10
    w, b = torch.randn(32), torch.randn(32)
    y = group_norm_silu(x.bfloat16(), w, b, 8)
    ref = group_norm_silu_reference(x.bfloat16().double(), w.double(), b.double(), 8)
    assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 1e-2


def test_group_norm_all_bf16_as_a_bf16_unet_calls_it(gn_path):
    """bf16 x, weight, bias, scale and shift (DeepSpeed's bf16 config): every gradient comes back in bf16 and
    matches float64 to bf16 precision, on both GroupNorm paths."""
    torch.manual_seed(3)
    B, C = 2, 64
    args = [
        torch.randn(B, C, 5, 7) * 2 + 1,
        torch.randn(C),
        torch.randn(C),
        torch.randn(B, C) * 0.5,
        torch.randn(B, C),
    ]
    args = [a.bfloat16().requires_grad_() for a in args]
    y = group_norm_silu(args[0], args[1], args[2], 32, scale=args[3], shift=args[4])
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, args, dy)
    args64 = [a.detach().double().requires_grad_() for a in args]
    y_ref = group_norm_silu_reference(args64[0], args64[1], args64[2], 32, scale=args64[3], shift=args64[4])
    grads_ref = torch.autograd.grad(y_ref, args64, dy.double())
    assert y.dtype == torch.bfloat16 and rel_err(y, y_ref) < 1e-2
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == torch.bfloat16 and rel_err(g, g_ref) < 1e-2


def test_group_norm_rejects_bad_groups():
    with pytest.raises(ValueError, match="num_groups"):
        group_norm_silu(torch.randn(1, 6, 2, 2), torch.ones(6), torch.zeros(6), 4)


ATTN_CASES = [
    # B, heads, head dim, T, order: T not a power of two nor a multiple of the block, D=48 padded to 64
    (2, 2, 32, 20, "legacy"),
    (1, 3, 16, 64, "new"),
    (1, 1, 48, 33, "legacy"),
    (1, 2, 16, 17, "new"),
]


@pytest.mark.parametrize("B,H,D,T,order", ATTN_CASES)
def test_attention_matches_float64_reference(B, H, D, T, order):
    torch.manual_seed(T + D)
    qkv = torch.randn(B, 3 * H * D, T).requires_grad_()
    y = qkv_attention(qkv, H, order)
    dy = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, qkv, dy)
    qkv64 = qkv.detach().double().requires_grad_()
    y_ref = qkv_attention_reference(qkv64, H, order)
    (g_ref,) = torch.autograd.grad(y_ref, qkv64, dy.double())
    assert y.shape == (B, H * D, T)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(g, g_ref) < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_attention_16_bit_inputs(dtype, tol):
    """fp16 runs the kernel's 16-bit path in the interpreter; bf16 on CPU must not reach the interpreter's
    dot,
    which multiplies bf16 bit patterns (triton-lang/triton#11584), and still be right."""
    torch.manual_seed(5)
    qkv = torch.randn(1, 3 * 2 * 32, 40).to(dtype).requires_grad_()
    y = qkv_attention(qkv, 2)
    dy = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, qkv, dy)
    qkv64 = qkv.detach().double().requires_grad_()
    y_ref = qkv_attention_reference(qkv64, 2)
    (g_ref,) = torch.autograd.grad(y_ref, qkv64, dy.double())
    assert y.dtype == dtype and g.dtype == dtype
    assert rel_err(y, y_ref) < tol and rel_err(g, g_ref) < tol


def test_attention_orders_differ_and_bad_widths_fail():
    qkv = torch.randn(1, 3 * 2 * 16, 16)
    assert not torch.allclose(
        qkv_attention_reference(qkv, 2, "legacy"), qkv_attention_reference(qkv, 2, "new")
    )
    with pytest.raises(ValueError, match="order"):
        qkv_attention(qkv, 2, "sideways")
    with pytest.raises(ValueError, match="width"):
        qkv_attention(torch.randn(1, 10, 4), 2)


def test_force_reference_switch(monkeypatch):
    monkeypatch.setenv("KERNELS_FORCE_REFERENCE", "1")
    from kernels.dispatch import use_triton

    assert not use_triton(torch.zeros(1))


def test_unet_with_kernels_on_matches_off():
    from conftest import ONE_LEVEL, tiny_flags

    from iddpm_ds.script_util import create_model_and_diffusion

    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model, diffusion = create_model_and_diffusion(
            **tiny_flags(learn_sigma=True, use_fused_kernels=fused, **ONE_LEVEL)
        )
        for (
            p
        ) in model.parameters():  # zero-initialised output convs would hide errors in the blocks they gate
            torch.nn.init.normal_(p, std=0.1)
        torch.manual_seed(1)
        x, t, noise = torch.randn(2, 3, 8, 8), torch.tensor([3, 15]), torch.randn(2, 3, 8, 8)
        loss = diffusion.training_losses(model, x, t, noise=noise)["loss"].mean()
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss_off, g_off), (loss_on, g_on) = results
    assert torch.allclose(loss_on, loss_off, rtol=1e-5)
    assert float((g_on - g_off).abs().max() / g_off.abs().max()) < 1e-4


def test_benchmark_baselines_compute_the_same_attention_and_norm(monkeypatch):
    """The baselines the one GPU run compares against, checked here: SDPA fed from our layout by the
    benchmark's
    transposes is our attention (its flash backend, which has a CPU build, refuses inputs whose head dim is
    not
    contiguous), and the torch.compile provider runs and matches float64."""
    from torch.nn.attention import SDPBackend

    from kernels.bench import bench_group_norm, sdpa_from_qkv

    monkeypatch.delenv("TRITON_INTERPRET")  # the harness on CPU: the kernel provider runs the reference
    qkv = torch.randn(2, 3 * 4 * 32, 50)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        assert rel_err(sdpa_from_qkv(qkv, 4, backend), qkv_attention_reference(qkv.double(), 4)) < 1e-5
    rows = bench_group_norm(
        [((2, 64, 4, 4), "ss"), ((1, 32, 3, 5), "plain")],
        torch.device("cpu"),
        torch.float32,
        use_compile=True,
    )
    assert [r["provider"] for r in rows] == ["triton", "eager", "compile"] * 2
    assert all(
        "error" not in r
        and r["max_rel_err"] < 1e-5
        and r["grad_rel_err"] < 1e-4
        and len(r["fwd_bwd_ms"]) == 2
        for r in rows
    )


def test_goal_verdicts_follow_the_measurements():
    from kernels.bench import goals

    def row(op, shape, provider, ms, **extra):
        return {
            "op": op,
            "shape": shape,
            "provider": provider,
            "fwd_ms": [ms / 3] * 2,
            "fwd_bwd_ms": [ms * 1.1, ms],
            "max_rel_err": 1e-3,
            "grad_rel_err": 1e-3,
            **extra,
        }

    big, small, attn = [64, 128, 64, 64], [64, 512, 8, 8], [8, 8, 1024, 64]
    rows = [
        row("group_norm", big, "triton", 1.0, pattern="silu", pct_of_copy=85.0),
        row("group_norm", big, "eager", 3.0, pattern="silu"),
        row("group_norm", big, "compile", 1.5, pattern="silu"),
        row("group_norm", small, "triton", 0.025, pattern="ss", grad_rel_err=0.05),
        {
            "op": "group_norm",
            "shape": small,
            "pattern": "ss",
            "provider": "eager",
            "error": "RuntimeError: out of memory",
        },
        row("attention", attn, "triton", 1.0, fwd_TFLOPs=300.0),
        row("attention", attn, "sdpa_flash", 1.2),
        row("attention", attn, "sdpa_mem_efficient", 0.9),
    ]
    report = {"meta": {"dtype": "torch.bfloat16"}, "rows": rows}
    verdicts = {g["goal"]: g["ok"] for g in goals(report)}
    assert verdicts == {
        "group_norm [64, 128, 64, 64] silu: max rel err, output and gradients": True,
        "group_norm [64, 128, 64, 64] silu: fwd+bwd % of copy bandwidth": True,  # 85 >= 80
        "group_norm [64, 128, 64, 64] silu: fwd+bwd speed-up over eager": False,  # 3x < 4x
        "group_norm [64, 128, 64, 64] silu: fwd+bwd speed-up over torch.compile": True,  # 1.5x >= 1.3x
        "group_norm [64, 512, 8, 8] ss: max rel err, output and gradients": False,  # 0.05 > 0.02 for bf16
        "group_norm [64, 512, 8, 8] ss: fwd+bwd speed-up over eager": None,  # eager failed: not measured
        "group_norm [64, 512, 8, 8] ss: fwd+bwd speed-up over torch.compile": None,
        "group_norm [64, 512, 8, 8] ss: fwd+bwd us": False,  # 25 us > 20 us
        "attention [8, 8, 1024, 64]: max rel err, output and gradients": True,
        "attention [8, 8, 1024, 64]: fwd+bwd speed-up over SDPA (faster "
        "backend)": False,  # 0.9x against mem-efficient
        "attention [8, 8, 1024, 64]: fwd TFLOP/s": True,
    }


def test_training_step_goal_verdict():
    from test_cli import entry_point

    bench_train = entry_point("bench_train.py")
    step = {"device": "NVIDIA H200", "speedup": 1.4, "fell_back_to_reference": []}
    assert bench_train.kernels_step_verdict(step) is True
    assert bench_train.kernels_step_verdict({**step, "speedup": 1.2}) is False
    # A speed-up with a kernel fallen back, or on a CPU (references both ways), measures nothing.
    assert bench_train.kernels_step_verdict({**step, "fell_back_to_reference": ["qkv_attention"]}) is None
    assert bench_train.kernels_step_verdict({**step, "device": "cpu"}) is None


def test_a_kernel_that_cannot_build_falls_back_to_the_reference_once(monkeypatch):
    from triton.runtime.errors import OutOfResources

    import kernels.dispatch
    from kernels import group_norm_triton

    calls = []

    def no_room(*args):
        calls.append(1)
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(group_norm_triton, "forward", no_room)
    monkeypatch.setattr(kernels.dispatch, "_broken", set())
    x, w, b = torch.randn(1, 8, 3, 3), torch.randn(8), torch.randn(8)
    with pytest.warns(UserWarning, match="group_norm_silu is unavailable"):
        y = group_norm_silu(x, w, b, 4)
    assert torch.allclose(y, group_norm_silu_reference(x, w, b, 4))
    group_norm_silu(x, w, b, 4)
    assert len(calls) == 1  # not retried on every call


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_every_benchmark_launch_builds_for_the_gpu_without_spills(tmp_path, arch):
    """Compiled for sm_90 (H100) and sm_80 (A100) on this CPU machine: Triton must build each kernel at each
    benchmark shape, and ptxas must place it without register spills and within the shared-memory limit.
    On sm_90 every dot of the benchmark's attention kernels must become Hopper's warpgroup MMA (wgmma), not
    the per-warp mma.sync that a tile with too few rows falls back to."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "kernels", "compile_report.py"),
            "--arch",
            str(arch),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    from kernels import attention_triton, group_norm_triton

    kernel_names = {
        n
        for m in (attention_triton, group_norm_triton)
        for n in dir(m)
        if n.endswith("_kernel") or n == "_bwd_preprocess"
    }
    # Both GroupNorm paths and the whole attention backward are covered.
    assert {r["kernel"] for r in rows} == kernel_names
    assert all(r["spill_bytes"] == 0 and 0 < r["registers"] <= 255 for r in rows)
    from kernels.bench import ATTN_SHAPES

    bench_attention = [
        r
        for r in rows
        if any(r["shape"] == f"attention {list(s)} bf16" for s in ATTN_SHAPES)
        and r["kernel"] != "_bwd_preprocess"
    ]
    assert len(bench_attention) == 3 * len(ATTN_SHAPES)
    assert {r["mma"] for r in bench_attention} == ({"wgmma"} if arch == 90 else {"mma.sync"})


BACKWARD_OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_custom_op_registrations_pass_opcheck():
    """torch.library.opcheck on every op (forward and backward): the schema, the fake implementation (what a
    compiled graph allocates on a GPU without running the op), the autograd registration and AOT dispatch,
    for GroupNorm with each modulation pattern and layout, and attention in both orders."""
    from kernels import attention, group_norm

    torch.manual_seed(0)
    B, C, G = 2, 8, 4
    x = torch.randn(B, C, 4, 4, requires_grad=True)
    w, b, scale, shift = (torch.randn(*s, requires_grad=True) for s in ((C,), (C,), (B, C), (B, C)))
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    for args in ((x, w, b, scale, shift), (x, w, b, None, None), (x_cl, w, b, scale, None)):
        torch.library.opcheck(group_norm._group_norm_silu_op, (*args, G, 1e-5, True))
        # The backward ops take no gradient themselves (no double backward): inputs that need none, and no
        # AOT test, which differentiates the op (the forward op's AOT test runs them through its formula).
        y, mean, rstd = (t.detach() for t in group_norm._group_norm_silu_op(*args, G, 1e-5, True))
        detached = [a.detach() if a is not None else None for a in args]
        torch.library.opcheck(
            group_norm._group_norm_silu_backward_op,
            (torch.randn_like(y), *detached, mean, rstd, G, 1e-5, True),
            test_utils=BACKWARD_OPCHECKS,
        )
    qkv = torch.randn(1, 3 * 2 * 16, 20, requires_grad=True)
    for order in ("legacy", "new"):
        torch.library.opcheck(attention._qkv_attention_op, (qkv, 2, order))
        out, lse = (t.detach() for t in attention._qkv_attention_op(qkv, 2, order))
        torch.library.opcheck(
            attention._qkv_attention_backward_op,
            (torch.randn_like(out), qkv.detach(), out, lse, 2, order),
            test_utils=BACKWARD_OPCHECKS,
        )
