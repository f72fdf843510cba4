import pytest
import torch
from conftest import tiny_flags

from iddpm_ds.checkpointing import CheckpointError, load_official_state_dict, load_state_dict_file
from iddpm_ds.script_util import (
    create_model,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)


def model_kwargs(**overrides):
    flags = model_and_diffusion_defaults()
    # improved-diffusion's create_model keywords, then ours
    keys = """image_size num_channels num_res_blocks learn_sigma class_cond use_checkpoint
        attention_resolutions num_heads num_heads_upsample use_scale_shift_norm dropout
        channel_mult num_head_channels use_fused_kernels""".split()
    kw = {k: flags[k] for k in keys}
    kw.update(num_channels=32, use_fused_kernels=False)
    kw.update(overrides)
    return kw


@pytest.mark.parametrize("size", [32, 64, 256])
def test_default_sizes_output_shape(size):
    model = create_model(**model_kwargs(image_size=size, learn_sigma=True, attention_resolutions="16,8"))
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        out = model(x, torch.tensor([10.0]))
    assert out.shape == (1, 6, size, size)


def test_improved_diffusion_widths_are_kept():
    assert create_model(**model_kwargs(image_size=64)).channel_mult == (1, 2, 3, 4)
    assert create_model(**model_kwargs(image_size=32)).channel_mult == (1, 2, 2, 2)
    assert create_model(**model_kwargs(image_size=256)).channel_mult == (1, 1, 2, 2, 4, 4)


@pytest.mark.parametrize("size,mult", [(16, "1,2,2"), (128, ""), (512, "1,1,2,2,4,4,4")])
def test_other_sizes_with_channel_mult(size, mult):
    model = create_model(
        **model_kwargs(
            image_size=size,
            channel_mult=mult,
            num_res_blocks=1,
            attention_resolutions="8",
            num_head_channels=32,
        )
    )
    assert all(
        b.num_heads == b.channels // 32 for b in model.modules() if type(b).__name__ == "AttentionBlock"
    )
    if size <= 128:
        with torch.no_grad():
            assert model(torch.randn(1, 3, size, size), torch.tensor([3])).shape == (1, 3, size, size)


def test_unsupported_size_names_the_fix():
    with pytest.raises(ValueError, match="channel_mult"):
        create_model(**model_kwargs(image_size=48))
    with pytest.raises(ValueError, match="not divisible"):
        create_model(**model_kwargs(image_size=18, channel_mult="1,2,2"))


def test_super_resolution_model():
    flags = sr_model_and_diffusion_defaults()
    assert (
        flags["large_size"] == 256
        and flags["small_size"] == 64
        and "image_size" not in flags
        and "sigma_small" not in flags
    )
    flags.update(
        large_size=32,
        small_size=8,
        num_channels=32,
        num_res_blocks=1,
        attention_resolutions="8",
        use_fused_kernels=False,
    )
    model, diffusion = sr_create_model_and_diffusion(**flags)
    x, low = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert model(x, torch.tensor([1, 2]), low_res=low).shape == (2, 3, 32, 32)
    losses = diffusion.training_losses(model, x, torch.tensor([1, 2]), model_kwargs={"low_res": low})
    assert torch.isfinite(losses["loss"]).all()
    with pytest.raises(ValueError, match="low_res"):
        model(x, torch.tensor([1, 2]))


def test_class_conditioning_changes_output_and_is_checked():
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**tiny_flags(class_cond=True))
    for p in model.parameters():  # zero-initialised output layers would hide the label's effect
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 3])
    with torch.no_grad():
        a, b = model(x, t, y=torch.tensor([0, 0])), model(x, t, y=torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="class_cond"):
        model(x, t)


def test_activation_checkpointing_gives_identical_gradients():
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        model, diffusion = create_model_and_diffusion(
            **tiny_flags(use_checkpoint=use_checkpoint, learn_sigma=True)
        )
        torch.manual_seed(1)
        x = torch.randn(2, 3, 8, 8)
        diffusion.training_losses(model, x, torch.tensor([1, 15]))["loss"].mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_channels_last_unet_computes_the_same_in_nhwc():
    """channels_last converts the activations once, at the input: every convolution then sees NHWC, and
    the output, loss and gradients are the NCHW model's (up to the convolutions' summation order)."""
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model, diffusion = create_model_and_diffusion(
            **tiny_flags(channels_last=channels_last, learn_sigma=True)
        )
        for p in model.parameters():  # zero-initialised output convs would hide the blocks they gate
            torch.nn.init.normal_(p, std=0.1)
        layouts = []
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_pre_hook(
                    lambda _, inputs: layouts.append(
                        inputs[0].is_contiguous(memory_format=torch.channels_last)
                    )
                )
        torch.manual_seed(1)
        x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 15])
        out = model(x, t)
        diffusion.training_losses(model, x, t, noise=torch.ones_like(x))["loss"].mean().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((out.detach(), grads, layouts))
    (out_a, grads_a, layouts_a), (out_b, grads_b, layouts_b) = results
    assert not any(layouts_a) and all(layouts_b)
    assert out_b.is_contiguous() and torch.allclose(out_a, out_b, atol=1e-5)
    assert torch.allclose(grads_a, grads_b, atol=1e-4)


