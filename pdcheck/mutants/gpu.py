"""GPU mutants of the NCCL plane: `NcclPeer`s that are wrong on purpose, each a few lines away
from the reference, so the stream-race suite (tests/test_stream_races.py) can prove that the
per-block checksums catch the stream bugs of BUGS.md.

- RecvOnOtherStream ("garbled output, CUDA streams", vLLM #20263): the receive buffer is
  allocated on the caller's current stream (the default stream in a fresh thread), not on the
  receive stream, with no record_stream and no wait, while ncclRecv writes it on the receive
  stream. The caching allocator may hand out memory whose queued default-stream kernels still
  write it, after the data has landed.
- SendBeforeKVWrite ("send before the layer's KV is written", vLLM #26205): the data send does
  not wait for the compute-stream event recorded after the KV write. Checksums made beside the
  send still do (`checksums_beside` orders them after that event), so the receiver's recomputed
  checksums differ from the sent ones. A sender whose checksums were also unordered would
  checksum the same stale bytes: only a comparison with the expected content would see that.

Each mutant subclasses NcclPeer and overrides one method. `over(peer)` gives a mutant view of
an existing peer (same communicator, streams and state; the peer's owner still closes it), so a
scenario run by `pdcheck.testing.gpu.run_pair` can swap the behaviour in; constructing one
directly works like NcclPeer. Never ship these: they exist to be caught.
"""

from __future__ import annotations

import torch

from pdcheck.connector.nccl import LayerSpec, NcclPeer, request_buffer


class MutantPeer(NcclPeer):
    """Base of the mutants: a view of an NcclPeer with one method changed."""

    @classmethod
    def over(cls, peer: NcclPeer) -> MutantPeer:
        mutant = object.__new__(cls)
        mutant.__dict__ = peer.__dict__  # shared, not copied: closing either closes both
        return mutant


class RecvOnOtherStream(MutantPeer):
    """The receive buffer allocated on the caller's current stream (#20263)."""

    def receive_buffer(self, specs: list[LayerSpec]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return request_buffer(specs, self.device)  # BUG: not under torch.cuda.stream(self.recv_stream)


class SendBeforeKVWrite(MutantPeer):
    """send_blocks whose data send does not wait for `after` (#26205); checksums made beside it do."""

    def order_send_after(self, after: torch.cuda.Event) -> None:
        pass  # BUG: the reference's `self.send_stream.wait_event(after)` is missing


MUTANTS: dict[str, type[MutantPeer]] = {cls.__name__: cls for cls in (RecvOnOtherStream, SendBeforeKVWrite)}
