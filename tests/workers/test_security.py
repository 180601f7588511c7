import torch
import zmq

from workers.security import RunKeys, new_run_keys, start_authenticator
from workers.transport import Receiver, Sender


def test_a_tcp_link_refuses_a_foreign_process_and_goes_on_with_its_own_peer():
    keys = new_run_keys()
    ctx = zmq.Context()
    auth = start_authenticator(ctx, keys)
    receiver = Receiver(ctx, "tcp://127.0.0.1:*", timeout_s=1, keys=keys)
    stranger_ctx = zmq.Context()  # another process would have its own context
    strangers = [
        Sender(stranger_ctx, receiver.endpoint, timeout_s=1),  # no CURVE at all
        Sender(stranger_ctx, receiver.endpoint, timeout_s=1,  # CURVE with the run's public key but its own secret
               keys=RunKeys(keys.public, new_run_keys().secret)),
        Sender(stranger_ctx, receiver.endpoint, timeout_s=1, keys=new_run_keys()),  # another run's keys
    ]
    for stranger in strangers:
        stranger.channel.socket.setsockopt(zmq.SNDTIMEO, 2000)
        try:
            stranger.send({"kind": "train", "step": 666}, {"x": torch.full((3,), 6.0)})
        except zmq.Again:
            pass  # never admitted: its message cannot even leave
    assert not receiver.channel.poll(1500)  # nothing from a stranger reached the stage
    peer = Sender(ctx, receiver.endpoint, timeout_s=5, keys=keys)
    peer.send({"kind": "train", "step": 1}, {"x": torch.arange(4.0)})
    message = receiver.recv()
    assert message.header["step"] == 1 and torch.equal(message.tensors["x"], torch.arange(4.0))
    receiver.done(message)
    for part in (*strangers, peer, receiver):
        part.close()
    stranger_ctx.destroy(linger=0)
    auth.stop()
    ctx.destroy(linger=0)


def test_run_keys_round_trip_through_the_store_encoding():
    keys = new_run_keys()
    assert RunKeys.decode(keys.encode()) == keys and len(keys.public) == len(keys.secret) == 40
