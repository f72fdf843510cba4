"""Factories with improved-diffusion's names, keywords and defaults, so `import iddpm_ds.script_util` is a
drop-in.

The factories' signatures are improved-diffusion's, written a few parameters to a line by hand (fmt: skip:
ruff would give each of their 20-odd parameters a line of its own).

Additions (all optional, with defaults that reproduce improved-diffusion):
`channel_mult` ("" = the per-size default), `num_head_channels` (-1 = use
num_heads), `use_fused_kernels` (route norms/attention through `kernels`),
`class_dropout_prob` (> 0: classifier-free guidance's learned null class, label NULL_CLASS) and
`channels_last` (the UNet's activations in NHWC memory order).
"""

import argparse
import inspect
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps
from .unet import SuperResModel, UNetModel

NUM_CLASSES = 1000
NULL_CLASS = NUM_CLASSES  # the label of "no class" in a model trained with class_dropout_prob > 0

# improved-diffusion's sizes keep their exact widths; 128 follows guided-diffusion.
DEFAULT_CHANNEL_MULT = {
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}


def model_and_diffusion_defaults() -> Dict:
    """Defaults for image training (improved-diffusion's, plus our optional keys)."""
    return dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        attention_resolutions="16,8",
        dropout=0.0,
        learn_sigma=False,
        sigma_small=False,
        class_cond=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=True,
        rescale_learned_sigmas=True,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        channel_mult="",
        num_head_channels=-1,
        use_fused_kernels=True,
        class_dropout_prob=0.0,
        channels_last=False,
        snr_gamma=0.0,
    )


def create_model_and_diffusion(
    image_size, class_cond, learn_sigma, sigma_small, num_channels, num_res_blocks, num_heads,
    num_heads_upsample, attention_resolutions, dropout, diffusion_steps, noise_schedule, timestep_respacing,
    use_kl, predict_xstart, rescale_timesteps, rescale_learned_sigmas, use_checkpoint, use_scale_shift_norm,
    # iddpm_ds's additions: at these defaults, improved-diffusion's model
    channel_mult="", num_head_channels=-1, use_fused_kernels=True, class_dropout_prob=0.0,
    channels_last=False, snr_gamma=0.0,
) -> Tuple[UNetModel, SpacedDiffusion]:  # fmt: skip
    """Build (UNetModel, SpacedDiffusion) from model_and_diffusion_defaults()-style keywords."""
    return _model_and_diffusion(create_model, locals())


