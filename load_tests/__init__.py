"""Load testing for chatserver: drive a running server over its real APIs and measure it.

``python -m load_tests`` (also ``chatserver-load``) is the general tool; ``bench_batching``
(issue 3) and ``strategies`` (issue 4) are fixed benchmarks built from the same parts:

    clients/    one async client per API mode (ws, query, openai); each returns RequestResults
    runner.py   fixed concurrency or Poisson rate, bounded by request count and/or duration
    stats.py    percentiles, the summary of a pass, terminal and markdown tables
    probe.py    a /healthz prober run alongside load (event-loop responsiveness)
    server.py   start/stop a ``chatserver serve`` subprocess; CPU use from /proc
    guard.py    loopback-only URL check
    plot.py     PNG charts (matplotlib, Agg)
"""
