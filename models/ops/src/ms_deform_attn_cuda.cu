// CUDA kernels for multi-scale deformable attention.
//
// Work decomposition: one warp per "bag", i.e. per (batch, query, head)
// triple. The lanes of the warp walk the channel dimension, so the value rows
// that a sampling point touches are read with coalesced accesses, and the
// per-point reductions over channels needed in the backward pass (gradients of
// the attention weight and of the sampling location) are single warp shuffles.
// Reduced-precision inputs are accumulated in float (at::opmath_type).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>

#include "ms_deform_attn.h"

namespace samdetr {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreadsPerBlock = kWarpSize * kWarpsPerBlock;
constexpr unsigned kFullWarpMask = 0xffffffffu;
// Number of bilinear corners of a sampling point.
constexpr int kCorners = 4;

__device__ __forceinline__ float floor_acc(float x) { return floorf(x); }
__device__ __forceinline__ double floor_acc(double x) { return floor(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullWarpMask, v, offset);
  }
  return v;
}

// Bilinear footprint of one sampling point on one feature level, following the
// grid_sample(align_corners=False, padding_mode="zeros") convention: the
// normalised coordinate u maps to pixel coordinate u * size - 0.5 and corners
// outside the map contribute zero. Corner k is (dy, dx) = (k / 2, k % 2).
template <typename acc_t>
struct BilinearFootprint {
  int64_t offset[kCorners];  // token offset y * width + x inside the level
  acc_t weight[kCorners];
  bool valid[kCorners];
  acc_t frac_x;
  acc_t frac_y;

