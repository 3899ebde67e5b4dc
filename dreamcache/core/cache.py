"""The feature cache: what a subject's reference images look like inside the base UNet.

One forward pass of the base UNet (adapters inactive) on the reference latent noised to
timestep t = 1, with the empty-prompt embedding, records the *input* of each selected
transformer, reshaped (B, C, H, W) -> (B, H*W, C). These tokens are the keys and values of the
adapters' memory attention, computed once per subject and reused for every generation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from dreamcache.core.adapter import LayerMemory, use_memory
from dreamcache import __version__
from dreamcache.core.errors import CacheError
from dreamcache.core.layers import Layer

if TYPE_CHECKING:  # a cache is read and written without diffusers: only computing one needs it
    from diffusers import DDPMScheduler, UNet2DConditionModel

FORMAT = "dreamcache.feature-cache/1"


@dataclass(frozen=True)
class CacheMetadata:
    """Everything a cache depends on; two caches with equal metadata hold the same features."""

    base_model: str  # the id or path the base was loaded from (informational)
    base_fingerprint: str  # hash of the base weights (see `model_fingerprint`): the real identity
    preset: str
    layers: tuple[str, ...]
    timestep: int
    noise_seed: int
    resolution: int
    dtype: str
    library_version: str
    references: int = 1
    format: str = FORMAT
    # How the pass was made beyond the method's defaults (empty text, letterboxed reference, latent mode);
    # the authors' released inference uses their negative prompt, a stretched reference and a sampled latent.
    text: str = ""
    reference_mode: str = "letterbox"
    latent: str = "mode"

    def to_json(self) -> str:
        # Fields at their defaults are left out, so caches written before they existed keep their hashes.
        data = {k: v for k, v in asdict(self).items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CacheMetadata":
        data = json.loads(text)
        data["layers"] = tuple(data["layers"])
        return cls(**data)


_LATER_FIELDS = {"text": "", "reference_mode": "letterbox", "latent": "mode"}


@dataclass
class FeatureCache:
    """One subject's cached tokens per layer, (tokens, channels) each, with their provenance."""

    tensors: dict[str, torch.Tensor]
    metadata: CacheMetadata
    _hash: str | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def content_hash(self) -> str:
        """sha256 over the metadata and every tensor's bytes; stored in the file, checked on load."""
        if self._hash is None:
            self._hash = _content_hash(self.tensors, self.metadata)
        return self._hash

    def to_bytes(self) -> bytes:
        """The cache as safetensors bytes; the same cache gives the same bytes in any process.

        safetensors keeps its metadata in a map whose order varies between processes, so everything
        goes in one entry (canonical JSON): a cache recomputed elsewhere is stored once, not twice.
        """
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.tensors.items()}
        header = json.dumps({"metadata": json.loads(self.metadata.to_json()), "content_sha256": self.content_hash},
                            sort_keys=True, separators=(",", ":"))
        return save_safetensors_bytes(tensors, metadata={"dreamcache": header})

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "FeatureCache":
        try:
            tensors = load_safetensors_bytes(data)
            header = _safetensors_header(data)
            if "content_sha256" in header:  # the first layout: two entries
                metadata, stored_hash = CacheMetadata.from_json(header["dreamcache"]), header["content_sha256"]
            else:
                packed = json.loads(header["dreamcache"])
                metadata = CacheMetadata.from_json(json.dumps(packed["metadata"]))
                stored_hash = packed["content_sha256"]
        except (SafetensorError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise CacheError(f"feature cache {source} is unreadable or not a DreamCache cache ({exc})") from exc
        if metadata.format != FORMAT:
            raise CacheError(f"feature cache {source} is in format {metadata.format!r}, which this version "
                             f"({__version__}) does not read ({FORMAT!r}): cache the subject again")
        cache = cls(tensors=tensors, metadata=metadata)
        if cache.content_hash != stored_hash:
            raise CacheError(
                f"feature cache {source} is corrupt: content hash {cache.content_hash[:12]}... "
                f"does not match the stored {stored_hash[:12]}...; delete it and cache the subject again"
            )
        if set(tensors) != set(metadata.layers):
            raise CacheError(f"feature cache {source} holds layers {sorted(tensors)}, expected {list(metadata.layers)}")
        return cache

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_bytes(self.to_bytes())
            tmp.replace(path)  # atomic: a reader never sees half a cache
        except BaseException:
            tmp.unlink(missing_ok=True)  # no half cache left behind (on a full disk it holds the space)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FeatureCache":
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CacheError(f"feature cache {path} cannot be read ({exc.strerror or exc})") from exc
        return cls.from_bytes(data, source=str(path))

    def check_compatible(self, base_fingerprint: str, layers: Sequence[str], source: str = "") -> None:
        """Refuse a cache made for another base model or another layer selection."""
        what = f"feature cache {source}".rstrip()
        if self.metadata.base_fingerprint != base_fingerprint:
            raise CacheError(
                f"{what} was made for base model {self.metadata.base_model!r} "
                f"(fingerprint {self.metadata.base_fingerprint[:12]}...), not the loaded one "
                f"(fingerprint {base_fingerprint[:12]}...): cache the subject again with this model"
            )
        if tuple(layers) != self.metadata.layers:
            raise CacheError(
                f"{what} holds layers {list(self.metadata.layers)} (preset {self.metadata.preset!r}), "
                f"but the loaded adapters use {list(layers)}: cache the subject again with this preset"
            )


def _content_hash(tensors: Mapping[str, torch.Tensor], metadata: CacheMetadata) -> str:
    digest = hashlib.sha256(metadata.to_json().encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _safetensors_header(data: bytes) -> dict[str, str]:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size])["__metadata__"]


