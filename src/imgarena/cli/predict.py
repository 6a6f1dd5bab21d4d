"""`imgarena predict` (not yet implemented: defines no register())."""
