// Tile-based rasterization of projected 3D Gaussians on the CPU (OpenMP), forward and backward.
//
// Input is the output of the shared torch projection (means2d, conics, depths, tile rects); the
// semantics are those of microdreamer/render/gaussians_torch.py. Layout of the work:
//   1. binning, per view: visible Gaussians sorted by (depth, index), appended to each tile they
//      touch, so every tile's list is depth-sorted (a counting sort by tile, no global sort);
//   2. forward, parallel over (view, tile): a tile's 256 pixels are updated one Gaussian at a time
//      (rows of 16 lanes that the compiler vectorizes); the final transmittance and the number of
//      list entries each pixel consumed are stored for the backward;
//   3. backward, parallel over (view, tile): the list is walked back to front, recovering each
//      pixel's transmittance by division as 3DGS does; per-entry gradients go to a buffer indexed
//      like the lists, then are summed per view in list order (deterministic, no atomics).
// A Gaussian only touches the rows/tiles where opacity·exp(-power) can reach alpha_min (the
// ellipse power <= log(opacity/alpha_min), widened by one pixel), a superset of the pixels the
// threshold test accepts, so the results equal the reference's.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int TS = 16;
constexpr int TP = TS * TS;

// Per-(view, Gaussian) record used by the raster loops.
struct Splat {
  float mx, my, a, b, c, op, r, g, bl, z;
  float ylo, yhi;  // pixel-centre rows that can reach alpha_min: |my - (y + 0.5)| <= half-height
};
static_assert(sizeof(Splat) == 12 * sizeof(float), "Splat must stay a flat float record");
constexpr int SPLAT_FLOATS = 12;
constexpr int GRAD_FLOATS = 10;  // d/d(mx, my, a, b, c, opacity, r, g, b, z)

struct Consts {
  float alpha_min, alpha_max, t_min;
};

// exp(x) for x <= 0 (Cephes-style range reduction and polynomial, about 1 ulp), written so that
// loops calling it vectorize; forward and backward share it so their threshold tests agree.
inline float exp_neg(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float fi = std::floor(x * 1.44269504088896341f + 0.5f);
  float f = x - fi * 0.693359375f;
  f = f + fi * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  const float y = p * f * f + f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fi) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return y * scale;
}

struct Bins {
  torch::Tensor offsets;  // [B*tiles+1] int32: tile t's list is ids[offsets[t] .. offsets[t+1])
  torch::Tensor ids;      // [n_isect] int32 Gaussian index within its view
  torch::Tensor splats;   // [B,N,12] float
};

