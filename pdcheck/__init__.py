"""pdcheck: a correctness and fault-injection gate for disaggregated prefill/decode serving."""

__version__ = "0.1.0"
