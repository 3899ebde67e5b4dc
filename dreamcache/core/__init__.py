"""The DreamCache method on diffusers, bottom-up as the paper reads.

`layers` (which transformers get adapters) -> `guidance` (how a step's predictions combine) ->
`adapter` (the memory attention inside a transformer block) -> `cache` (reference features at
t = 1) -> `weights` (adapters in safetensors, the authors' checkpoint converted; what they are for,
readable without torch, in `adapter_config`) -> `unet_halves` and `denoiser` (the fast paths: a
shared encoder half, compiled halves, CUDA graphs) -> `pipeline`
(`DreamCachePipeline`: load / set scale / unload, cache subjects, generate). Beside them: `placement`
(a product photo kept pixel-exact in a generated scene: blended latent diffusion), `schedulers`, `images`
(reference loading), `errors`, and `architectures` (the public UNet configs and tiny models built in
code).

May import nothing else of `dreamcache`: only diffusers, transformers, torch and the like.
"""
