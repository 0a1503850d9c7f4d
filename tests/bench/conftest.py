"""tests/bench: its helper module (bench_modules: the bench scripts loaded from their files) is
importable by the test files, which the importlib import mode does not put on sys.path."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
