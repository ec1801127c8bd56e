import os
import sys

# the project is a flat folder of scripts (as nanoGPT): make them importable from tests/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
