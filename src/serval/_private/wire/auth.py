"""Mutual authentication of a TCP connection, before a single frame is read.

A Unix socket is private by the 0700 directory it lives in; a TCP port is open to anyone who
can reach the address, so both ends first prove they hold the cluster's secret: each sends a
fresh random nonce and answers the other's with an HMAC-SHA256 of both nonces (keyed by the
secret, and by which side answers, so that an answer cannot be reflected back). Only raw bytes
of fixed size cross until both proofs are checked; nothing is unpickled from a peer that has
not proven itself, and a peer that stays silent is dropped after ``HANDSHAKE_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket

__all__ = ["HANDSHAKE_TIMEOUT_S", "AuthenticationError", "accept", "connect", "new_secret"]

HANDSHAKE_TIMEOUT_S = 5.0
_MAGIC = b"serval-wire-1\n"  # also tells a stray client (a browser, a port scanner) what this is
_NONCE = 32
_PROOF = hashlib.sha256().digest_size


class AuthenticationError(ConnectionError):
    """The peer did not prove it holds the cluster's secret."""


def new_secret() -> bytes:
    return os.urandom(32)


def _proof(secret: bytes, role: bytes, mine: bytes, theirs: bytes) -> bytes:
    return hmac.new(secret, role + mine + theirs, hashlib.sha256).digest()


async def _read_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await loop.sock_recv(sock, n - len(got))
        if not chunk:
            raise AuthenticationError("the peer closed the connection during the handshake")
        got += chunk
    return bytes(got)


async def connect(sock: socket.socket, secret: bytes) -> None:
    """The dialling side of the handshake, on a connected non-blocking socket."""
    await asyncio.wait_for(_connect(sock, secret), HANDSHAKE_TIMEOUT_S)


async def _connect(sock: socket.socket, secret: bytes) -> None:
    loop = asyncio.get_running_loop()
    mine = os.urandom(_NONCE)
    await loop.sock_sendall(sock, _MAGIC + mine)
    hello = await _read_exactly(loop, sock, len(_MAGIC) + _NONCE + _PROOF)
    if not hello.startswith(_MAGIC):
        raise AuthenticationError("the peer is not a serval endpoint")
    theirs, their_proof = hello[len(_MAGIC) : -_PROOF], hello[-_PROOF:]
    if not hmac.compare_digest(their_proof, _proof(secret, b"listener", theirs, mine)):
        raise AuthenticationError("the listener does not hold this cluster's secret")
    await loop.sock_sendall(sock, _proof(secret, b"dialler", mine, theirs))
    verdict = await _read_exactly(loop, sock, 1)
    if verdict != b"\x01":
        raise AuthenticationError("the listener refused this connection")


async def accept(sock: socket.socket, secret: bytes) -> None:
    """The listening side, on an accepted non-blocking socket; raises (and the caller closes
    the socket) unless the dialler proves itself in time."""
    await asyncio.wait_for(_accept(sock, secret), HANDSHAKE_TIMEOUT_S)


async def _accept(sock: socket.socket, secret: bytes) -> None:
    loop = asyncio.get_running_loop()
    hello = await _read_exactly(loop, sock, len(_MAGIC) + _NONCE)
    if not hello.startswith(_MAGIC):
        raise AuthenticationError("not a serval dialler")
    theirs = hello[len(_MAGIC) :]
    mine = os.urandom(_NONCE)
    await loop.sock_sendall(sock, _MAGIC + mine + _proof(secret, b"listener", mine, theirs))
    their_proof = await _read_exactly(loop, sock, _PROOF)
    if not hmac.compare_digest(their_proof, _proof(secret, b"dialler", theirs, mine)):
        await loop.sock_sendall(sock, b"\x00")
        raise AuthenticationError("the dialler does not hold this cluster's secret")
    await loop.sock_sendall(sock, b"\x01")
