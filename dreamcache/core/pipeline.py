"""`DreamCachePipeline`: Stable Diffusion with cached-reference personalisation, the diffusers way.

    pipe = DreamCachePipeline.from_pretrained("stabilityai/stable-diffusion-2-1-base")
    pipe.load_dreamcache("path/to/adapter")              # adapter_config.json + adapter_model.safetensors
    pipe.dreamcache_defaults                             # the adapter's recommended settings, now in force
    subject = pipe.cache_subject(["mug_front.png"])      # once per product
    images = pipe(["a mug on a beach"], subject=subject, seed=[0]).images
    wide = pipe(["a mug on a beach"], subject=subject, width=896, height=512).images  # multiples of size_multiple
    placed = PlacedProduct.from_photo(photo, mask, Placement(x=0.4))  # placement.py: the photo's product kept
    shots = pipe(["a mug on a beach"], subject=subject, placed=placed).images
    pipe.unload_dreamcache()                             # the plain pipeline again
"""

from __future__ import annotations

import inspect
import json
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from dreamcache import __version__
from dreamcache.core.adapter import DreamCacheAdapter, apply_dreamcache, dreamcache_processors, remove_dreamcache
from dreamcache.core.cache import CacheMetadata, FeatureCache, collate_memory, extract_features, model_fingerprint
from dreamcache.core.denoiser import Denoiser, FastPaths, StepPlan
from dreamcache.core.guidance import COMBINED, DEFAULT_GUIDANCE, EVALUATIONS, GUIDANCE_MODES, JOINT, Guidance
from dreamcache.core.images import ImageInput, load_reference
from dreamcache.core.layers import Layer, resolve_preset
from dreamcache.core.placement import LatentBlend, PlacedProduct, paste as paste_products
from dreamcache.core.schedulers import make_scheduler
from dreamcache.core.weights import (
    AdapterConfig, Recommended, base_identity, load_adapters, read_adapter_config, save_adapters,
)

# One subject's references: a single image or several (their tokens are concatenated).
References = Union[ImageInput, Sequence[ImageInput]]
CACHE_TIMESTEP = 1  # the paper's ablation: t = 1 beats 150 and 300


@dataclass
class DreamCacheOutput:
    images: list[Image.Image] | torch.Tensor
    nsfw_content_detected: list[bool] | None = None


