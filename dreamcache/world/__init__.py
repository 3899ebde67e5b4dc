"""The procedural product world: a world with ground truth, the model the project trains on it, and
personalisation fidelity measured against that truth (docs/toy-world.md).

- `scene`: products with identities captions never mention, in scenes; exact masks; deterministic.
- `classifier`: the attribute classifier that reads identity, family and scene from a shot.
- `pool`: rendered triplets as tensors, and the datasets the adapter trainer draws from.
- `model`: every training stage (VAE, CLIP, UNet, classifier, adapters), data-parallel, resumable.
- `evaluation`: identity, scene accuracy and toy CLIP-T of held-out products, with the paper's ablations.

It uses the rest of `dreamcache` (the pipeline, the trainer, the data augmentations); nothing outside
this package imports it except the application layer (the bundled model, the CLI).
"""
