"""The conformance battery: every failure class, written against the connector under test.

    pdcheck test --connector mypkg.conn:MyConnector [--connector-config JSON] [--profile FILE]
    pytest --pyargs pdcheck.conformance --pd-connector mypkg.conn:MyConnector

It ships in the package, so a connector author runs it from their own repository. One module
per failure class; each test drives the connector under test (the `connector` fixture: the
class the name resolves to, with its profile, pdcheck/profiles.py) through a deployment beside
a single-engine oracle, and asserts on the outcome of every request and on the drain after.
A class the connector's profile opts out of is skipped with the profile's reason. Every failure
message ends with the one line that replays that test (`pdcheck test ... -- -k NAME`).
"""
