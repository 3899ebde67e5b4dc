"""Whole runs: the catalogue run (the Prefect flow and the embedded runner), synthetic triplets,
adapter training, and `verify` (a finished run's outputs checked against its records); beside the
catalogue run, its Prefect artifacts (`run_report`) and its log plumbing (`run_logs`).

May import the `steps` and `platform` rooms, never the entry points above (`cli`, `worker`, `stack`).
"""
