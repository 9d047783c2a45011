// Every covrl op schema, in ONE TORCH_LIBRARY block. Kernels register their
// implementations per backend in csrc/cpu/*.cpp and csrc/cuda/*.cu; the Python
// side (covrl/ops.py) adds register_fake and register_autograd.
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace covrl {

// Which backends this binary was compiled with; covrl.kernel_info() reports it.
std::string build_info() {
#ifdef COVRL_WITH_CUDA
  return "cpu,cuda";
#else
  return "cpu";
#endif
}

}  // namespace covrl

TORCH_LIBRARY(covrl, m) {
  // build_info() -> "cpu" or "cpu,cuda": the kernels compiled into covrl._C.
  m.def("build_info() -> str", &covrl::build_info);
}

// covrl._C is imported as a Python module only so that its static initialisers
// (the registrations above) run; it exposes nothing to Python itself.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
