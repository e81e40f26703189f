"""FleetGate's benchmark harness: every path under the same load, one table, docs/benchmarks.md.

Run it with ``bench/run`` (which installs what it needs). The pieces are importable on their
own so that ``tests/bench/test_harness.py`` can exercise them in a tiny mode.
"""
