"""The reference connector's TCP plane driven directly (no vLLM): real ZMQ sockets on loopback.

Covers the transfer paths (pull, push), and bad input from a peer: a malformed or
wrong-version message, an unknown key, a full receive buffer, a corrupted payload, a peer that
never answers. Each ends in a clear error within its deadline, and the server keeps serving.
"""

from __future__ import annotations

import socket

import pytest

torch = pytest.importorskip("torch")
zmq = pytest.importorskip("zmq")

from pdcheck.connector import protocol  # noqa: E402
from pdcheck.connector.buffers import Inbox, Outbox  # noqa: E402
from pdcheck.connector.protocol import ErrorReply, ProtocolError  # noqa: E402
from pdcheck.connector.tcp import KVClient, KVServer, to_frame  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def plane():
    context = zmq.Context()
    address = f"127.0.0.1:{free_port()}"
    outbox, inbox = Outbox(hold_s=60), Inbox(capacity_bytes=4096, spill_bytes=4096)
    server = KVServer(context, address, outbox, inbox).start()
    client = KVClient(context)
    yield address, outbox, inbox, client
    client.close()
    server.stop()
    context.term()


def kv(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, n, 8, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_pull_returns_exact_bytes_once_and_marks_the_request_sent(plane):
    address, outbox, _, client = plane
    data = kv()
    outbox.put("k1", "req-1", to_frame("k1", data))
    assert torch.equal(client.pull(address, "k1", 5), data)
    assert outbox.finished() == {"req-1"} and outbox.num_waiting == 0
    with pytest.raises(ProtocolError, match="unknown transfer key k1"):
        client.pull(address, "k1", 5)


def test_push_lands_in_the_inbox_under_its_key(plane):
    address, _, inbox, client = plane
    data = kv(seed=3)
    client.push(address, "k2", data, 5)
    assert torch.equal(inbox.take("k2", 1), data)
    assert inbox.take("k2", 0.05) is None and inbox.used_bytes == 0


def test_push_that_fits_in_neither_buffer_nor_spill_is_refused(plane):
    address, _, inbox, client = plane
    client.push(address, "a", torch.zeros(1024, dtype=torch.float32), 5)  # 4096 bytes: the buffer
    client.push(address, "b", torch.zeros(1024, dtype=torch.float32), 5)  # the spill pool
    with pytest.raises(ProtocolError, match="receive buffer full"):
        client.push(address, "c", torch.zeros(1, dtype=torch.float32), 5)
    assert set(inbox.entries) == {"a", "b"}


@pytest.mark.parametrize("frames, message", [
    ([b"\xc1garbage"], "malformed message"),
    ([protocol.encode(protocol.Pull("k", version=99))], "protocol version 99"),
    ([protocol.encode(protocol.Ack("k"))], "unexpected Ack"),
])
def test_bad_peer_messages_get_an_error_reply_and_the_server_keeps_serving(plane, frames, message):
    address, outbox, _, client = plane
    with pytest.raises(ProtocolError, match=message):
        client.request(address, frames, 5)
    outbox.put("k", "r", to_frame("k", kv()))
    assert torch.equal(client.pull(address, "k", 5), kv())


def test_corrupted_payload_is_caught_by_its_checksum(plane):
    address, _, inbox, client = plane
    header, data = to_frame("k", kv())
    damaged = bytearray(data)
    damaged[5] ^= 0x01
    with pytest.raises(ProtocolError, match="checksum mismatch"):
        client.request(address, [protocol.encode(protocol.Push(header)), bytes(damaged)], 5)
    assert inbox.used_bytes == 0


def test_silent_peer_times_out_within_the_deadline():
    context = zmq.Context()
    silent = context.socket(zmq.ROUTER)  # accepts, never answers
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    client = KVClient(context)
    with pytest.raises(TimeoutError, match="within 0.3s"):
        client.pull(f"127.0.0.1:{port}", "k", 0.3)
    client.close()
    silent.close(linger=0)
    context.term()


def test_decode_of_an_error_reply_round_trips():
    reply = protocol.decode(protocol.encode(ErrorReply(transfer_key=None, message="x")))
    assert reply == ErrorReply(transfer_key=None, message="x")


def worker_half(mode: str = "get"):
    from pdcheck.connector.config import P2PConfig
    from pdcheck.connector.worker import WorkerHalf

    return WorkerHalf(P2PConfig.from_extra({"port": free_port(), "mode": mode, "deadline_s": 2}))


def test_worker_halves_move_a_request_and_refuse_kv_that_does_not_fit():
    """GET between two worker halves on paged caches; then KV of another shape is a load error."""
    from pdcheck.connector.worker import LoadEntry, SaveEntry

    prefill, decode = worker_half(), worker_half()
    try:
        src = {f"layer{i}": torch.randn(6, 2, 4, 8) for i in range(2)}  # BLOCKS_FIRST [B, H, N, C]
        dst = {name: torch.zeros_like(t) for name, t in src.items()}
        for name, cache in src.items():
            prefill.record_layer(name, cache)
        prefill.save([SaveEntry("req", "key", [1, 4])])
        decode.load([LoadEntry("req", "key", [0, 5], prefill.config.address)], dst)
        assert decode.take_load_errors() == set()
        for name in src:
            assert torch.equal(dst[name][0], src[name][1]) and torch.equal(dst[name][5], src[name][4])
        assert prefill.finished({"req"}) == {"req"}
        narrow = {name: torch.zeros(6, 2, 4, 4) for name in src}  # another head size
        prefill.save([SaveEntry("req2", "key2", [2])])
        decode.load([LoadEntry("req2", "key2", [3], prefill.config.address)], narrow)
        assert decode.take_load_errors() == {3}
        assert not narrow["layer0"].any()
    finally:
        prefill.close()
        decode.close()
