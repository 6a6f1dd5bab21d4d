"""vit family: being written (see issue #3)."""
