// AMX tile registers for our kernels (gemv.cpp: AMX-INT8 decode; matmul.cpp: AMX-BF16 prefill), shared by both.
//
// The tile instructions are inline assembly with memory operands the compiler can see: GCC's tile intrinsics hide
// from it what ldtilecfg and tilestored read and write (ggml-org/llama.cpp#26954 is that bug). A thread configures
// its tiles (ldtilecfg) before use and releases them (tiles_release) after, since other code on the same thread
// (oneDNN, the other kernel) configures them its own way. Linux grants the tile data state once per process
// (amx_permission); the caller checks the CPU's flags first.

#pragma once

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of each tile register
  uint8_t rows[16] = {};
};

inline void tiles_configure(const TileConfig& config) { asm volatile("ldtilecfg %0" : : "m"(config)); }

inline void tiles_release() { asm volatile("tilerelease" ::: "memory"); }

// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): true if this process may use the tile data (asked once).
inline bool amx_permission() {
  static const bool granted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

#define INT8SERVE_TILE_LOAD(T, BASE, STRIDE) \
  asm volatile("tileloadd (%0,%1,1), %%tmm" #T : : "r"(BASE), "r"(static_cast<int64_t>(STRIDE)) : "memory")
#define INT8SERVE_TILE_STORE(T, BASE, STRIDE) \
  asm volatile("tilestored %%tmm" #T ", (%0,%1,1)" : : "r"(BASE), "r"(static_cast<int64_t>(STRIDE)) : "memory")
#define INT8SERVE_TILE_ZERO(T) asm volatile("tilezero %%tmm" #T ::)
