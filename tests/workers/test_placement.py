import pytest

from pipeline.config import ConfigError
from workers.placement import (LinkEnd, LinkKind, World, ipc_device_index, link_endpoint, link_kind,
                               sends_in_background, stage_device, torchrun_world, travels_by_ipc)

# (device, gpus, visible GPUs, local rank or None when one launcher spawns every stage) -> device of stages 0, 1, 2
PLACEMENT = [
    ("cpu", [], 0, None, ["cpu", "cpu", "cpu"]),
    ("cpu", [], 4, 1, ["cpu", "cpu", "cpu"]),  # a CPU run never looks at GPUs
    # spawn: one launcher, every stage on this host
    ("cuda", [], 1, None, ["cuda:0", "cuda:0", "cuda:0"]),  # one GPU: every stage shares it
    ("cuda", [], 2, None, ["cuda:0", "cuda:1", "cuda:0"]),  # fewer GPUs than stages: round robin
    ("cuda", [], 8, None, ["cuda:0", "cuda:1", "cuda:2"]),
    ("cuda", [3, 1, 3], 4, None, ["cuda:3", "cuda:1", "cuda:3"]),  # gpus: one per stage, as given
    ("cuda:1", [], 2, None, ["cuda:1", "cuda:1", "cuda:1"]),  # an explicit GPU takes every stage, as sequential does
    # torchrun, one process per stage: stage = rank, the local rank spreads the ranks of one node
    ("cuda", [], 8, 2, ["cuda:2", "cuda:2", "cuda:2"]),
    ("cuda", [], 1, 2, ["cuda:0", "cuda:0", "cuda:0"]),  # 3 ranks on a node with one GPU
    ("cuda", [], 2, 5, ["cuda:1", "cuda:1", "cuda:1"]),  # more local ranks than GPUs
    ("cuda", [], 1, 7, ["cuda:0", "cuda:0", "cuda:0"]),  # each rank sees only its own GPU (CUDA_VISIBLE_DEVICES)
    ("cuda:0", [], 1, 3, ["cuda:0", "cuda:0", "cuda:0"]),
    ("cuda", [0, 0, 1], 2, 1, ["cuda:0", "cuda:0", "cuda:1"]),  # gpus wins over the local rank
]


@pytest.mark.parametrize("device, gpus, visible, local_rank, expected", PLACEMENT)
def test_stage_placement(device, gpus, visible, local_rank, expected):
    assert [stage_device(device, gpus, k, visible, local_rank) for k in range(3)] == expected


@pytest.mark.parametrize("device, gpus, visible, local_rank, message", [
    ("cuda", [], 0, None, "no CUDA GPU is visible"),
    ("cuda", [0, 2, 0], 2, None, r"gpus\[1\] = 2 does not exist: this process sees 2 GPU\(s\)"),
    ("cuda:3", [], 2, 0, r"device cuda:3 does not exist: this process sees 2 GPU\(s\)"),
])
def test_placement_that_cannot_run_is_one_line(device, gpus, visible, local_rank, message):
    with pytest.raises(ConfigError, match=message) as err:
        [stage_device(device, gpus, k, visible, local_rank) for k in range(3)]
    assert "\n" not in str(err.value)


HOST, OTHER = "node-a/boot-1", "node-b/boot-2"


@pytest.mark.parametrize("transport, producer, consumer, expected", [
    ("auto", LinkEnd(HOST, "GPU-a"), LinkEnd(HOST, "GPU-b", ("GPU-a", "GPU-b")), LinkKind.CUDA_IPC),  # it sees our GPU
    ("auto", LinkEnd(HOST, "GPU-a"), LinkEnd(HOST, "GPU-b", ("GPU-b",)), LinkKind.SHARED_MEMORY),  # only its own GPU
    ("auto", LinkEnd(HOST, "GPU-a", ("GPU-a",)), LinkEnd(HOST), LinkKind.SHARED_MEMORY),  # a CPU consumer
    ("auto", LinkEnd(HOST), LinkEnd(HOST), LinkKind.SHARED_MEMORY),  # CPU stages on one host
    ("auto", LinkEnd(HOST), LinkEnd(HOST, "GPU-a", ("GPU-a",)), LinkKind.SHARED_MEMORY),  # a CPU producer shares no GPU
    ("auto", LinkEnd(HOST, "GPU-a"), LinkEnd(OTHER, "GPU-a", ("GPU-a",)), LinkKind.ZMQ),  # another host: a UUID match
    ("auto", LinkEnd(HOST), LinkEnd(OTHER), LinkKind.ZMQ),                                  # proves nothing there
    ("zmq", LinkEnd(HOST, "GPU-a"), LinkEnd(HOST, "GPU-a", ("GPU-a",)), LinkKind.ZMQ),  # zmq forced
    ("zmq", LinkEnd(HOST), LinkEnd(HOST), LinkKind.ZMQ),
])
def test_the_link_kind_follows_where_the_two_ends_live(transport, producer, consumer, expected):
    assert link_kind(transport, producer, consumer) is expected


