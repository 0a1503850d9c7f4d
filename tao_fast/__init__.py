"""tao-fast: Test-time Adaptive Optimization, fast."""
__version__ = "0.1.0"
