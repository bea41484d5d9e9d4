"""Test configuration: the real-server fixtures come from the harness plugin."""

from __future__ import annotations

pytest_plugins = ["registry.testing.plugin", "pool_fixtures"]
