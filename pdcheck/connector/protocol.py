"""The connector's wire protocol: versioned msgspec messages.

Control messages go over ZMQ, one msgpack frame each. KV bytes go over a plain TCP data
connection (see `stream`), each message there followed by the raw bytes a `Blocks` header
describes (the KV of a whole request: all layers, all blocks). A peer's message that does not
decode, or that has another version, gets an `ErrorReply` and a log line; it never stops the
listener.

    client --Hello---------------------> server    control: once per peer, before any transfer
    client <--Welcome(data_port)-------- server    (a version mismatch is refused here)
  GET (decode pulls):
    decode --Pull(key)-----------------> prefill   control: announce; prefill still holds key
    decode <--Blocks(key, ...)---------- prefill
    decode ==Fetch(key)================> prefill   data connection
    decode <==Blocks(key, ...) + bytes== prefill
  PUT / PUT_ASYNC (prefill pushes):
    prefill --Push(Blocks)-------------> decode    control: announce; decode reserves room
    prefill <--Ack(key)----------------- decode
    prefill ==Blocks(key, ...) + bytes=> decode    data connection
    prefill <==Ack(key)================= decode    stored under key
  either <--ErrorReply(key, message)--- either     refused: unknown key, full, malformed

On the NCCL plane (pdcheck.connector.nccl_plane) the Hello also carries the NCCL id the client
made, and the bytes go over that communicator instead of a data connection.
"""

from __future__ import annotations

import msgspec

VERSION = 2


class Hello(msgspec.Struct, tag=True, frozen=True):
    peer: str  # who is asking, for the server's log lines
    version: int = VERSION
    nccl_id: bytes | None = None  # the NCCL plane's 128-byte communicator id; None on the TCP plane


class Welcome(msgspec.Struct, tag=True, frozen=True):
    data_port: int  # where the server's data connections are accepted, on the same host
    version: int = VERSION


class Fetch(msgspec.Struct, tag=True, frozen=True):
    transfer_key: str
    version: int = VERSION


class Pull(msgspec.Struct, tag=True, frozen=True):
    transfer_key: str
    version: int = VERSION


class Blocks(msgspec.Struct, tag=True, frozen=True):
    """Header of a data frame: what the bytes are, so the receiver can check them."""

    transfer_key: str
    dtype: str
    shape: list[int]
    checksum: int
    version: int = VERSION


class Push(msgspec.Struct, tag=True, frozen=True):
    blocks: Blocks
    version: int = VERSION


class Ack(msgspec.Struct, tag=True, frozen=True):
    transfer_key: str
    version: int = VERSION


class ErrorReply(msgspec.Struct, tag=True, frozen=True):
    transfer_key: str | None
    message: str
    version: int = VERSION


Message = Hello | Welcome | Pull | Fetch | Blocks | Push | Ack | ErrorReply

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class ProtocolError(ValueError):
    """A peer sent something this protocol cannot accept."""


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(frame: bytes) -> Message:
    try:
        message = _decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"malformed message: {e}") from None
    if message.version != VERSION:
        raise ProtocolError(f"protocol version {message.version}, expected {VERSION}")
    return message
