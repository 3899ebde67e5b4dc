"""Real servers for the tests: the stack's own (flows/stack.py), which `dreamcache stack up` runs as well."""

from flows.stack import PostgresServer, PrefectServer, S3_CREDENTIALS, S3Server, free_port, postgres_bin_dir

__all__ = ["PostgresServer", "PrefectServer", "S3_CREDENTIALS", "S3Server", "free_port", "postgres_bin_dir"]
