"""The Triton backend (kernels in ``kernels``; importing this package does not import triton)."""
