// Python module stub for minitron._C. The operators register themselves with the PyTorch
// dispatcher from static initialisers in each source file (TORCH_LIBRARY_FRAGMENT /
// TORCH_LIBRARY_IMPL); importing this module (or torch.ops.load_library on the .so) loads them.
#include <Python.h>

#include <torch/library.h>

#include "common/cpu_features.h"

#ifndef MINITRON_VERSION
#define MINITRON_VERSION "dev"
#endif

namespace minitron {

std::string build_info() {
  std::string s = "version=" MINITRON_VERSION;
#ifdef MINITRON_WITH_CUDA
  s += ";cuda=1";
#else
  s += ";cuda=0";
#endif
  s += ";cpu_isa=";
  s += cpu::isa_name(cpu::detect_isa());
  return s;
}

}  // namespace minitron

TORCH_LIBRARY_FRAGMENT(minitron, m) {
  m.def("_build_info() -> str", [] { return minitron::build_info(); });
}

extern "C" {
static struct PyModuleDef minitron_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&minitron_c_module); }
}
