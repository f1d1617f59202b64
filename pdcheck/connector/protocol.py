"""The connector's wire protocol: versioned msgspec messages over ZMQ.

Every message is one msgpack frame, optionally followed by one raw data frame (the KV bytes of
a whole request: all layers, all blocks). A peer's message that does not decode, or that has
another version, gets an `ErrorReply` and a log line; it never stops the listener.

    decode --Pull(key)------------------> prefill      GET: decode pulls
    decode <--Blocks(key, ...) + bytes--- prefill
    prefill --Push(key, ...) + bytes----> decode       PUT / PUT_ASYNC: prefill pushes
    prefill <--Ack(key)------------------ decode
    either <--ErrorReply(key, message)--- either       refused: unknown key, full, malformed
"""

from __future__ import annotations

import msgspec

VERSION = 1


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


Message = Pull | Blocks | Push | Ack | ErrorReply

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
