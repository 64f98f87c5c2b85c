"""Training recipes shipped with auglocal-fx (YAML files; see docs/training.md)."""
