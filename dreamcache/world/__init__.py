"""The procedural product world: a world with ground truth, the model the project trains on it, and
personalisation fidelity measured against that truth (docs/toy-world.md).

- `scene`: products with identities captions never mention, in scenes; exact masks; deterministic.
- `classifier`: the attribute classifier that reads identity, family and scene from a shot.
- `pool`: rendered triplets as tensors, and the datasets the adapter trainer draws from.
- `model`: every training stage (VAE, CLIP, UNet, classifier, adapters), data-parallel, resumable.
- `evaluation`: identity, scene accuracy and toy CLIP-T of held-out products, with the paper's ablations.

May import `dreamcache.core`, `dreamcache.perception` and `dreamcache.training` (the pipeline, the
trainer, the augmentations); of the library, only `dreamcache.app` imports it.
"""
