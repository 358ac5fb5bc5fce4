"""One training loop for one run or K runs at once, and what a run writes.

    loop.py      the loop (K members; a solo run is K = 1): segments, evaluation, checkpoints,
                 divergence, signals, finish; `train` and `train_group`
    engine.py    what differs between one plain MLP and K stacked ones (SoloEngine, StackedEngine)
    member.py    one run's state: its dir, model, optimizer, data order, progress, TensorBoard
    summary.py   summary.json, the typed structure its writer and readers share
    order.py     the data order (shuffled epochs of randperm slices)
    signals.py   stop signals turned into a flag the loop polls
"""