def model_fingerprint(*modules: torch.nn.Module) -> str:
    """A cheap, dtype-stable identity of model weights.

    Hashing every weight of an 860M-parameter UNet costs seconds; a strided sample of each
    tensor (256 values, rounded to fp16 so fp32 and fp16 copies of the same weights agree),
    with every name and shape, tells different models apart just as well.
    """
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)][:256]
            digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
            digest.update(sample.to("cpu", torch.float16).numpy().tobytes())
    return digest.hexdigest()


class _FeaturesRecorded(Exception):
    """Raised by the last recording hook: the rest of the UNet is not needed."""


@torch.no_grad()
def extract_features(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    text_embedding: torch.Tensor,
    layers: Sequence[Layer],
    noise_scheduler: DDPMScheduler,
    timestep: int = 1,
    generators: Sequence[torch.Generator] | None = None,
) -> dict[str, torch.Tensor]:
    """Record each selected transformer's input tokens for a batch of reference latents.

    latents: (B, 4, h, w) VAE latents of references on white (already scaled).
    text_embedding: (1, L, D) embedding of the pass's text: the empty prompt (the method), or the
    authors' negative prompt (their released inference).
    Returns layer name -> (B, h_l * w_l, C_l).
    """
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor(latents.shape, generator=list(generators) if generators else None,
                         device=latents.device, dtype=latents.dtype)
    t = torch.full((latents.shape[0],), timestep, device=latents.device, dtype=torch.long)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    recorded: dict[str, torch.Tensor] = {}
    last = layers[-1].name

    def recorder(name: str):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            b, c, h, w = hidden.shape
            recorded[name] = hidden.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, C, H, W) -> (B, HW, C)
            if name == last:
                raise _FeaturesRecorded

        return hook

    handles = [unet.get_submodule(layer.name).register_forward_pre_hook(recorder(layer.name), with_kwargs=True)
               for layer in layers]
    try:
        with use_memory(unet, None):  # adapters inactive: the cache comes from the base model
            unet(noisy, t, encoder_hidden_states=text_embedding.expand(latents.shape[0], -1, -1))
    except _FeaturesRecorded:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return recorded


def collate_memory(
    caches: Sequence[FeatureCache | None],
    layers: Sequence[str],
    device: torch.device | str,
    dtype: torch.dtype,
) -> dict[str, LayerMemory] | None:
    """Per-layer memory for a batch whose rows carry different subjects' caches, or none.

    Rows without a cache are left to the base model. Caches of different lengths (subjects with
    more reference images) are padded and masked, so each row sees exactly its own tokens.
    """
    rows = [i for i, cache in enumerate(caches) if cache is not None]
    if not rows:
        return None
    present = [caches[i] for i in rows]
    row_index = None if len(rows) == len(caches) else torch.tensor(rows, device=device)
    memory: dict[str, LayerMemory] = {}
    for name in layers:
        parts = [cache.tensors[name] for cache in present]
        longest = max(p.shape[0] for p in parts)
        tokens = torch.zeros(len(parts), longest, parts[0].shape[1], device=device, dtype=dtype)
        mask = torch.zeros(len(parts), longest, device=device, dtype=torch.bool)
        for i, part in enumerate(parts):
            tokens[i, : part.shape[0]] = part.to(device=device, dtype=dtype)
            mask[i, : part.shape[0]] = True
        padded = any(p.shape[0] != longest for p in parts)
        memory[name] = LayerMemory(tokens=tokens, rows=row_index, mask=mask if padded else None)
    return memory
