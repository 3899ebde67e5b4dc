#!/bin/sh
# Runs once, when the PostgreSQL data volume is empty (the postgres image's /docker-entrypoint-initdb.d):
# one role and database for the platform, one for Prefect's own state, neither a superuser; and the
# analysts' group role, which only a superuser (or CREATEROLE) may create: `dreamcache` grants it SELECT on
# the history views after migrating (docs/sql.md, "A read-only role for analysts").
set -eu

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v dreamcache_password="$DREAMCACHE_DB_PASSWORD" -v prefect_password="$PREFECT_DB_PASSWORD" <<'SQL'
CREATE ROLE dreamcache LOGIN PASSWORD :'dreamcache_password';
CREATE DATABASE dreamcache OWNER dreamcache;
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;
CREATE ROLE dreamcache_reader NOLOGIN;
SQL
