"""pgregistry: the registry of named pools (to come)."""
