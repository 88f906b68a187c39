"""Engine integrations. Nothing in dspark_ext imports this package: each engine loads its
integration through its own plugin entry point (pyproject.toml)."""
