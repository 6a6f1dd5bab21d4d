"""mixer family: being written (see issue #3)."""
