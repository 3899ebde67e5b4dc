"""Security: no unpickling on load paths, keys that cannot escape, secrets that stay secret, bound SQL,
and the documented read-only role doing what docs/sql.md says."""

import ast
import json
import logging
import re
from pathlib import Path

import boto3
import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from db import migrate
from db.objects import LocalStore, clean_key
from db.session import make_engine, session_factory, transaction
from flows.runs.catalogue import run_embedded
from flows.platform.params import CatalogueRunParams
from flows.steps.layout import output_key

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for folder in ("dreamcache", "db", "flows") for p in sorted((ROOT / folder).rglob("*.py"))]


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def dotted(node: ast.AST) -> str:
    """`torch.load` for Attribute(Name('torch'), 'load'); '' for anything not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def keyword_is(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


# --- (1) no pickle on load paths -----------------------------------------------------------------

def unpickling_calls(tree: ast.Module) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        if name == "torch.load" and not keyword_is(node, "weights_only", True):
            found.append((node.lineno, "torch.load without weights_only=True"))
        elif name in ("pickle.load", "pickle.loads", "cPickle.load", "cPickle.loads", "dill.load", "dill.loads",
                      "joblib.load", "pickle.Unpickler"):
            found.append((node.lineno, name))
        elif name in ("np.load", "numpy.load") and not keyword_is(node, "allow_pickle", False) and any(
                k.arg == "allow_pickle" for k in node.keywords):
            found.append((node.lineno, f"{name} with allow_pickle"))
    return found


def test_the_scanner_finds_unpickling():
    # The planted calls are assembled, so that the repository's own text searches for unsafe loads
    # do not report this test's bait as a load path.
    load = "torch." + "load"
    bad = ast.parse("import torch, pickle, numpy as np\n"
                    f"{load}(f)\n{load}(f, weights_only=False)\npickle.loads(b)\n"
                    f"np.load(f, allow_pickle=True)\n{load}(f, weights_only=True)\nnp.load(f)\n")
    assert [line for line, _ in unpickling_calls(bad)] == [2, 3, 4, 5]


def test_nothing_in_the_sources_unpickles():
    found = [f"{path.relative_to(ROOT)}:{line}: {what}"
             for path in SOURCES for line, what in unpickling_calls(parsed(path))]
    assert not found, "unpickling can run code from a crafted file; load with weights_only=True or safetensors:\n" + \
        "\n".join(found)


# --- (2) keys from user input stay under their prefix and root -------------------------------------

HOSTILE_SKUS = ["../../etc/passwd", "/etc/passwd", "..\\x", "..\\..\\windows\\system32", "a\x00b", "S" * 5000,
                "ünïcødé-🙂", "..", ".", "", " ", "a/../../b", "%2e%2e%2f", "\u202eevil", "CON", "x\ny"]


@pytest.mark.parametrize("sku", HOSTILE_SKUS)
def test_output_keys_of_hostile_skus_stay_under_the_prefix_and_root(tmp_path, sku):
    store = LocalStore(tmp_path / "store")
    key = output_key("shots/run-1", sku, "0123456789abcdef" * 4)
    assert clean_key(key) == key and key.startswith("shots/run-1/") and key.count("/") == 3
    assert len(key) < 200  # fits a file name and an S3 key with room to spare
    stored = store.put(key, b"png")
    path = Path(stored.uri.removeprefix("file://"))
    assert path.resolve().is_relative_to(store.root) and path.read_bytes() == b"png"
    assert store.key_of(stored.uri) == key


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a//b", "..\\x", "a\\..\\b", "a\x00b", "",
                                 "./a", "a/.", "a/"])
def test_keys_that_could_escape_are_refused_naming_the_key(tmp_path, key):
    store = LocalStore(tmp_path / "store")
    with pytest.raises(ValueError, match="invalid object key"):
        store.put(key, b"x")
    assert not any((tmp_path).glob("x")) and not (tmp_path / "store").exists()


def test_a_symlink_inside_the_root_cannot_lead_out_of_it(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.root.mkdir()
    (tmp_path / "outside").mkdir()
    (store.root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="resolves outside"):
        store.put("link/x.png", b"x")
    assert not (tmp_path / "outside" / "x.png").exists()


def test_uris_from_outside_the_store_are_refused(tmp_path):
    store = LocalStore(tmp_path / "store")
    for uri in ("file:///etc/passwd", f"{store.url}/../secret", f"{store.url}x/a.png"):
        with pytest.raises(ValueError):
            store.key_of(uri)


# --- (3) credentials: never logged, never in objects, never in the database ------------------------

SECRET_KEY = "PLANTED-aws-secret-5b1f0e7c"
ACCESS_KEY = "PLANTEDKEYID5B1F"
DB_PASSWORD = "PLANTED-db-password-c93a"


def test_planted_credentials_appear_in_no_log_object_or_row(platform_env, catalogue, postgres_url, s3_bucket,
                                                            caplog, capsys, tmp_path):
    url = make_url(postgres_url).set(password=DB_PASSWORD)  # trust auth: accepted, and must not travel
    platform_env.setenv("DREAMCACHE_DATABASE_URL", url.render_as_string(hide_password=False))
    platform_env.setenv("DREAMCACHE_OBJECTS_URL", f"s3://{s3_bucket}/platform")
    platform_env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    platform_env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    caplog.set_level(logging.DEBUG)  # everything, third-party libraries included

    summary = run_embedded(CatalogueRunParams(source=str(catalogue), prompts=["a {category} on a beach"],
                                              images_per_prompt=1, steps=2), progress=True)
    assert summary["images_generated"] == 3 and summary["rejected"] == 2

    out = capsys.readouterr()
    logs = "\n".join(r.getMessage() for r in caplog.records) + out.out + out.err
    assert len(caplog.records) > 50  # DEBUG really was captured (SQL, botocore, ...)
    for secret in (SECRET_KEY, DB_PASSWORD):
        assert secret not in logs, f"{secret} was logged"
    # The access key id is an identifier botocore prints in its DEBUG request headers; not in our records.
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.split(".")[0] in ("flows", "db", "dreamcache"))
    assert ACCESS_KEY not in ours
    assert not any(s in json.dumps(summary) for s in (SECRET_KEY, DB_PASSWORD, ACCESS_KEY))

    s3 = boto3.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
            for o in page.get("Contents", [])]
    assert len(keys) > 10
    for key in keys:
        body = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        assert not any(s.encode() in body for s in (SECRET_KEY, DB_PASSWORD, ACCESS_KEY)), key
    for path in (tmp_path / "home").rglob("*") if (tmp_path / "home").exists() else []:
        if path.is_file():
            assert not any(s.encode() in path.read_bytes() for s in (SECRET_KEY, DB_PASSWORD, ACCESS_KEY)), path

    conninfo = make_url(postgres_url).render_as_string(hide_password=False).replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(conninfo) as conn:
        tables = [t for (t,) in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
        assert {"runs", "subjects", "generations", "rejected_items"} <= set(tables)
        for table in tables:  # every column of every row, as text
            for (row,) in conn.execute(sql.SQL("SELECT CAST(t AS text) FROM {} t").format(sql.Identifier(table))):
                assert not any(s in row for s in (SECRET_KEY, DB_PASSWORD, ACCESS_KEY)), (table, row[:200])


# --- (4) SQL only through bound parameters --------------------------------------------------------

SQL_START = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|WITH|PRAGMA|GRANT|TRUNCATE)\b", re.I)


def interpolates_data(node: ast.AST) -> bool:
    """An f-string, `.format` or `%`/`+` built string whose parts are not all constants (UPPER_CASE names)."""
    if isinstance(node, ast.JoinedStr):
        return not all(isinstance(v.value, ast.Name) and v.value.id.isupper()
                       for v in node.values if isinstance(v, ast.FormattedValue))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)):
        return not all(isinstance(n, ast.Constant) for n in (node.left, node.right))
    return False


def first_text(node: ast.AST) -> str:
    """The leading literal text of a string expression, to tell SQL from other strings."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return node.values[0].value
    if isinstance(node, ast.BinOp):
        return first_text(node.left)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return first_text(node.func.value)
    return ""


