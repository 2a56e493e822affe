"""Shared pytest setup."""
from engine.distributed import pin_build_tools

# In-process engine runs (the `world` fixture) JIT-build DeepSpeed's ops inside the pytest process, and every
# subprocess inherits its PATH: pin the venv's ninja here too, so a `.venv/bin/python -m pytest` started without the
# venv on PATH does not rebuild the shared op cache with the system ninja (2-4 minutes per op, then again for the
# next engine.train process).
pin_build_tools()
