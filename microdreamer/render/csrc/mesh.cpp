// Z-buffer triangle rasterizer for pinhole cameras (CPU, OpenMP).
//
// Input vertices are already in OpenCV camera space (x right, y down, z forward). For the ray through
// a pixel, d = ((u - cx) / fx, (v - cy) / fy, 1), the unnormalised barycentrics of triangle (p0, p1, p2)
// are w_i = d . (p_j x p_k) with (i, j, k) cyclic; they are linear in the pixel coordinates, their sum
// S = d . n, and the hit lies at depth z = det(p0, p1, p2) / S. The normalised w_i / S are the
// perspective-correct barycentrics, and the test needs no near-plane clipping: a triangle crossing
// the near plane simply gets the whole image as its bounding box. Both faces of a triangle are
// rasterised; on equal depth the lower face index wins, as in the torch reference.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

struct Setup {
  float a[3][3];  // a[i] = p_j x p_k
  float det;
  int x0, x1, y0, y1;  // inclusive pixel bounds, x0 > x1 when culled
};

constexpr int kBand = 8;  // image rows per parallel task

Setup setup_triangle(const float* p0, const float* p1, const float* p2, int width, int height, float fx,
                     float fy, float cx, float cy, float near, float far) {
  Setup s;
  const float* p[3] = {p0, p1, p2};
  for (int i = 0; i < 3; ++i) {
    const float* q = p[(i + 1) % 3];
    const float* r = p[(i + 2) % 3];
    s.a[i][0] = q[1] * r[2] - q[2] * r[1];
    s.a[i][1] = q[2] * r[0] - q[0] * r[2];
    s.a[i][2] = q[0] * r[1] - q[1] * r[0];
  }
  s.det = p0[0] * s.a[0][0] + p0[1] * s.a[0][1] + p0[2] * s.a[0][2];
  s.x0 = 1;
  s.x1 = 0;
  s.y0 = 0;
  s.y1 = -1;
  int in_front = 0, beyond = 0;
  for (int i = 0; i < 3; ++i) {
    in_front += p[i][2] > near;
    beyond += p[i][2] >= far;
  }
  if (in_front == 0 || beyond == 3) return s;
  if (in_front < 3) {  // crosses the near plane: its projection is unbounded
    s.x0 = 0;
    s.x1 = width - 1;
    s.y0 = 0;
    s.y1 = height - 1;
    return s;
  }
  float umin = std::numeric_limits<float>::max(), umax = -umin, vmin = umin, vmax = -umin;
  for (int i = 0; i < 3; ++i) {
    float u = fx * p[i][0] / p[i][2] + cx, v = fy * p[i][1] / p[i][2] + cy;
    umin = std::min(umin, u);
    umax = std::max(umax, u);
    vmin = std::min(vmin, v);
    vmax = std::max(vmax, v);
  }
  // pixel j has its centre at j + 0.5; one pixel of slack, the exact test decides
  s.x0 = std::max(0, (int)std::floor(umin - 0.5f) - 1);
  s.x1 = std::min(width - 1, (int)std::ceil(umax - 0.5f) + 1);
  s.y0 = std::max(0, (int)std::floor(vmin - 0.5f) - 1);
  s.y1 = std::min(height - 1, (int)std::ceil(vmax - 0.5f) + 1);
  return s;
}

}  // namespace

