// Multiresolution hash-grid encoding on the CPU (OpenMP), laid out and indexed as tiny-cuda-nn's
// HashGrid (CoherentPrime hash, linear interpolation). Semantics are those of
// microdreamer/render/hashgrid_torch.py (the reference the tests compare against); like tcnn, the
// position is one fused multiply-add and the features accumulate by fmaf in corner order.
//
// Every pass runs level by level, so only one level's table (at most 2^log2_hashmap_size entries,
// 4 MiB for threestudio's grid) is being read or written at a time and stays in cache:
//   forward      threads split the points; writes a level-major [L, N, F] buffer (sequential stores)
//                that is transposed into the [N, L*F] output at the end;
//   backward     threads split the levels (each level owns a disjoint slice of the table, so the
//                scatter-add needs no atomics, and each level adds its points in order: the
//                gradient does not depend on the thread count); reads the output gradient transposed
//                to level-major first;
//   backward_x   threads split the points (the same static split at every level, so each point's
//                gradient is summed by one thread, level after level).

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr uint32_t PRIME_Y = 2654435761u, PRIME_Z = 805459861u;

struct Level {
  float scale;
  uint32_t res;
  uint32_t size;  // entries (a power of two when hashed)
  int64_t offset;  // first entry in the flat table
  bool hashed;
};

std::vector<Level> read_levels(const torch::Tensor& scales, const torch::Tensor& table) {
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && table.dtype() == torch::kInt64, "level table dtypes");
  TORCH_CHECK(table.dim() == 2 && table.size(1) == 4 && table.size(0) == scales.numel(), "level table shape");
  const auto s = scales.accessor<float, 1>();
  const auto t = table.accessor<int64_t, 2>();  // res, size, offset, hashed
  std::vector<Level> levels(scales.numel());
  for (int64_t l = 0; l < scales.numel(); ++l) {
    levels[l] = {s[l], static_cast<uint32_t>(t[l][0]), static_cast<uint32_t>(t[l][1]), t[l][2], t[l][3] != 0};
  }
  return levels;
}

// The cell of point p at a level: the 8 corners' entries (relative to the level's offset), the
// fractional position and the per-dimension weights w[d][0] = 1 - frac, w[d][1] = frac.
struct Cell {
  uint32_t entry[8];
  float w[3][2];
};

inline void locate(const float* __restrict p, const Level& lv, Cell& c) {
  uint32_t g[3];
  for (int d = 0; d < 3; ++d) {
    const float pos = std::fma(lv.scale, p[d], 0.5f);
    const float fl = std::floor(pos);
    g[d] = static_cast<uint32_t>(static_cast<int32_t>(fl));
    const float frac = pos - fl;
    c.w[d][0] = 1.f - frac;
    c.w[d][1] = frac;
  }
  if (lv.hashed) {
    const uint32_t mask = lv.size - 1;
    const uint32_t hx[2] = {g[0], g[0] + 1};
    const uint32_t hy[2] = {g[1] * PRIME_Y, (g[1] + 1) * PRIME_Y};
    const uint32_t hz[2] = {g[2] * PRIME_Z, (g[2] + 1) * PRIME_Z};
    for (int k = 0; k < 8; ++k) c.entry[k] = (hx[k & 1] ^ hy[(k >> 1) & 1] ^ hz[k >> 2]) & mask;
  } else {
    const uint32_t r = lv.res, r2 = lv.res * lv.res;
    const uint32_t base = g[0] + g[1] * r + g[2] * r2;
    const uint32_t step[8] = {0, 1, r, r + 1, r2, r2 + 1, r2 + r, r2 + r + 1};
    // Inside the grid no index reaches the table size; only cells on the far faces (x = 1) and
    // wrapped negative cells need the modulo.
    const bool inside = g[0] < r - 1 && g[1] < r - 1 && g[2] < r - 1 && base + step[7] < lv.size;
    for (int k = 0; k < 8; ++k) c.entry[k] = inside ? base + step[k] : (base + step[k]) % lv.size;
  }
}

inline float weight(const Cell& c, int k) {
  float w = 1.f;
  w *= c.w[0][k & 1];
  w *= c.w[1][(k >> 1) & 1];
  w *= c.w[2][k >> 2];
  return w;
}

