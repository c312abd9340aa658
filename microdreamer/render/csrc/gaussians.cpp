// 3D Gaussian splatting on the CPU (OpenMP): EWA projection and tile rasterization, each with a
// hand-written backward. Semantics are those of microdreamer/render/gaussians_torch.py (the
// reference the tests compare against).
//
// Projection (project_forward / project_backward): one pass per Gaussian over the views.
// Rasterization (forward / backward):
//   1. binning, per view: drawn Gaussians radix-sorted by depth (stable), then appended to every
//      tile they touch, so each tile's list comes out depth-sorted. A list entry holds a copy of
//      its Gaussian's screen-space record, so the raster loops read memory in order;
//   2. forward, parallel over (view, tile): the tile's 256 pixels are updated one entry at a time,
//      in rows of 16 lanes that the compiler vectorizes; each pixel's final transmittance and the
//      number of entries it consumed are kept for the backward;
//   3. backward, parallel over (view, tile): the list is walked back to front, recovering each
//      pixel's transmittance by division as 3DGS does; each entry's gradient goes to its slot in
//      a Gaussian-major buffer and a Gaussian's gradient is the sum over its contiguous slots (a
//      fixed order: results do not depend on the thread count).
// A Gaussian is only evaluated on tiles and rows where opacity·exp(-power) can reach alpha_min
// (the ellipse power <= log(opacity/alpha_min), with slack for rounding): a superset of the
// pixels the threshold test accepts, so the results equal the reference's.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

namespace {

constexpr int TS = 16;
constexpr int TP = TS * TS;

// A (view, Gaussian)'s screen-space record for the raster loops. The pixels that can reach
// alpha_min lie in the ellipse a·dx² + 2b·dx·dy + c·dy² <= level (level = 2·log(opacity/alpha_min)
// plus slack), d = mean - pixel centre; per row that is the interval
// |x - (mx + xk·dy)| <= sqrt((level - xq·dy²)·xa), and rows lie in [ylo, yhi].
struct Splat {
  float mx, my, a, b, c, op, r, g, bl, z;
  float ylo, yhi, level, xk, xq, xa;
};
static_assert(sizeof(Splat) == 16 * sizeof(float), "Splat must stay a flat float record");
constexpr int SPLAT_FLOATS = 16;
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

// One row of a tile (16 pixels, centres x0 + 0..15 and dy = my - centre_y) composited with
// Gaussian s, the entry number `count` of the tile's list (1-based) — forward state update.
void forward_row(const Splat& s, float x0, float dy, int32_t count, const Consts& k,
                 float* __restrict T, float* __restrict ar, float* __restrict ag, float* __restrict ab,
                 float* __restrict ad, float* __restrict live, int32_t* __restrict used) {
  const float cdy = 0.5f * s.c * dy * dy, bdy = s.b * dy;
#pragma omp simd
  for (int x = 0; x < TS; ++x) {
    const float dx = s.mx - (x0 + static_cast<float>(x));
    const float power = 0.5f * s.a * dx * dx + cdy + bdy * dx;
    const float raw = s.op * exp_neg(-power);
    const float a = raw < k.alpha_max ? raw : k.alpha_max;
    const float t = T[x];
    const float t_next = t * (1.f - a);
    const bool ok = (power >= 0.f) & (a >= k.alpha_min) & (live[x] != 0.f);
    const bool stop = ok & (t_next < k.t_min);
    const bool use = ok & !stop;
    const float w = use ? a * t : 0.f;
    ar[x] += w * s.r;
    ag[x] += w * s.g;
    ab[x] += w * s.bl;
    ad[x] += w * s.z;
    T[x] = use ? t_next : t;
    used[x] = use ? count : used[x];
    live[x] = stop ? 0.f : live[x];
  }
}

// Backward through one row: T is the transmittance behind the entry, B* the colour/depth
// composited behind it (background included), g* the output gradients (gat = dL/dalpha · T_final);
// per-lane gradient sums for the entry's 10 parameters are added to acc.
// (Kept out of line: inlined into the tile loop, GCC 12 fails to if-convert it.)
__attribute__((noinline)) void backward_row(
    const Splat& s, float x0, float dy, int32_t count, float amin, float amax, float* __restrict T,
    float* __restrict Br, float* __restrict Bg, float* __restrict Bb, float* __restrict Bd,
    const float* __restrict gr, const float* __restrict gg, const float* __restrict gb,
    const float* __restrict gd, const float* __restrict gat, const int32_t* __restrict n_used,
    float (*__restrict acc)[TS]) {
  const float cdy = 0.5f * s.c * dy * dy, bdy = s.b * dy;
#pragma omp simd
  for (int x = 0; x < TS; ++x) {
    const float dx = s.mx - (x0 + static_cast<float>(x));
    const float power = 0.5f * s.a * dx * dx + cdy + bdy * dx;
    const float G = exp_neg(-power);
    const float raw = s.op * G;
    const float a = raw < amax ? raw : amax;
    const bool ok = (power >= 0.f) & (a >= amin) & (count <= n_used[x]);
    const float inv = 1.f / (1.f - a);
    const float Ti = T[x] * inv;  // transmittance in front of this entry
    const float dalpha = gr[x] * (s.r * Ti - Br[x] * inv) + gg[x] * (s.g * Ti - Bg[x] * inv) +
                         gb[x] * (s.bl * Ti - Bb[x] * inv) + gd[x] * (s.z * Ti - Bd[x] * inv) + gat[x] * inv;
    const float draw = (ok & (raw <= amax)) ? dalpha : 0.f;
    const float dpow = -raw * draw;
    const float w = ok ? a * Ti : 0.f;
    acc[0][x] += dpow * (s.a * dx + bdy);
    acc[1][x] += dpow * (s.b * dx + s.c * dy);
    acc[2][x] += dpow * 0.5f * dx * dx;
    acc[3][x] += dpow * dx * dy;
    acc[4][x] += dpow * 0.5f * dy * dy;
    acc[5][x] += G * draw;
    acc[6][x] += w * gr[x];
    acc[7][x] += w * gg[x];
    acc[8][x] += w * gb[x];
    acc[9][x] += w * gd[x];
    Br[x] += w * s.r;
    Bg[x] += w * s.g;
    Bb[x] += w * s.bl;
    Bd[x] += w * s.z;
    T[x] = ok ? Ti : T[x];
  }
}

// Gradients of unused outputs arrive as empty tensors: read them as zeros.
inline const float* optional_data(const torch::Tensor& t) {
  return t.numel() ? t.data_ptr<float>() : nullptr;
}

// A float's bits mapped so that unsigned order is the float order.
inline uint32_t sortable_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits ^ ((bits >> 31) ? 0xffffffffu : 0x80000000u);
}

