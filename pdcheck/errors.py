"""Typed errors. BadInput means the user gave something unusable: the CLI exits 2 on it."""


class BadInput(ValueError):
    """A config, model path, connector path or peer message that cannot be used."""


class InstanceFailed(RuntimeError):
    """An engine instance died or broke its protocol; the run's verdict becomes unknown."""
