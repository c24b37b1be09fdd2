"""C kernels the runner compiles on the machine it runs on (see native_kernels.py)."""
