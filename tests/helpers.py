"""Small models and images built in code, shared by the tests."""

import torch
from PIL import Image, ImageDraw

from dreamcache.architectures import build_tiny_pipeline_components
from dreamcache.pipeline import DreamCachePipeline

TEST_RESOLUTION = 32


def make_tiny_pipeline(seed: int = 0) -> DreamCachePipeline:
    pipe = DreamCachePipeline(
        **build_tiny_pipeline_components(seed=seed, resolution=TEST_RESOLUTION),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def product_image(color=(200, 30, 40), size=(96, 80), shape="ellipse") -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    box = (size[0] // 5, size[1] // 6, size[0] * 4 // 5, size[1] * 5 // 6)
    (draw.ellipse if shape == "ellipse" else draw.rectangle)(box, fill=color)
    return image