// Indices sorted by key, stable, so equal depths keep index order as torch.sort(stable=True)
// does. LSD radix sort, 2 × 16 bits.
std::vector<int32_t> sort_by_depth(const std::vector<std::pair<uint32_t, int32_t>>& keyed) {
  const size_t n = keyed.size();
  std::vector<std::pair<uint32_t, int32_t>> a(keyed), tmp(n);
  std::vector<uint32_t> count(1 << 16);
  for (int shift = 0; shift < 32; shift += 16) {
    std::fill(count.begin(), count.end(), 0u);
    for (const auto& e : a) ++count[(e.first >> shift) & 0xffff];
    uint32_t sum = 0;
    for (auto& c : count) sum += std::exchange(c, sum);
    for (const auto& e : a) tmp[count[(e.first >> shift) & 0xffff]++] = e;
    a.swap(tmp);
  }
  std::vector<int32_t> order(n);
  for (size_t j = 0; j < n; ++j) order[j] = a[j].second;
  return order;
}

// The tile lists. Entry e (a tile/Gaussian pair) holds a copy of its Gaussian's Splat, so the
// raster loops read memory in order; its "slot" numbers the entries Gaussian-major (view, depth
// rank, tile), so the backward writes each entry's gradient to its slot and a Gaussian's
// gradient is then the sum over one contiguous span of slots. Every (view, Gaussian) has a span,
// empty when it is not drawn.
struct Bins {
  torch::Tensor offsets;  // [B*tiles+1] int32: tile t's entries are offsets[t] .. offsets[t+1]-1
  torch::Tensor entries;  // [n_isect, SPLAT_FLOATS] float: the entries' Splats, in list order
  torch::Tensor slots;    // [n_isect] int32
  torch::Tensor owners;   // [B*N] int32: span k belongs to (view, Gaussian) b·N + i
  torch::Tensor spans;    // [B*N+1] int32: span k covers slots spans[k] .. spans[k+1]-1
};