// Points are taken in blocks: the block's cells are located first and their table rows prefetched,
// then read, so the cache misses of a block overlap instead of stalling one after another.
constexpr int64_t BLOCK = 16;

template <int F, bool WRITE>
inline void locate_block(const float* x, const Level& lv, int64_t i0, int64_t m, const float* table, Cell* cells) {
  for (int64_t j = 0; j < m; ++j) {
    locate(x + 3 * (i0 + j), lv, cells[j]);
    for (int k = 0; k < 8; ++k) __builtin_prefetch(table + static_cast<int64_t>(cells[j].entry[k]) * F, WRITE);
  }
}

// Level-major [L, N, F] <-> the output layout [N, L*F], in parallel over blocks of points.
template <int F, bool TO_LEVEL_MAJOR>
void transpose(float* level_major, float* point_major, int64_t n_levels, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    const int64_t i1 = std::min(n, i0 + 64);
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t l = 0; l < n_levels; ++l) {
        float* a = level_major + (l * n + i) * F;
        float* b = point_major + (i * n_levels + l) * F;
        for (int f = 0; f < F; ++f) {
          if (TO_LEVEL_MAJOR) a[f] = b[f]; else b[f] = a[f];
        }
      }
    }
  }
}

// Calls body(l, table, point, cell) for every point at every level, level after level; threads split
// the points the same (static) way at every level, so each point is handled by one thread.
template <int F, typename Body>
void each_level_by_points(const float* x, const float* params, const std::vector<Level>& levels, int64_t n,
                          Body body) {
  for (int64_t l = 0; l < static_cast<int64_t>(levels.size()); ++l) {
    const Level& lv = levels[l];
    const float* table = params + lv.offset * F;
#pragma omp parallel for schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {
      const int64_t m = std::min(BLOCK, n - i0);
      Cell cells[BLOCK];
      locate_block<F, false>(x, lv, i0, m, table, cells);
      for (int64_t j = 0; j < m; ++j) body(l, table, i0 + j, cells[j]);
    }
  }
}

template <int F>
void forward_impl(const float* x, const float* params, const std::vector<Level>& levels, int64_t n, float* out) {
  const int64_t n_levels = static_cast<int64_t>(levels.size());
  std::vector<float> level_major(static_cast<size_t>(n_levels * n * F));
  float* dst = level_major.data();
  each_level_by_points<F>(x, params, levels, n, [&](int64_t l, const float* table, int64_t i, const Cell& c) {
    float acc[F] = {};
    for (int k = 0; k < 8; ++k) {
      const float w = weight(c, k);
      const float* v = table + static_cast<int64_t>(c.entry[k]) * F;
      for (int f = 0; f < F; ++f) acc[f] = std::fma(w, v[f], acc[f]);
    }
    for (int f = 0; f < F; ++f) dst[(l * n + i) * F + f] = acc[f];
  });
  transpose<F, false>(dst, out, n_levels, n);
}

template <int F>
void backward_impl(const float* x, const float* grad, const std::vector<Level>& levels, int64_t n, float* g_params) {
  const int64_t n_levels = static_cast<int64_t>(levels.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t l = 0; l < n_levels; ++l) {
    const Level& lv = levels[l];
    float* table = g_params + lv.offset * F;
    const float* src = grad + l * n * F;
    for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {
      const int64_t m = std::min(BLOCK, n - i0);
      Cell cells[BLOCK];
      locate_block<F, true>(x, lv, i0, m, table, cells);
      for (int64_t j = 0; j < m; ++j) {
        const float* g = src + (i0 + j) * F;
        for (int k = 0; k < 8; ++k) {
          const float w = weight(cells[j], k);
          float* v = table + static_cast<int64_t>(cells[j].entry[k]) * F;
          for (int f = 0; f < F; ++f) v[f] += w * g[f];
        }
      }
    }
  }
}

