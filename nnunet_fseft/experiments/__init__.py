"""Experiments run through nnU-Net's commands: the benchmark (the FSEFT protocol) and the demo."""
