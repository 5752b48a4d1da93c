"""`compinv-rt eval`: the paper's evaluation protocol and ablation (see protocol.py)."""
