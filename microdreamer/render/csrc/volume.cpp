// NeRF volume rendering on the CPU (OpenMP): ray marching through an occupancy grid into packed
// samples, the early-stop / alpha visibility test, and alpha compositing with a hand-written
// backward. Semantics are those of microdreamer/render/volume_torch.py (the reference the tests
// compare against); every loop is parallel over rays, and each ray is handled by one thread in
// sample order, so results do not depend on the thread count.
//
// Samples of a ray lie on the lattice t_k = t_entry + (k + offset)·dt, k = 0, 1, ..., where t_entry
// is where the ray enters the box [-radius, radius]³ (or the near plane, if later) and offset in
// [0, 1) jitters the lattice (stratified sampling). Sample k spans [t_k, t_k + dt]; it is kept when
// its midpoint lies before the box exit (or the far plane) and in an occupied grid cell.
// Packed layout: the samples of ray r are rows packed_info[r][0] .. packed_info[r][0] + packed_info[r][1] - 1.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// Ray / box [-radius, radius]³ slab test; zero direction components are nudged to 1e-12 (as the
// reference does) so that no infinity enters the arithmetic. Marching runs in double precision (as the
// reference does), so that both round the same exact values to float32.
inline bool ray_box(const float* o, const float* d, double radius, double& t0, double& t1) {
  t0 = -1e300;
  t1 = 1e300;
  for (int a = 0; a < 3; ++a) {
    double da = d[a];
    if (std::fabs(da) < 1e-12) da = da < 0.0 ? -1e-12 : 1e-12;
    const double inv = 1.0 / da;
    double ta = (-radius - o[a]) * inv, tb = (radius - o[a]) * inv;
    if (ta > tb) std::swap(ta, tb);
    t0 = std::max(t0, ta);
    t1 = std::min(t1, tb);
  }
  return t1 > t0;
}

struct MarchSetup {
  const float *o, *d, *offsets;
  const bool* binaries;
  int64_t res;
  double radius, dt, near, far, scale;
};

// Walks ray r's lattice; calls emit(t_start) for every kept sample, returns the count.
template <typename Emit>
int64_t march_ray(const MarchSetup& s, int64_t r, Emit emit) {
  const float* o = s.o + 3 * r;
  const float* d = s.d + 3 * r;
  double t0, t1;
  if (!ray_box(o, d, s.radius, t0, t1)) return 0;
  t0 = std::max(t0, s.near);
  t1 = std::min(t1, s.far);
  const double offset = s.offsets ? s.offsets[r] : 0.0;
  int64_t count = 0;
  for (int64_t k = 0;; ++k) {
    const double ts = t0 + (static_cast<double>(k) + offset) * s.dt;
    const double mid = ts + 0.5 * s.dt;
    if (!(mid < t1)) break;
    if (s.binaries) {
      int64_t cell = 0;
      for (int a = 0; a < 3; ++a) {
        const double p = o[a] + mid * d[a];
        int64_t i = static_cast<int64_t>(std::floor((p + s.radius) * s.scale));
        i = std::min<int64_t>(std::max<int64_t>(i, 0), s.res - 1);
        cell = cell * s.res + i;
      }
      if (!s.binaries[cell]) continue;
    }
    emit(ts);
    ++count;
  }
  return count;
}

}  // namespace

