"""Pixels: an image file or PIL image of any mode to the RGB uint8 array the model trains on, resized
and cropped as improved-diffusion prepares its data."""

import io

import numpy as np
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "gif", "webp")


def to_rgb(pil_image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: 16/32-bit integer images are rescaled to 8 bits first, alpha is
    dropped."""
    if pil_image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(pil_image, dtype=np.float64)
        peak = 65535.0 if pil_image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        pil_image = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return pil_image if pil_image.mode == "RGB" else pil_image.convert("RGB")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """improved-diffusion's resize: halve with BOX while the short side is >= 2x the target,
    BICUBIC to the target short side, then centre-crop. Returns uint8 [image_size, image_size, 3]."""
    if pil_image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pil_image = to_rgb(pil_image)
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(to_rgb(pil_image))
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def decode_image(data: bytes) -> Image.Image:
    pil_image = Image.open(io.BytesIO(data))
    pil_image.load()  # decode now, so a truncated file fails here and not later
    return pil_image
