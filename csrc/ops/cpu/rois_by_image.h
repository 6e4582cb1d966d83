#pragma once
// Work partitioning for race-free CPU backward kernels: gradients of different images, or
// of different channels, never overlap, so a task owns one (image, channel range) pair and
// visits that image's RoIs in their original order.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../roi_geometry.h"

namespace detframe::ops {

// RoI indices grouped by batch index (a stable counting sort); RoIs whose batch index is
// invalid belong to no image.
class RoIsByImage {
 public:
  template <typename scalar_t>
  RoIsByImage(const scalar_t* rois, int64_t num_rois, int64_t batch_size)
      : start_(batch_size + 1, 0), order_() {
    using T = at::opmath_type<scalar_t>;
    std::vector<int64_t> image(num_rois);
    for (int64_t k = 0; k < num_rois; ++k) {
      image[k] = roi_batch_index(static_cast<T>(rois[k * 5]), batch_size);
      if (image[k] >= 0) {
        ++start_[image[k] + 1];
      }
    }
    for (int64_t b = 0; b < batch_size; ++b) {
      start_[b + 1] += start_[b];
    }
    order_.resize(start_[batch_size]);
    std::vector<int64_t> next(start_.begin(), start_.end() - 1);
    for (int64_t k = 0; k < num_rois; ++k) {
      if (image[k] >= 0) {
        order_[next[image[k]]++] = k;
      }
    }
  }

  // The RoIs of image b, in increasing index order.
  struct Range {
    const int64_t* first;
    const int64_t* last;
    const int64_t* begin() const { return first; }
    const int64_t* end() const { return last; }
  };
  Range rois_of(int64_t b) const {
    return {order_.data() + start_[b], order_.data() + start_[b + 1]};
  }

 private:
  std::vector<int64_t> start_;  // [batch_size + 1] offsets into order_
  std::vector<int64_t> order_;  // RoI indices, grouped by image
};

// Splits (image, channel) space into tasks of contiguous channel ranges: whole images when
// there are at least as many images as threads, else images split into as many channel
// ranges as needed to give every thread a task (each range a multiple of 16 channels, so
// it vectorises and writes whole cache lines).
class ChannelTasks {
 public:
  ChannelTasks(int64_t batch_size, int64_t channels) : batch_(batch_size), channels_(channels) {
    constexpr int64_t kAlign = 16;
    const int64_t threads = at::get_num_threads();
    const int64_t images = std::max<int64_t>(batch_size, 1);
    const int64_t splits = std::max<int64_t>(1, (threads + images - 1) / images);
    chunk_ = (channels + splits - 1) / splits;
    chunk_ = std::max<int64_t>(1, std::min(channels, (chunk_ + kAlign - 1) / kAlign * kAlign));
    per_image_ = (channels + chunk_ - 1) / chunk_;
  }

  int64_t count() const { return batch_ * per_image_; }

  // (image, first channel, one past the last channel) of task t.
  std::tuple<int64_t, int64_t, int64_t> task(int64_t t) const {
    const int64_t b = t / per_image_;
    const int64_t c0 = (t % per_image_) * chunk_;
    return {b, c0, std::min(c0 + chunk_, channels_)};
  }

 private:
  int64_t batch_, channels_, chunk_, per_image_;
};

}  // namespace detframe::ops