Bins bin(const torch::Tensor& means2d, const torch::Tensor& conics, const torch::Tensor& depths,
         const torch::Tensor& opacities, const torch::Tensor& colors, const torch::Tensor& rects,
         int width, int height, const Consts& k) {
  const int64_t B = means2d.size(0), N = means2d.size(1);
  const int tw = (width + TS - 1) / TS, th = (height + TS - 1) / TS, nt = tw * th;
  auto splats = torch::empty({B, N, SPLAT_FLOATS}, means2d.options());
  // Tight tile rect per (view, Gaussian); x1 <= x0 means not drawn.
  std::vector<int32_t> tight(static_cast<size_t>(B * N * 4));
  std::vector<std::vector<int32_t>> order(B);
  std::vector<int64_t> view_count(B + 1, 0);
  std::vector<std::vector<int32_t>> tile_count(B, std::vector<int32_t>(nt + 1, 0));

  const float* m2 = means2d.data_ptr<float>();
  const float* cn = conics.data_ptr<float>();
  const float* dp = depths.data_ptr<float>();
  const float* opa = opacities.data_ptr<float>();
  const float* col = colors.data_ptr<float>();
  const int32_t* rc = rects.data_ptr<int32_t>();
  float* sp = splats.data_ptr<float>();

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) {
    std::vector<std::pair<float, int32_t>> keyed;
    keyed.reserve(N);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t bi = b * N + i;
      const float mx = m2[bi * 2], my = m2[bi * 2 + 1];
      const float a = cn[bi * 3], bb = cn[bi * 3 + 1], c = cn[bi * 3 + 2];
      const float op = opa[i];
      Splat s{mx, my, a, bb, c, op, col[i * 3], col[i * 3 + 1], col[i * 3 + 2], dp[bi], 0.f, -1.f};
      int32_t* t = &tight[bi * 4];
      t[0] = t[1] = t[2] = t[3] = 0;
      const int32_t* r = &rc[bi * 4];
      const float det = a * c - bb * bb;
      if (r[2] > r[0] && r[3] > r[1] && op >= k.alpha_min && det > 0.f) {
        const float level = 2.0f * std::log(op / k.alpha_min);
        const float hx = std::sqrt(level * c / det) + 1.0f;  // ellipse half-width (+1 px)
        const float hy = std::sqrt(level * a / det) + 1.0f;
        const int x0 = std::max<int>(r[0], static_cast<int>(std::floor((mx - hx - 0.5f) / TS)));
        const int x1 = std::min<int>(r[2], static_cast<int>(std::floor((mx + hx - 0.5f) / TS)) + 1);
        const int y0 = std::max<int>(r[1], static_cast<int>(std::floor((my - hy - 0.5f) / TS)));
        const int y1 = std::min<int>(r[3], static_cast<int>(std::floor((my + hy - 0.5f) / TS)) + 1);
        if (x1 > x0 && y1 > y0) {
          t[0] = x0, t[1] = y0, t[2] = x1, t[3] = y1;
          s.ylo = my - hy - 0.5f;
          s.yhi = my + hy - 0.5f;
          keyed.emplace_back(dp[bi], static_cast<int32_t>(i));
        }
      }
      std::memcpy(&sp[bi * SPLAT_FLOATS], &s, sizeof(Splat));
    }
    std::sort(keyed.begin(), keyed.end());
    auto& ord = order[b];
    ord.resize(keyed.size());
    auto& cnt = tile_count[b];
    int64_t total = 0;
    for (size_t j = 0; j < keyed.size(); ++j) {
      const int32_t i = keyed[j].second;
      ord[j] = i;
      const int32_t* t = &tight[(b * N + i) * 4];
      for (int ty = t[1]; ty < t[3]; ++ty)
        for (int tx = t[0]; tx < t[2]; ++tx) ++cnt[ty * tw + tx];
      total += static_cast<int64_t>(t[2] - t[0]) * (t[3] - t[1]);
    }
    view_count[b + 1] = total;
  }
  for (int64_t b = 0; b < B; ++b) view_count[b + 1] += view_count[b];
  const int64_t n_isect = view_count[B];
  TORCH_CHECK(n_isect < INT32_MAX, "too many tile/Gaussian pairs for int32 offsets");
  auto offsets = torch::empty({B * nt + 1}, rects.options());
  auto ids = torch::empty({n_isect}, rects.options());
  int32_t* off = offsets.data_ptr<int32_t>();
  int32_t* idp = ids.data_ptr<int32_t>();
  off[B * nt] = static_cast<int32_t>(n_isect);

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) {
    auto& cnt = tile_count[b];
    std::vector<int32_t> cursor(nt);
    int64_t acc = view_count[b];
    for (int t = 0; t < nt; ++t) {
      off[b * nt + t] = static_cast<int32_t>(acc);
      cursor[t] = static_cast<int32_t>(acc);
      acc += cnt[t];
    }
    for (const int32_t i : order[b]) {
      const int32_t* t = &tight[(b * N + i) * 4];
      for (int ty = t[1]; ty < t[3]; ++ty)
        for (int tx = t[0]; tx < t[2]; ++tx) idp[cursor[ty * tw + tx]++] = i;
    }
  }
  return {offsets, ids, splats};
}

// Rows [r0, r1) of the tile (local) that Gaussian s can touch.
inline void row_range(const Splat& s, int py0, int rows, int& r0, int& r1) {
  r0 = std::max(0, static_cast<int>(std::ceil(s.ylo)) - py0);
  r1 = std::min(rows, static_cast<int>(std::floor(s.yhi)) - py0 + 1);
}

}  // namespace

