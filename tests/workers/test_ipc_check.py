import torch

from workers.launcher import checked_ipc


def test_the_start_up_check_falls_back_to_zmq_with_one_warning_where_cuda_ipc_fails(capsys):
    checked: dict = {}
    works = checked_ipc(True, "cuda:0", "cuda:0", checked)
    err = capsys.readouterr().err
    if torch.cuda.is_available():  # a GPU host whose containers allow IPC: the check passes silently
        assert works and err == ""
    else:  # here the producer cannot even make a CUDA tensor: the run must not rely on IPC
        assert not works and err.startswith("warning: CUDA IPC from cuda:0 to cuda:0 does not work here (")
        assert err.endswith("those stages pass tensors through host memory (zmq) instead\n") and err.count("\n") == 1
    assert checked == {("cuda:0", "cuda:0"): works}
    assert checked_ipc(True, "cuda:0", "cuda:0", checked) is works and capsys.readouterr().err == ""  # checked once
    assert checked_ipc(False, "cuda:0", "cuda:1", checked) is False and len(checked) == 1  # nothing to check
