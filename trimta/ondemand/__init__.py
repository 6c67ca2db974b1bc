"""On-demand relay: releasing held domains with ETRN (RFC 1985)."""
