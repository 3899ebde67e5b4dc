"""The steps of a catalogue run, as plain functions: keys in, keys out, idempotent.

One module per stage, in the order a run takes them: `source` (list the catalogue: a prefix, a folder
or a manifest), `ingest` (read and record each product image), `segment` (cut each product out once),
`caches` (its DreamCache features, once per model), `plan` (every cache x prompt x seed x format,
recorded once), `generate` (a GPU worker's batch: claim, generate, write, score, record), `sheets`
(contact sheets), `assets` (cut-outs and packshots), `review` (approve by the run's rules or a person's
decision) and `publish` (copy the approved shots to the shop's prefix). A step imports only the steps
before it (an import-linter contract). Beside them: `layout` names every object key, `run_record` keeps
the run's record and rejections, `run_summary` types its summary (`RunSummary`), `generation_settings`
types a shot's settings (the one hashed record), `prompts` reads prompt files and fills templates,
`shared` holds what several steps read.

The Prefect flow (flows/runs/catalogue.py) wraps each step as a task (the unit of retry); the embedded
run (`run_embedded` there) calls them directly. Every step reads its inputs from the database and the
object store and writes its outputs there first, so a step that is retried, or a run that is re-run,
finds finished work and skips it. Objects are written before the rows that point to them. Read-only
queries live in `db/queries.py`.
"""
