// The compiled library detframe._C. Importing it (or loading it with torch.ops.load_library)
// runs the static registrations in csrc/ops: one schema per operator, kernels per backend.

#include <Python.h>
#include <torch/library.h>

// Owns the `detframe` operator namespace; each operator adds its schemas in its own file
// (csrc/ops/<op>.cpp) with TORCH_LIBRARY_FRAGMENT. Loading a second copy of this library
// into one process fails here, loudly, instead of mixing two builds' kernels.
TORCH_LIBRARY(detframe, m) {}

// A module with no Python functions: everything is reached through torch.ops.detframe.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "detframe's compiled operators", -1, nullptr};
  return PyModule_Create(&module);
}
