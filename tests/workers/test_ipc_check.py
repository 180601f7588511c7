import torch

from workers.launcher import checked_link
from workers.placement import LinkKind


def test_the_start_up_check_falls_back_to_shared_memory_with_one_warning_where_cuda_ipc_fails(capsys):
    checked: dict = {}
    kind = checked_link(LinkKind.CUDA_IPC, "cuda:0", "cuda:0", checked)
    err = capsys.readouterr().err
    if torch.cuda.is_available():  # a GPU host whose containers allow IPC: the check passes silently
        assert kind is LinkKind.CUDA_IPC and err == ""
    else:  # here the producer cannot even make a CUDA tensor: the run must not rely on IPC
        assert kind is LinkKind.SHARED_MEMORY and err.startswith("warning: CUDA IPC from cuda:0 to cuda:0 does not work here (")
        assert err.endswith("those stages pass tensors through host shared memory instead\n") and err.count("\n") == 1
    assert checked == {("cuda:0", "cuda:0"): kind is LinkKind.CUDA_IPC}
    assert checked_link(LinkKind.CUDA_IPC, "cuda:0", "cuda:0", checked) is kind and capsys.readouterr().err == ""  # once
    for other in (LinkKind.ZMQ, LinkKind.SHARED_MEMORY):  # nothing to check
        assert checked_link(other, "cuda:0", "cuda:1", checked) is other and len(checked) == 1
