"""A small app on examples/pools.yaml: writes through the writer, reads through the readers.

    PGPASSWORD=... python examples/app.py [path/to/pools.yaml]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pgregistry import Registry

HERE = Path(__file__).resolve().parent


def main(path: str) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with Registry.from_yaml(path) as registry:
        writer = registry.get("writer")
        readers = registry.get("readers")

        with writer.conn() as conn, conn.cursor() as cur:
            cur.execute(
                "CREATE TABLE IF NOT EXISTS example_visits"
                " (id serial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())"
            )
            cur.execute("INSERT INTO example_visits DEFAULT VALUES RETURNING id")
            (visit,) = cur.fetchone()
            conn.commit()  # the pool never commits for you: uncommitted work is rolled back

        with readers.conn() as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery(), host(inet_server_addr())")
            replica, address = cur.fetchone()

        with registry.get("analytics").conn() as conn, conn.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            (statement_timeout,) = cur.fetchone()

        print(f"wrote visit {visit} on the writer; "
              f"read from {'a replica' if replica else 'the primary'} at {address}; "
              f"analytics statement_timeout={statement_timeout}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else str(HERE / "pools.yaml")))
