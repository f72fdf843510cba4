"""What a GPU run relies on, checked without a GPU: every tensor the library makes follows the device of the
model or data it works with, and nothing assumes CUDA.

PyTorch's meta device stands in for the GPU: an op that mixes a meta tensor with a CPU tensor (one made
without device=) raises, as it would with a CUDA tensor.
"""

import ast
import glob
import os

import pytest
import torch
from conftest import ROOT, tiny_flags

from iddpm_ds.resample import SAMPLER_NAMES, create_named_schedule_sampler
from iddpm_ds.sampling import classifier_free_guidance
from iddpm_ds.script_util import NULL_CLASS, create_model_and_diffusion
from iddpm_ds.train_util import drop_labels

META = torch.device("meta")


@pytest.mark.parametrize(
    "flags",
    [
        dict(learn_sigma=True),
        dict(class_cond=True, class_dropout_prob=0.1),
        dict(learn_sigma=True, timestep_respacing="10", noise_schedule="linear", diffusion_steps=100),
        dict(predict_xstart=True, rescale_timesteps=True),
    ],
    ids=["learned-sigma", "class-cond", "respaced", "x0"],
)
def test_training_and_sampling_math_keeps_to_the_models_device(flags):
    """The UNet, the timestep samplers, label dropout, the losses and the sampling loops (guided too) on the
    meta device: any tensor built on the CPU inside them would raise."""
    model, diffusion = create_model_and_diffusion(**tiny_flags(**flags))
    model.to(META)
    x = torch.randn(2, 3, 8, 8, device=META)
    kwargs = {}
    if flags.get("class_cond"):
        kwargs["y"] = drop_labels(torch.zeros(2, dtype=torch.long, device=META), 0.5, NULL_CLASS)
    for name in SAMPLER_NAMES:
        t, weights = create_named_schedule_sampler(name, diffusion).sample(2, META)
        losses = diffusion.training_losses(model, x, t, model_kwargs=kwargs)
        assert t.device == weights.device == losses["loss"].device == META
    net = classifier_free_guidance(model, 3.0, NULL_CLASS) if flags.get("class_cond") else model
    for loop in (diffusion.p_sample_loop, diffusion.ddim_sample_loop):
        assert loop(net, (2, 3, 8, 8), model_kwargs=kwargs, device=META).device == META


# Tensor factories that take a device.
FACTORIES = {
    "tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "randn",
    "rand",
    "randint",
    "linspace",
    "randperm",
}
# Factory calls that make CPU tensors on purpose, by file and call: each says why.
ON_THE_CPU = {
    ("iddpm_ds/digit_classifier.py", "torch.randint(0, 5, (2,), generator=gen)"): "CPU-only classifier",
    ("iddpm_ds/digit_classifier.py", "torch.randperm(len(train), generator=gen)"): "CPU-only classifier",
    (
        "iddpm_ds/image_datasets.py",
        "torch.tensor(labels, dtype=torch.int64)",
    ): "a loader batch; the step moves it",
    ("iddpm_ds/image_datasets.py", "torch.tensor(skipped)"): "a loader batch's count",
    (
        "iddpm_ds/sampling.py",
        "torch.randn(*shape, generator=g)",
    ): "per-image CPU generators: seeds mean the same images on any device; stacked and moved at once",
    ("launch/train.py", "torch.arange(num)"): "labels returned as numpy; moved to the device for the model",
}


def test_no_tensor_is_built_on_an_assumed_device():
    """A CPU-side check of the class of mistake a GPU run would show first: a tensor factory without device=
    (its tensor lands on the CPU beside CUDA ones), or a .cuda() / "cuda" that assumes the device instead of
    taking the model's or the engine's. Each file of the library and the entry points is read."""
    found = []
    for path in sorted(
        glob.glob(os.path.join(ROOT, "iddpm_ds", "*.py")) + glob.glob(os.path.join(ROOT, "launch", "*.py"))
    ):
        rel = os.path.relpath(path, ROOT)
        tree = ast.parse(open(path).read())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            named = isinstance(node, ast.Constant) and str(node.value).split(":")[0] == "cuda"
            argument = isinstance(
                parents.get(node), (ast.Call, ast.keyword)
            )  # torch.device("cuda"), .to("cuda")
            if named and argument and rel != "iddpm_ds/dist_util.py":
                found.append(f'{rel}:{node.lineno}: "{node.value}" as a device')
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr == "cuda":
                found.append(f"{rel}:{node.lineno}: .cuda()")
            factory = node.func.attr in FACTORIES and ast.unparse(node.func.value) == "torch"
            placed = any(k.arg == "device" for k in node.keywords) or (
                isinstance(parents.get(node), ast.Attribute) and parents[node].attr == "to"
            )
            if factory and not placed and (rel, ast.unparse(node)) not in ON_THE_CPU:
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert found == []