def _resolve_unet_shape(
    image_size: int, channel_mult, attention_resolutions: str, flag: str
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Per-level channel multipliers and attention downsample rates for an image size."""
    if channel_mult:
        mult = (
            tuple(int(m) for m in str(channel_mult).split(","))
            if isinstance(channel_mult, str)
            else tuple(channel_mult)
        )
    elif image_size in DEFAULT_CHANNEL_MULT:
        mult = DEFAULT_CHANNEL_MULT[image_size]
    else:
        raise ValueError(
            f"unsupported {flag}: {image_size} has no default channel_mult (defaults exist for "
            f"{sorted(DEFAULT_CHANNEL_MULT)}); pass channel_mult, e.g. --channel_mult 1,2,2 for 16 px or "
            "1,1,2,2,4,4,4 for 512 px"
        )
    if image_size % (2 ** (len(mult) - 1)):
        raise ValueError(
            f"{flag}={image_size} is not divisible by 2^{len(mult) - 1}, as channel_mult={mult} needs"
        )
    attention_ds = tuple(
        image_size // int(res) for res in str(attention_resolutions).split(",") if res.strip()
    )
    return mult, attention_ds


def _model_and_diffusion(model_factory: Callable, flags: Dict) -> Tuple:
    """(model, diffusion) from model_factory and create_gaussian_diffusion, each given the flags it takes."""
    diffusion_flags = {**flags, "steps": flags["diffusion_steps"]}
    return _call_with(model_factory, flags), _call_with(create_gaussian_diffusion, diffusion_flags)


def _call_with(fn: Callable, values: Dict):
    """fn called with the entries of values it has parameters for (the factories forward the same flags)."""
    names = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in values.items() if k in names})


def _unet_keywords(values: Dict) -> Dict:
    """The flags every UNet factory passes on unchanged: create_model's, less the image size."""
    return {k: values[k] for k in inspect.signature(create_model).parameters if k != "image_size"}


def _build_unet(
    cls,
    image_size: int,
    size_flag: str,
    *,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    attention_resolutions,
    channel_mult,
    class_dropout_prob,
    **unet_kwargs,
):
    """cls (UNetModel or SuperResModel) for RGB images of image_size px; 6 outputs with learn_sigma."""
    mult, attention_ds = _resolve_unet_shape(image_size, channel_mult, attention_resolutions, size_flag)
    return cls(
        in_channels=3,
        model_channels=num_channels,
        out_channels=(6 if learn_sigma else 3),
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_ds,
        channel_mult=mult,
        # Classifier-free guidance trains one more label: NULL_CLASS, "no class".
        num_classes=(NUM_CLASSES + (class_dropout_prob > 0) if class_cond else None),
        **unet_kwargs,
    )


def create_model(
    image_size, num_channels, num_res_blocks, learn_sigma, class_cond, use_checkpoint, attention_resolutions,
    num_heads, num_heads_upsample, use_scale_shift_norm, dropout,
    # iddpm_ds's additions: at these defaults, improved-diffusion's model
    channel_mult="", num_head_channels=-1, use_fused_kernels=True, class_dropout_prob=0.0,
    channels_last=False,
) -> UNetModel:  # fmt: skip
    """Build the UNet for RGB images of image_size px (6 output channels with learn_sigma)."""
    return _build_unet(UNetModel, image_size, "image_size", **_unet_keywords(locals()))


def sr_model_and_diffusion_defaults() -> Dict:
    """Defaults for super-resolution training: 64 -> 256 px."""
    res = model_and_diffusion_defaults()
    res["large_size"] = 256
    res["small_size"] = 64
    arg_names = inspect.getfullargspec(sr_create_model_and_diffusion)[0]
    return {k: v for k, v in res.items() if k in arg_names}


def sr_create_model_and_diffusion(
    large_size, small_size,  # output and input sides in pixels
    class_cond, learn_sigma, num_channels, num_res_blocks, num_heads, num_heads_upsample,
    attention_resolutions, dropout, diffusion_steps, noise_schedule, timestep_respacing, use_kl,
    predict_xstart, rescale_timesteps, rescale_learned_sigmas, use_checkpoint, use_scale_shift_norm,
    # iddpm_ds's additions: at these defaults, improved-diffusion's model
    channel_mult="", num_head_channels=-1, use_fused_kernels=True, class_dropout_prob=0.0,
    channels_last=False, snr_gamma=0.0,
) -> Tuple[SuperResModel, SpacedDiffusion]:  # fmt: skip
    """Build (SuperResModel, SpacedDiffusion) for small_size -> large_size upsampling."""
    return _model_and_diffusion(sr_create_model, locals())


def sr_create_model(
    large_size, small_size,  # output and input sides in pixels
    num_channels, num_res_blocks, learn_sigma, class_cond, use_checkpoint, attention_resolutions, num_heads,
    num_heads_upsample, use_scale_shift_norm, dropout,
    # iddpm_ds's additions: at these defaults, improved-diffusion's model
    channel_mult="", num_head_channels=-1, use_fused_kernels=True, class_dropout_prob=0.0,
    channels_last=False,
) -> SuperResModel:  # fmt: skip
    """Build the super-resolution UNet for large_size px outputs (small_size only documents the input)."""
    if small_size > large_size:
        raise ValueError(f"small_size ({small_size}) must not exceed large_size ({large_size})")
    return _build_unet(SuperResModel, large_size, "large_size", **_unet_keywords(locals()))


def create_gaussian_diffusion(
    *,
    steps: int = 1000,
    learn_sigma: bool = False,
    sigma_small: bool = False,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    predict_xstart: bool = False,
    rescale_timesteps: bool = False,
    rescale_learned_sigmas: bool = False,
    timestep_respacing: Union[str, List[int]] = "",
    snr_gamma: float = 0.0,
) -> SpacedDiffusion:
    """Build the diffusion process; without respacing it is the plain T-step GaussianDiffusion."""
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
        snr_gamma=snr_gamma,
    )


def add_dict_to_argparser(
    parser: argparse.ArgumentParser, default_dict: Dict, help: Optional[Dict] = None
) -> None:
    """Add a --key flag per entry, typed by its default (bools parsed by str2bool), with help[key] if
    given."""
    for k, v in default_dict.items():
        v_type = str if v is None else str2bool if isinstance(v, bool) else type(v)
        parser.add_argument(f"--{k}", default=v, type=v_type, help=(help or {}).get(k))


def args_to_dict(args: argparse.Namespace, keys: Iterable[str]) -> Dict:
    return {k: getattr(args, k) for k in keys}


def str2bool(v: Union[str, bool]) -> bool:
    """Parse yes/no, true/false, t/f, y/n, 1/0 (any case)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError("boolean value expected")
