"""The TOML configuration: typed model, loading and checking."""
