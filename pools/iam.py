"""Aurora/RDS IAM database authentication: a ``password_provider`` that makes auth tokens.

Needs the optional extra ``pgregistry[aws]`` (botocore). The token is a SigV4-presigned URL
made locally from the standard AWS credential chain (environment variables, shared
credentials/config files, container or instance roles: botocore's chain); no network call is
needed to make it. A token is valid for 15 minutes and only for opening a connection, so the
pool asks for one at every new connection (AWS documentation: "IAM database authentication
for MariaDB, MySQL, and PostgreSQL", and botocore's ``RDS.Client.generate_db_auth_token``).
The server side needs ``rds_iam`` granted to the user and TLS (``sslmode: require`` or
stricter).

In YAML::

    writer:
      host: mydb.cluster-abc.eu-west-1.rds.amazonaws.com
      user: app
      sslmode: verify-full
      password_provider: pgregistry.pools.iam:rds_auth_token

The region comes from ``AWS_REGION``/``AWS_DEFAULT_REGION`` or the profile, else from the
endpoint's name (``<name>.<id>.<region>.rds.amazonaws.com``).
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from .credentials import CredentialError

__all__ = ["rds_auth_token", "region_of"]

logger = logging.getLogger(__name__)

_ENDPOINT_REGION = re.compile(r"\.([a-z]{2}(?:-[a-z]+)+-\d+)\.rds\.amazonaws\.com\.?$", re.I)

_session_lock = threading.Lock()
_session: Any = None
_clients: dict[str, Any] = {}  # region -> RDS client (building one loads botocore's model)


def region_of(host: str) -> str | None:
    """The AWS region in an RDS endpoint name, or ``None``."""
    m = _ENDPOINT_REGION.search(host)
    return m.group(1).lower() if m else None


def _botocore_session() -> Any:
    global _session
    with _session_lock:
        if _session is None:
            try:
                import botocore.session
            except ImportError:
                raise CredentialError(
                    "the IAM token provider needs botocore: pip install 'pgregistry[aws]'"
                ) from None
            _session = botocore.session.get_session()
        return _session


def rds_auth_token(*, host: str, port: int, user: str | None,
                   region: str | None = None) -> str:
    """An RDS IAM auth token for ``user`` at ``host``:``port`` (a ``password_provider``).

    :param host: the endpoint name the connection uses (cluster, reader or instance endpoint).
    :param port: its port.
    :param user: the database user (must have ``rds_iam``).
    :param region: the AWS region; default: the session's (``AWS_REGION``, profile), else the
        one in ``host``.
    :raises CredentialError: botocore missing, no region, no AWS credentials (the message says
        which, never a key).
    """
    if not user:
        raise CredentialError("an IAM auth token needs a user")
    session = _botocore_session()
    region = region or session.get_config_variable("region") or region_of(host)
    if not region:
        raise CredentialError(f"no AWS region for {host}: set AWS_REGION (or use an "
                              "rds.amazonaws.com endpoint name)")
    if session.get_credentials() is None:
        raise CredentialError("no AWS credentials found (environment, shared files, or role)")
    with _session_lock:
        client = _clients.get(region)
        if client is None:
            client = _clients[region] = session.create_client("rds", region_name=region)
    token: str = client.generate_db_auth_token(
        DBHostname=host, Port=int(port), DBUsername=user, Region=region)
    return token
