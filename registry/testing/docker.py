"""An optional container backend for users whose machines run Docker.

:func:`docker_available` decides in milliseconds without importing docker or testcontainers;
:class:`ContainerServer` imports testcontainers only when it starts. A container gives one server
on one mapped port: tests that need several addresses on one port use :class:`LocalCluster`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import psycopg2.extensions

from .servers import SqlClientMixin

__all__ = ["BACKEND_ENV", "ContainerServer", "docker_available"]

log = logging.getLogger(__name__)

BACKEND_ENV = "PGREGISTRY_TEST_BACKEND"
DEFAULT_SOCKET = "/var/run/docker.sock"
PROBE_TIMEOUT = 0.05


def _unix_socket_answers(path: str) -> bool:
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(PROBE_TIMEOUT)
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def _tcp_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            return True
    except OSError:
        return False


def docker_available() -> bool:
    """Whether a Docker engine answers, decided in milliseconds.

    ``PGREGISTRY_TEST_BACKEND=local`` forces False and ``=docker`` forces True. Otherwise
    ``DOCKER_HOST`` is probed when set (a unix socket must exist and accept a connection, a
    tcp:// address must accept one within 50 ms, other schemes are trusted), else
    ``/var/run/docker.sock``.
    """
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced == "local":
        return False
    if forced == "docker":
        return True
    if forced:
        log.warning("%s=%r is neither 'local' nor 'docker': ignored", BACKEND_ENV, forced)
    docker_host = os.environ.get("DOCKER_HOST", "").strip()
    if not docker_host:
        return _unix_socket_answers(DEFAULT_SOCKET)
    if docker_host.startswith("/"):
        return _unix_socket_answers(docker_host)
    url = urlsplit(docker_host)
    if url.scheme == "unix":
        return _unix_socket_answers(url.path)
    if url.scheme == "tcp":
        return url.hostname is not None and _tcp_answers(url.hostname, url.port or 2375)
    return True  # ssh://, npipe://...: cannot be probed cheaply


class ContainerServer(SqlClientMixin):
    """PostgreSQL in a container (testcontainers), with the surface tests use from PgServer."""

    user = "postgres"
    password = "postgres"
    dbname = "postgres"

    def __init__(self, image: str = "postgres:16-alpine") -> None:
        self.image = image
        self.name = "container"
        self._container: Any = None
        self._host = ""
        self._port = 0

    def __repr__(self) -> str:
        return f"<ContainerServer {self.image} {self._host}:{self._port}>"

    def __enter__(self) -> ContainerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def running(self) -> bool:
        return self._container is not None

    def start(self, timeout: float = 60.0) -> ContainerServer:
        if self._container is not None:
            return self
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:  # testcontainers before the community split
            from testcontainers.postgres import PostgresContainer

        started = time.monotonic()
        container = PostgresContainer(
            self.image, username=self.user, password=self.password, dbname=self.dbname
        )
        container.start()
        self._container = container
        self._host = str(container.get_container_host_ip())
        self._port = int(container.get_exposed_port(5432))
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.connect(connect_timeout=1).close()
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)
        log.info("container %s ready in %.1f s", self.image, time.monotonic() - started)
        return self

    def stop(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            container.stop()

    def dsn(self, **extra: Any) -> str:
        params: dict[str, Any] = {
            "host": self._host,
            "port": self._port,
            "user": self.user,
            "password": self.password,
            "dbname": self.dbname,
        }
        params.update(extra)
        return str(psycopg2.extensions.make_dsn(**{k: str(v) for k, v in params.items()}))
