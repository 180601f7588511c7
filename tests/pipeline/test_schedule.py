import torch

from pipeline.config import Config
from pipeline.data import load_config_data, steps_per_epoch, train_batches
from pipeline.schedule import is_due, run_epochs


def test_a_run_walks_its_epochs_batches_and_due_events_from_any_start():
    cfg = Config(dataset="digits", batch_size=64, epochs=3, train_subset=256, eval_every=0, checkpoint_every=3)
    data = load_config_data(cfg)
    spe = steps_per_epoch(data, cfg.batch_size)
    assert spe == 4
    walked = [(epoch, trained, [(s.step, s.evaluate, s.checkpoint) for s in steps])
              for epoch, trained, steps in run_epochs(cfg, data, spe)]
    assert walked == [(0, 0, [(1, False, False), (2, False, False), (3, False, True), (4, True, False)]),
                      (1, 0, [(5, False, False), (6, False, True), (7, False, False), (8, True, False)]),
                      (2, 0, [(9, False, True), (10, False, False), (11, False, False), (12, True, True)])]
    resumed = [(epoch, trained, [s.step for s in steps]) for epoch, trained, steps in run_epochs(cfg, data, spe, 6)]
    assert resumed == [(1, 2, [7, 8]), (2, 0, [9, 10, 11, 12])]  # the first batch not yet trained
    first = next(next(run_epochs(cfg, data, spe, 6))[2])
    x, y = list(train_batches(data, 1, cfg.batch_size, cfg.seed, cfg.augment))[2]
    assert first.epoch == 1 and torch.equal(first.x, x) and torch.equal(first.y, y)  # the batches of (seed, epoch)


def test_the_last_step_is_always_due():
    assert is_due(1000, 12, 4, 12) and not is_due(1000, 11, 4, 12) and is_due(0, 8, 4, 12)
