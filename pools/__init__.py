"""pgregistry pools (placeholder)."""
