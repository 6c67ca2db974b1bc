"""trimta: a mail transfer agent on Trio."""

__version__ = "0.1.0"
