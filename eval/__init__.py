"""Evaluation of ControlNet++: generation (eval.py), one script per metric, summarize.py."""
