"""Credentials that rotate: password_file read per new connection, password_provider called per
new connection, clear errors without secrets, the IAM token provider offline, and a reload that
changes only the credential source retuning the pool in place. The real-server tests use a role
with a scram-sha-256 password (pg_hba on a fresh cluster asks it of that role only)."""

from __future__ import annotations

import logging
import uuid

import psycopg2
import pytest
import yaml
from pgregistry import Registry
from pgregistry.pools import ConnectError, ConnectionPool
from pgregistry.pools.credentials import CredentialError, Credentials, load_provider

SECRET_IN_ERROR = "provider-secret-0xC0FFEE"
calls: list[dict[str, object]] = []


def recording_provider(**kw: object) -> str:
    """A password_provider given by name in YAML (``test_credentials:recording_provider``)."""
    calls.append(kw)
    return str(current_password[0])


current_password = ["unset"]


def failing_provider(**kw: object) -> str:
    raise RuntimeError(f"token service said no; last token was {SECRET_IN_ERROR}")


# -- the sources, without a server ---------------------------------------------------------------


def test_password_file_is_read_again_for_every_password(tmp_path):
    f = tmp_path / "pw"
    f.write_text("first\n")
    creds = Credentials(password_file=f)
    assert creds.password_for("h", 5432, "u") == "first"
    f.write_text("second")  # a rotated Kubernetes secret
    assert creds.password_for("h", 5432, "u") == "second"
    assert creds.describe() == f"password_file {f}"
    f.write_text("")
    with pytest.raises(CredentialError, match="is empty"):
        creds.password_for("h", 5432, "u")
    f.unlink()
    with pytest.raises(CredentialError, match="cannot read password_file .*No such file"):
        creds.password_for("h", 5432, "u")


def test_a_provider_gets_host_port_user_and_its_failure_hides_its_message():
    calls.clear()
    current_password[0] = "tok"
    creds = Credentials(password_provider="test_credentials:recording_provider")
    assert creds.password_for("db.example", 6432, "app") == "tok"
    assert calls == [{"host": "db.example", "port": 6432, "user": "app"}]
    bad = Credentials(password_provider=failing_provider)
    with pytest.raises(CredentialError) as info:
        bad.password_for("db.example", 6432, "app")
    text = str(info.value)
    assert "failing_provider raised RuntimeError" in text and "app@db.example:6432" in text
    assert SECRET_IN_ERROR not in text
    assert info.value.__cause__ is None and info.value.__context__ is None
    with pytest.raises(CredentialError, match="returned an empty string"):
        Credentials(password_provider=lambda **kw: "").password_for("h", 1, "u")


def test_bad_sources_are_refused_clearly():
    with pytest.raises(ValueError, match="only one of"):
        Credentials(password="x", password_file="/f")
    with pytest.raises(ValueError, match="package.module:function"):
        load_provider("not a spec")
    with pytest.raises(ImportError, match="cannot import 'no_such_module_x'"):
        load_provider("no_such_module_x:f")
    with pytest.raises(AttributeError, match="has no 'nothing_here'"):
        load_provider("test_credentials:nothing_here")
    with pytest.raises(TypeError, match="not callable"):
        load_provider("test_credentials:SECRET_IN_ERROR")


def test_the_iam_provider_makes_a_token_offline_from_fake_credentials(monkeypatch):
    pytest.importorskip("botocore")
    from pgregistry.pools import iam

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFAKEFAKE0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake/secret/key/for/tests/only/0001")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setattr(iam, "_session", None)
    monkeypatch.setattr(iam, "_clients", {})
    host = "mydb.cluster-abc123.eu-west-1.rds.amazonaws.com"
    token = iam.rds_auth_token(host=host, port=5432, user="app")
    assert token.startswith(f"{host}:5432/?Action=connect&DBUser=app&")
    assert "X-Amz-Credential=AKIAFAKEFAKEFAKE0001%2F" in token
    assert "%2Feu-west-1%2Frds-db%2Faws4_request" in token  # the region from the name
    assert "X-Amz-Signature=" in token and "X-Amz-Expires=900" in token
    assert "fake/secret" not in token  # signed with the key, never carrying it
    # through the spec a YAML file uses
    creds = Credentials(password_provider="pgregistry.pools.iam:rds_auth_token")
    assert creds.password_for(host, 5432, "app").startswith(host)
    assert iam.region_of("x.cluster-ro-a.us-east-2.rds.amazonaws.com") == "us-east-2"
    with pytest.raises(CredentialError, match="no AWS region"):
        iam.rds_auth_token(host="db.internal", port=5432, user="app")


# -- on a real server whose password changes ------------------------------------------------------


@pytest.fixture
def scram_role(pg_primary):
    """A new role that must give its password (scram-sha-256) on the primary: a pg_hba line
    for that role only, ahead of the harness's trust lines, removed afterwards."""
    primary = pg_primary
    role = f"rot_{uuid.uuid4().hex[:8]}"
    primary.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-one'")
    hba = primary.datadir / "pg_hba.conf"
    text = hba.read_text()
    with hba.open("r+") as f:  # in place: the file keeps its owner
        f.write(f"host all {role} 127.0.0.0/8 scram-sha-256\n" + text)
    primary.execute("SELECT pg_reload_conf()")
    try:
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            psycopg2.connect(primary.dsn(user=role, password="wrong"))
        yield primary, role
    finally:
        with hba.open("r+") as f:
            f.write(text)
            f.truncate()
        primary.execute("SELECT pg_reload_conf()")
        primary.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE usename = %s", (role,))
        primary.execute(f"DROP ROLE IF EXISTS {role}")


