// Python bindings for the multi-scale deformable attention CUDA kernels.
#include <torch/extension.h>

#include "ms_deform_attn.h"

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
}
