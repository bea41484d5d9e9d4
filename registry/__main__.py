"""``python -m pgregistry``: check a file, print the JSON Schema, show a registry's pools.

    python -m pgregistry check pools.yaml     # exactly the loader reload uses; exit 0 or 1
    python -m pgregistry schema               # the file format as JSON Schema
    python -m pgregistry stats pools.yaml     # open the pools, print pools and addresses
    python -m pgregistry demo                 # the live demo (local cluster); demo --help
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from .schemas import ConfigError, json_schema, load_config


def _check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    names = ", ".join(config.pools) or "no pools"
    print(f"{args.file}: ok ({len(config.pools)} pool(s): {names})")
    return 0


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def format_table(stats: dict[str, Any]) -> str:
    """Pools and their addresses as a plain-text table."""
    rows = [("pool", "address", "conns", "in use", "idle", "failures", "state")]
    for name, s in stats.items():
        if name.startswith("_"):
            continue
        rows.append((name, "", str(s["size"]), str(s["in_use"]), str(s["idle"]),
                     str(s["connect_errors"]), "closed" if s["closed"] else
                     f"waiting {s['waiting']}" if s["waiting"] else "ok"))
        for label, a in sorted(s["addresses"].items()):
            state = (f"banned {a['banned_for_s']:.0f}s ({a['ban_reason']})" if a["banned"]
                     else "ok" if a["active"] else "left DNS")
            rows.append(("", label, str(a["connections"]), str(a["in_use"]), str(a["idle"]),
                         str(a["connect_failures"]), state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _stats(args: argparse.Namespace) -> int:
    from .registry import Registry

    try:
        reg = Registry.from_yaml(args.file, install_sighup=False)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    with reg:
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:  # let the prewarm happen
            s = reg.stats()
            if all(s[n]["size"] >= s[n]["minconn"] or s[n]["connect_errors"] for n in reg.names()):
                break
            time.sleep(0.05)
        stats = reg.stats()
        if args.json:
            print(json.dumps(stats, indent=2, default=str))
        else:
            print(format_table(stats))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgregistry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate a YAML file (exit 1 with every problem)")
    p.add_argument("file")
    p.set_defaults(func=_check)
    p = sub.add_parser("schema", help="print the JSON Schema of the file format")
    p.set_defaults(func=_schema)
    p = sub.add_parser("stats", help="open the pools of a file and print them")
    p.add_argument("file")
    p.add_argument("--wait", type=float, default=5.0, help="seconds to let pools prewarm")
    p.add_argument("--json", action="store_true", help="print stats as JSON")
    p.set_defaults(func=_stats)
    # the demo parses its own options (python -m pgregistry demo --help)
    sub.add_parser("demo", add_help=False, help="run the live demo (see: demo --help)")
    args, extra = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main([*(["--verbose"] if args.verbose else []), *extra])
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
