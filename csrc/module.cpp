// nemokern._C: the pybind11 extension. No libtorch: raw pointers, sizes, dtypes and stream
// handles cross this boundary, so the extension builds without torch headers.
#include <pybind11/pybind11.h>

namespace py = pybind11;

#ifndef NEMOKERN_WITH_CUDA
#define NEMOKERN_WITH_CUDA 0
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "nemokern C++/CUDA extension";
  m.def("abi_version", []() { return 1; }, "Version of the extension's Python-facing ABI.");
  m.attr("with_cuda") = py::bool_(NEMOKERN_WITH_CUDA != 0);
}