std::vector<torch::Tensor> forward(torch::Tensor means2d, torch::Tensor conics, torch::Tensor depths,
                                   torch::Tensor opacities, torch::Tensor colors,
                                   torch::Tensor background, torch::Tensor rects, int64_t width,
                                   int64_t height, double alpha_min, double alpha_max, double t_min) {
  for (const auto* t : {&means2d, &conics, &depths, &opacities, &colors, &background}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 && t->is_contiguous(),
                "gaussians.forward expects contiguous float32 CPU tensors");
  }
  TORCH_CHECK(rects.scalar_type() == torch::kInt32 && rects.is_contiguous(), "rects must be int32");
  const Consts k{static_cast<float>(alpha_min), static_cast<float>(alpha_max), static_cast<float>(t_min)};
  const int W = static_cast<int>(width), H = static_cast<int>(height);
  const int64_t B = means2d.size(0), N = means2d.size(1);
  const int tw = (W + TS - 1) / TS, th = (H + TS - 1) / TS, nt = tw * th;

  Bins bins = bin(means2d, conics, depths, opacities, colors, rects, W, H, k);
  auto fopt = means2d.options();
  auto rgb = torch::empty({B, 3, H, W}, fopt);
  auto alpha = torch::empty({B, 1, H, W}, fopt);
  auto depth = torch::empty({B, 1, H, W}, fopt);
  auto t_final = torch::empty({B, H, W}, fopt);
  auto n_used = torch::empty({B, H, W}, rects.options());

  const int32_t* off = bins.offsets.data_ptr<int32_t>();
  const int32_t* ids = bins.ids.data_ptr<int32_t>();
  const Splat* splats = reinterpret_cast<const Splat*>(bins.splats.data_ptr<float>());
  const float* bg = background.data_ptr<float>();
  float* o_rgb = rgb.data_ptr<float>();
  float* o_alpha = alpha.data_ptr<float>();
  float* o_depth = depth.data_ptr<float>();
  float* o_t = t_final.data_ptr<float>();
  int32_t* o_n = n_used.data_ptr<int32_t>();
  const int64_t HW = static_cast<int64_t>(H) * W;

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t job = 0; job < B * nt; ++job) {
    const int64_t b = job / nt;
    const int tile = static_cast<int>(job % nt);
    const int px0 = (tile % tw) * TS, py0 = (tile / tw) * TS;
    const int rows = std::min(TS, H - py0), cols = std::min(TS, W - px0);
    alignas(64) float T[TP], ar[TP], ag[TP], ab[TP], ad[TP], live[TP];
    alignas(64) int32_t used[TP];
    for (int p = 0; p < TP; ++p) {
      T[p] = 1.f, ar[p] = ag[p] = ab[p] = ad[p] = 0.f, used[p] = 0;
      live[p] = ((p / TS) < rows && (p % TS) < cols) ? 1.f : 0.f;
    }
    const Splat* base = splats + b * N;
    const int32_t start = off[job], end = off[job + 1];
    for (int32_t j = start; j < end; ++j) {
      if (((j - start) & 31) == 31) {  // stop once every pixel of the tile is saturated
        float any = 0.f;
#pragma omp simd reduction(+ : any)
        for (int p = 0; p < TP; ++p) any += live[p];
        if (any == 0.f) break;
      }
      const Splat s = base[ids[j]];
      int r0, r1;
      row_range(s, py0, rows, r0, r1);
      const int32_t count = j - start + 1;
      for (int r = r0; r < r1; ++r) {
        const float dy = s.my - (static_cast<float>(py0 + r) + 0.5f);
        const float cdy = 0.5f * s.c * dy * dy, bdy = s.b * dy;
        float* Tr = T + r * TS;
        float* lr = live + r * TS;
        float *arr = ar + r * TS, *agr = ag + r * TS, *abr = ab + r * TS, *adr = ad + r * TS;
        int32_t* ur = used + r * TS;
#pragma omp simd
        for (int x = 0; x < TS; ++x) {
          const float dx = s.mx - (static_cast<float>(px0 + x) + 0.5f);
          const float power = 0.5f * s.a * dx * dx + cdy + bdy * dx;
          const float a = std::min(k.alpha_max, s.op * exp_neg(-power));
          const float t = Tr[x];
          const float nt_ = t * (1.f - a);
          const bool ok = (power >= 0.f) & (a >= k.alpha_min) & (lr[x] != 0.f);
          const bool stop = ok & (nt_ < k.t_min);
          const bool use = ok & !stop;
          const float w = use ? a * t : 0.f;
          arr[x] += w * s.r;
          agr[x] += w * s.g;
          abr[x] += w * s.bl;
          adr[x] += w * s.z;
          Tr[x] = use ? nt_ : t;
          ur[x] = use ? count : ur[x];
          lr[x] = stop ? 0.f : lr[x];
        }
      }
    }
    for (int r = 0; r < rows; ++r) {
      for (int x = 0; x < cols; ++x) {
        const int p = r * TS + x;
        const int64_t q = static_cast<int64_t>(py0 + r) * W + px0 + x;
        const float t = T[p];
        o_rgb[(b * 3 + 0) * HW + q] = ar[p] + t * bg[0];
        o_rgb[(b * 3 + 1) * HW + q] = ag[p] + t * bg[1];
        o_rgb[(b * 3 + 2) * HW + q] = ab[p] + t * bg[2];
        o_alpha[b * HW + q] = 1.f - t;
        o_depth[b * HW + q] = ad[p];
        o_t[b * HW + q] = t;
        o_n[b * HW + q] = used[p];
      }
    }
  }
  return {rgb, alpha, depth, t_final, n_used, bins.offsets, bins.ids, bins.splats};
}

