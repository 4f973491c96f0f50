// moe/cuda/buffer.hpp: owning device memory for the CUDA backend: a 1-D array and a row-major
// matrix. Capacity only grows, so after the first batch of a given size no call allocates
// (the backend's workspace is "allocated once and reused"). Move-only: device memory is never
// copied behind the caller's back.
#pragma once

#include <cstddef>
#include <limits>
#include <utility>

#include "moe/config.hpp"

namespace moe::cuda {

template <class T, class D>
class DeviceArray {
 public:
  using value_type = T;
  DeviceArray() = default;
  explicit DeviceArray(Index size) { resize(size); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray(DeviceArray&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)),
        capacity_(std::exchange(other.capacity_, 0)) {}
  DeviceArray& operator=(DeviceArray&& other) noexcept {
    if (this != &other) {
      release();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
      capacity_ = std::exchange(other.capacity_, 0);
    }
    return *this;
  }
  ~DeviceArray() { release(); }

  // Contents are kept only when the capacity suffices; growing leaves the values undefined.
  void resize(Index size) {
    check(size >= 0, "device array size must be >= 0, got ", size);
    check(std::size_t(size) <= std::numeric_limits<std::size_t>::max() / 2 / sizeof(T), "device array of ", size,
          " elements of ", sizeof(T), " bytes: past any byte count an allocation can have");
    if (size > capacity_) {
      release();
      data_ = static_cast<T*>(D::allocate(std::size_t(size) * sizeof(T)));
      capacity_ = size;
    }
    size_ = size;
  }
  T* data() { return data_; }
  const T* data() const { return data_; }
  Index size() const { return size_; }
  Index capacity() const { return capacity_; }
  bool empty() const { return size_ == 0; }

 private:
  void release() {
    if (data_) D::deallocate(data_);
    data_ = nullptr;
    size_ = capacity_ = 0;
  }
  T* data_ = nullptr;
  Index size_ = 0, capacity_ = 0;
};

// A row-major [rows, cols] matrix in device memory; viewable as a MatrixView like Eigen's.
template <class S, class D>
class DeviceMatrix {
 public:
  static constexpr bool IsRowMajor = true;
  DeviceMatrix() = default;
  DeviceMatrix(Index rows, Index cols) { resize(rows, cols); }
  void resize(Index rows, Index cols) {
    check(rows >= 0 && cols >= 0, "device matrix shape [", rows, ", ", cols, "] is negative");
    check(cols == 0 || rows <= std::numeric_limits<Index>::max() / cols, "device matrix shape [", rows, ", ", cols,
          "]: the element count overflows");
    storage_.resize(rows * cols);
    rows_ = rows, cols_ = cols;
  }
  S* data() { return storage_.data(); }
  const S* data() const { return storage_.data(); }
  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  Index size() const { return rows_ * cols_; }

 private:
  DeviceArray<S, D> storage_;
  Index rows_ = 0, cols_ = 0;
};

}  // namespace moe::cuda
