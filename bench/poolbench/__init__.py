"""The benchmark's parts (``bench/bench.py`` is the entry point): ``env`` the run's settings,
server and pinning; ``peers`` the subjects; ``workloads`` W1-W5 and the hanging host;
``report`` the tables and targets; ``measure`` the statistics."""
