#pragma once
// Geometry shared by every backend (CPU, CUDA) of detframe's RoI operators, so that the
// kernels differ only in how they schedule the work, never in what they compute.
//
// Conventions
//   input  [N, C, H, W]   feature map of N images
//   rois   [K, 5]         rows (batch_index, x1, y1, x2, y2) in input-image coordinates;
//                         spatial_scale maps them onto the feature map
//   output [K, C, PH, PW] one PH x PW grid of bins per RoI
//   T                     arithmetic type: at::opmath_type of the tensor dtype (float for
//                         half, bfloat16 and float; double for double)
//
// The formulas follow torchvision's kernels exactly (same expressions, same order of
// floating-point operations) so that results agree to the last bit in float64.
//
// Invalid RoIs: a RoI whose batch index is not an integer in [0, N), or whose coordinates
// are not all finite, is never used to index memory. Its output is all zeros and it
// contributes no gradient. (The CPU kernels reject an out-of-range batch index with an
// error before they start; a CUDA kernel cannot raise without a device synchronisation, so
// there the zero output is the contract.)

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace detframe::ops {

// Upper bound on the adaptive sampling grid along one side of a bin. It keeps the integer
// conversion defined for absurd finite boxes and every sample index exact in float (i + 0.5
// below 2^23). It changes no result torchvision can give: torchvision multiplies the two
// grid sides in 32-bit int, which overflows long before either side reaches 2^20.
constexpr int64_t kMaxSamplingGrid = int64_t{1} << 20;

// True for finite values; false for NaN and +-inf (inf - inf and NaN - NaN are NaN).
template <typename T>
C10_HOST_DEVICE inline bool is_finite(T v) {
  return v - v == T(0);
}

// The batch index stored in a RoI row, or -1 when it is not an integer in [0, batch_size).
template <typename T>
C10_HOST_DEVICE inline int64_t roi_batch_index(T value, int64_t batch_size) {
  if (!(value >= T(0) && value < static_cast<T>(batch_size))) {
    return -1;  // also catches NaN, for which every comparison is false
  }
  const auto index = static_cast<int64_t>(value);
  return static_cast<T>(index) == value ? index : -1;
}

// ---------------------------------------------------------------------------------------
// RoIAlign: each bin averages grid_h x grid_w bilinear samples.

template <typename T>
struct RoIAlignGeometry {
  T start_h, start_w;      // top-left corner of the RoI on the feature map
  T bin_h, bin_w;          // size of one bin
  int64_t grid_h, grid_w;  // sampling points per bin along each side
  T count;                 // number of samples averaged per bin, at least 1
};

// ceil(extent) as a grid size, clamped to [0, kMaxSamplingGrid].
template <typename T>
C10_HOST_DEVICE inline int64_t adaptive_grid(T extent) {
  if (!(extent > T(0))) {
    return 0;
  }
  if (extent >= static_cast<T>(kMaxSamplingGrid)) {
    return kMaxSamplingGrid;
  }
  return static_cast<int64_t>(std::ceil(extent));
}

// Fills `g` for one RoI row; returns false when a coordinate is not finite.
template <typename T, typename R>
C10_HOST_DEVICE inline bool roi_align_geometry(
    const R* roi,
    T spatial_scale,
    int64_t pooled_h,
    int64_t pooled_w,
    int64_t sampling_ratio,
    bool aligned,
    RoIAlignGeometry<T>& g) {
  // No rounding of the box: this detail is what makes RoIAlign "aligned" with the image.
  const T offset = aligned ? T(0.5) : T(0);
  const T x1 = static_cast<T>(roi[1]) * spatial_scale - offset;
  const T y1 = static_cast<T>(roi[2]) * spatial_scale - offset;
  const T x2 = static_cast<T>(roi[3]) * spatial_scale - offset;
  const T y2 = static_cast<T>(roi[4]) * spatial_scale - offset;
  if (!(is_finite(x1) && is_finite(y1) && is_finite(x2) && is_finite(y2))) {
    return false;
  }
  T roi_w = x2 - x1;
  T roi_h = y2 - y1;
  if (!aligned) {  // legacy behaviour: malformed RoIs are forced to be at least 1 x 1
    roi_w = roi_w > T(1) ? roi_w : T(1);
    roi_h = roi_h > T(1) ? roi_h : T(1);
  }
  g.start_h = y1;
  g.start_w = x1;
  g.bin_h = roi_h / static_cast<T>(pooled_h);
  g.bin_w = roi_w / static_cast<T>(pooled_w);
  g.grid_h = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(g.bin_h);
  g.grid_w = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(g.bin_w);
  const int64_t samples = g.grid_h * g.grid_w;
  g.count = static_cast<T>(samples > 1 ? samples : 1);
  return true;
}

// Coordinate of sample `i` of `grid` inside bin `bin` along one axis.
template <typename T>
C10_HOST_DEVICE inline T sample_coord(T start, int64_t bin, T bin_size, int64_t i, int64_t grid) {
  return start + static_cast<T>(bin) * bin_size +
      static_cast<T>(static_cast<float>(i) + 0.5f) * bin_size / static_cast<T>(grid);
}

// The first i in [begin, end) for which pred(i) is false, where pred is true on a prefix of
// [begin, end) and false after it: O(log(end - begin)) calls of pred.
template <typename Pred>
C10_HOST_DEVICE inline int64_t partition_point(int64_t begin, int64_t end, const Pred& pred) {
  while (begin < end) {
    const int64_t mid = begin + (end - begin) / 2;
    if (pred(mid)) {
      begin = mid + 1;
    } else {
      end = mid;
    }
  }
  return begin;
}

// The samples [first, last) of one bin along one axis whose coordinate lies in [-1, size].
struct SampleRun {
  int64_t first, last;
};

// Bounded adaptive sampling. A sample outside [-1, size] adds exactly nothing to its bin's
// sum (bilinear_taps rejects it) yet counts in the divisor, so only the samples inside need
// a visit. sample_coord is monotone in i for a fixed bin (each of its rounded steps is), so
// those samples form one run, found by bisection on the very expression the kernels
// evaluate: the sums are bit for bit those of visiting all grid samples. Along one axis a
// RoI's runs hold at most about 2 * (size + 2) + P samples in all (adaptive samples are at
// least half a pixel apart), however large the box, at the cost of O(log grid) per bin.
// A non-finite coordinate (a box whose size overflows) gives an empty run.
template <typename T>
C10_HOST_DEVICE inline SampleRun sample_run(
    T start,
    int64_t bin,
    T bin_size,
    int64_t grid,
    int64_t size) {
  const T lo = T(-1);
  const T hi = static_cast<T>(size);
  auto coord = [&](int64_t i) { return sample_coord(start, bin, bin_size, i, grid); };
  SampleRun run;
  if (bin_size < T(0)) {  // coordinates decrease with i (aligned=False never gets here)
    run.first = partition_point(int64_t{0}, grid, [&](int64_t i) { return coord(i) > hi; });
    run.last = partition_point(run.first, grid, [&](int64_t i) { return coord(i) >= lo; });
  } else {  // coordinates increase with i; NaN counts as below the map
    run.first =
        partition_point(int64_t{0}, grid, [&](int64_t i) { return !(coord(i) >= lo); });
    run.last = partition_point(run.first, grid, [&](int64_t i) { return coord(i) <= hi; });
  }
  return run;
}

// The four taps of a bilinear sample: offsets into one H x W plane and their weights.
template <typename T>
struct BilinearTaps {
  int64_t offset[4];
  T weight[4];
};

// Bilinear taps for the point (y, x); returns false when the point lies more than one
// pixel outside the feature map, where the sample counts as zero.
template <typename T>
C10_HOST_DEVICE inline bool bilinear_taps(
    T y,
    T x,
    int64_t height,
    int64_t width,
    BilinearTaps<T>& taps) {
  if (!(y >= T(-1) && y <= static_cast<T>(height) && x >= T(-1) &&
        x <= static_cast<T>(width))) {
    return false;
  }
  y = y <= T(0) ? T(0) : y;
  x = x <= T(0) ? T(0) : x;
  int64_t y_low = static_cast<int64_t>(y);
  int64_t x_low = static_cast<int64_t>(x);
  int64_t y_high = y_low + 1;
  int64_t x_high = x_low + 1;
  if (y_low >= height - 1) {
    y_high = y_low = height - 1;
    y = static_cast<T>(y_low);
  }
  if (x_low >= width - 1) {
    x_high = x_low = width - 1;
    x = static_cast<T>(x_low);
  }
  const T ly = y - static_cast<T>(y_low);
  const T lx = x - static_cast<T>(x_low);
  const T hy = T(1) - ly;
  const T hx = T(1) - lx;
  taps.offset[0] = y_low * width + x_low;
  taps.offset[1] = y_low * width + x_high;
  taps.offset[2] = y_high * width + x_low;
  taps.offset[3] = y_high * width + x_high;
  taps.weight[0] = hy * hx;
  taps.weight[1] = hy * lx;
  taps.weight[2] = ly * hx;
  taps.weight[3] = ly * lx;
  return true;
}

// ---------------------------------------------------------------------------------------
// RoIPool: each bin is the maximum over a window of whole feature-map cells.

template <typename T>
struct RoIPoolGeometry {
  T start_h, start_w;  // rounded top-left cell of the RoI (an integer, kept in T)
  T bin_h, bin_w;      // size of one bin in cells
};

// C's round(): halves go away from zero (std::round and CUDA's round agree).
template <typename T>
C10_HOST_DEVICE inline T round_half_away(T v) {
  return std::round(v);
}

// Fills `g` for one RoI row; returns false when a coordinate is not finite.
template <typename T, typename R>
C10_HOST_DEVICE inline bool roi_pool_geometry(
    const R* roi,
    T spatial_scale,
    int64_t pooled_h,
    int64_t pooled_w,
    RoIPoolGeometry<T>& g) {
  const T x1 = round_half_away(static_cast<T>(roi[1]) * spatial_scale);
  const T y1 = round_half_away(static_cast<T>(roi[2]) * spatial_scale);
  const T x2 = round_half_away(static_cast<T>(roi[3]) * spatial_scale);
  const T y2 = round_half_away(static_cast<T>(roi[4]) * spatial_scale);
  if (!(is_finite(x1) && is_finite(y1) && is_finite(x2) && is_finite(y2))) {
    return false;
  }
  // Malformed RoIs are forced to be at least one cell.
  const T roi_w = x2 - x1 + T(1) > T(1) ? x2 - x1 + T(1) : T(1);
  const T roi_h = y2 - y1 + T(1) > T(1) ? y2 - y1 + T(1) : T(1);
  g.start_h = y1;
  g.start_w = x1;
  g.bin_h = roi_h / static_cast<T>(pooled_h);
  g.bin_w = roi_w / static_cast<T>(pooled_w);
  return true;
}

// Clamps start + offset into [0, limit] and converts it to an index.
template <typename T>
C10_HOST_DEVICE inline int64_t clamp_cell(T start, T offset, int64_t limit) {
  const T v = offset + start;
  return v <= T(0) ? 0 : (v >= static_cast<T>(limit) ? limit : static_cast<int64_t>(v));
}

// The window [h0, h1) x [w0, w1) of bin (ph, pw), clipped to the feature map; it is empty
// when h1 <= h0 or w1 <= w0.
struct Window {
  int64_t h0, h1, w0, w1;
  C10_HOST_DEVICE bool empty() const {
    return h1 <= h0 || w1 <= w0;
  }
};

template <typename T>
C10_HOST_DEVICE inline Window roi_pool_window(
    const RoIPoolGeometry<T>& g,
    int64_t ph,
    int64_t pw,
    int64_t height,
    int64_t width) {
  Window win;
  win.h0 = clamp_cell(g.start_h, std::floor(static_cast<T>(ph) * g.bin_h), height);
  win.h1 = clamp_cell(g.start_h, std::ceil(static_cast<T>(ph + 1) * g.bin_h), height);
  win.w0 = clamp_cell(g.start_w, std::floor(static_cast<T>(pw) * g.bin_w), width);
  win.w1 = clamp_cell(g.start_w, std::ceil(static_cast<T>(pw + 1) * g.bin_w), width);
  return win;
}

}  // namespace detframe::ops