// rays_o, rays_d [R,3]; binaries [res³] bool (or empty: every cell occupied); offsets [R] (or empty).
// Returns packed_info [R,2] int64, ray_indices [S] int64, t_starts [S], t_ends [S].
std::vector<torch::Tensor> march(torch::Tensor rays_o, torch::Tensor rays_d, torch::Tensor binaries,
                                 int64_t res, double radius, double dt, double near, double far,
                                 torch::Tensor offsets) {
  const int64_t R = rays_o.size(0);
  MarchSetup s;
  s.o = rays_o.data_ptr<float>();
  s.d = rays_d.data_ptr<float>();
  s.offsets = offsets.numel() ? offsets.data_ptr<float>() : nullptr;
  s.binaries = binaries.numel() ? binaries.data_ptr<bool>() : nullptr;
  s.res = res;
  s.radius = radius;
  s.dt = dt;
  s.near = near;
  s.far = far;
  s.scale = static_cast<double>(res) / (2.0 * radius);

  auto packed = torch::zeros({R, 2}, torch::kInt64);
  int64_t* info = packed.data_ptr<int64_t>();
#pragma omp parallel for schedule(dynamic, 256)
  for (int64_t r = 0; r < R; ++r) info[2 * r + 1] = march_ray(s, r, [](double) {});
  int64_t total = 0;
  for (int64_t r = 0; r < R; ++r) {
    info[2 * r] = total;
    total += info[2 * r + 1];
  }
  auto ray_indices = torch::empty({total}, torch::kInt64);
  auto t_starts = torch::empty({total}, torch::kFloat32);
  auto t_ends = torch::empty({total}, torch::kFloat32);
  int64_t* ri = ray_indices.data_ptr<int64_t>();
  float* ts = t_starts.data_ptr<float>();
  float* te = t_ends.data_ptr<float>();
#pragma omp parallel for schedule(dynamic, 256)
  for (int64_t r = 0; r < R; ++r) {
    int64_t i = info[2 * r];
    march_ray(s, r, [&](double t) {
      ri[i] = r;
      ts[i] = static_cast<float>(t);
      te[i] = static_cast<float>(t + s.dt);
      ++i;
    });
  }
  return {packed, ray_indices, t_starts, t_ends};
}

// Which samples can contribute: transmittance before the sample >= early_stop_eps and, when
// alpha_thre > 0, alpha = 1 - exp(-sigma·dt) >= alpha_thre (nerfacc render_visibility_from_density).
torch::Tensor visibility(torch::Tensor sigmas, torch::Tensor t_starts, torch::Tensor t_ends,
                         torch::Tensor packed_info, double early_stop_eps, double alpha_thre) {
  const int64_t R = packed_info.size(0);
  auto mask = torch::zeros({sigmas.size(0)}, torch::kBool);
  const float* sg = sigmas.data_ptr<float>();
  const float* ts = t_starts.data_ptr<float>();
  const float* te = t_ends.data_ptr<float>();
  const int64_t* info = packed_info.data_ptr<int64_t>();
  bool* m = mask.data_ptr<bool>();
#pragma omp parallel for schedule(dynamic, 256)
  for (int64_t r = 0; r < R; ++r) {
    double trans = 1.0;  // transmittance in front of the sample
    for (int64_t i = info[2 * r], e = i + info[2 * r + 1]; i < e; ++i) {
      const double s = static_cast<double>(sg[i]) * (static_cast<double>(te[i]) - ts[i]);
      const double alpha = -std::expm1(-s);
      m[i] = trans >= early_stop_eps && (alpha_thre <= 0.0 || alpha >= alpha_thre);
      trans -= trans * alpha;
    }
  }
  return mask;
}

// Alpha compositing per ray: w_i = T_i·(1 - exp(-sigma_i·dt_i)), T_i = exp(-Σ_{j<i} sigma_j·dt_j) (kept as
// the running product T_{i+1} = T_i - w_i, in double); rgb = Σ w·c, opacity = Σ w, depth = Σ w·t_mid.
// Returns rgb [R,3], opacity [R], depth [R].
std::vector<torch::Tensor> composite_forward(torch::Tensor sigmas, torch::Tensor rgbs, torch::Tensor t_starts,
                                             torch::Tensor t_ends, torch::Tensor packed_info) {
  const int64_t R = packed_info.size(0);
  auto rgb = torch::zeros({R, 3}, torch::kFloat32);
  auto opacity = torch::zeros({R}, torch::kFloat32);
  auto depth = torch::zeros({R}, torch::kFloat32);
  const float* sg = sigmas.data_ptr<float>();
  const float* c = rgbs.data_ptr<float>();
  const float* ts = t_starts.data_ptr<float>();
  const float* te = t_ends.data_ptr<float>();
  const int64_t* info = packed_info.data_ptr<int64_t>();
  float* out_rgb = rgb.data_ptr<float>();
  float* out_op = opacity.data_ptr<float>();
  float* out_d = depth.data_ptr<float>();
#pragma omp parallel for schedule(dynamic, 256)
  for (int64_t r = 0; r < R; ++r) {
    double trans = 1.0, acc[5] = {0, 0, 0, 0, 0};  // T_i = Π_{j<i} exp(-s_j)
    for (int64_t i = info[2 * r], e = i + info[2 * r + 1]; i < e; ++i) {
      const double s = static_cast<double>(sg[i]) * (static_cast<double>(te[i]) - ts[i]);
      const double w = trans * -std::expm1(-s);
      acc[0] += w * c[3 * i];
      acc[1] += w * c[3 * i + 1];
      acc[2] += w * c[3 * i + 2];
      acc[3] += w;
      acc[4] += w * 0.5 * (static_cast<double>(ts[i]) + te[i]);
      trans -= w;
    }
    for (int k = 0; k < 3; ++k) out_rgb[3 * r + k] = static_cast<float>(acc[k]);
    out_op[r] = static_cast<float>(acc[3]);
    out_d[r] = static_cast<float>(acc[4]);
  }
  return {rgb, opacity, depth};
}

