"""Measuring a run: peak memory (memory.py); micro-benchmarks and kernel/step profiles are
driven from here by `tao-fast bench` and `tao-fast profile`."""
