// Multi-scale deformable attention: declarations shared by the C++ bindings
// and the CUDA implementation.
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>

namespace samdetr {

// value:               (batch, tokens, heads, channels)
// spatial_shapes:      (levels, 2) int64, rows are (height, width)
// level_start_index:   (levels,) int64, first token of every level
// sampling_locations:  (batch, queries, heads, levels, points, 2), (x, y) in [0, 1]
// attention_weights:   (batch, queries, heads, levels, points)
// returns              (batch, queries, heads * channels)
at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value,
                                       const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights);

// Returns {grad_value, grad_sampling_locations, grad_attention_weights}.
std::vector<at::Tensor> ms_deform_attn_cuda_backward(const at::Tensor& value,
                                                     const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     const at::Tensor& grad_output);

}  // namespace samdetr