Bins bin(const torch::Tensor& means2d, const torch::Tensor& conics, const torch::Tensor& depths,
         const torch::Tensor& opacities, const torch::Tensor& colors, const torch::Tensor& rects,
         int width, int height, const Consts& k) {
  const int64_t B = means2d.size(0), N = means2d.size(1);
  const int tw = (width + TS - 1) / TS, th = (height + TS - 1) / TS, nt = tw * th;
  std::vector<Splat> splats(static_cast<size_t>(B * N));
  std::vector<int32_t> tight(static_cast<size_t>(B * N * 4));  // tile rect (x0, y0, x1, y1)
  std::vector<std::vector<int32_t>> order(B);                   // binned Gaussians, by depth
  std::vector<int64_t> view_isect(B + 1, 0);
  std::vector<std::vector<int32_t>> tile_count(B, std::vector<int32_t>(nt, 0));

  const float* m2 = means2d.data_ptr<float>();
  const float* cn = conics.data_ptr<float>();
  const float* dp = depths.data_ptr<float>();
  const float* opa = opacities.data_ptr<float>();
  const float* col = colors.data_ptr<float>();
  const int32_t* rc = rects.data_ptr<int32_t>();

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) {
    std::vector<std::pair<uint32_t, int32_t>> keyed;  // (sortable depth bits, index)
    keyed.reserve(N);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t bi = b * N + i;
      const float mx = m2[bi * 2], my = m2[bi * 2 + 1];
      const float a = cn[bi * 3], bb = cn[bi * 3 + 1], c = cn[bi * 3 + 2];
      const float op = opa[i];
      const int32_t* r = &rc[bi * 4];
      const float det = a * c - bb * bb;
      if (!(r[2] > r[0] && r[3] > r[1] && op >= k.alpha_min && det > 0.f)) continue;
      // slack far above the float error of power and exp
      const float level = 2.0f * std::log(op / k.alpha_min) + 1e-2f;
      const float hx = std::sqrt(level * c / det) * 1.001f + 1e-3f;  // ellipse half-extents
      const float hy = std::sqrt(level * a / det) * 1.001f + 1e-3f;
      const int x0 = std::max<int>(r[0], static_cast<int>(std::floor((mx - hx - 0.5f) / TS)));
      const int x1 = std::min<int>(r[2], static_cast<int>(std::floor((mx + hx - 0.5f) / TS)) + 1);
      const int y0 = std::max<int>(r[1], static_cast<int>(std::floor((my - hy - 0.5f) / TS)));
      const int y1 = std::min<int>(r[3], static_cast<int>(std::floor((my + hy - 0.5f) / TS)) + 1);
      if (x1 <= x0 || y1 <= y0) continue;
      int32_t* t = &tight[bi * 4];
      t[0] = x0, t[1] = y0, t[2] = x1, t[3] = y1;
      splats[bi] = Splat{mx, my, a, bb, c, op, col[i * 3], col[i * 3 + 1], col[i * 3 + 2], dp[bi],
                         my - hy - 0.5f, my + hy - 0.5f, level, bb / a, det / a, 1.0f / a};
      keyed.emplace_back(sortable_bits(dp[bi]), static_cast<int32_t>(i));
    }
    order[b] = sort_by_depth(keyed);
    auto& cnt = tile_count[b];
    int64_t total = 0;
    for (const int32_t i : order[b]) {
      const int32_t* t = &tight[(b * N + i) * 4];
      for (int ty = t[1]; ty < t[3]; ++ty)
        for (int tx = t[0]; tx < t[2]; ++tx) ++cnt[ty * tw + tx];
      total += static_cast<int64_t>(t[2] - t[0]) * (t[3] - t[1]);
    }
    view_isect[b + 1] = total;
  }
  for (int64_t b = 0; b < B; ++b) view_isect[b + 1] += view_isect[b];
  const int64_t n_isect = view_isect[B];
  TORCH_CHECK(n_isect < INT32_MAX && B * N < INT32_MAX, "too many Gaussians for int32 indices");
  const auto iopt = rects.options();
  Bins bins{torch::empty({B * nt + 1}, iopt), torch::empty({n_isect, SPLAT_FLOATS}, means2d.options()),
            torch::empty({n_isect}, iopt), torch::empty({B * N}, iopt), torch::empty({B * N + 1}, iopt)};
  int32_t* off = bins.offsets.data_ptr<int32_t>();
  Splat* entries = reinterpret_cast<Splat*>(bins.entries.data_ptr<float>());
  int32_t* slots = bins.slots.data_ptr<int32_t>();
  int32_t* owners = bins.owners.data_ptr<int32_t>();
  int32_t* spans = bins.spans.data_ptr<int32_t>();
  off[B * nt] = static_cast<int32_t>(n_isect);
  spans[B * N] = static_cast<int32_t>(n_isect);

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) {
    const auto& cnt = tile_count[b];
    std::vector<int32_t> cursor(nt);
    int64_t acc = view_isect[b];
    for (int t = 0; t < nt; ++t) {
      off[b * nt + t] = static_cast<int32_t>(acc);
      cursor[t] = static_cast<int32_t>(acc);
      acc += cnt[t];
    }
    int32_t slot = static_cast<int32_t>(view_isect[b]);
    int64_t kk = b * N;  // this view's spans: drawn Gaussians by depth, then the empty ones
    for (const int32_t i : order[b]) {
      const int64_t bi = b * N + i;
      owners[kk] = static_cast<int32_t>(bi);
      spans[kk++] = slot;
      const int32_t* t = &tight[bi * 4];
      for (int ty = t[1]; ty < t[3]; ++ty) {
        for (int tx = t[0]; tx < t[2]; ++tx) {
          const int32_t e = cursor[ty * tw + tx]++;
          entries[e] = splats[bi];
          slots[e] = slot++;
        }
      }
    }
    for (int64_t i = 0; i < N; ++i) {
      if (tight[(b * N + i) * 4 + 2] > tight[(b * N + i) * 4]) continue;  // drawn: has its span
      owners[kk] = static_cast<int32_t>(b * N + i);
      spans[kk++] = slot;
    }
  }
  return bins;
}

// Rows [r0, r1) of the tile (local) that Gaussian s can touch.
inline void row_range(const Splat& s, int py0, int rows, int& r0, int& r1) {
  r0 = std::max(0, static_cast<int>(std::ceil(s.ylo)) - py0);
  r1 = std::min(rows, static_cast<int>(std::floor(s.yhi)) - py0 + 1);
}

// Whether the ellipse of s meets the pixel centres xc0 .. xc0 + 15 of the row at offset dy.
inline bool row_hits(const Splat& s, float dy, float xc0) {
  const float disc = (s.level - s.xq * dy * dy) * s.xa;
  if (disc < 0.f) return false;
  const float half = std::sqrt(disc) * 1.001f + 1e-3f, centre = s.mx + s.xk * dy;
  return centre + half >= xc0 && centre - half <= xc0 + static_cast<float>(TS - 1);
}

// Bit r set when row r of the tile has a pixel that still composites.
inline uint32_t live_rows(const float* live) {
  uint32_t mask = 0;
  for (int r = 0; r < TS; ++r) {
    float any = 0.f;
    for (int x = 0; x < TS; ++x) any += live[r * TS + x];
    mask |= (any != 0.f ? 1u : 0u) << r;
  }
  return mask;
}


// ---------------------------------------------------------------------------------------------
// EWA projection (same maths as project_gaussians in gaussians_torch.py), forward and backward.

struct View {
  float R[3][3], t[3];
  float fx, fy, cx, cy;
  float lxp, lxn, lyp, lyn;  // clamp range of x/z and y/z in the Jacobian
};

