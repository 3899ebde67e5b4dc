"""Orchestration: composes the model library (`dreamcache`) and persistence (`db`), in four rooms that
point one way (each imports only the rooms below it; import-linter contracts in pyproject.toml):

- entry points, at the top: `cli` (the full `dreamcache` command), `worker` (a GPU worker: Prefect's
  task worker, stopped cleanly) and `stack` (the platform's servers on one host, for trying it);
- `runs/`: whole runs (the catalogue run as a Prefect flow or embedded, synthetic triplets, training,
  verify);
- `steps/`: a catalogue run's steps, keys in and keys out, each importing only the steps before it;
- `platform/`: the plumbing (resources, run parameters, places, liveness, failures, markdown).
"""
