"""The plumbing every run and step stands on: the platform's resources (`resources`: database,
object stores, model), run parameters (`params`), the places a run may read (`places`), leases and
heartbeats (`liveness`), how failures are told and retried (`failures`), and markdown for artifacts.

May import `dreamcache` and `db` only, never the `steps` or `runs` rooms or the entry points.
"""