View make_view(const float* vm, const float* K, int W, int H, float margin) {
  View v;
  for (int r = 0; r < 3; ++r) {
    for (int c = 0; c < 3; ++c) v.R[r][c] = vm[r * 4 + c];
    v.t[r] = vm[r * 4 + 3];
  }
  v.fx = K[0], v.fy = K[4], v.cx = K[2], v.cy = K[5];
  v.lxp = (W - v.cx) / v.fx + margin * 0.5f * W / v.fx;
  v.lxn = v.cx / v.fx + margin * 0.5f * W / v.fx;
  v.lyp = (H - v.cy) / v.fy + margin * 0.5f * H / v.fy;
  v.lyn = v.cy / v.fy + margin * 0.5f * H / v.fy;
  return v;
}

// Normalised quaternion q (w, x, y, z) → rotation R; M = R·diag(s); Σ = M·Mᵀ.
struct Shape {
  float q[4], inv_norm, R[3][3], M[3][3], S[3][3];
};

Shape make_shape(const float* quat, const float* scale) {
  Shape sh;
  const float n2 = quat[0] * quat[0] + quat[1] * quat[1] + quat[2] * quat[2] + quat[3] * quat[3];
  sh.inv_norm = 1.0f / std::sqrt(n2);
  for (int k = 0; k < 4; ++k) sh.q[k] = quat[k] * sh.inv_norm;
  const float w = sh.q[0], x = sh.q[1], y = sh.q[2], z = sh.q[3];
  const float R[3][3] = {{1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)},
                         {2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)},
                         {2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)}};
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 3; ++c) sh.R[r][c] = R[r][c], sh.M[r][c] = R[r][c] * scale[c];
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 3; ++c)
      sh.S[r][c] = sh.M[r][0] * sh.M[c][0] + sh.M[r][1] * sh.M[c][1] + sh.M[r][2] * sh.M[c][2];
  return sh;
}

// Per (view, Gaussian) projection intermediates.
struct Proj {
  float x, y, z, u, v, tx, ty;
  bool cx_free, cy_free;  // x/z, y/z inside the clamp range
  float J00, J02, J11, J12;
  float T[2][3], TS_[2][3];  // T = J·R_view, TS_ = T·Σ
  float a, b, c, det;        // 2D covariance (dilated) and its determinant
};

Proj project_one(const View& v, const Shape& sh, const float* mu, float eps2d) {
  Proj p;
  p.x = v.R[0][0] * mu[0] + v.R[0][1] * mu[1] + v.R[0][2] * mu[2] + v.t[0];
  p.y = v.R[1][0] * mu[0] + v.R[1][1] * mu[1] + v.R[1][2] * mu[2] + v.t[1];
  p.z = v.R[2][0] * mu[0] + v.R[2][1] * mu[1] + v.R[2][2] * mu[2] + v.t[2];
  p.u = p.x / p.z, p.v = p.y / p.z;
  const float uc = std::min(v.lxp, std::max(-v.lxn, p.u));
  const float vc = std::min(v.lyp, std::max(-v.lyn, p.v));
  p.cx_free = uc == p.u, p.cy_free = vc == p.v;
  p.tx = p.z * uc, p.ty = p.z * vc;
  p.J00 = v.fx / p.z, p.J02 = -v.fx * p.tx / (p.z * p.z);
  p.J11 = v.fy / p.z, p.J12 = -v.fy * p.ty / (p.z * p.z);
  for (int j = 0; j < 3; ++j) {
    p.T[0][j] = p.J00 * v.R[0][j] + p.J02 * v.R[2][j];
    p.T[1][j] = p.J11 * v.R[1][j] + p.J12 * v.R[2][j];
  }
  for (int m = 0; m < 2; ++m)
    for (int j = 0; j < 3; ++j)
      p.TS_[m][j] = p.T[m][0] * sh.S[0][j] + p.T[m][1] * sh.S[1][j] + p.T[m][2] * sh.S[2][j];
  p.a = p.TS_[0][0] * p.T[0][0] + p.TS_[0][1] * p.T[0][1] + p.TS_[0][2] * p.T[0][2] + eps2d;
  p.b = p.TS_[0][0] * p.T[1][0] + p.TS_[0][1] * p.T[1][1] + p.TS_[0][2] * p.T[1][2];
  p.c = p.TS_[1][0] * p.T[1][0] + p.TS_[1][1] * p.T[1][1] + p.TS_[1][2] * p.T[1][2] + eps2d;
  p.det = p.a * p.c - p.b * p.b;
  return p;
}

