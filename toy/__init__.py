"""The toy world: the CPU test world of this repository and the toy-scale experiment run in it.

    python -m toy.world --out work_dirs/toy                 # tiny random models and datasets (seconds)
    python -m toy.committed --out work_dirs/toy-pretrained  # the shipped pretrained world (seconds)
    python -m toy.pretrain --toy T --out work_dirs/toy-pretrained   # pretrain one here (f4: ~37 min)
    python -m toy.experiment                                # the paper's table at toy scale

- ``world.py``: the toy SD1.5, ControlNet, CLIP, Inception and the paper's six datasets in their
  real layouts, written deterministically from a seed; reading a world's model paths (--toy).
- ``reward_checkpoints.py``: tiny reward-model checkpoints in the published formats.
- ``pretrain.py``: the toy world's models trained on its own data, so its images are scenes.
- ``committed.py``: the pretrained world shipped in ``toy/weights`` (all but its datasets), restored
  and checked against its SHA256SUMS; ``--update`` ships a new one.
- ``experiment.py``: ControlNet vs ControlNet++ vs Ctrl-U on the pretrained toy world, and its table.

Test scaffolding: the product code (train/, eval/, inference/, reward_models/, utils/,
benchmarks/) imports it only inside a function behind a toy option (``--toy``), never at module
level.
"""
