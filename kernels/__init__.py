"""adaswitch.kernels: the kernels only (no model code). Triton under `triton/`, C++ under `csrc/`
(built by CMakeLists.txt into `adaswitch._C`)."""