  // Returns false when no corner can contribute a value or a gradient, which
  // also rejects NaN coordinates and keeps the integer casts below in range.
  __device__ __forceinline__ bool init(acc_t loc_x, acc_t loc_y, int64_t height, int64_t width) {
    const acc_t x = loc_x * static_cast<acc_t>(width) - static_cast<acc_t>(0.5);
    const acc_t y = loc_y * static_cast<acc_t>(height) - static_cast<acc_t>(0.5);
    if (!(x >= static_cast<acc_t>(-1) && x < static_cast<acc_t>(width) &&
          y >= static_cast<acc_t>(-1) && y < static_cast<acc_t>(height))) {
      return false;
    }
    const acc_t x_floor = floor_acc(x);
    const acc_t y_floor = floor_acc(y);
    frac_x = x - x_floor;
    frac_y = y - y_floor;
    const int64_t x0 = static_cast<int64_t>(x_floor);
    const int64_t y0 = static_cast<int64_t>(y_floor);
    const acc_t one = static_cast<acc_t>(1);
    const acc_t weight_x[2] = {one - frac_x, frac_x};
    const acc_t weight_y[2] = {one - frac_y, frac_y};
#pragma unroll
    for (int k = 0; k < kCorners; ++k) {
      const int dy = k / 2;
      const int dx = k % 2;
      const int64_t xk = x0 + dx;
      const int64_t yk = y0 + dy;
      valid[k] = xk >= 0 && xk < width && yk >= 0 && yk < height;
      offset[k] = yk * width + xk;
      weight[k] = weight_y[dy] * weight_x[dx];
    }
    return true;
  }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    ms_deform_attn_forward_kernel(const scalar_t* __restrict__ value,
                                  const int64_t* __restrict__ spatial_shapes,
                                  const int64_t* __restrict__ level_start_index,
                                  const scalar_t* __restrict__ sampling_locations,
                                  const scalar_t* __restrict__ attention_weights,
                                  scalar_t* __restrict__ output, const int64_t num_bags,
                                  const int64_t tokens, const int64_t queries, const int heads,
                                  const int channels, const int levels, const int points) {
  using acc_t = at::opmath_type<scalar_t>;
  // The bag index is uniform across a warp, so whole warps leave together.
  const int64_t bag = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (bag >= num_bags) {
    return;
  }
  const int lane = threadIdx.x % kWarpSize;
  const int head = static_cast<int>(bag % heads);
  const int64_t batch_index = bag / (queries * heads);
  const int64_t token_stride = static_cast<int64_t>(heads) * channels;
  const int samples = levels * points;
  const scalar_t* bag_value = value + batch_index * tokens * token_stride + static_cast<int64_t>(head) * channels;
  const scalar_t* bag_locations = sampling_locations + bag * samples * 2;
  const scalar_t* bag_weights = attention_weights + bag * samples;

  for (int channel_base = 0; channel_base < channels; channel_base += kWarpSize) {
    const int channel = channel_base + lane;
    const bool active = channel < channels;
    acc_t acc = 0;
    for (int level = 0; level < levels; ++level) {
      const int64_t height = spatial_shapes[2 * level];
      const int64_t width = spatial_shapes[2 * level + 1];
      const scalar_t* level_value = bag_value + level_start_index[level] * token_stride + channel;
      for (int point = 0; point < points; ++point) {
        const int sample = level * points + point;
        BilinearFootprint<acc_t> fp;
        if (!fp.init(static_cast<acc_t>(bag_locations[2 * sample]),
                     static_cast<acc_t>(bag_locations[2 * sample + 1]), height, width)) {
          continue;
        }
        acc_t sampled = 0;
#pragma unroll
        for (int k = 0; k < kCorners; ++k) {
          if (fp.valid[k] && active) {
            sampled += fp.weight[k] * static_cast<acc_t>(level_value[fp.offset[k] * token_stride]);
          }
        }
        acc += static_cast<acc_t>(bag_weights[sample]) * sampled;
      }
    }
    if (active) {
      output[bag * channels + channel] = static_cast<scalar_t>(acc);
    }
  }
}

// grad_value is accumulated with atomics in acc_t (float for half/bfloat16),
// so reduced-precision gradients do not lose mass to rounding on every add.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    ms_deform_attn_backward_kernel(const scalar_t* __restrict__ value,
                                   const int64_t* __restrict__ spatial_shapes,
                                   const int64_t* __restrict__ level_start_index,
                                   const scalar_t* __restrict__ sampling_locations,
                                   const scalar_t* __restrict__ attention_weights,
                                   const scalar_t* __restrict__ grad_output,
                                   at::opmath_type<scalar_t>* __restrict__ grad_value,
                                   scalar_t* __restrict__ grad_sampling_locations,
                                   scalar_t* __restrict__ grad_attention_weights,
                                   const int64_t num_bags, const int64_t tokens,
                                   const int64_t queries, const int heads, const int channels,
                                   const int levels, const int points) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bag = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (bag >= num_bags) {
    return;
  }
  const int lane = threadIdx.x % kWarpSize;
  const int head = static_cast<int>(bag % heads);
  const int64_t batch_index = bag / (queries * heads);
  const int64_t token_stride = static_cast<int64_t>(heads) * channels;
  const int samples = levels * points;
  const int64_t bag_offset = batch_index * tokens * token_stride + static_cast<int64_t>(head) * channels;
  const scalar_t* bag_value = value + bag_offset;
  acc_t* bag_grad_value = grad_value + bag_offset;
  const scalar_t* bag_grad_output = grad_output + bag * channels;
  const scalar_t* bag_locations = sampling_locations + bag * samples * 2;
  const scalar_t* bag_weights = attention_weights + bag * samples;
  const acc_t one = static_cast<acc_t>(1);

  for (int level = 0; level < levels; ++level) {
    const int64_t height = spatial_shapes[2 * level];
    const int64_t width = spatial_shapes[2 * level + 1];
    const int64_t level_offset = level_start_index[level] * token_stride;
    for (int point = 0; point < points; ++point) {
      const int sample = level * points + point;
      BilinearFootprint<acc_t> fp;
      // Uniform across the warp, so skipping here cannot strand a shuffle.
      // Skipped points keep the zero gradient the outputs were created with.
      if (!fp.init(static_cast<acc_t>(bag_locations[2 * sample]),
                   static_cast<acc_t>(bag_locations[2 * sample + 1]), height, width)) {
        continue;
      }
      const acc_t weight = static_cast<acc_t>(bag_weights[sample]);
      acc_t grad_weight = 0;
      acc_t grad_x = 0;
      acc_t grad_y = 0;
      for (int channel = lane; channel < channels; channel += kWarpSize) {
        const acc_t g = static_cast<acc_t>(bag_grad_output[channel]);
        const int64_t base = level_offset + channel;
        acc_t corner[kCorners];
#pragma unroll
        for (int k = 0; k < kCorners; ++k) {
          corner[k] = fp.valid[k] ? static_cast<acc_t>(bag_value[base + fp.offset[k] * token_stride])
                                  : static_cast<acc_t>(0);
        }
        acc_t sampled = 0;
#pragma unroll
        for (int k = 0; k < kCorners; ++k) {
          sampled += fp.weight[k] * corner[k];
        }
        grad_weight += g * sampled;
        grad_x += g * ((one - fp.frac_y) * (corner[1] - corner[0]) + fp.frac_y * (corner[3] - corner[2]));
        grad_y += g * ((one - fp.frac_x) * (corner[2] - corner[0]) + fp.frac_x * (corner[3] - corner[1]));
        const acc_t scaled = g * weight;
#pragma unroll
        for (int k = 0; k < kCorners; ++k) {
          if (fp.valid[k]) {
            atomicAdd(bag_grad_value + base + fp.offset[k] * token_stride, scaled * fp.weight[k]);
          }
        }
      }
      grad_weight = warp_sum(grad_weight);
      grad_x = warp_sum(grad_x);
      grad_y = warp_sum(grad_y);
      if (lane == 0) {
        const int64_t index = bag * samples + sample;
        grad_attention_weights[index] = static_cast<scalar_t>(grad_weight);
        // Chain rule through pixel = location * size - 0.5.
        grad_sampling_locations[2 * index] = static_cast<scalar_t>(grad_x * weight * static_cast<acc_t>(width));
        grad_sampling_locations[2 * index + 1] =
            static_cast<scalar_t>(grad_y * weight * static_cast<acc_t>(height));
      }
    }
  }
}

