"""The training entry points (run as files: ``accelerate launch train/reward_control.py``), importable
as ``train.reward_control`` so that stage one and the tests reuse the script's parts."""
