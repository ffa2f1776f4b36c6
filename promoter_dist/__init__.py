"""promoter-dist: distributed training of promoter-to-expression models."""

__version__ = "0.1.0"