struct Problem {
  int64_t batch;
  int64_t tokens;
  int64_t queries;
  int heads;
  int channels;
  int levels;
  int points;

  int64_t bags() const { return batch * queries * heads; }
};

Problem check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                     const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                     const at::Tensor& attention_weights) {
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn: value must be a CUDA tensor");
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(), "ms_deform_attn: all inputs must be on ", value.device(),
                ", got a tensor on ", t->device());
  }
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (batch, tokens, heads, channels), got ",
              value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (batch, queries, heads, levels, points, 2), got ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights must be (batch, queries, heads, levels, points), got ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share a dtype, got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ", attention_weights.scalar_type());
  const int64_t levels = sampling_locations.size(3);
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == levels && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (levels, 2) with levels = ", levels, ", got ",
              spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == levels,
              "ms_deform_attn: level_start_index must be (levels,) with levels = ", levels);
  TORCH_CHECK(sampling_locations.size(0) == value.size(0) && sampling_locations.size(2) == value.size(2),
              "ms_deform_attn: batch or head count of sampling_locations ", sampling_locations.sizes(),
              " does not match value ", value.sizes());
  TORCH_CHECK(value.size(2) <= INT_MAX && value.size(3) <= INT_MAX && levels * sampling_locations.size(4) <= INT_MAX,
              "ms_deform_attn: heads, channels or levels * points too large");
  return Problem{value.size(0),
                 value.size(1),
                 sampling_locations.size(1),
                 static_cast<int>(value.size(2)),
                 static_cast<int>(value.size(3)),
                 static_cast<int>(levels),
                 static_cast<int>(sampling_locations.size(4))};
}

int64_t num_blocks(const Problem& problem) {
  const int64_t blocks = (problem.bags() + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= INT_MAX, "ms_deform_attn: problem too large for a single launch");
  return blocks;
}

}  // namespace

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                       const at::Tensor& level_start_index_in,
                                       const at::Tensor& sampling_locations_in,
                                       const at::Tensor& attention_weights_in) {
  const Problem problem = check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in,
                                       attention_weights_in);
  const c10::cuda::CUDAGuard device_guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor spatial_shapes = spatial_shapes_in.contiguous();
  const at::Tensor level_start_index = level_start_index_in.contiguous();
  const at::Tensor sampling_locations = sampling_locations_in.contiguous();
  const at::Tensor attention_weights = attention_weights_in.contiguous();

  at::Tensor output = at::empty({problem.batch, problem.queries, static_cast<int64_t>(problem.heads) * problem.channels},
                                value.options());
  if (output.numel() == 0) {
    return output;
  }
  if (problem.levels * problem.points == 0) {
    return output.zero_();
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda_forward", [&] {
    ms_deform_attn_forward_kernel<scalar_t><<<num_blocks(problem), kThreadsPerBlock, 0, stream>>>(
        value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(),
        output.data_ptr<scalar_t>(), problem.bags(), problem.tokens, problem.queries, problem.heads,
        problem.channels, problem.levels, problem.points);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::vector<at::Tensor> ms_deform_attn_cuda_backward(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                                     const at::Tensor& level_start_index_in,
                                                     const at::Tensor& sampling_locations_in,
                                                     const at::Tensor& attention_weights_in,
                                                     const at::Tensor& grad_output_in) {
  const Problem problem = check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in,
                                       attention_weights_in);
  TORCH_CHECK(grad_output_in.device() == value_in.device() && grad_output_in.scalar_type() == value_in.scalar_type(),
              "ms_deform_attn: grad_output must match value in device and dtype");
  TORCH_CHECK(grad_output_in.numel() == problem.bags() * problem.channels,
              "ms_deform_attn: grad_output has ", grad_output_in.numel(), " elements, expected ",
              problem.bags() * problem.channels);
  const c10::cuda::CUDAGuard device_guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor spatial_shapes = spatial_shapes_in.contiguous();
  const at::Tensor level_start_index = level_start_index_in.contiguous();
  const at::Tensor sampling_locations = sampling_locations_in.contiguous();
  const at::Tensor attention_weights = attention_weights_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous();

  const at::ScalarType acc_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_sampling_locations = at::zeros_like(sampling_locations);
  at::Tensor grad_attention_weights = at::zeros_like(attention_weights);

  if (problem.bags() > 0 && problem.channels > 0 && problem.levels * problem.points > 0) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      ms_deform_attn_backward_kernel<scalar_t><<<num_blocks(problem), kThreadsPerBlock, 0, stream>>>(
          value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
          sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(),
          grad_output.data_ptr<scalar_t>(), grad_value_acc.data_ptr<acc_t>(),
          grad_sampling_locations.data_ptr<scalar_t>(), grad_attention_weights.data_ptr<scalar_t>(), problem.bags(),
          problem.tokens, problem.queries, problem.heads, problem.channels, problem.levels, problem.points);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_value_acc.to(value.scalar_type()), grad_sampling_locations, grad_attention_weights};
}

}  // namespace samdetr
