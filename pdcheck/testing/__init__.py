"""What tests, suites and benches run the product against; the product never imports it.

- clock: `FakeClock`, time that moves only when a test advances it;
- actors and memory_transport: the protocol model's world, an in-memory network whose real
  connector core (KVHandler, KVClient, Outbox, Inbox) runs as actors one at a time;
- gpu: spawned ranks placed on GPUs (`run_ranks`), and a pair of them joined by an NcclPeer
  (`run_pair`), for the NCCL tests and the NCCL bench;
- fake_backend: `FakeBackend`, a stand-in vLLM HTTP server for the proxy's tests and its bench.
"""