struct ProjParams {
  int W, H;
  float near, far, eps2d, margin;
};

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
  TORCH_CHECK(conics.size(0) == B && conics.size(1) == N && depths.size(1) == N && rects.size(1) == N &&
                  opacities.size(0) == N && colors.size(0) == N && background.numel() == 3,
              "gaussians.forward: inconsistent shapes");
  const int tw = (W + TS - 1) / TS, th = (H + TS - 1) / TS, nt = tw * th;

  Bins bins = bin(means2d, conics, depths, opacities, colors, rects, W, H, k);
  auto fopt = means2d.options();
  auto rgb = torch::empty({B, 3, H, W}, fopt);
  auto alpha = torch::empty({B, 1, H, W}, fopt);
  auto depth = torch::empty({B, 1, H, W}, fopt);
  auto t_final = torch::empty({B, H, W}, fopt);
  auto n_used = torch::empty({B, H, W}, rects.options());

  const int32_t* off = bins.offsets.data_ptr<int32_t>();
  const Splat* entries = reinterpret_cast<const Splat*>(bins.entries.data_ptr<float>());
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
    const int32_t start = off[job], end = off[job + 1];
    const float xc0 = static_cast<float>(px0) + 0.5f;
    uint32_t alive = live_rows(live);
    for (int32_t j = start; j < end && alive; ++j) {
      if (((j - start) & 15) == 15) alive = live_rows(live);  // skip saturated rows, then the tile
      const Splat& s = entries[j];
      int r0, r1;
      row_range(s, py0, rows, r0, r1);
      const int32_t count = j - start + 1;
      for (int r = r0; r < r1; ++r) {
        const float dy = s.my - (static_cast<float>(py0 + r) + 0.5f);
        if (!((alive >> r) & 1u) || !row_hits(s, dy, xc0)) continue;
        const int o = r * TS;
        forward_row(s, xc0, dy, count, k, T + o, ar + o, ag + o, ab + o, ad + o, live + o, used + o);
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
  return {rgb, alpha, depth, t_final, n_used, bins.offsets, bins.entries, bins.slots, bins.owners, bins.spans};
}

// Returns the gradients w.r.t. means2d [B,N,2], conics [B,N,3], depths [B,N], opacities [N],
// colors [N,3] and background [3]. Empty output-gradient tensors stand for zeros.
std::vector<torch::Tensor> backward(torch::Tensor grad_rgb, torch::Tensor grad_alpha,
                                    torch::Tensor grad_depth, torch::Tensor background,
                                    torch::Tensor t_final, torch::Tensor n_used,
                                    torch::Tensor offsets, torch::Tensor entries, torch::Tensor slots,
                                    torch::Tensor owners, torch::Tensor spans, int64_t n_gaussians,
                                    int64_t width, int64_t height, double alpha_min,
                                    double alpha_max) {
  for (const auto* t : {&grad_rgb, &grad_alpha, &grad_depth, &background, &t_final, &entries}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 && t->is_contiguous(),
                "gaussians.backward expects contiguous float32 CPU tensors");
  }
  const float amin = static_cast<float>(alpha_min), amax = static_cast<float>(alpha_max);
  const int W = static_cast<int>(width), H = static_cast<int>(height);
  const int64_t N = n_gaussians, B = t_final.size(0);
  const int tw = (W + TS - 1) / TS, th = (H + TS - 1) / TS, nt = tw * th;
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int64_t n_isect = entries.size(0);

  // Entry gradients by slot; every slot is written (zeros for entries no pixel reached).
  std::unique_ptr<float[]> buf(new float[static_cast<size_t>(n_isect) * GRAD_FLOATS]);
  std::vector<float> bg_part(static_cast<size_t>(B * nt) * 3);  // per-tile Σ T_final·dL/drgb
  const int32_t* off = offsets.data_ptr<int32_t>();
  const Splat* list = reinterpret_cast<const Splat*>(entries.data_ptr<float>());
  const int32_t* slot = slots.data_ptr<int32_t>();
  const float* g_rgb = optional_data(grad_rgb);
  const float* g_a = optional_data(grad_alpha);
  const float* g_d = optional_data(grad_depth);
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
        gr[p] = g_rgb ? g_rgb[(b * 3 + 0) * HW + q] : 0.f;
        gg[p] = g_rgb ? g_rgb[(b * 3 + 1) * HW + q] : 0.f;
        gb[p] = g_rgb ? g_rgb[(b * 3 + 2) * HW + q] : 0.f;
        gd[p] = g_d ? g_d[b * HW + q] : 0.f;
        gat[p] = g_a ? g_a[b * HW + q] * t : 0.f;
        nused[p] = nu[b * HW + q];
      } else {
        T[p] = 1.f, Br[p] = Bg[p] = Bb[p] = Bd[p] = 0.f;
        gr[p] = gg[p] = gb[p] = gd[p] = gat[p] = 0.f;
        nused[p] = 0;
      }
      deepest = std::max(deepest, nused[p]);
    }
    float bsum[3] = {0.f, 0.f, 0.f};
    for (int p = 0; p < TP; ++p) bsum[0] += T[p] * gr[p], bsum[1] += T[p] * gg[p], bsum[2] += T[p] * gb[p];
    for (int c = 0; c < 3; ++c) bg_part[job * 3 + c] = bsum[c];
    int32_t row_deepest[TS];  // per row, the last entry any of its pixels consumed
    for (int r = 0; r < TS; ++r) {
      row_deepest[r] = 0;
      for (int x = 0; x < TS; ++x) row_deepest[r] = std::max(row_deepest[r], nused[r * TS + x]);
    }
    const int32_t start = off[job], end = off[job + 1];
    for (int32_t j = start + deepest; j < end; ++j)
      std::fill_n(&buf[static_cast<size_t>(slot[j]) * GRAD_FLOATS], GRAD_FLOATS, 0.f);
    const float xc0 = static_cast<float>(px0) + 0.5f;
    for (int32_t j = start + deepest - 1; j >= start; --j) {
      const Splat& s = list[j];
      const int32_t count = j - start + 1;
      int r0, r1;
      row_range(s, py0, rows, r0, r1);
      alignas(64) float acc[GRAD_FLOATS][TS];
      for (int m = 0; m < GRAD_FLOATS; ++m)
        for (int x = 0; x < TS; ++x) acc[m][x] = 0.f;
      for (int r = r0; r < r1; ++r) {
        const float dy = s.my - (static_cast<float>(py0 + r) + 0.5f);
        if (count > row_deepest[r] || !row_hits(s, dy, xc0)) continue;
        const int o = r * TS;
        backward_row(s, xc0, dy, count, amin, amax, T + o, Br + o, Bg + o, Bb + o, Bd + o, gr + o, gg + o,
                     gb + o, gd + o, gat + o, nused + o, acc);
      }
      float* out = &buf[static_cast<size_t>(slot[j]) * GRAD_FLOATS];
      for (int m = 0; m < GRAD_FLOATS; ++m) {
        float sum = 0.f;
        for (int x = 0; x < TS; ++x) sum += acc[m][x];
        out[m] = sum;
      }
    }
  }

  // A Gaussian's gradient in one view is the sum over its span of slots (a fixed order, so
  // deterministic); spans are visited in slot order. Opacity and colour then sum over views.
  auto fopt = entries.options();
  auto g_means2d = torch::empty({B, N, 2}, fopt);
  auto g_conics = torch::empty({B, N, 3}, fopt);
  auto g_depths = torch::empty({B, N}, fopt);
  auto g_opac = torch::empty({N}, fopt);
  auto g_colors = torch::empty({N, 3}, fopt);
  auto g_bg = torch::zeros({3}, fopt);
  std::unique_ptr<float[]> opcol(new float[static_cast<size_t>(B * N) * 4]);  // per view
  float* o_m2 = g_means2d.data_ptr<float>();
  float* o_cn = g_conics.data_ptr<float>();
  float* o_d = g_depths.data_ptr<float>();
  float* o_op = g_opac.data_ptr<float>();
  float* o_col = g_colors.data_ptr<float>();
  const int32_t* own = owners.data_ptr<int32_t>();
  const int32_t* sp = spans.data_ptr<int32_t>();
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 1024)
    for (int64_t kk = 0; kk < B * N; ++kk) {  // every (view, Gaussian) once, slots in order
      float g[GRAD_FLOATS] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int32_t q = sp[kk]; q < sp[kk + 1]; ++q)
        for (int m = 0; m < GRAD_FLOATS; ++m) g[m] += buf[static_cast<size_t>(q) * GRAD_FLOATS + m];
      const int64_t e = own[kk];
      o_m2[e * 2] = g[0], o_m2[e * 2 + 1] = g[1];
      o_cn[e * 3] = g[2], o_cn[e * 3 + 1] = g[3], o_cn[e * 3 + 2] = g[4];
      o_d[e] = g[9];
      for (int m = 0; m < 4; ++m) opcol[e * 4 + m] = g[5 + m];
    }
