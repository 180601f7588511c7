from workers.messages import Kind, Record


def test_only_training_batches_take_the_training_windows_credit():
    assert [k for k in Kind if k.training] == [Kind.TRAIN]


def test_kinds_are_their_wire_values():
    assert Kind("eval_end") is Kind.EVAL_END and Record("beat") is Record.BEAT
    assert Kind.TRAIN == "train" and len({k.value for k in Kind}) == len(Kind)
