"""pgregistry: schemas of the YAML file (to come)."""
