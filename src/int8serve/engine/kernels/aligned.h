// Scratch on 64-byte boundaries for our kernels (gemv.cpp, matmul.cpp).
//
// malloc (and so std::vector) aligns its blocks to 16 bytes. A 512-bit load or a tile row of 64 bytes that starts off
// a 64-byte boundary reads two cache lines, and where a buffer lands depends on the heap's state: matmul.cpp's packed
// rows and sums, std::vectors read through tile loads, made its speed a draw of 0.81-0.99x per process (kept per
// thread, they were placed once) until they were aligned (docs/benchmarks.md, "The bf16 prefill kernel's scratch").

#pragma once

#include <cstdint>
#include <vector>

// Extra elements to allocate so that aligned64 finds 64-byte aligned room for the elements wanted.
template <typename T>
constexpr int64_t kAlignSlack = (64 + sizeof(T) - 1) / sizeof(T);

// The first 64-byte aligned element of storage (allocated with kAlignSlack<T> elements to spare).
template <typename T>
T* aligned64(std::vector<T>& storage) {
  return storage.data() + (64 - reinterpret_cast<uintptr_t>(storage.data()) % 64) % 64 / sizeof(T);
}
