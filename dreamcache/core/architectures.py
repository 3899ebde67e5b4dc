"""UNet architectures known by name, and the tiny models built in code.

The public Stable Diffusion configs are written out here so that `dreamcache inspect` and the
tests can build the real structures (on the meta device, no weights) without any download.
The tiny pipeline, for tests and smoke runs, has the Stable Diffusion layout (cross-attention down
blocks, a mid block, cross-attention up blocks) at a size that runs in well under a second on a
laptop CPU.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# Public `unet/config.json` of runwayml/stable-diffusion-v1-5.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
)

# Public `unet/config.json` of stabilityai/stable-diffusion-2-1-base (the authors' base model).
SD21_UNET = dict(
    SD15_UNET,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
)

# Public `unet/config.json` of stabilityai/stable-diffusion-xl-base-1.0.
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

ARCHITECTURES: dict[str, dict] = {"sd15": SD15_UNET, "sd21": SD21_UNET, "sdxl": SDXL_UNET}

# Latent channels are downsampled by 2 per VAE block after the first: SD's 4-block VAE gives 8.
SD_VAE_SCALE = 8


def unet_config(architecture: str) -> dict:
    try:
        return dict(ARCHITECTURES[architecture])
    except KeyError:
        raise ValueError(
            f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}"
        ) from None


def build_unet(architecture: str, device: str | torch.device = "meta") -> UNet2DConditionModel:
    """The named UNet with random weights; on the meta device by default (no memory used)."""
    with torch.device(device):
        return UNet2DConditionModel(**unet_config(architecture))


# --- the tiny model ----------------------------------------------------------------------

TINY_RESOLUTION = 64
TINY_UNET = dict(
    sample_size=TINY_RESOLUTION // 2,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    attention_head_dim=8,
    cross_attention_dim=32,
    norm_num_groups=8,
)


def _byte_level_vocab() -> dict[str, int]:
    """A CLIP vocabulary of single byte-level characters: every text tokenizes, no merges needed."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in codes]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def tiny_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(vocab=_byte_level_vocab(), merges=[], model_max_length=77)


def build_tiny_pipeline_components(seed: int = 0, resolution: int = TINY_RESOLUTION) -> dict:
    """Components of a tiny randomly initialised SD pipeline, deterministic for a seed.

    Its VAE downsamples by 2, so the latent side is resolution / 2.
    """
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(**dict(TINY_UNET, sample_size=resolution // 2))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


# --- full-size pipelines with random weights (speed and memory measurements) --------------------

SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)

# CLIP ViT-L/14 text tower (SD 1.5) and OpenCLIP ViT-H/14 (SD 2.1), penultimate layer included.
TEXT_ENCODERS = {
    "sd15": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu"),
    "sd21": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu"),
}


def build_random_pipeline_components(architecture: str = "sd15", seed: int = 0) -> dict:
    """A full-size SD 1.5 / 2.1 pipeline with random weights: real shapes and cost, no download.

    The tokenizer is the tiny byte-level one (the real vocabulary is a download); the text
    encoder keeps the real width and depth, so its cost is the real one.
    """
    if architecture not in TEXT_ENCODERS:
        raise ValueError(f"random full-size pipelines exist for {', '.join(TEXT_ENCODERS)}, not {architecture!r}")
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT_ENCODERS[architecture],
        )
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return dict(unet=UNet2DConditionModel(**unet_config(architecture)), vae=AutoencoderKL(**SD_VAE),
                text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


# Scorer towers: "base" has the shapes of CLIP ViT-B/32 and DINO ViT-S/16 (the scorers' real cost),
# "tiny" runs in milliseconds on a CPU.
SCORER_SHAPES = {
    "tiny": dict(
        clip_text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        clip_vision=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4),
        clip_projection=16,
        dino=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64),
    ),
    "base": dict(
        clip_text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        clip_vision=dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12),
        clip_projection=512,
        dino=dict(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                  intermediate_size=1536),
    ),
}


def save_random_scorers(directory, size: str = "tiny") -> tuple[str, str]:
    """CLIP and DINO-style ViT models with random weights and their processors, saved like hub checkpoints.

    Returns the two directories, for `DREAMCACHE_CLIP_MODEL` and `DREAMCACHE_DINO_MODEL`.
    """
    from pathlib import Path

    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, ViTConfig, ViTImageProcessor,
                              ViTModel)

    shapes, directory = SCORER_SHAPES[size], Path(directory)
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **shapes["clip_text"]),
        vision_config=shapes["clip_vision"], projection_dim=shapes["clip_projection"]))
    clip.save_pretrained(directory / "clip")
    clip_size, dino_size = shapes["clip_vision"]["image_size"], shapes["dino"]["image_size"]
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": clip_size},
                                                     crop_size={"height": clip_size, "width": clip_size}),
                  tokenizer=tokenizer).save_pretrained(directory / "clip")
    ViTModel(ViTConfig(**shapes["dino"]), add_pooling_layer=False).save_pretrained(directory / "dino")
    ViTImageProcessor(size={"height": dino_size, "width": dino_size}).save_pretrained(directory / "dino")
    return str(directory / "clip"), str(directory / "dino")