#pragma omp for schedule(dynamic, 1024)
    for (int64_t i = 0; i < N; ++i) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t b = 0; b < B; ++b)
        for (int m = 0; m < 4; ++m) acc[m] += opcol[(b * N + i) * 4 + m];
      o_op[i] = acc[0];
      for (int c = 0; c < 3; ++c) o_col[i * 3 + c] = acc[1 + c];
    }
  }
  float* o_bg = g_bg.data_ptr<float>();
  for (int64_t job = 0; job < B * nt; ++job)
    for (int c = 0; c < 3; ++c) o_bg[c] += bg_part[job * 3 + c];
  return {g_means2d, g_conics, g_depths, g_opac, g_colors, g_bg};
}

std::vector<torch::Tensor> project_forward(torch::Tensor means, torch::Tensor quats,
                                           torch::Tensor scales, torch::Tensor viewmats,
                                           torch::Tensor ks, int64_t width, int64_t height,
                                           double near, double far, double eps2d, double margin) {
  for (const auto* t : {&means, &quats, &scales, &viewmats, &ks}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 && t->is_contiguous(),
                "gaussians.project_forward expects contiguous float32 CPU tensors");
  }
  const ProjParams pp{static_cast<int>(width), static_cast<int>(height), static_cast<float>(near),
                      static_cast<float>(far), static_cast<float>(eps2d), static_cast<float>(margin)};
  const int64_t N = means.size(0), B = viewmats.size(0);
  const int tw = (pp.W + TS - 1) / TS, th = (pp.H + TS - 1) / TS;
  auto fopt = means.options();
  auto iopt = fopt.dtype(torch::kInt32);
  auto means2d = torch::empty({B, N, 2}, fopt);
  auto conics = torch::empty({B, N, 3}, fopt);
  auto depths = torch::empty({B, N}, fopt);
  auto radii = torch::empty({B, N}, iopt);
  auto rects = torch::empty({B, N, 4}, iopt);
  std::vector<View> views(B);
  for (int64_t b = 0; b < B; ++b)
    views[b] = make_view(viewmats.data_ptr<float>() + b * 16, ks.data_ptr<float>() + b * 9, pp.W, pp.H, pp.margin);
  const float* mu = means.data_ptr<float>();
  const float* qp = quats.data_ptr<float>();
  const float* sp = scales.data_ptr<float>();
  float* o_m2 = means2d.data_ptr<float>();
  float* o_cn = conics.data_ptr<float>();
  float* o_d = depths.data_ptr<float>();
  int32_t* o_r = radii.data_ptr<int32_t>();
  int32_t* o_rc = rects.data_ptr<int32_t>();