// Gradients of composite_forward. With v_i = c_i·g_rgb + g_opacity + t_mid_i·g_depth (the value a
// sample's weight multiplies) and s_i = sigma_i·dt_i: d/dc_i = w_i·g_rgb and
// d/dsigma_i = dt_i·(T_{i+1}·v_i - Σ_{k>i} w_k·v_k); the suffix sum is accumulated back to front
// from the weights recomputed in a forward pass over the ray. Empty gradients count as zero.
std::vector<torch::Tensor> composite_backward(torch::Tensor g_rgb, torch::Tensor g_opacity, torch::Tensor g_depth,
                                              torch::Tensor sigmas, torch::Tensor rgbs, torch::Tensor t_starts,
                                              torch::Tensor t_ends, torch::Tensor packed_info) {
  const int64_t R = packed_info.size(0);
  const int64_t S = sigmas.size(0);
  auto g_sigmas = torch::empty({S}, torch::kFloat32);  // every sample belongs to a ray: all are written
  auto g_rgbs = torch::empty({S, 3}, torch::kFloat32);
  const float* gr = g_rgb.numel() ? g_rgb.data_ptr<float>() : nullptr;
  const float* go = g_opacity.numel() ? g_opacity.data_ptr<float>() : nullptr;
  const float* gd = g_depth.numel() ? g_depth.data_ptr<float>() : nullptr;
  const float* sg = sigmas.data_ptr<float>();
  const float* c = rgbs.data_ptr<float>();
  const float* ts = t_starts.data_ptr<float>();
  const float* te = t_ends.data_ptr<float>();
  const int64_t* info = packed_info.data_ptr<int64_t>();
  float* out_gs = g_sigmas.data_ptr<float>();
  float* out_gc = g_rgbs.data_ptr<float>();
#pragma omp parallel
  {
    std::vector<double> value, wv, after;  // per sample of the current ray: v_i, w_i·v_i, T_{i+1}
#pragma omp for schedule(dynamic, 256)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t begin = info[2 * r], n = info[2 * r + 1];
      if (n == 0) continue;
      value.resize(n);
      wv.resize(n);
      after.resize(n);
      const double g0 = gr ? gr[3 * r] : 0.0, g1 = gr ? gr[3 * r + 1] : 0.0, g2 = gr ? gr[3 * r + 2] : 0.0;
      const double gop = go ? go[r] : 0.0, gdp = gd ? gd[r] : 0.0;
      double trans = 1.0;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = begin + j;
        const double s = static_cast<double>(sg[i]) * (static_cast<double>(te[i]) - ts[i]);
        const double w = trans * -std::expm1(-s);
        value[j] = c[3 * i] * g0 + c[3 * i + 1] * g1 + c[3 * i + 2] * g2 + gop +
                   0.5 * (static_cast<double>(ts[i]) + te[i]) * gdp;
        trans -= w;
        wv[j] = w * value[j];
        after[j] = trans;
        out_gc[3 * i] = static_cast<float>(w * g0);
        out_gc[3 * i + 1] = static_cast<float>(w * g1);
        out_gc[3 * i + 2] = static_cast<float>(w * g2);
      }
      double suffix = 0.0;  // Σ_{k>i} w_k·v_k
      for (int64_t j = n - 1; j >= 0; --j) {
        const int64_t i = begin + j;
        out_gs[i] = static_cast<float>((static_cast<double>(te[i]) - ts[i]) * (after[j] * value[j] - suffix));
        suffix += wv[j];
      }
    }
  }
  return {g_sigmas, g_rgbs};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("march", &march, "ray marching through an occupancy grid into packed samples");
  m.def("visibility", &visibility, "early-stop and alpha-threshold visibility of packed samples");
  m.def("composite_forward", &composite_forward, "alpha compositing of packed samples");
  m.def("composite_backward", &composite_backward, "gradients of composite_forward");
}
