"""Small shared helpers (hylorada.utils.io: the one writer of every output folder)."""
