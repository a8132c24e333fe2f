"""promoe-bench: benchmark and profile Mixture-of-Experts expert-offloading strategies."""

__version__ = "0.1.0"
