"""Triton kernels. Import after setting TRITON_INTERPRET=1 to run them on CPU tensors."""
