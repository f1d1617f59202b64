"""A module that imports but whose class is not a KV connector (a bad-input case)."""


class NotAConnector:
    pass