#pragma omp parallel for schedule(dynamic, 256)
  for (int64_t i = 0; i < N; ++i) {
    const Shape sh = make_shape(qp + i * 4, sp + i * 3);
    for (int64_t b = 0; b < B; ++b) {
      const View& v = views[b];
      const int64_t e = b * N + i;
      const Proj p = project_one(v, sh, mu + i * 3, pp.eps2d);
      const bool in_depth = p.z > pp.near && p.z <= pp.far;
      const float zs = in_depth ? p.z : 1.0f;
      const float mx = v.fx * p.x / zs + v.cx, my = v.fy * p.y / zs + v.cy;
      o_m2[e * 2] = mx, o_m2[e * 2 + 1] = my;
      o_d[e] = p.z;
      const bool ok = in_depth && p.det > 0.f;
      float* cn = o_cn + e * 3;
      int32_t* rc = o_rc + e * 4;
      rc[0] = rc[1] = rc[2] = rc[3] = 0;
      o_r[e] = 0;
      if (!ok) {
        cn[0] = cn[1] = cn[2] = 0.f;
        continue;
      }
      cn[0] = p.c / p.det, cn[1] = -p.b / p.det, cn[2] = p.a / p.det;
      const float mid = 0.5f * (p.a + p.c);
      const float lam = mid + std::sqrt(std::max(0.01f, mid * mid - p.det));
      const float r = std::ceil(3.0f * std::sqrt(lam));
      if (mx + r <= 0.f || mx - r >= pp.W || my + r <= 0.f || my - r >= pp.H) continue;
      o_r[e] = static_cast<int32_t>(r);
      const auto clampi = [](float t, int hi) { return static_cast<int32_t>(std::min<float>(hi, std::max(0.f, t))); };
      rc[0] = clampi(std::floor((mx - r) / TS), tw);
      rc[1] = clampi(std::floor((my - r) / TS), th);
      rc[2] = clampi(std::ceil((mx + r) / TS), tw);
      rc[3] = clampi(std::ceil((my + r) / TS), th);
    }
  }
  return {means2d, conics, depths, radii, rects};
}

std::vector<torch::Tensor> project_backward(torch::Tensor means, torch::Tensor quats,
                                            torch::Tensor scales, torch::Tensor viewmats,
                                            torch::Tensor ks, torch::Tensor g_means2d,
                                            torch::Tensor g_conics, torch::Tensor g_depths,
                                            int64_t width, int64_t height, double near, double far,
                                            double eps2d, double margin) {
  for (const auto* t : {&means, &quats, &scales, &viewmats, &ks, &g_means2d, &g_conics, &g_depths}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 && t->is_contiguous(),
                "gaussians.project_backward expects contiguous float32 CPU tensors (empty: zero gradient)");
  }
  const ProjParams pp{static_cast<int>(width), static_cast<int>(height), static_cast<float>(near),
                      static_cast<float>(far), static_cast<float>(eps2d), static_cast<float>(margin)};
  const int64_t N = means.size(0), B = viewmats.size(0);
  auto g_means = torch::empty_like(means);
  auto g_quats = torch::empty_like(quats);
  auto g_scales = torch::empty_like(scales);
  std::vector<View> views(B);
  for (int64_t b = 0; b < B; ++b)
    views[b] = make_view(viewmats.data_ptr<float>() + b * 16, ks.data_ptr<float>() + b * 9, pp.W, pp.H, pp.margin);
  const float* mu = means.data_ptr<float>();
  const float* qp = quats.data_ptr<float>();
  const float* sp = scales.data_ptr<float>();
  const float* gm2 = optional_data(g_means2d);
  const float* gcn = optional_data(g_conics);
  const float* gdp = optional_data(g_depths);
  float* o_gm = g_means.data_ptr<float>();
  float* o_gq = g_quats.data_ptr<float>();
  float* o_gs = g_scales.data_ptr<float>();