def built_sql(tree: ast.Module) -> list[int]:
    """Lines where SQL is built from data: passed to text()/execute(), or any string that starts like SQL."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (dotted(node.func) in ("text", "sqlalchemy.text", "sa.text") or (
                isinstance(node.func, ast.Attribute) and node.func.attr in ("execute", "exec_driver_sql",
                                                                          "executemany"))):
            if node.args and interpolates_data(node.args[0]):
                found.append(node.lineno)
        elif interpolates_data(node) and SQL_START.match(first_text(node)):
            found.append(node.lineno)
    return sorted(set(found))


def test_the_scanner_finds_sql_built_from_data():
    bad = ast.parse('s.execute(text(f"SELECT * FROM t WHERE sku = \'{sku}\'"))\n'
                    'c.execute("DELETE FROM t WHERE id = %s" % ident)\n'
                    'q = "SELECT {} FROM t".format(col)\n'
                    'c.exec_driver_sql("UPDATE t SET a = " + value)\n'
                    's.execute(text("SELECT * FROM t WHERE sku = :sku"), dict(sku=sku))\n'
                    'c.execute(f"PRAGMA busy_timeout={TIMEOUT_MS}")\n')
    assert built_sql(bad) == [1, 2, 3, 4]


def test_sql_in_the_sources_is_only_bound():
    found = [f"{path.relative_to(ROOT)}:{line}" for path in SOURCES for line in built_sql(parsed(path))]
    assert not found, "SQL built from data (use bound :parameters or SQLAlchemy expressions):\n" + "\n".join(found)


# --- the read-only role of docs/sql.md --------------------------------------------------------------

ROLE_BLOCKS = {"reader_role", "analyst_login"}


def documented_role_sql() -> dict[str, str]:
    """docs/sql.md's role set-up: its ```postgresql blocks, by name."""
    blocks = dict(re.findall(r"```postgresql\n-- name: (\w+)\n(.*?)```", (ROOT / "docs" / "sql.md").read_text(),
                             flags=re.S))
    assert set(blocks) == ROLE_BLOCKS, f"docs/sql.md has the ```postgresql blocks {sorted(ROLE_BLOCKS)}"
    return blocks


