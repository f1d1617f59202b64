"""Clusters own processes: the engines of one configuration beside their oracle, started and
stopped together; they never send requests (that is the client's role, pdcheck.client).

Two clusters, one protocol:
- `deployment.Deployment`: xPyD engines in worker processes, driven in process (`LegsClient`);
- `http_cluster.ServedCluster`: `pdcheck serve` instances behind the PD proxy (`ProxyClient`).
"""
