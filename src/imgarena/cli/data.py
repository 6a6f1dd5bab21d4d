"""`imgarena data` (not yet implemented: defines no register())."""