def analyst_login(blocks: dict[str, str]) -> str:
    return re.search(r"CREATE ROLE (\w+) LOGIN", blocks["analyst_login"])[1]


def assert_reads_the_views_and_nothing_else(conninfo: str, runs: list[tuple]) -> None:
    """Connected as the analyst: the views read (and docs/sql.md's failures query), every base table and every
    write refused."""
    from tests.db.test_sql_examples import queries

    with psycopg.connect(conninfo, autocommit=True) as conn:
        assert conn.execute("SELECT name FROM run_summary").fetchall() == runs
        assert conn.execute("SELECT COUNT(*) FROM generation_history").fetchone() == (0,)
        assert conn.execute(queries()["failures"]).fetchall() == []
        refused = [
            "SELECT * FROM runs", "SELECT * FROM subjects", "SELECT * FROM generations",
            "SELECT * FROM rejected_items", "SELECT * FROM subject_caches",
            "INSERT INTO runs (name, parameters, status, summary) VALUES ('x', '{}', 'running', '{}')",
            "UPDATE runs SET name = 'x'", "DELETE FROM runs", "TRUNCATE runs", "DROP VIEW run_summary",
            "CREATE TABLE public.mine (x int)",
        ]
        # The views join tables, so writing to them fails as "not updatable" before privileges are
        # even checked; what the role may do to them is asked directly.
        for view in migrate.VIEW_GRANTS:
            granted = conn.execute(
                "SELECT privilege FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) "
                "AS privilege WHERE has_table_privilege(%s, privilege)", (view,)).fetchall()
            assert granted == [("SELECT",)], (view, granted)
        for statement in refused:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_the_documented_read_only_role_reads_the_views_and_nothing_else(postgres_url, monkeypatch):
    """Each block run as the role docs/sql.md names, none a superuser: the roles by a role with CREATEROLE, the
    grants by `dreamcache db upgrade` as the schema owner, a plain login role as in the compose stack, which
    cannot create the role; views made again by a later upgrade are granted again."""
    from typer.testing import CliRunner

    from flows.cli import app
    from db.models import Run, RunStatus, utcnow

    blocks = documented_role_sql()
    url = make_url(postgres_url)
    server = f"host={url.host} port={url.port}"
    owner, admin, login = "schema_owner", "role_admin", analyst_login(blocks)
    with psycopg.connect(f"{server} dbname=postgres user={url.username}", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(owner)))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEROLE").format(sql.Identifier(admin)))
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(url.database),
                                                                     sql.Identifier(owner)))
    try:
        owner_url = url.set(username=owner).render_as_string(hide_password=False)
        migrate.upgrade(owner_url)
        engine = make_engine(owner_url)
        with transaction(session_factory(engine)) as s:
            s.add(Run(name="nightly", parameters={}, status=RunStatus.completed, started_at=utcnow()))
        engine.dispose()
        owner_info = f"{server} dbname={url.database} user={owner}"
        with psycopg.connect(owner_info, autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied to create role"):
                conn.execute(blocks["reader_role"])
        with psycopg.connect(f"{server} dbname={url.database} user={admin}", autocommit=True) as conn:
            conn.execute(blocks["reader_role"])
            conn.execute(blocks["analyst_login"])
        monkeypatch.setenv("DREAMCACHE_DATABASE_URL", owner_url)
        analyst = f"{server} dbname={url.database} user={login} password=change-me"
        for downgraded_to in (None, "0006"):  # 0006: every view dropped and made again, without its grants
            if downgraded_to:
                migrate.downgrade(owner_url, downgraded_to)
            upgraded = CliRunner().invoke(app, ["db", "upgrade"])
            assert upgraded.exit_code == 0, upgraded.output
            assert_reads_the_views_and_nothing_else(analyst, [("nightly",)])
        with psycopg.connect(owner_info) as conn:
            assert conn.execute("SELECT name FROM runs").fetchall() == [("nightly",)]  # nothing changed
    finally:
        with psycopg.connect(f"{server} dbname=postgres user={url.username}", autocommit=True) as conn:
            # Roles are cluster-wide: leave none behind (the database, which holds their grants, goes first).
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(url.database)))
            for role in (login, "dreamcache_reader", admin, owner):
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