class DreamCachePipeline(StableDiffusionPipeline):
    """A `StableDiffusionPipeline` that can load DreamCache adapters and sample with a cached subject.

    Loaded adapters bring the settings they are meant to be sampled with (their config's `recommended`:
    steps, sampler, scales, eta, negative prompt, how references are cached); every argument left None
    takes them, so a model samples here as `dreamcache run` samples it. `dreamcache_defaults` shows them.
    """

    _dreamcache_preset: str | None = None
    _dreamcache_layers: tuple[Layer, ...] = ()
    # The loaded adapter's recommended settings (the method's defaults without one), and the image scale a
    # caller set with `set_dreamcache_scale` (None: the recommended one).
    _recommended: Recommended = Recommended()
    _image_scale: float | None = None
    _denoiser: Denoiser | None = None
    _denoisers: dict[FastPaths, Denoiser] | None = None
    _compiled_vae_decode = None
    _embeddings: dict[str, torch.Tensor] | None = None
    _placed_latents: dict | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained`, in float32 unless a `dtype` (or `torch_dtype`) is given: diffusers loads
        its models in float32 by default, but transformers (5.x) loads the text encoder in the dtype it was
        saved in, and a float16 text encoder beside a float32 UNet fails on the first call."""
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            kwargs["dtype"] = torch.float32
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save the base pipeline as a plain Stable Diffusion directory (adapters are saved apart).

        The model index names `StableDiffusionPipeline`, so any diffusers tool loads the directory.
        """
        with self._base_alone():
            super().save_pretrained(save_directory, *args, **kwargs)
        index = Path(save_directory) / "model_index.json"
        config = json.loads(index.read_text())
        config["_class_name"] = StableDiffusionPipeline.__name__
        index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @contextmanager
    def _base_alone(self):
        """The UNet without its adapters for the block (it holds them while they are attached), then with
        them again, as they were."""
        attached = self.dreamcache_adapters
        if attached:
            dtype = next(iter(attached.values())).linear_cat.weight.dtype
            remove_dreamcache(self.unet)
        try:
            yield
        finally:
            if attached:
                apply_dreamcache(self.unet, attached, dtype)

    # --- adapters: load / set scale / unload ------------------------------------------------

    def load_dreamcache(
        self,
        pretrained: str | Path | Mapping[str, DreamCacheAdapter] | None = None,
        preset: str = "default",
        dtype: torch.dtype | None = None,
    ) -> None:
        """Attach adapters: from an adapter directory, in-memory adapters (layer name -> adapter) for
        `preset`, or freshly initialised ones for `preset` when None. `dtype` defaults to the UNet's.

        An adapter directory's recommended settings become the defaults of `cache_subjects` and `__call__`
        (`dreamcache_defaults`); adapters without a config keep the method's. An image scale set with
        `set_dreamcache_scale` stays in force over the recommended one.
        """
        recommended = Recommended()
        if isinstance(pretrained, Mapping):
            layers = resolve_preset(self.unet, preset)
            if sorted(pretrained) != sorted(layer.name for layer in layers):
                raise ValueError(f"adapters for {sorted(pretrained)} do not match preset {preset!r} on this UNet")
            adapters = dict(pretrained)
        elif pretrained is not None:
            config = read_adapter_config(pretrained)
            layers = resolve_preset(self.unet, config.preset)
            if [layer.name for layer in layers] != config.layer_names:
                raise ValueError(
                    f"adapters in {pretrained} are for layers {config.layer_names}, but preset "
                    f"{config.preset!r} selects {[layer.name for layer in layers]} on this UNet: "
                    "they were trained for another architecture"
                )
            adapters = load_adapters(pretrained, layers)
            preset, recommended = config.preset, config.recommended
        else:
            layers = resolve_preset(self.unet, preset)
            adapters = {layer.name: DreamCacheAdapter.for_layer(layer) for layer in layers}
        apply_dreamcache(self.unet, adapters, dtype)
        self._dreamcache_preset, self._dreamcache_layers = preset, tuple(layers)
        self._recommended = recommended

    def set_dreamcache_scale(self, image_scale: float | None) -> None:
        """Default image guidance scale: higher keeps more of the reference, lower edits more. It wins over
        the adapter's recommended scale, now and for adapters loaded later; None goes back to that."""
        self._image_scale = None if image_scale is None else float(image_scale)

    def unload_dreamcache(self) -> None:
        """Remove the adapters, and their recommended settings with them: the plain pipeline again."""
        remove_dreamcache(self.unet)
        self._dreamcache_preset, self._dreamcache_layers = None, ()
        self._recommended = Recommended()

    def save_dreamcache(self, directory: str | Path) -> Path:
        """The adapters with their config: their layers, the base named by `base_identity`, and the
        recommended settings they were loaded with."""
        preset = self._require_adapters()
        with self._base_alone():
            base = base_identity(self.name_or_path, self.unet, self.vae)
        config = AdapterConfig.for_layers(preset, self._dreamcache_layers, base, recommended=self._recommended)
        return save_adapters(directory, self.dreamcache_adapters, config)

    @property
    def dreamcache_defaults(self) -> Recommended:
        """The settings every argument left None takes: the loaded adapter's recommended ones (the method's
        defaults without a config), with the image scale of `set_dreamcache_scale` where one is set."""
        return self._recommended.resolve(image_scale=self._image_scale)

    def __repr__(self) -> str:
        adapters = f"preset {self._dreamcache_preset!r}" if self._dreamcache_preset else "none"
        return f"{super().__repr__()}\nDreamCache adapters: {adapters}; defaults in force: {self.dreamcache_defaults}"

    # --- fast paths ------------------------------------------------------------------------

    def enable_fast_paths(self, fast: FastPaths | None = None) -> None:
        """Run denoising steps the fast ways (`denoiser.py`); default: everything on CUDA.

        Call after moving the pipeline to its device: compiled kernels and captured graphs belong
        to one device. The first batch of each shape compiles (about a minute on an H100) and
        captures; later batches of that shape replay.
        """
        fast = fast or FastPaths.for_device(self._execution_device)
        # A memory format changes how the weights are laid out, never their values: set before any compile.
        memory_format = torch.channels_last if fast.channels_last else torch.contiguous_format
        for model in (self.unet, self.vae):
            model.to(memory_format=memory_format)
        if self._denoisers is None or any(d.unet is not self.unet for d in self._denoisers.values()):
            self._denoisers = {}
        if fast not in self._denoisers:  # kept per setting: switching back reuses compiled kernels and graphs
            self._denoisers[fast] = Denoiser(self.unet, fast)
        self._denoiser = self._denoisers[fast]

    def disable_fast_paths(self) -> None:
        """Back to the eager, unshared passes of plain diffusers (the benchmark's baseline)."""
        self.enable_fast_paths(FastPaths.off())

    @property
    def fast_paths(self) -> FastPaths:
        return self.denoiser.fast

    @property
    def denoiser(self) -> Denoiser:
        if self._denoiser is None or self._denoiser.unet is not self.unet:
            self.enable_fast_paths(FastPaths())
        return self._denoiser

    @property
    def dreamcache_adapters(self) -> dict[str, DreamCacheAdapter]:
        return {name: processor.adapter for name, processor in dreamcache_processors(self.unet).items()}

    @property
    def dreamcache_layers(self) -> tuple[Layer, ...]:
        return self._dreamcache_layers

    @property
    def dreamcache_preset(self) -> str | None:
        """The layer preset of the attached adapters (None when none are attached)."""
        return self._dreamcache_preset

    def _require_adapters(self) -> str:
        if self._dreamcache_preset is None:
            raise RuntimeError("no DreamCache adapters are loaded: call load_dreamcache(...) first")
        return self._dreamcache_preset

    @cached_property
    def base_fingerprint(self) -> str:
        """Identity of the base weights (UNet and VAE) that caches are checked against."""
        return model_fingerprint(self.unet, self.vae)

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """What a width or height must be a multiple of: the VAE's factor times the UNet's downsamplings."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def _check_size(self, name: str, side: int) -> None:
        m = self.size_multiple
        if side <= 0 or side % m:
            lower, upper = max(m, side // m * m), max(m, -(-side // m) * m)
            nearest = " or ".join(str(v) for v in sorted({lower, upper}))
            raise ValueError(f"{name} {side} is not a positive multiple of {m} (the VAE's factor "
                             f"{self.vae_scale_factor} times the UNet's downsamplings): use {nearest}")

    # --- caching subjects ------------------------------------------------------------------

    def cache_subject(self, references: References, seed: int = 0, resolution: int | None = None,
                      timestep: int = CACHE_TIMESTEP, **options) -> FeatureCache:
        return self.cache_subjects([references], seed=seed, resolution=resolution, timestep=timestep, **options)[0]

    @torch.no_grad()
    def cache_subjects(
        self, subjects: Sequence[References], seed: int = 0, batch_size: int = 32, progress: bool = False,
        resolution: int | None = None, timestep: int = CACHE_TIMESTEP, text: str | None = None,
        reference_mode: str | None = None, latent: str | None = None,
    ) -> list[FeatureCache]:
        """Cache many subjects, their reference images batched through one UNet pass per batch.

        Each reference's noise comes from its own generator (seed + its index within the subject),
        so a subject's cache does not depend on what else shares its batch. `timestep` is the
        noise level of the cached pass: keep the method's t = 1 except to reproduce its ablation.

        The method caches with the empty prompt, references letterboxed on white and the VAE
        latent's mode. The authors' released inference caches with its negative prompt as `text`,
        references stretched (`reference_mode="stretch"`) and the latent sampled (`latent="sample"`,
        from the same per-reference generator, before the noise). All three are in the metadata; left
        None, each is the loaded adapter's recommendation (`dreamcache_defaults`: its negative prompt,
        reference mode and latent), as the cache of a catalogue run is made.
        """
        preset = self._require_adapters()
        settings = self.dreamcache_defaults.resolve(negative_prompt=text, reference_mode=reference_mode, latent=latent)
        text, reference_mode, latent = settings.negative_prompt, settings.reference_mode, settings.latent
        resolution = resolution or self.resolution
        per_subject = [[refs] if isinstance(refs, (str, Path, Image.Image)) else list(refs) for refs in subjects]
        flat = [(i, k, ref) for i, refs in enumerate(per_subject) for k, ref in enumerate(refs)]
        device, dtype = self._execution_device, self.unet.dtype
        embedding = self._text_embedding(text)
        noise_scheduler = DDPMScheduler.from_config(self.scheduler.config)
        features: list[dict[str, torch.Tensor]] = []
        for start in tqdm(range(0, len(flat), batch_size), desc="caching", disable=not progress):
            batch = flat[start : start + batch_size]
            images = [load_reference(ref, resolution, mode=reference_mode) for _, _, ref in batch]
            pixels = self.image_processor.preprocess(images).to(device=device, dtype=self.vae.dtype)
            posterior = self.vae.encode(pixels).latent_dist
            generators = [torch.Generator(device).manual_seed(seed + k) for _, k, _ in batch]
            if latent == "sample":
                sampled = [posterior.mean[j:j + 1] + posterior.std[j:j + 1] * randn_tensor(
                    posterior.mean[j:j + 1].shape, generator=g, device=device, dtype=posterior.mean.dtype)
                    for j, g in enumerate(generators)]
                latents = torch.cat(sampled) * self.vae.config.scaling_factor
            else:
                latents = posterior.mode() * self.vae.config.scaling_factor
            recorded = extract_features(
                self.unet, latents.to(dtype), embedding, self._dreamcache_layers, noise_scheduler,
                timestep=timestep, generators=generators,
            )
            features += [{name: t[j] for name, t in recorded.items()} for j in range(len(batch))]

        caches, offset = [], 0
        for refs in per_subject:
            parts = features[offset : offset + len(refs)]
            offset += len(refs)
            tensors = {layer.name: torch.cat([p[layer.name] for p in parts]) for layer in self._dreamcache_layers}
            metadata = CacheMetadata(
                base_model=str(self.name_or_path or "<in-memory>"),
                base_fingerprint=self.base_fingerprint,
                preset=preset,
                layers=tuple(layer.name for layer in self._dreamcache_layers),
                timestep=timestep,
                noise_seed=seed,
                resolution=resolution,
                dtype=str(dtype).removeprefix("torch."),
                library_version=__version__,
                references=len(refs),
                text=text,
                reference_mode=reference_mode,
                latent=latent,
            )
            caches.append(FeatureCache(tensors=tensors, metadata=metadata))
        return caches

    # --- generation ------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        subject: FeatureCache | Sequence[FeatureCache | None] | None = None,
        *,
        seed: int | Sequence[int] = 0,
        guidance: Guidance = DEFAULT_GUIDANCE,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        batch_size: int = 8,
        resolution: int | None = None,
        output_type: str = "pil",
        progress: bool = True,
        negative_prompt: str | Sequence[str] | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        width: int | None = None,
        height: int | None = None,
        placed: PlacedProduct | Sequence[PlacedProduct | None] | None = None,
        paste: bool = True,
        on_step: Callable[[int], None] | None = None,
        deep_reuse_interval: int | None = None,
    ) -> DreamCacheOutput:
        """Generate one image per prompt, each with its own subject cache (or none) and seed.

        `prompt`, `subject`, `seed` and `negative_prompt` are broadcast to the same length: a single
        subject, seed or negative prompt applies to every prompt; an int seed gives seeds seed,
        seed + 1, ... Rows without a subject are plain text-to-image with classifier-free guidance.
        Each image depends only on its own row, never on what shares its batch.

        Every sampling setting left None takes `dreamcache_defaults` (the loaded adapter's recommended
        settings): `num_inference_steps`, `guidance_scale` (text), `image_guidance_scale`, `sampler`,
        `eta` and `negative_prompt`. A value given always wins.

        `negative_prompt` is the text of the unconditional passes (diffusers' meaning; without one, the
        empty prompt), for cached rows as in the authors' released inference. `sampler` names a
        scheduler (`schedulers.SAMPLERS`) built on the model's noise schedule; "model" uses
        `self.scheduler`, as diffusers does (set it to a scheduler of your own and pass "model"). `eta` is
        DDIM's noise (0: deterministic); the recommended eta comes only with the recommended sampler.

        `width` and `height` (multiples of `size_multiple`) default to the square of `resolution`, itself
        the model's own by default. `placed` (broadcast like `subject`) keeps a row's product pixel-exact
        at its placement and generates the scene around it (`placement.py`); `paste=False` leaves out the
        final paste of the product's pixels (the decoded latents alone). `on_step(k)` is called after each
        denoising step with the steps done so far (of `num_inference_steps` per batch of `batch_size`), for a
        caller's own progress display.

        `deep_reuse_interval` N reuses the UNet's deep features across steps (`denoiser.DeepReuse`): the
        deep path runs every N-th step, the shallow path at every step. Fewer FLOPs, different numbers; 1 is
        the plain step, None the model's recommendation (no reuse unless it recommends one). BENCHMARKS.md
        ("Feature reuse across steps") has its fidelity.
        """
        if guidance not in GUIDANCE_MODES:
            raise ValueError(f"unknown guidance {guidance!r}; choose one of {', '.join(GUIDANCE_MODES)}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = len(prompts)
        subjects = list(subject) if isinstance(subject, (list, tuple)) else [subject] * n
        products = list(placed) if isinstance(placed, (list, tuple)) else [placed] * n
        if len(products) != n:
            raise ValueError(f"got {n} prompts and {len(products)} placed products: give one each (None for none)")
        seeds = [seed + i for i in range(n)] if isinstance(seed, int) else list(seed)
        one_negative = negative_prompt is None or isinstance(negative_prompt, str)
        settings = self.dreamcache_defaults.resolve(
            steps=num_inference_steps, text_scale=guidance_scale, image_scale=image_guidance_scale, sampler=sampler,
            eta=eta, negative_prompt=negative_prompt if one_negative else None,
            deep_reuse_interval=deep_reuse_interval)
        negatives = [settings.negative_prompt] * n if one_negative else \
            [settings.negative_prompt if text is None else text for text in negative_prompt]
        if not (len(subjects) == len(seeds) == len(negatives) == n):
            raise ValueError(f"got {n} prompts, {len(subjects)} subjects, {len(seeds)} seeds and {len(negatives)} "
                             "negative prompts: give one each")
        scheduler = self.scheduler if settings.sampler == "model" else make_scheduler(settings.sampler, self.scheduler)
        if any(s is not None for s in subjects):
            layer_names = [layer.name for layer in self._dreamcache_layers] if self._dreamcache_preset else []
            if not layer_names:
                raise RuntimeError("a subject cache was given but no adapters are loaded: call load_dreamcache(...)")
            for s in subjects:
                if s is not None:
                    s.check_compatible(self.base_fingerprint, layer_names)
        resolution = resolution or self.resolution
        size = (resolution, resolution)
        if width is not None or height is not None:
            size = (resolution if width is None else width, resolution if height is None else height)
            self._check_size("width", size[0])
            self._check_size("height", size[1])

        images, nsfw = [], []
        chunks = range(0, n, batch_size)
        with tqdm(total=len(chunks) * settings.steps, desc="denoising", unit="step", disable=not progress) as bar:
            done = 0

            def stepped() -> None:
                nonlocal done
                done += 1
                bar.update()
                if on_step:
                    on_step(done)

            for start in chunks:
                part = slice(start, start + batch_size)
                rows = _padded([prompts[part], subjects[part], seeds[part], negatives[part], products[part]],
                               batch_size, self.fast_paths.static_batch)
                latents = self._sample(*rows, guidance, settings.image_scale, settings.text_scale, settings.steps,
                                       size, stepped, scheduler, settings.eta, settings.deep_reuse_interval)
                chunk, flags = self._decode(latents[: len(prompts[part])], output_type,
                                            products[part] if paste else None)
                images += list(chunk)
                nsfw += flags or []
        if output_type in ("pt", "latent"):
            images = torch.stack(images)
        return DreamCacheOutput(images=images, nsfw_content_detected=nsfw or None)

    def _sample(self, prompts, subjects, seeds, negatives, products, guidance, image_scale, text_scale, steps, size,
                stepped, scheduler, eta, deep_reuse_interval):
        device, dtype = self._execution_device, self.unet.dtype
        n = len(prompts)
        text = self.encode_prompt(prompts, device, 1, False)[0]  # (n, L, D)
        empty = torch.cat([self._text_embedding(negative) for negative in negatives])  # (n, L, D)
        # No row has a cache: plain classifier-free guidance, two evaluations ("joint" reduces to it).
        mode = guidance if any(s is not None for s in subjects) else JOINT
        denoiser = self.denoiser
        shape = (n, self.unet.config.in_channels, size[1] // self.vae_scale_factor, size[0] // self.vae_scale_factor)
        region = self._image_region(products, size, shape[-2:], device, dtype) if mode == COMBINED else None
        plan = StepPlan.make(mode, text, empty, denoiser.share_encoder(self._dreamcache_layers), image_scale,
                             text_scale, region)
        rows = [s if name != "plain" else None for name in EVALUATIONS[mode] for s in subjects]
        memory = collate_memory(rows, [layer.name for layer in self._dreamcache_layers], device, dtype)

        generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
        scheduler.set_timesteps(steps, device=device)
        # As diffusers' prepare_latents, with this call's scheduler's initial sigma.
        noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
        latents = noise * scheduler.init_noise_sigma
        blend = self._latent_blend(products, size, noise, scheduler)
        accepted = inspect.signature(scheduler.step).parameters
        extra = {k: v for k, v in (("eta", eta), ("generator", generators)) if k in accepted}
        with denoiser.batch(plan, memory, deep_reuse_interval) as step:
            for i, t in enumerate(scheduler.timesteps):
                eps = step(scheduler.scale_model_input(latents, t), t)
                latents = scheduler.step(eps, t, latents, **extra).prev_sample
                if blend is not None:
                    latents = blend(latents, i)
                stepped()
        return latents

    @staticmethod
    def _image_region(products, size, latent_size, device, dtype) -> torch.Tensor | None:
        """Where each row's image guidance acts, (n, 1, h, w): a placed product's `region` averaged over each latent
        cell, 1 for rows without one; None when no row limits it."""
        regions = [None if p is None else p.region(tuple(size)) for p in products]
        if all(r is None for r in regions):
            return None
        pixels = torch.stack([torch.ones(size[1], size[0]) if r is None else torch.from_numpy(r) for r in regions])
        return F.adaptive_avg_pool2d(pixels[:, None], tuple(latent_size)).to(device, dtype)

    def _latent_blend(self, products, size, noise, scheduler) -> LatentBlend | None:
        """The placed rows' canvases encoded (posterior mode) with their masks; None when no row has a product."""
        rows = [j for j, product in enumerate(products) if product is not None]
        if not rows:
            return None
        canvases = [products[j].canvas(tuple(size)) for j in rows]
        z0 = torch.zeros_like(noise)
        z0[rows] = torch.cat([self._placed_latent(products[j], tuple(size), noise) for j in rows])
        masks = torch.zeros(len(products), 1, size[1], size[0], device=noise.device)  # (n, 1, H, W)
        masks[rows] = torch.stack([torch.from_numpy(mask) for _, mask in canvases])[:, None].to(noise.device)
        free_steps = [0.0 if p is None else p.placement.free_steps for p in products]
        return LatentBlend.make(z0, masks, noise, free_steps, scheduler)

    def _placed_latent(self, product, size, like: torch.Tensor) -> torch.Tensor:
        """A placed product's canvas encoded (posterior mode, scaled), (1, C, h, w): once per product and size, as
        a run places one product in batch after batch (the product is kept with its latent: ids stay unique)."""
        key = (id(product), size, like.device, like.dtype)
        if self._placed_latents is None or len(self._placed_latents) > 64:
            self._placed_latents = {}
        if key not in self._placed_latents:
            pixels = self.image_processor.preprocess([product.canvas(size)[0]])
            encoded = self.vae.encode(pixels.to(device=like.device, dtype=self.vae.dtype)).latent_dist.mode()
            self._placed_latents[key] = (product, (encoded * self.vae.config.scaling_factor).to(like.dtype))
        return self._placed_latents[key][1]

    def _empty_embedding(self) -> torch.Tensor:
        """The empty prompt's embedding (1, L, D), encoded once: every batch needs it."""
        return self._text_embedding("")

    def _text_embedding(self, text: str) -> torch.Tensor:
        """A fixed text's embedding (1, L, D), encoded once per text (the empty prompt, negative prompts)."""
        device = self._execution_device
        cached = self._embeddings.get(text) if self._embeddings is not None else None
        if cached is None or cached.device != device or cached.dtype != self.text_encoder.dtype:
            if self._embeddings is None or len(self._embeddings) > 64:
                self._embeddings = {}
            cached = self._embeddings[text] = self.encode_prompt(text, device, 1, False)[0]
        return cached

    def _decode(self, latents: torch.Tensor, output_type: str, products=None):
        """Decoded images, each placed row's product pasted back (`products`: one per row, or None)."""
        if output_type == "latent":
            return latents, None
        decode = self.vae.decode
        if self.fast_paths.compile:
            if self._compiled_vae_decode is None:
                self._compiled_vae_decode = torch.compile(self.vae.decode)
            decode = self._compiled_vae_decode
        image = decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        if products is not None and any(p is not None for p in products):
            image = paste_products(image, products)
        nsfw = None
        if self.safety_checker is not None:
            image, nsfw = self.run_safety_checker(image, self._execution_device, latents.dtype)
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * len(image))
        return image, nsfw


def _padded(columns: list[list], batch_size: int, static: bool) -> list[list]:
    """Rows padded with copies of the last one up to the next power of two (at most `batch_size`).

    A run then meets a handful of batch shapes, each compiled and captured once. Each image
    depends only on its own row, so the copies change nothing and are dropped after sampling.
    """
    n = len(columns[0])
    if not static or n >= batch_size:
        return columns
    size = min(batch_size, 1 << (n - 1).bit_length())
    return [list(c) + [c[-1]] * (size - n) for c in columns]