// verts [B,V,3] float32 camera space, faces [F,3] int64. Returns face_id [B,H,W] int32 (-1 empty),
// bary [B,H,W,2] float32 (weights of the face's first two vertices), depth [B,H,W] float32 (0 empty).
std::vector<torch::Tensor> rasterize(torch::Tensor verts, torch::Tensor faces, int64_t width, int64_t height,
                                     double fx, double fy, double cx, double cy, double near, double far) {
  TORCH_CHECK(verts.device().is_cpu() && faces.device().is_cpu(), "mesh rasterizer: CPU tensors expected");
  TORCH_CHECK(verts.dim() == 3 && verts.size(2) == 3, "verts must be [B,V,3]");
  TORCH_CHECK(faces.dim() == 2 && faces.size(1) == 3, "faces must be [F,3]");
  verts = verts.to(torch::kFloat32).contiguous();
  faces = faces.to(torch::kInt64).contiguous();
  const int64_t B = verts.size(0), V = verts.size(1), F = faces.size(0);
  const int W = (int)width, H = (int)height;
  auto face_id = torch::full({B, H, W}, -1, torch::kInt32);
  auto bary = torch::zeros({B, H, W, 2}, torch::kFloat32);
  auto depth = torch::zeros({B, H, W}, torch::kFloat32);
  const float* vp = verts.data_ptr<float>();
  const int64_t* fp = faces.data_ptr<int64_t>();
  TORCH_CHECK(F == 0 || (faces.min().item<int64_t>() >= 0 && faces.max().item<int64_t>() < V),
              "face index out of range");
  int32_t* id_out = face_id.data_ptr<int32_t>();
  float* bary_out = bary.data_ptr<float>();
  float* depth_out = depth.data_ptr<float>();
  const float ffx = (float)fx, ffy = (float)fy, fcx = (float)cx, fcy = (float)cy;
  const float fnear = (float)near, ffar = (float)far;

  std::vector<Setup> setups((size_t)(B * F));
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < B * F; ++k) {
    const int64_t b = k / F, f = k % F;
    const float* base = vp + b * V * 3;
    setups[k] = setup_triangle(base + fp[f * 3] * 3, base + fp[f * 3 + 1] * 3, base + fp[f * 3 + 2] * 3, W, H,
                               ffx, ffy, fcx, fcy, fnear, ffar);
  }

  const int bands = (H + kBand - 1) / kBand;
#pragma omp parallel for schedule(dynamic)
  for (int64_t task = 0; task < B * bands; ++task) {
    const int64_t b = task / bands;
    const int r0 = (int)(task % bands) * kBand, r1 = std::min(H, r0 + kBand) - 1;
    // finite sentinel: the build uses -ffast-math, which assumes no infinities
    std::vector<float> zbuf((size_t)(r1 - r0 + 1) * W, std::numeric_limits<float>::max());
    const Setup* tri = setups.data() + b * F;
    for (int64_t f = 0; f < F; ++f) {
      const Setup& s = tri[f];
      if (s.x0 > s.x1 || s.y1 < r0 || s.y0 > r1) continue;
      const int ya = std::max(r0, s.y0), yb = std::min(r1, s.y1);
      for (int yi = ya; yi <= yb; ++yi) {
        const float y = ((float)yi + 0.5f - fcy) / ffy;
        const float c0 = s.a[0][1] * y + s.a[0][2], c1 = s.a[1][1] * y + s.a[1][2], c2 = s.a[2][1] * y + s.a[2][2];
        float* zrow = zbuf.data() + (size_t)(yi - r0) * W;
        for (int xi = s.x0; xi <= s.x1; ++xi) {
          const float x = ((float)xi + 0.5f - fcx) / ffx;
          const float w0 = s.a[0][0] * x + c0, w1 = s.a[1][0] * x + c1, w2 = s.a[2][0] * x + c2;
          const float sum = w0 + w1 + w2;
          if (sum == 0.0f || w0 * sum < 0.0f || w1 * sum < 0.0f || w2 * sum < 0.0f) continue;
          const float z = s.det / sum;
          if (!(z > fnear && z < ffar && z < zrow[xi])) continue;
          zrow[xi] = z;
          const int64_t pix = (b * H + yi) * W + xi;
          id_out[pix] = (int32_t)f;
          bary_out[pix * 2] = w0 / sum;
          bary_out[pix * 2 + 1] = w1 / sum;
          depth_out[pix] = z;
        }
      }
    }
  }
  return {face_id, bary, depth};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rasterize", &rasterize, "z-buffer rasterization of camera-space triangles (face id, barycentrics, depth)");
}
