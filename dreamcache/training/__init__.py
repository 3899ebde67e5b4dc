"""Training the adapters: the loop for one process or many (`trainer`: `TrainConfig`, `Trainer`, the
dataset protocols it draws from), its learning-rate schedules (`schedule`), triplet manifests and the method's reference augmentations, on the
CPU per sample or on the GPU per batch (`data`), and synthetic triplets from a text-to-image model
(`synthetic`).

    python -m dreamcache.training.trainer config.toml
    accelerate launch --num_processes 4 -m dreamcache.training.trainer config.toml

May import `dreamcache.core` and `dreamcache.perception`; nothing above them.
"""
