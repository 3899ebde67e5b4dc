"""Small models and images built in code, and the embedded run's database, shared by the tests."""

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from sqlalchemy import Engine, create_engine

from dreamcache.core.architectures import build_tiny_pipeline_components
from dreamcache.core.pipeline import DreamCachePipeline

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


def scene(product_color=(200, 30, 40), background=(90, 140, 200), size=(120, 100), box=(30, 20, 90, 80),
          noise: float = 0.0, seed: int = 0):
    """A product (an ellipse) on a plain, optionally noisy, background; returns (image, true mask)."""
    import numpy as np

    image = Image.new("RGB", size, background)
    ImageDraw.Draw(image).ellipse(box, fill=product_color)
    canvas = Image.new("L", size, 0)
    ImageDraw.Draw(canvas).ellipse(box, fill=255)
    mask = np.asarray(canvas) > 127
    if noise:
        rng = np.random.default_rng(seed)
        array = np.asarray(image, dtype=np.float32) + rng.normal(0, noise, (size[1], size[0], 3))
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    return image, mask


def tiny_sam(seed: int = 0):
    """Segment Anything's architecture at toy size (256 px input), random weights."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    size, patch = 256, 16
    return Sam(
        image_encoder=ImageEncoderViT(depth=2, embed_dim=64, img_size=size, mlp_ratio=2, num_heads=2,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), patch_size=patch,
                                      qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,), window_size=4,
                                      out_chans=32),
        prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(size // patch, size // patch),
                                     input_image_size=(size, size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=1, embedding_dim=32,
                                 mlp_dim=64, num_heads=2), transformer_dim=32, iou_head_depth=2, iou_head_hidden_dim=32),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def save_tiny_scorers(directory) -> tuple[str, str]:
    """Tiny CLIP and DINO-style ViT models with their processors, saved like hub checkpoints."""
    from dreamcache.core.architectures import save_random_scorers

    return save_random_scorers(directory, "tiny")


def home_database(home: Path) -> Engine:
    """An engine on the SQLite database an embedded run keeps in its DREAMCACHE_HOME (the platform_env
    fixture's is tmp_path / "home"); the caller disposes of it."""
    return create_engine(f"sqlite:///{home / 'dreamcache.db'}")
