"""``python -m schemas``: print the JSON Schema of the YAML file (``--write`` updates the
shipped ``pgregistry.schema.json``, ``--check`` tells whether it is up to date)."""

from .jsonschema import main

raise SystemExit(main())