#pragma omp parallel for schedule(dynamic, 256)
  for (int64_t i = 0; i < N; ++i) {
    const Shape sh = make_shape(qp + i * 4, sp + i * 3);
    float gmu[3] = {0.f, 0.f, 0.f};
    float gS[3][3] = {{0.f, 0.f, 0.f}, {0.f, 0.f, 0.f}, {0.f, 0.f, 0.f}};
    for (int64_t b = 0; b < B; ++b) {
      const View& v = views[b];
      const int64_t e = b * N + i;
      const Proj p = project_one(v, sh, mu + i * 3, pp.eps2d);
      const bool in_depth = p.z > pp.near && p.z <= pp.far;
      const float g_mx = gm2 ? gm2[e * 2] : 0.f, g_my = gm2 ? gm2[e * 2 + 1] : 0.f;
      float gx, gy, gz = gdp ? gdp[e] : 0.f;
      if (!in_depth) {  // the reference divides by 1 there
        gx = g_mx * v.fx, gy = g_my * v.fy;
      } else {
        const float iz = 1.0f / p.z;
        gx = g_mx * v.fx * iz, gy = g_my * v.fy * iz;
        gz -= (g_mx * v.fx * p.x + g_my * v.fy * p.y) * iz * iz;
        const float gA = gcn ? gcn[e * 3] : 0.f, gB = gcn ? gcn[e * 3 + 1] : 0.f, gC = gcn ? gcn[e * 3 + 2] : 0.f;
        if (p.det > 0.f && (gA != 0.f || gB != 0.f || gC != 0.f)) {
          // conic (A, B, C) = (c, -b, a)/det  →  gradient w.r.t. the 2D covariance (a, b, c)
          const float id = 1.0f / p.det, id2 = id * id;
          const float ga = gA * (-p.c * p.c * id2) + gB * (p.b * p.c * id2) + gC * (id - p.a * p.c * id2);
          const float gb = gA * (2.f * p.b * p.c * id2) + gB * (-id - 2.f * p.b * p.b * id2) +
                           gC * (2.f * p.a * p.b * id2);
          const float gc = gA * (id - p.a * p.c * id2) + gB * (p.a * p.b * id2) + gC * (-p.a * p.a * id2);
          // cov2d = T Σ Tᵀ: dL/dT = 2·G·T·Σ, dL/dΣ = Tᵀ·G·T with G = [[ga, gb/2], [gb/2, gc]]
          const float G[2][2] = {{ga, 0.5f * gb}, {0.5f * gb, gc}};
          float gT[2][3];
          for (int m = 0; m < 2; ++m)
            for (int j = 0; j < 3; ++j) gT[m][j] = 2.f * (G[m][0] * p.TS_[0][j] + G[m][1] * p.TS_[1][j]);
          for (int j = 0; j < 3; ++j)
            for (int k2 = 0; k2 < 3; ++k2)
              gS[j][k2] += p.T[0][j] * (G[0][0] * p.T[0][k2] + G[0][1] * p.T[1][k2]) +
                           p.T[1][j] * (G[1][0] * p.T[0][k2] + G[1][1] * p.T[1][k2]);
          // T = J·R_view
          float gJ00 = 0.f, gJ02 = 0.f, gJ11 = 0.f, gJ12 = 0.f;
          for (int j = 0; j < 3; ++j) {
            gJ00 += gT[0][j] * v.R[0][j];
            gJ02 += gT[0][j] * v.R[2][j];
            gJ11 += gT[1][j] * v.R[1][j];
            gJ12 += gT[1][j] * v.R[2][j];
          }
          gz += -v.fx * iz * iz * gJ00 + 2.f * v.fx * p.tx * iz * iz * iz * gJ02 - v.fy * iz * iz * gJ11 +
                2.f * v.fy * p.ty * iz * iz * iz * gJ12;
          const float g_tx = -v.fx * iz * iz * gJ02, g_ty = -v.fy * iz * iz * gJ12;
          if (p.cx_free) gx += g_tx; else gz += g_tx * p.tx * iz;
          if (p.cy_free) gy += g_ty; else gz += g_ty * p.ty * iz;
        }
      }
      for (int k2 = 0; k2 < 3; ++k2) gmu[k2] += v.R[0][k2] * gx + v.R[1][k2] * gy + v.R[2][k2] * gz;
    }
    for (int k2 = 0; k2 < 3; ++k2) o_gm[i * 3 + k2] = gmu[k2];
    // Σ = M Mᵀ: dL/dM = (G + Gᵀ)·M; M = R·diag(s)
    float gR[3][3], gs[3] = {0.f, 0.f, 0.f};
    for (int r = 0; r < 3; ++r) {
      for (int c = 0; c < 3; ++c) {
        float gM = 0.f;
        for (int k2 = 0; k2 < 3; ++k2) gM += (gS[r][k2] + gS[k2][r]) * sh.M[k2][c];
        gR[r][c] = gM * sp[i * 3 + c];
        gs[c] += gM * sh.R[r][c];
      }
    }
    for (int c = 0; c < 3; ++c) o_gs[i * 3 + c] = gs[c];
    const float w = sh.q[0], x = sh.q[1], y = sh.q[2], z = sh.q[3];
    const float gw = 2.f * (-z * gR[0][1] + y * gR[0][2] + z * gR[1][0] - x * gR[1][2] - y * gR[2][0] + x * gR[2][1]);
    const float gx_ = 2.f * (y * gR[0][1] + z * gR[0][2] + y * gR[1][0] - 2.f * x * gR[1][1] - w * gR[1][2] +
                             z * gR[2][0] + w * gR[2][1] - 2.f * x * gR[2][2]);
    const float gy_ = 2.f * (-2.f * y * gR[0][0] + x * gR[0][1] + w * gR[0][2] + x * gR[1][0] + z * gR[1][2] -
                             w * gR[2][0] + z * gR[2][1] - 2.f * y * gR[2][2]);
    const float gz_ = 2.f * (-2.f * z * gR[0][0] - w * gR[0][1] + x * gR[0][2] + w * gR[1][0] - 2.f * z * gR[1][1] +
                             y * gR[1][2] + x * gR[2][0] + y * gR[2][1]);
    // through q = quat/|quat|
    const float dot = w * gw + x * gx_ + y * gy_ + z * gz_;
    const float gq[4] = {gw, gx_, gy_, gz_};
    for (int k2 = 0; k2 < 4; ++k2) o_gq[i * 4 + k2] = (gq[k2] - sh.q[k2] * dot) * sh.inv_norm;
  }
  return {g_means, g_quats, g_scales};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Tile-based CPU rasterization of projected 3D Gaussians (forward and backward)";
  m.def("forward", &forward, "Rasterize projected Gaussians",
        py::call_guard<py::gil_scoped_release>());
  m.def("project_forward", &project_forward, "EWA projection of 3D Gaussians",
        py::call_guard<py::gil_scoped_release>());
  m.def("project_backward", &project_backward, "Gradients of project_forward",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "Gradients of forward w.r.t. the projected Gaussians",
        py::call_guard<py::gil_scoped_release>());
}