std::vector<torch::Tensor> backward(torch::Tensor grad_rgb, torch::Tensor grad_alpha,
                                    torch::Tensor grad_depth, torch::Tensor background,
                                    torch::Tensor t_final, torch::Tensor n_used,
                                    torch::Tensor offsets, torch::Tensor ids, torch::Tensor splats,
                                    int64_t width, int64_t height, double alpha_min,
                                    double alpha_max) {
  for (const auto* t : {&grad_rgb, &grad_alpha, &grad_depth, &background, &t_final, &splats}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 && t->is_contiguous(),
                "gaussians.backward expects contiguous float32 CPU tensors");
  }
  const float amin = static_cast<float>(alpha_min), amax = static_cast<float>(alpha_max);
  const int W = static_cast<int>(width), H = static_cast<int>(height);
  const int64_t B = splats.size(0), N = splats.size(1);
  const int tw = (W + TS - 1) / TS, th = (H + TS - 1) / TS, nt = tw * th;
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int64_t n_isect = ids.size(0);

  std::vector<float> buf(static_cast<size_t>(n_isect) * GRAD_FLOATS);
  const int32_t* off = offsets.data_ptr<int32_t>();
  const int32_t* idp = ids.data_ptr<int32_t>();
  const Splat* sp = reinterpret_cast<const Splat*>(splats.data_ptr<float>());
  const float* g_rgb = grad_rgb.data_ptr<float>();
  const float* g_a = grad_alpha.data_ptr<float>();
  const float* g_d = grad_depth.data_ptr<float>();
  const float* bg = background.data_ptr<float>();
  const float* tf = t_final.data_ptr<float>();
  const int32_t* nu = n_used.data_ptr<int32_t>();

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t job = 0; job < B * nt; ++job) {
    const int64_t b = job / nt;
    const int tile = static_cast<int>(job % nt);
    const int px0 = (tile % tw) * TS, py0 = (tile / tw) * TS;
    const int rows = std::min(TS, H - py0), cols = std::min(TS, W - px0);
    // Per pixel: the transmittance after the current entry, the colour/depth composited behind it
    // (background included), the output gradients, and how many entries it consumed.
    alignas(64) float T[TP], Br[TP], Bg[TP], Bb[TP], Bd[TP];
    alignas(64) float gr[TP], gg[TP], gb[TP], gd[TP], gat[TP];
    alignas(64) int32_t nused[TP];
    int32_t deepest = 0;
    for (int p = 0; p < TP; ++p) {
      const int r = p / TS, x = p % TS;
      if (r < rows && x < cols) {
        const int64_t q = static_cast<int64_t>(py0 + r) * W + px0 + x;
        const float t = tf[b * HW + q];
        T[p] = t;
        Br[p] = t * bg[0], Bg[p] = t * bg[1], Bb[p] = t * bg[2], Bd[p] = 0.f;
        gr[p] = g_rgb[(b * 3 + 0) * HW + q];
        gg[p] = g_rgb[(b * 3 + 1) * HW + q];
        gb[p] = g_rgb[(b * 3 + 2) * HW + q];
        gd[p] = g_d[b * HW + q];
        gat[p] = g_a[b * HW + q] * t;
        nused[p] = nu[b * HW + q];
      } else {
        T[p] = 1.f, Br[p] = Bg[p] = Bb[p] = Bd[p] = 0.f;
        gr[p] = gg[p] = gb[p] = gd[p] = gat[p] = 0.f;
        nused[p] = 0;
      }
      deepest = std::max(deepest, nused[p]);
    }
    const Splat* base = sp + b * N;
    const int32_t start = off[job];
    for (int32_t j = start + deepest - 1; j >= start; --j) {
      const Splat s = base[idp[j]];
      const int32_t count = j - start + 1;
      int r0, r1;
      row_range(s, py0, rows, r0, r1);
      alignas(64) float acc[GRAD_FLOATS][TS];
      for (int m = 0; m < GRAD_FLOATS; ++m)
        for (int x = 0; x < TS; ++x) acc[m][x] = 0.f;
      for (int r = r0; r < r1; ++r) {
        const float dy = s.my - (static_cast<float>(py0 + r) + 0.5f);
        const float cdy = 0.5f * s.c * dy * dy, bdy = s.b * dy;
        const int o = r * TS;
#pragma omp simd
        for (int x = 0; x < TS; ++x) {
          const int p = o + x;
          const float dx = s.mx - (static_cast<float>(px0 + x) + 0.5f);
          const float power = 0.5f * s.a * dx * dx + cdy + bdy * dx;
          const float G = exp_neg(-power);
          const float raw = s.op * G;
          const float a = std::min(amax, raw);
          const bool ok = (power >= 0.f) & (a >= amin) & (count <= nused[p]);
          const float inv = 1.f / (1.f - a);
          const float Ti = T[p] * inv;  // transmittance in front of this entry
          const float w = a * Ti;
          const float dalpha = gr[p] * (s.r * Ti - Br[p] * inv) + gg[p] * (s.g * Ti - Bg[p] * inv) +
                               gb[p] * (s.bl * Ti - Bb[p] * inv) + gd[p] * (s.z * Ti - Bd[p] * inv) +
                               gat[p] * inv;
          const float draw = (ok & (raw <= amax)) ? dalpha : 0.f;
          const float dpow = -raw * draw;
          const float wk = ok ? w : 0.f;
          acc[0][x] += dpow * (s.a * dx + bdy);
          acc[1][x] += dpow * (s.b * dx + s.c * dy);
          acc[2][x] += dpow * 0.5f * dx * dx;
          acc[3][x] += dpow * dx * dy;
          acc[4][x] += dpow * 0.5f * dy * dy;
          acc[5][x] += G * draw;
          acc[6][x] += wk * gr[p];
          acc[7][x] += wk * gg[p];
          acc[8][x] += wk * gb[p];
          acc[9][x] += wk * gd[p];
          Br[p] += wk * s.r;
          Bg[p] += wk * s.g;
          Bb[p] += wk * s.bl;
          Bd[p] += wk * s.z;
          T[p] = ok ? Ti : T[p];
        }
      }
      float* out = &buf[static_cast<size_t>(j) * GRAD_FLOATS];
      for (int m = 0; m < GRAD_FLOATS; ++m) {
        float sum = 0.f;
        for (int x = 0; x < TS; ++x) sum += acc[m][x];
        out[m] = sum;
      }
    }
  }

  auto fopt = splats.options();
  auto grads = torch::zeros({B, N, GRAD_FLOATS}, fopt);
  float* gp = grads.data_ptr<float>();
#pragma omp parallel for schedule(static, 1)
  for (int64_t b = 0; b < B; ++b) {
    float* gv = gp + b * N * GRAD_FLOATS;
    for (int32_t j = off[b * nt]; j < off[(b + 1) * nt]; ++j) {
      float* dst = gv + static_cast<int64_t>(idp[j]) * GRAD_FLOATS;
      const float* src = &buf[static_cast<size_t>(j) * GRAD_FLOATS];
      for (int m = 0; m < GRAD_FLOATS; ++m) dst[m] += src[m];
    }
  }
  return {grads};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Tile-based CPU rasterization of projected 3D Gaussians (forward and backward)";
  m.def("forward", &forward, "Rasterize projected Gaussians",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "Gradients of forward w.r.t. the projected Gaussians",
        py::call_guard<py::gil_scoped_release>());
}