@pytest.mark.parametrize("kind, host, expected", [
    (LinkKind.SHARED_MEMORY, None, "unix:///run/sgr-x/link1.0.0"),  # headers only: a Unix socket, spawned or not
    (LinkKind.SHARED_MEMORY, "10.0.0.1", "unix:///run/sgr-x/link1.0.0"),
    (LinkKind.ZMQ, None, "ipc:///run/sgr-x/link1.0.0"),  # tensors as frames: zmq
    (LinkKind.CUDA_IPC, None, "ipc:///run/sgr-x/link1.0.0"),
    (LinkKind.ZMQ, "10.0.0.1", "tcp://10.0.0.1:*"),  # torchrun: another host may be the producer
    (LinkKind.CUDA_IPC, "127.0.0.1", "tcp://127.0.0.1:*"),
])
def test_the_consumer_binds_where_its_link_kind_says(kind, host, expected):
    assert link_endpoint(kind, "/run/sgr-x", "link1.0.0", host) == expected


@pytest.mark.parametrize("name, is_cuda, numel, link_ipc, expected", [
    ("x", True, 10, True, True),  # the stage's own activation
    ("delta", True, 10, True, True),
    ("y", True, 10, True, False),  # labels are forwarded from stage to stage: never by handle
    ("image", True, 10, True, False),  # so are InfoPro's input images
    ("x", True, 0, True, False),  # an empty tensor has no memory to share
    ("x", False, 10, True, False),  # CPU tensors go as frames
    ("x", True, 10, False, False),  # a link without IPC
])
def test_which_tensors_travel_by_ipc(name, is_cuda, numel, link_ipc, expected):
    assert travels_by_ipc(name, is_cuda, numel, link_ipc) is expected


@pytest.mark.parametrize("gpu, visible, expected", [
    ("GPU-b", ("GPU-a", "GPU-b"), 1),  # spawned stages: every process numbers the GPUs alike
    ("GPU-b", ("GPU-b",), 0),  # a rank that sees only the producer's GPU calls it cuda:0
    ("GPU-a", ("GPU-c", "GPU-b", "GPU-a"), 2),  # ranks with CUDA_VISIBLE_DEVICES in another order
])
def test_an_ipc_handle_opens_under_this_processes_index_of_its_gpu(gpu, visible, expected):
    assert ipc_device_index(gpu, visible) == expected


def test_an_ipc_handle_of_a_gpu_this_process_cannot_see_is_one_line():
    with pytest.raises(RuntimeError, match=r"GPU-z arrived, but this process sees only \['GPU-a'\]; run with --set tr"):
        ipc_device_index("GPU-z", ("GPU-a",))


TORCHRUN = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("environ,world", [
    ({}, World()),
    ({"RANK": "1"}, World()),  # a stray RANK without torchrun's WORLD_SIZE is not a rank
    ({"WORLD_SIZE": "1", "RANK": "0"}, World()),
    ({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", **TORCHRUN}, World(8, 5, 1, 4)),
    ({"WORLD_SIZE": "3", "RANK": "2", **TORCHRUN}, World(3, 2, 0, 3)),  # one node: LOCAL_WORLD_SIZE defaults to all
])
def test_torchrun_world_reads_torchruns_variables(environ, world):
    assert torchrun_world(environ) == world


@pytest.mark.parametrize("environ,message", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "-1"}, "WORLD_SIZE=-1 is not a number of processes"),
    ({"WORLD_SIZE": "3", **TORCHRUN}, "WORLD_SIZE=3 needs a RANK from 0 to 2, got None"),
    ({"WORLD_SIZE": "3", "RANK": "3", **TORCHRUN}, "WORLD_SIZE=3 needs a RANK from 0 to 2, got 3"),
    ({"WORLD_SIZE": "3", "RANK": "x", **TORCHRUN}, "RANK='x' is not an integer"),
    ({"WORLD_SIZE": "3", "RANK": "0", "MASTER_ADDR": "a"}, "WORLD_SIZE=3 without MASTER_PORT"),
    ({"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "3", **TORCHRUN}, "LOCAL_RANK=3 of LOCAL_WORLD_SIZE=3 does not"),
    ({"WORLD_SIZE": "3", "RANK": "0", "LOCAL_WORLD_SIZE": "4", **TORCHRUN}, "LOCAL_RANK=0 of LOCAL_WORLD_SIZE=4"),
])
def test_torchrun_variables_that_cannot_work_are_one_line(environ, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")) as raised:
        torchrun_world(environ)
    assert raised.value.args[0].endswith("or unset WORLD_SIZE to let launch.py spawn it")


def test_only_cpu_stages_send_from_a_background_thread():
    assert sends_in_background("cpu")
    assert not sends_in_background("cuda")  # CUDA IPC handles and device copies stay on the stream's thread