def test_bf16_model_takes_and_returns_float32():
    model, _ = create_model_and_diffusion(**tiny_flags())
    model = model.to(torch.bfloat16)
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def resblock_keys(prefix, c_in, c_out, emb, scale_shift=True):
    keys = {
        f"{prefix}.in_layers.0.weight": (c_in,),
        f"{prefix}.in_layers.0.bias": (c_in,),
        f"{prefix}.in_layers.2.weight": (c_out, c_in, 3, 3),
        f"{prefix}.in_layers.2.bias": (c_out,),
        f"{prefix}.emb_layers.1.weight": ((2 if scale_shift else 1) * c_out, emb),
        f"{prefix}.emb_layers.1.bias": ((2 if scale_shift else 1) * c_out,),
        f"{prefix}.out_layers.0.weight": (c_out,),
        f"{prefix}.out_layers.0.bias": (c_out,),
        f"{prefix}.out_layers.3.weight": (c_out, c_out, 3, 3),
        f"{prefix}.out_layers.3.bias": (c_out,),
    }
    if c_in != c_out:
        keys.update(
            {
                f"{prefix}.skip_connection.weight": (c_out, c_in, 1, 1),
                f"{prefix}.skip_connection.bias": (c_out,),
            }
        )
    return keys


def attention_keys(prefix, c):
    return {
        f"{prefix}.norm.weight": (c,),
        f"{prefix}.norm.bias": (c,),
        f"{prefix}.qkv.weight": (3 * c, c, 1),
        f"{prefix}.qkv.bias": (3 * c,),
        f"{prefix}.proj_out.weight": (c, c, 1),
        f"{prefix}.proj_out.bias": (c,),
    }


def improved_diffusion_layout():
    """improved-diffusion's state_dict names and shapes for image_size=8, num_channels=32, num_res_blocks=1,
    channel_mult=(1, 2), attention at 4 px, learn_sigma, class_cond, use_scale_shift_norm (its unet.py, read
    by hand)."""
    e = 128
    keys = {
        "time_embed.0.weight": (e, 32),
        "time_embed.0.bias": (e,),
        "time_embed.2.weight": (e, e),
        "time_embed.2.bias": (e,),
        "label_emb.weight": (1000, e),
        "input_blocks.0.0.weight": (32, 3, 3, 3),
        "input_blocks.0.0.bias": (32,),
        "input_blocks.2.0.op.weight": (32, 32, 3, 3),
        "input_blocks.2.0.op.bias": (32,),
        "output_blocks.1.2.conv.weight": (64, 64, 3, 3),
        "output_blocks.1.2.conv.bias": (64,),
        "out.0.weight": (32,),
        "out.0.bias": (32,),
        "out.2.weight": (6, 32, 3, 3),
        "out.2.bias": (6,),
    }
    keys.update(resblock_keys("input_blocks.1.0", 32, 32, e))
    keys.update(resblock_keys("input_blocks.3.0", 32, 64, e))
    keys.update(attention_keys("input_blocks.3.1", 64))
    keys.update(resblock_keys("middle_block.0", 64, 64, e))
    keys.update(attention_keys("middle_block.1", 64))
    keys.update(resblock_keys("middle_block.2", 64, 64, e))
    keys.update(resblock_keys("output_blocks.0.0", 128, 64, e))
    keys.update(attention_keys("output_blocks.0.1", 64))
    keys.update(resblock_keys("output_blocks.1.0", 96, 64, e))
    keys.update(attention_keys("output_blocks.1.1", 64))
    keys.update(resblock_keys("output_blocks.2.0", 96, 32, e))
    keys.update(resblock_keys("output_blocks.3.0", 64, 32, e))
    return keys


def test_state_dict_has_improved_diffusion_names_and_shapes():
    model, _ = create_model_and_diffusion(**tiny_flags(learn_sigma=True, class_cond=True))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == improved_diffusion_layout()


def test_loading_an_improved_diffusion_state_dict(tmp_path):
    torch.manual_seed(0)
    official = {k: torch.randn(shape) * 0.05 for k, shape in improved_diffusion_layout().items()}
    path = tmp_path / "model000100.pt"
    torch.save(official, path)
    model, _ = create_model_and_diffusion(**tiny_flags(learn_sigma=True, class_cond=True))
    load_official_state_dict(model, load_state_dict_file(str(path)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, official[k])
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 5]), torch.tensor([3, 7])
    with torch.no_grad():
        out = model(x, t, y=y)
    assert out.shape == (2, 6, 8, 8) and out.abs().sum() > 0


@pytest.mark.parametrize(
    "flag,value,expect",
    [
        ("learn_sigma", False, "learn_sigma"),
        ("class_cond", False, "class_cond"),
        ("num_channels", 64, "num_channels"),
        ("attention_resolutions", "8", "attention_resolutions"),
    ],
)
def test_flag_mismatch_is_one_line_naming_the_flag(flag, value, expect):
    source, _ = create_model_and_diffusion(**tiny_flags(learn_sigma=True, class_cond=True))
    target, _ = create_model_and_diffusion(
        **tiny_flags(**{"learn_sigma": True, "class_cond": True, flag: value})
    )
    with pytest.raises(CheckpointError, match=expect) as err:
        load_official_state_dict(target, source.state_dict())
    assert "\n" not in str(err.value)


def test_unreadable_and_malicious_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict_file(str(tmp_path / "missing.pt"))
    bad = tmp_path / "truncated.pt"
    torch.save({"w": torch.randn(100)}, bad)
    bad.write_bytes(bad.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_state_dict_file(str(bad))

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, evil)
    with pytest.raises(CheckpointError, match="refusing"):
        load_state_dict_file(str(evil))
    assert not (tmp_path / "pwned").exists()
