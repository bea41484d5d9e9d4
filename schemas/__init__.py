"""pgregistry schemas: the YAML file's models, its loader, its errors and its JSON Schema.

    from pgregistry.schemas import load_config, ConfigError
    config = load_config("pools.yaml")        # RegistryConfig, or ConfigError with every problem
    config.pools["writer"].pool_kwargs()      # ConnectionPool keywords, defaults merged in

Imports nothing of the project's other packages.
"""

from .errors import ConfigError, Problem
from .jsonschema import json_schema
from .loading import check_file, load_config, load_config_text
from .models import (
    LIBPQ_PARAMETERS,
    LIVE_KEYWORDS,
    POOL_KEYWORDS,
    SECRET_KEYS,
    DnsConfig,
    PoolConfig,
    PoolDefaults,
    RegistryConfig,
)

__all__ = [
    "RegistryConfig",
    "PoolConfig",
    "PoolDefaults",
    "DnsConfig",
    "ConfigError",
    "Problem",
    "load_config",
    "load_config_text",
    "check_file",
    "json_schema",
    "POOL_KEYWORDS",
    "LIBPQ_PARAMETERS",
    "LIVE_KEYWORDS",
    "SECRET_KEYS",
]
