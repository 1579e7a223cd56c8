import os
import sys

# Test helpers (tests/*.py modules) and the benchmark harness (bench/) import by name.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
