"""`imgarena bench` (not yet implemented: defines no register())."""