def test_a_rewritten_password_file_is_used_by_the_next_connection(scram_role, tmp_path,
                                                                   stepped):
    primary, role = scram_role
    f = tmp_path / "pw"
    f.write_text("pw-one\n")
    pool = ConnectionPool(minconn=2, maxconn=3, background_prewarm=False,
                          dsn=primary.dsn(user=role), password_file=f, supervisor=stepped,
                          timeout=5)
    try:
        first, second = pool.getconn(), pool.getconn()  # the two prewarmed connections
        running = {first.info.backend_pid, second.info.backend_pid}
        primary.execute(f"ALTER ROLE {role} PASSWORD 'pw-two'")  # the server rotates first
        with pytest.raises(ConnectError, match="password authentication failed"):
            pool.getconn()  # a third connection, still with the old file: refused
        f.write_text("pw-two\n")  # then the mounted secret changes
        third = pool.getconn()
        assert third.info.backend_pid not in running
        for conn in (first, second):  # the running connections were not dropped
            with conn.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                assert cur.fetchone()[0] in running
        for conn in (first, second, third):
            pool.putconn(conn)
        s = pool.stats()
        assert s["connections_opened"] == 3 and s["size"] == 3 and s["closed_by_reason"] == {}
    finally:
        pool.close_all()


def test_a_provider_that_raises_gives_a_clear_connect_error_naming_the_pool(scram_role,
                                                                           stepped, caplog):
    caplog.set_level(logging.DEBUG)
    primary, role = scram_role
    pool = ConnectionPool(minconn=0, dsn=primary.dsn(user=role), name="rotating",
                          password_provider=failing_provider, supervisor=stepped, timeout=1)
    try:
        with pytest.raises(ConnectError) as info:
            pool.getconn()
    finally:
        pool.close()
    text = str(info.value)
    assert "pool 'rotating'" in text and "failing_provider raised RuntimeError" in text
    assert SECRET_IN_ERROR not in text and SECRET_IN_ERROR not in caplog.text
    assert SECRET_IN_ERROR not in repr(info.value.__cause__)
    assert pool.stats()["connect_errors"] == 1 and pool.stats()["size"] == 0


def test_a_provider_called_per_connection_follows_the_rotation(scram_role, stepped):
    primary, role = scram_role
    calls.clear()
    current_password[0] = "pw-one"
    pool = ConnectionPool(minconn=0, maxconn=4, dsn=primary.dsn(user=role),
                          password_provider="test_credentials:recording_provider",
                          supervisor=stepped, timeout=5)
    try:
        c1 = pool.getconn()
        primary.execute(f"ALTER ROLE {role} PASSWORD 'pw-two'")
        current_password[0] = "pw-two"
        c2 = pool.getconn()
        assert c1.info.backend_pid != c2.info.backend_pid
        pool.putconn(c1)
        pool.putconn(c2)
    finally:
        pool.close_all()
    assert calls == [{"host": primary.host, "port": primary.port, "user": role}] * 2


def test_changing_only_the_credential_source_on_reload_keeps_the_pool(scram_role, tmp_path,
                                                                      monkeypatch):
    primary, role = scram_role
    (tmp_path / "pw").write_text("pw-one\n")
    config = {"version": 1, "pools": {"app": {
        "host": primary.host, "port": primary.port, "user": role, "dbname": "postgres",
        "password_file": "pw", "minconn": 1, "maxconn": 3, "timeout": 5}}}
    path = tmp_path / "pools.yaml"
    path.write_text(yaml.safe_dump(config))
    with Registry.from_yaml(path, install_sighup=False) as reg:
        pool = reg.get("app").pool
        held = reg.get("app").getconn()
        pid = held.info.backend_pid
        # the source becomes a provider (and the server's password changes)
        primary.execute(f"ALTER ROLE {role} PASSWORD 'pw-three'")
        current_password[0] = "pw-three"
        del config["pools"]["app"]["password_file"]
        config["pools"]["app"]["password_provider"] = "test_credentials:recording_provider"
        path.write_text(yaml.safe_dump(config))
        result = reg.reload()
        assert result.retuned == ("app",) and result.replaced == ()
        assert reg.get("app").pool is pool  # retuned in place
        with reg.get("app").conn() as c2:
            assert c2.info.backend_pid != pid  # a new connection, with the new password
        with held.cursor() as cur:  # the running connection was not dropped
            cur.execute("SELECT 1")
        reg.get("app").putconn(held)
        # a provider that cannot be loaded: the reload is refused, nothing changes
        config["pools"]["app"]["password_provider"] = "no_such_module_x:f"
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(Exception, match="no_such_module_x"):
            reg.reload()
        assert reg.get("app").pool is pool
