// nemokern._C: the pybind11 extension. No libtorch: raw pointers, sizes, dtype codes and stream
// handles cross this boundary, so the extension builds without torch headers. Python front end:
// nemokern/parallel/all_reduce.py (the only intended caller of these classes).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "collective.h"
#include "shm_allreduce.h"

#ifndef NEMOKERN_WITH_CUDA
#define NEMOKERN_WITH_CUDA 0
#endif
#if NEMOKERN_WITH_CUDA
#include "cuda_allreduce.h"
#endif

namespace py = pybind11;
using nemokern::ShmAllReduce;

PYBIND11_MODULE(_C, m) {
  m.doc() = "nemokern C++/CUDA extension";
  m.def("abi_version", []() { return 3; }, "Version of the extension's Python-facing ABI.");
  m.attr("with_cuda") = py::bool_(NEMOKERN_WITH_CUDA != 0);
  m.attr("MAX_RANKS") = nemokern::kMaxRanks;
  m.attr("DTYPE_FLOAT32") = static_cast<int>(nemokern::kFloat32);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(nemokern::kBFloat16);
  py::register_exception<nemokern::CollectiveTimeout>(m, "CollectiveTimeout", PyExc_TimeoutError);

  py::class_<ShmAllReduce>(m, "ShmAllReduce",
                           "All-reduce (sum) of CPU buffers through a /dev/shm workspace.")
      .def(py::init<const std::string&, int, int, size_t, bool, double, size_t>(),
           py::arg("name"), py::arg("rank"), py::arg("world_size"), py::arg("chunk_bytes"),
           py::arg("create"), py::arg("timeout_s"), py::arg("one_shot_max_bytes"))
      .def("all_reduce", &ShmAllReduce::all_reduce, py::arg("ptr"), py::arg("numel"),
           py::arg("dtype"), py::call_guard<py::gil_scoped_release>(),
           "In-place sum of numel elements at address ptr across all ranks.")
      .def("unlink", &ShmAllReduce::unlink, "Remove the /dev/shm name (mappings stay valid).")
      .def_property_readonly("rank", &ShmAllReduce::rank)
      .def_property_readonly("world_size", &ShmAllReduce::world_size)
      .def_property_readonly("chunk_bytes", &ShmAllReduce::chunk_bytes)
      .def_property_readonly("one_shot_max_bytes", &ShmAllReduce::one_shot_max_bytes)
      .def_property_readonly("name", &ShmAllReduce::name)
      .def_property_readonly("steps", &ShmAllReduce::steps);

#if NEMOKERN_WITH_CUDA
  using nemokern::CudaAllReduce;
  m.def("cuda_device_count", &nemokern::cuda_device_count,
        "Number of CUDA devices the runtime sees (0 without a driver or GPU).");
  py::class_<CudaAllReduce>(m, "CudaAllReduce",
                            "All-reduce (sum) of CUDA buffers on one node through CUDA IPC.")
      .def(py::init<int, int, int, size_t, double, size_t>(), py::arg("rank"),
           py::arg("world_size"), py::arg("device"), py::arg("buffer_bytes"),
           py::arg("timeout_s"), py::arg("one_shot_max_bytes"))
      .def("ipc_handle", [](const CudaAllReduce& c) { return py::bytes(c.ipc_handle()); },
           "This rank's cudaIpcMemHandle_t, to be gathered by every peer.")
      .def("open_peers", &CudaAllReduce::open_peers, py::arg("handles"),
           "Map every peer's workspace from the gathered handles (index = rank).")
      .def("all_reduce", &CudaAllReduce::all_reduce, py::arg("ptr"), py::arg("numel"),
           py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
           "Enqueue an in-place sum on `stream` (a cudaStream_t as int; 0 = legacy default).")
      .def("raise_if_failed", &CudaAllReduce::raise_if_failed,
           "Raise the failure an earlier kernel recorded (TimeoutError subclass for a missing "
           "peer, ValueError for another size or dtype on a peer); no synchronisation.")
      .def("error_code", &CudaAllReduce::error_code, py::call_guard<py::gil_scoped_release>(),
           "Synchronise; return the recorded failure kind (0 ok, 1 peer timeout, 2 size "
           "mismatch).")
      .def_property_readonly("buffer_bytes", &CudaAllReduce::buffer_bytes);
#endif
}