template <int F>
void backward_x_impl(const float* x, const float* params, const float* grad, const std::vector<Level>& levels,
                     int64_t n, float* g_x) {
  each_level_by_points<F>(x, params, levels, n, [&](int64_t l, const float* table, int64_t i, const Cell& c) {
    const float* g = grad + (l * n + i) * F;
    float d[3] = {0.f, 0.f, 0.f};
    for (int k = 0; k < 8; ++k) {
      const float* v = table + static_cast<int64_t>(c.entry[k]) * F;
      float gv = 0.f;
      for (int f = 0; f < F; ++f) gv += g[f] * v[f];
      const int bx = k & 1, by = (k >> 1) & 1, bz = k >> 2;
      // d weight / d frac_d: the other two factors, signed by whether the corner is the +1 one
      d[0] += gv * (bx ? 1.f : -1.f) * c.w[1][by] * c.w[2][bz];
      d[1] += gv * (by ? 1.f : -1.f) * c.w[0][bx] * c.w[2][bz];
      d[2] += gv * (bz ? 1.f : -1.f) * c.w[0][bx] * c.w[1][by];
    }
    for (int q = 0; q < 3; ++q) g_x[3 * i + q] += levels[l].scale * d[q];
  });
}

#define DISPATCH_F(F_VALUE, ...)                                             \
  switch (F_VALUE) {                                                           \
    case 1: { constexpr int F = 1; __VA_ARGS__; break; }                       \
    case 2: { constexpr int F = 2; __VA_ARGS__; break; }                       \
    case 4: { constexpr int F = 4; __VA_ARGS__; break; }                       \
    case 8: { constexpr int F = 8; __VA_ARGS__; break; }                       \
    default: TORCH_CHECK(false, "n_features_per_level must be 1, 2, 4 or 8"); \
  }

void check_points(const torch::Tensor& x) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2 && x.size(1) == 3,
              "x must be a contiguous float32 [N,3] tensor");
}

// x [N,3], params flat [P] → features [N, L*F] (level-major within a row).
torch::Tensor forward(torch::Tensor x, torch::Tensor params, torch::Tensor scales, torch::Tensor table,
                      int64_t n_features) {
  check_points(x);
  TORCH_CHECK(params.dtype() == torch::kFloat32 && params.is_contiguous(), "params must be contiguous float32");
  const auto levels = read_levels(scales, table);
  const int64_t n = x.size(0);
  auto out = torch::empty({n, static_cast<int64_t>(levels.size()) * n_features}, x.options());
  DISPATCH_F(n_features,
             forward_impl<F>(x.data_ptr<float>(), params.data_ptr<float>(), levels, n, out.data_ptr<float>()));
  return out;
}

// Gradients w.r.t. params (flat [P]) and x ([N,3]) from the output gradient [N, L*F]; each is
// computed only when asked for (else an empty tensor).
std::vector<torch::Tensor> backward(torch::Tensor grad, torch::Tensor x, torch::Tensor params, torch::Tensor scales,
                                    torch::Tensor table, int64_t n_features, bool need_params, bool need_x) {
  check_points(x);
  TORCH_CHECK(params.dtype() == torch::kFloat32 && params.is_contiguous(), "params must be contiguous float32");
  const auto levels = read_levels(scales, table);
  const int64_t n = x.size(0), n_levels = static_cast<int64_t>(levels.size());
  TORCH_CHECK(grad.dtype() == torch::kFloat32 && grad.is_contiguous() && grad.dim() == 2 && grad.size(0) == n &&
                  grad.size(1) == n_levels * n_features,
              "grad must be a contiguous float32 [N, L*F] tensor");
  auto level_major = torch::empty({n_levels, n, n_features}, x.options());
  auto g_params = torch::zeros({need_params ? params.numel() : 0}, x.options());
  auto g_x = need_x ? torch::zeros_like(x) : torch::empty({0}, x.options());
  DISPATCH_F(n_features, {
    transpose<F, true>(level_major.data_ptr<float>(), grad.data_ptr<float>(), n_levels, n);
    const float* g = level_major.data_ptr<float>();
    if (need_params) backward_impl<F>(x.data_ptr<float>(), g, levels, n, g_params.data_ptr<float>());
    if (need_x) backward_x_impl<F>(x.data_ptr<float>(), params.data_ptr<float>(), g, levels, n, g_x.data_ptr<float>());
  });
  return {g_params, g_x};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multiresolution hash-grid encoding (tiny-cuda-nn layout) on the CPU: forward and backward";
  m.def("forward", &forward, "Encode points (level-major output)", py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "Gradients w.r.t. the flat parameters and the points",
        py::call_guard<py::gil_scoped_release>());
}
