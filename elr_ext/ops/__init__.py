"""The ops: one module per op, each holding its schema, fake kernel, autograd and dispatch."""

from .fdn import fdn

__all__ = ["fdn"]
