"""qexport: integer-only transformer encoders, trained, exported and shipped."""

__version__ = "0.1.0"
