"""Modules built on the ops."""

from .fdn import FDN

__all__ = ["FDN"]
