"""Subclasses of vLLM connectors that do the part of a connector's own proxy that pdcheck's PD path lacks."""
