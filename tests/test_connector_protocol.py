"""The reference connector's TCP plane driven directly (no vLLM): real sockets on loopback.

Covers the transfer paths (pull, push), and bad input from a peer: a malformed or
wrong-version message or handshake, an unknown key, a full receive buffer, an oversize announce,
a corrupted payload, garbage or unannounced bytes on a data connection, a peer that never
answers, a peer that dies mid-payload. Each ends in a clear error within its deadline, and the server keeps serving.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

torch = pytest.importorskip("torch")
zmq = pytest.importorskip("zmq")

from pdcheck.cluster.instance import free_port  # noqa: E402
from pdcheck.connector import protocol, stream  # noqa: E402
from pdcheck.connector.buffers import Inbox, Outbox  # noqa: E402
from pdcheck.connector.protocol import ErrorReply, ProtocolError  # noqa: E402
from pdcheck.connector.tcp import KVClient, KVServer, to_frame  # noqa: E402
from pdcheck.faults.wire import FaultyClient, WireFault as Fault  # noqa: E402


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


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_a_byte_corrupted_on_the_data_connection_is_caught_by_the_checksum(plane, direction):
    address, outbox, inbox, _ = plane
    context = zmq.Context()
    client = FaultyClient(context, [Fault.CORRUPT])
    try:
        with pytest.raises(ProtocolError, match="checksum mismatch"):
            if direction == "push":
                client.push(address, "k", kv(), 5)
            else:
                outbox.put("k", "r", to_frame("k", kv()))
                client.pull(address, "k", 5)
        assert inbox.used_bytes == 0 and "k" not in inbox.entries
        client.push(address, "k2", kv(seed=1), 5)  # the next transfer is clean
        assert torch.equal(inbox.take("k2", 1), kv(seed=1))
    finally:
        client.close()
        context.term()


def test_an_oversize_announce_is_refused_before_any_byte_is_read(plane):
    address, outbox, _, client = plane
    outbox.put("big", "r", to_frame("big", torch.zeros(1024, dtype=torch.float32)))
    client.max_bytes = 1000
    with pytest.raises(ProtocolError, match="4096 bytes exceed"):
        client.pull(address, "big", 5)
    assert outbox.num_waiting == 1  # still there: nothing was fetched


def test_a_handshake_of_another_version_is_refused(plane):
    address, _, _, client = plane
    with pytest.raises(ProtocolError, match="protocol version 1, expected"):
        client.request(address, [protocol.encode(protocol.Hello("old", version=1))], 5)


def test_garbage_and_unannounced_bytes_on_a_data_connection_close_it_and_the_server_keeps_serving(plane):
    address, outbox, inbox, client = plane
    (welcome,) = client.request(address, [protocol.encode(protocol.Hello("t"))], 5)
    host = address.rpartition(":")[0]
    header, payload = to_frame("never-announced", kv())
    cases = [(b"\xff\xff\xff\xff", None, "message header"), (stream.LENGTH.pack(3) + b"\xc1\xc1\xc1", None, "malformed"),
             (None, (header, payload), "no room reserved")]
    for garbage, push, reason in cases:
        with socket.create_connection((host, welcome.data_port), timeout=5) as conn:
            if garbage:
                conn.sendall(garbage)
            else:
                stream.write(conn, push[0], time.monotonic() + 5)  # the header alone: the server hangs up
            reply = stream.read_message(conn, time.monotonic() + 5)
            assert isinstance(reply, ErrorReply) and reason in reply.message
    assert inbox.used_bytes == 0
    outbox.put("k", "r", to_frame("k", kv()))
    assert torch.equal(client.pull(address, "k", 5), kv())


@pytest.mark.parametrize("client_class", ["KVClient", "NoRedialClient"])
def test_a_peer_restarted_on_the_same_address_is_reached_again_by_the_next_pull(client_class):
    """The client's connections to a peer outlive the peer: the server stops, a new one starts on
    the same address (another data port), and the next pull must reach it (the catalogued
    mutant, reusing the dead data connection, fails that pull)."""
    from pdcheck.mutants import connector as mutants

    context = zmq.Context()
    address = f"127.0.0.1:{free_port()}"
    outbox, inbox = Outbox(hold_s=60), Inbox(capacity_bytes=4096, spill_bytes=4096)
    client = (KVClient if client_class == "KVClient" else mutants.NoRedialClient)(context)
    server = KVServer(context, address, outbox, inbox).start()
    try:
        outbox.put("old", "r0", to_frame("old", kv(seed=1)))
        assert torch.equal(client.pull(address, "old", 5), kv(seed=1))
        server.stop()
        outbox, inbox = Outbox(hold_s=60), Inbox(capacity_bytes=4096, spill_bytes=4096)
        server = KVServer(context, address, outbox, inbox).start()
        outbox.put("new", "r1", to_frame("new", kv(seed=2)))
        if client_class == "NoRedialClient":
            with pytest.raises(ProtocolError, match="data connection failed"):
                client.pull(address, "new", 5)
            return
        assert torch.equal(client.pull(address, "new", 5), kv(seed=2))
    finally:
        client.close()
        server.stop()
        context.term()


def test_a_peer_that_dies_mid_payload_fails_the_pull_within_its_deadline():
    """A fake prefill announces 4 KiB, sends half, and closes: the pull ends at once, cleanly."""
    context = zmq.Context()
    control = context.socket(zmq.ROUTER)
    port = control.bind_to_random_port("tcp://127.0.0.1")
    data = socket.create_server(("127.0.0.1", 0))
    header, payload = to_frame("k", torch.zeros(1024, dtype=torch.float32))

    def fake_prefill():
        for answer in (protocol.Welcome(data.getsockname()[1]), header):
            identity, _ = control.recv_multipart()
            control.send_multipart([identity, protocol.encode(answer)])
        conn, _ = data.accept()
        with conn:
            stream.read_message(conn, time.monotonic() + 5)
            stream.write(conn, header, time.monotonic() + 5)
            conn.sendall(bytes(payload)[:2048])

    thread = threading.Thread(target=fake_prefill)
    thread.start()
    client = KVClient(context)
    started = time.monotonic()
    try:
        with pytest.raises(ProtocolError, match="data connection failed: peer closed"):
            client.pull(f"127.0.0.1:{port}", "k", 5)
        assert time.monotonic() - started < 5
    finally:
        thread.join(5)
        client.close()
        control.close(0)
        data.close()
        context.term()


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

    return WorkerHalf(P2PConfig.from_extra({"port": free_port(), "mode": mode, "deadline_s": 2, "share_s": 0.5}))


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


def decode_request(request_id: str, key: str, address: str, prompt_len: int = 9):
    """A decode leg as the scheduler half reads it (attributes only)."""
    from types import SimpleNamespace

    params = {"do_remote_prefill": True, "transfer_key": key, "remote_prefill": address}
    first = int(request_id[0]) * 3
    blocks = SimpleNamespace(get_block_ids=lambda: ([first, first + 1],))
    return SimpleNamespace(request_id=request_id, kv_transfer_params=params, prompt_token_ids=[7] * prompt_len,
                           blocks=blocks)


@pytest.mark.parametrize("scheduler", ["SchedulerHalf", "PullEveryLoadScheduler"])
def test_children_of_an_n_gt_1_request_share_one_pull_and_a_late_child_recomputes(scheduler):
    """Three children carrying one transfer key: two in a step, one in the next. All three load
    prefill's KV, pulled once (the catalogued mutant, pulling per child, is refused the second
    pull). Once share_s has passed, the worker lets the KV go, and a child after that recomputes
    instead of asking for a key prefill has let go of."""
    from types import SimpleNamespace

    from pdcheck.connector import scheduler as halves
    from pdcheck.connector.worker import SaveEntry
    from pdcheck.mutants import connector as mutants

    half_class = getattr(halves, scheduler, None) or getattr(mutants, scheduler)
    prefill, decode = worker_half(), worker_half()
    try:
        src = {f"layer{i}": torch.randn(6, 2, 4, 8) for i in range(2)}
        dst = {name: torch.zeros(9, 2, 4, 8) for name in src}
        for name, cache in src.items():
            prefill.record_layer(name, cache)
        prefill.save([SaveEntry("prefill-req", "key", [1, 4])])
        half = half_class(decode.config, block_size=4)
        output = SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens={},
                                 scheduled_cached_reqs=SimpleNamespace(req_ids=[]))

        def step(*children) -> list[str]:
            for child in children:
                assert half.get_num_new_matched_tokens(child, 0) == (8, False)
                half.update_state_after_alloc(child, child.blocks, 8)
            _, loads, releases = half.build_connector_meta(output)
            decode.load(loads, dst, releases)
            return releases

        children = [decode_request(f"{i}_parent{i}", "key", prefill.config.address) for i in (0, 1, 2)]
        step(*children[:2])
        errors = decode.take_load_errors()
        if scheduler == "PullEveryLoadScheduler":
            assert errors == {3, 4}  # the second child's blocks
            return
        assert errors == set() and step(children[2]) == [] and decode.take_load_errors() == set()
        for name in src:
            for first in (0, 3, 6):
                assert torch.equal(dst[name][first], src[name][1]) and torch.equal(dst[name][first + 1], src[name][4])
        assert decode.held() == "1 pulled and kept for children" and half.has_pending_frees
        time.sleep(decode.config.share_s)
        assert step() == ["key"] and decode.held() == "" and not half.has_pending_frees
        late = decode_request("3_parent3", "key", prefill.config.address)
        assert half.get_num_new_matched_tokens(late, 0) == (0, False)
    finally:
        prefill.close()
        decode.close()


@pytest.mark.parametrize("remote", [None, "decode-without-a-port", "127.0.0.1:http"])
def test_a_push_to_a_peer_address_that_is_not_host_port_fails_cleanly_and_frees_the_request(remote, caplog):
    """Transfer parameters without a usable decode address (a proxy or connector bug) must not
    break prefill's engine step or pin its blocks: the push fails with an error naming the
    address, and the request is reported done sending."""
    from pdcheck.connector.worker import SaveEntry

    prefill = worker_half("put")
    try:
        prefill.record_layer("layer0", torch.randn(4, 2, 4, 8))
        prefill.save([SaveEntry("req", "key", [1], remote)])
        assert prefill.finished({"req"}) == {"req"}
        assert f"peer address {remote!r} is not host:port" in caplog.text
    finally:
        prefill.close()


def test_pushed_kv_no_load_claims_is_dropped_after_its_hold_and_frees_its_room():
    """A decode leg that never comes must not leave its pushed KV filling the buffer for good."""
    inbox = Inbox(capacity_bytes=4096, spill_bytes=0, hold_s=0.2)
    inbox.put("unclaimed", torch.zeros(1024, dtype=torch.float32))
    with pytest.raises(BufferError, match="receive buffer full"):
        inbox.put("next", torch.zeros(1, dtype=torch.float32))
    time.sleep(0.3)
    inbox.put("next", torch.zeros(1, dtype=torch.float32))
    assert set(inbox.entries) == {"next"} and inbox.take("unclaimed", 0.01) is None


def test_transfer_logs_fold_only_whole_lines_and_only_once(tmp_path):
    from pdcheck.connector.stats import TransferLog, TransferLogs, TransferRecord

    log, logs = TransferLog(str(tmp_path / "transfers-1.jsonl")), TransferLogs(tmp_path)
    log.record(TransferRecord("k", "save", 2, 64, 0.0))
    with open(tmp_path / "transfers-1.jsonl", "ab") as f:
        f.write(b'{"transfer_key": "k", "side": "lo')  # a line still being written
    assert (logs.update()["k"].saved_blocks, logs.update()["k"].loaded_blocks) == (2, 0)
    with open(tmp_path / "transfers-1.jsonl", "ab") as f:
        f.write(b'ad", "blocks": 2, "bytes": 64, "seconds": 0.5}\n')
    transfer = logs.update()["k"]
    assert (transfer.saved_blocks, transfer.loaded_blocks, transfer.load_seconds) == (2, 2, 0.5)
