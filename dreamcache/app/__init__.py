"""The library as an application: typed settings from the environment (`config`), the models they
name loaded once (`loading`, the bundled product-world model included), the `dreamcache` library
commands (`cli`), the demo (`demo`) and architecture inspection (`inspection`).

May import every other wing of `dreamcache`; none of them imports it. (Orchestration and
persistence live outside the library, in `flows/` and `db/`.)
"""
