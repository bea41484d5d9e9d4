"""The ``pgregistry`` command (also ``python -m pgregistry``): check files, print the JSON
Schema, show the health of a file's pools, run the demo. See :data:`DESCRIPTION`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import psycopg2

from .health import PoolHealth, exit_code, format_table, pool_health
from .schemas import ConfigError, json_schema, load_config, load_config_text

DESCRIPTION = """\
Named PostgreSQL connection pools from one YAML file.

  pgregistry check pools.yaml [more.yaml ...]   check files exactly as a reload would
                                                (- reads standard input); exit 0 or 1
  pgregistry schema                             the file format as JSON Schema
  pgregistry stats pools.yaml                   open the pools, show each pool's and each
                                                address's state; exit 0 ok, 1 refused
                                                file, 2 degraded, 3 failing
  pgregistry demo                               the live demo (demo --help)
"""


def _check(args: argparse.Namespace) -> int:
    status = 0
    for name in args.files:
        try:
            if name == "-":
                config = load_config_text(sys.stdin.read(), source="<stdin>")
            else:
                config = load_config(name)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            status = 1
            continue
        names = ", ".join(config.pools) or "no pools"
        print(f"{'<stdin>' if name == '-' else name}: ok ({len(config.pools)} pool(s): {names})")
    return status


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def _probe(reg: Any, names: list[str], timeout_s: float) -> dict[str, str]:
    """One checkout per pool that has nothing open, all at once within ``timeout_s``: the
    error of each that failed."""
    errors: dict[str, str] = {}

    def probe(name: str) -> None:
        pool = reg.get(name).pool
        s = pool.stats()
        if s["size"] - s["opening"] > 0:
            return
        try:
            conn = pool.getconn(timeout_s)
        except (psycopg2.Error, OSError) as exc:
            errors[name] = " ".join(str(exc).split())
            return
        pool.putconn(conn)

    threads = [threading.Thread(target=probe, args=(name,), daemon=True) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s + 5)
    return errors


def _settle(reg: Any, names: list[str], deadline: float) -> None:
    """Wait (until ``deadline``) for each pool to have minconn connections open, or to have
    failed to connect with nothing in flight."""
    while time.monotonic() < deadline:
        stats = reg.stats()
        if all(s["size"] - s["opening"] >= s["minconn"] or
               (s["opening"] == 0 and s["connect_errors"]) for s in (stats[n] for n in names)):
            return
        threading.Event().wait(0.05)


def _stats(args: argparse.Namespace) -> int:
    from .registry import Registry

    try:
        reg = Registry.from_yaml(args.file, install_sighup=False)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    with reg:
        names = reg.names()
        deadline = time.monotonic() + args.wait
        errors = _probe(reg, names, args.wait)
        _settle(reg, names, deadline)
        stats = reg.stats()
        health: list[PoolHealth] = [pool_health(name, stats[name], errors.get(name))
                                    for name in names]
        if args.json:
            for item in health:
                stats[item.name]["health"] = {"state": item.state, "open": item.open,
                                              "error": item.error,
                                              "addresses": {a.label: a.state
                                                            for a in item.addresses}}
            print(json.dumps(stats, indent=2, default=str))
        else:
            print(format_table(health))
    return exit_code(health)


def main(argv: Sequence[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log at INFO")
    parser = argparse.ArgumentParser(prog="pgregistry", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", parents=[common],
                       help="check YAML files exactly as a reload would (exit 1 with every "
                            "problem)",
                       description="Check each file (- for standard input) with the loader "
                                   "that from_yaml, reload and stats use; print every problem "
                                   "as file:line:column: key: message. Exit 1 when any file "
                                   "is refused.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=_check)
    p = sub.add_parser("schema", parents=[common],
                       help="print the JSON Schema of the file format")
    p.set_defaults(func=_schema)
    p = sub.add_parser("stats", parents=[common],
                       help="open the pools of a file and show their health",
                       description="Open every pool of the file, try one checkout on each "
                                   "that has no connection open, and print each pool's and "
                                   "each address's state (ok, degraded, failing) with the "
                                   "last error. Exit 0 when every pool is ok, 1 when the file "
                                   "is refused, 2 when some pool is degraded, 3 when some "
                                   "pool is failing: usable as a health check.")
    p.add_argument("file")
    p.add_argument("--wait", type=float, default=5.0,
                   help="seconds a pool may take to open its first connection (default 5)")
    p.add_argument("--json", action="store_true", help="print stats as JSON")
    p.set_defaults(func=_stats)
    # the demo parses its own options (python -m pgregistry demo --help)
    sub.add_parser("demo", add_help=False, help="run the live demo (see: demo --help)")
    args, extra = parser.parse_known_args(argv)
    verbose = getattr(args, "verbose", False)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main([*(["--verbose"] if verbose else []), *extra])
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
