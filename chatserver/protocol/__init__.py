"""Plain data shared by handlers, the engine and workers: no I/O here."""
