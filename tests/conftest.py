import os
import sys

# tests import the project's top-level modules (model.py, lora.py, ...) and tests/tiny.py
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
