"""TCP links that accept only this run's processes: zmq CURVE with one key pair per run.

Under torchrun the stages talk over tcp:// sockets on the host's address. Without this, a
PAIR socket takes the first process that connects, whoever it is, and a stranger could feed
it tensors or take the real neighbour's place. Rank 0 draws a CURVE key pair for the run and
shares it through the torch.distributed store; every socket of the run encrypts with it, and
a ZAP handler in each process admits only clients that prove they hold the run's secret key.
A process that does not fails the handshake: it never becomes the peer and the run goes on.
Spawned stages on one host use ipc:// sockets in a folder only the user can open, and need none;
nor do shared-memory links (one host), whose unix:// sockets live in such a folder under torchrun too.
"""
from __future__ import annotations

from dataclasses import dataclass

import zmq
from zmq.auth.thread import ThreadAuthenticator

STORE_KEY = "sgr/curve"


@dataclass(frozen=True)
class RunKeys:
    """The run's CURVE key pair (z85-encoded bytes), used by every socket as server and as client."""

    public: bytes
    secret: bytes

    def encode(self) -> bytes:
        return self.public + b" " + self.secret

    @classmethod
    def decode(cls, raw: bytes) -> RunKeys:
        public, secret = raw.split(b" ")
        return cls(public, secret)


def new_run_keys() -> RunKeys:
    """A fresh key pair for one run (needs libzmq with CURVE, which pyzmq's wheels have)."""
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE security; install pyzmq from its wheels (they bundle it)")
    return RunKeys(*zmq.curve_keypair())


def secure(socket: zmq.Socket, keys: RunKeys | None, server: bool) -> None:
    """Make `socket` speak CURVE with the run's keys, before it binds (server) or connects (client)."""
    if keys is None:
        return
    socket.curve_publickey, socket.curve_secretkey = keys.public, keys.secret
    if server:
        socket.curve_server = True
    else:
        socket.curve_serverkey = keys.public


class _OnlyThisRun:
    """ZAP credentials check: a client is admitted only if its public key is the run's."""

    def __init__(self, public: bytes) -> None:
        self.public = public

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.public


def start_authenticator(ctx: zmq.Context, keys: RunKeys | None) -> ThreadAuthenticator | None:
    """The ZAP handler of this process's context (one per context), or None without keys; stop it at the end."""
    if keys is None:
        return None
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_OnlyThisRun(keys.public))
    return auth
