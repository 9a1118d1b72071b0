"""flowserve's benchmark harness: ``python -m bench`` (or ``make bench``).

It starts the real server the way users do (``flowserve serve``, default settings), loads it with a
real HTTP load generator (wrk, else a Python generator in its own process), and reports every
figure as a ratio to a limit measured in the same run: the HTTP ceiling (a no-op FastAPI app that
parses the same body and answers the same shape) or the model limit (the same model's in-process
batched throughput). See ``bench/README.md``.
"""
