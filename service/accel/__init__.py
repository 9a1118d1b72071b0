"""Faster ways to run a model's passes, each checked against the eager pass it replaces
(TorchScript traces, CUDA graphs), and the process's thread and memory policies."""
