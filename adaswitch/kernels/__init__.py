"""adaswitch.kernels: the kernels only (no model code). Triton under `triton/` and C++ under `csrc/` live in
the repository's top-level `kernels/` directory and are mapped here by setup.py (built by CMakeLists.txt
into `adaswitch._C_<cpu capability>`).

That top-level directory has no `__init__.py` on purpose: a process started in the repository root has
the root on `sys.path`, and a regular package named `kernels` there would shadow Hugging Face's `kernels`
package, which transformers imports while loading any model config. Without it, the directory is at most a
namespace portion, and Python always prefers a regular package found later on the path."""
