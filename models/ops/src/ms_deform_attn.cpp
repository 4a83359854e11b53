// Python bindings for the multi-scale deformable attention CUDA kernels.
#include <torch/extension.h>

#include <algorithm>
#include <string>

#include "ms_deform_attn.h"

// The CUDA archs this binary was compiled for. setup.py and the JIT loader (models/ops/archs.py) pass
// them as -DSAMDETR_BUILT_ARCHS=7.5,8.0,12.0+PTX: commas, because a ';' would end the shell command
// that ninja runs. Compiled in, the list survives copying the .so alone. Empty when built otherwise,
// which the loader treats as "unknown".
#ifndef SAMDETR_BUILT_ARCHS
#define SAMDETR_BUILT_ARCHS
#endif
#define SAMDETR_STRINGIFY_IMPL(...) #__VA_ARGS__
#define SAMDETR_STRINGIFY(...) SAMDETR_STRINGIFY_IMPL(__VA_ARGS__)

namespace {

// The built archs in TORCH_CUDA_ARCH_LIST syntax, e.g. "7.5;8.0;12.0+PTX".
std::string built_archs() {
  std::string archs = SAMDETR_STRINGIFY(SAMDETR_BUILT_ARCHS);
  std::replace(archs.begin(), archs.end(), ',', ';');
  return archs;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable attention (SAM-DETR re-implementation), CUDA kernels";
  m.def("forward", &samdetr::ms_deform_attn_cuda_forward,
        "Forward pass: (value, spatial_shapes, level_start_index, sampling_locations, "
        "attention_weights) -> output",
        pybind11::arg("value"), pybind11::arg("spatial_shapes"), pybind11::arg("level_start_index"),
        pybind11::arg("sampling_locations"), pybind11::arg("attention_weights"));
  m.def("backward", &samdetr::ms_deform_attn_cuda_backward,
        "Backward pass: returns [grad_value, grad_sampling_locations, grad_attention_weights]",
        pybind11::arg("value"), pybind11::arg("spatial_shapes"), pybind11::arg("level_start_index"),
        pybind11::arg("sampling_locations"), pybind11::arg("attention_weights"),
        pybind11::arg("grad_output"));
  m.def("built_archs", &built_archs,
        "CUDA archs compiled into this binary, as TORCH_CUDA_ARCH_LIST (\"\" if unknown)");
}
