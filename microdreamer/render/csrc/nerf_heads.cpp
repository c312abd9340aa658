// The NeRF's two MLP heads on the CPU (OpenMP), blocked so that activations never leave the cache, with a
// hand-written backward. Semantics are those of microdreamer/representations/nerf_heads.py (heads_torch,
// the reference the tests compare against):
//   density network: bias-free linear layers with ReLU between them, then sigma = softplus(raw + bias)
//                    (torch's softplus: raw itself above 20);
//   feature network: the same kind of network, then rgb = sigmoid(z).
// Samples are processed in blocks of S; inside a block every activation is stored feature-major
// ([dim][S]), so each layer is a small matrix product whose inner loop runs over 16 samples at a time
// (vector lanes) with several outputs accumulated at once (independent FMA chains). The backward
// recomputes the block's forward, then propagates back; weight gradients are summed per block and the
// blocks are added in order, so results do not depend on the thread count.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t S = 256;   // samples per block
constexpr int64_t LANES = 16;  // samples per inner vector loop of the weight gradients
constexpr int64_t MLANES = 32;  // samples per inner vector loop of the matrix products
constexpr int64_t JB = 8;     // outputs accumulated together

// Y[j][s] = sum_k W[j][k] X[k][s] for j < out, k < in, s < S (W row-major [out][in]).
void matmul(const float* __restrict W, const float* __restrict X, float* __restrict Y, int64_t out, int64_t in) {
  int64_t j = 0;
  for (; j + JB <= out; j += JB) {
    for (int64_t s0 = 0; s0 < S; s0 += MLANES) {
      float acc[JB][MLANES] = {};
      for (int64_t k = 0; k < in; ++k) {
        const float* __restrict x = X + k * S + s0;
        for (int64_t jj = 0; jj < JB; ++jj) {
          const float w = W[(j + jj) * in + k];
#pragma omp simd
          for (int64_t l = 0; l < MLANES; ++l) acc[jj][l] += w * x[l];
        }
      }
      for (int64_t jj = 0; jj < JB; ++jj)
        for (int64_t l = 0; l < MLANES; ++l) Y[(j + jj) * S + s0 + l] = acc[jj][l];
    }
  }
  for (; j < out; ++j) {  // the few outputs of a head
    for (int64_t s0 = 0; s0 < S; s0 += MLANES) {
      float acc[MLANES] = {};
      for (int64_t k = 0; k < in; ++k) {
        const float w = W[j * in + k];
        const float* __restrict x = X + k * S + s0;
#pragma omp simd
        for (int64_t l = 0; l < MLANES; ++l) acc[l] += w * x[l];
      }
      for (int64_t l = 0; l < MLANES; ++l) Y[j * S + s0 + l] = acc[l];
    }
  }
}

// G[j][k] += sum_s D[j][s] X[k][s] (the weight gradient of a layer over one block): 4×4 tiles of (j, k),
// each accumulated over the block in vector lanes and reduced once.
void outer(const float* __restrict D, const float* __restrict X, float* __restrict G, int64_t out, int64_t in) {
  constexpr int64_t B = 4;
  for (int64_t j = 0; j < out; j += B) {
    const int64_t nj = std::min(B, out - j);
    const float* d[B];
    for (int64_t a = 0; a < B; ++a) d[a] = D + std::min(j + a, out - 1) * S;  // repeats past the edge
    for (int64_t k = 0; k < in; k += B) {
      const int64_t nk = std::min(B, in - k);
      const float* x[B];
      for (int64_t b = 0; b < B; ++b) x[b] = X + std::min(k + b, in - 1) * S;
      float acc[B][B][LANES] = {};
      for (int64_t s0 = 0; s0 < S; s0 += LANES) {
#pragma GCC unroll 4
        for (int64_t a = 0; a < B; ++a) {
#pragma GCC unroll 4
          for (int64_t b = 0; b < B; ++b) {
#pragma omp simd
            for (int64_t l = 0; l < LANES; ++l) acc[a][b][l] += d[a][s0 + l] * x[b][s0 + l];
          }
        }
      }
      for (int64_t a = 0; a < nj; ++a)
        for (int64_t b = 0; b < nk; ++b) {
          float sum = 0.0f;
          for (int64_t l = 0; l < LANES; ++l) sum += acc[a][b][l];
          G[(j + a) * in + k + b] += sum;
        }
    }
  }
}

// One network: weights W_l [out_l][in_l] and their transposes.
struct Net {
  std::vector<std::vector<float>> w, wt;
  std::vector<int64_t> in, out, offset;  // offset: first weight of each layer in a flat gradient buffer
  int64_t widest = 0, params = 0;

  explicit Net(const std::vector<torch::Tensor>& weights) {
    for (const auto& t : weights) {
      auto c = t.contiguous();
      const int64_t o = c.size(0), i = c.size(1);
      const float* src = c.data_ptr<float>();
      std::vector<float> fw(src, src + o * i), tw(o * i);
      for (int64_t a = 0; a < o; ++a)
        for (int64_t b = 0; b < i; ++b) tw[b * o + a] = fw[a * i + b];
      w.push_back(std::move(fw));
      wt.push_back(std::move(tw));
      in.push_back(i);
      out.push_back(o);
      offset.push_back(params);
      params += o * i;
      widest = std::max({widest, i, o});
    }
  }
  int64_t layers() const { return static_cast<int64_t>(w.size()); }

  // acts[l] ([in_l][S]) is layer l's input, acts[L] the raw outputs; ReLU on all but the last layer.
  void forward(std::vector<std::vector<float>>& acts) const {
    for (int64_t l = 0; l < layers(); ++l) {
      matmul(w[l].data(), acts[l].data(), acts[l + 1].data(), out[l], in[l]);
      if (l + 1 < layers()) {
        float* y = acts[l + 1].data();
#pragma omp simd
        for (int64_t i = 0; i < out[l] * S; ++i) y[i] = y[i] > 0.0f ? y[i] : 0.0f;
      }
    }
  }

  // grad ([out_{L-1}][S]) holds d(loss)/d(raw outputs); accumulates weight gradients into gw and
  // d(loss)/d(input) into gx ([in_0][S]). Uses grad and tmp as scratch.
  void backward(const std::vector<std::vector<float>>& acts, std::vector<float>& grad, std::vector<float>& tmp,
                float* gw, float* gx) const {
    for (int64_t l = layers() - 1; l >= 0; --l) {
      outer(grad.data(), acts[l].data(), gw + offset[l], out[l], in[l]);
      matmul(wt[l].data(), grad.data(), tmp.data(), in[l], out[l]);
      const float* a = acts[l].data();
      if (l == 0) {
#pragma omp simd
        for (int64_t i = 0; i < in[0] * S; ++i) gx[i] += tmp[i];
      } else {
#pragma omp simd
        for (int64_t i = 0; i < in[l] * S; ++i) grad[i] = a[i] > 0.0f ? tmp[i] : 0.0f;
      }
    }
  }
};

inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

struct Workspace {
  std::vector<std::vector<float>> dacts, facts;
  std::vector<float> grad, tmp, gx;
  Workspace(const Net& dn, const Net& fn, int64_t F) {
    for (int64_t l = 0; l <= dn.layers(); ++l) dacts.emplace_back(std::max<int64_t>(dn.widest, F) * S, 0.0f);
    for (int64_t l = 0; l <= fn.layers(); ++l) facts.emplace_back(std::max<int64_t>(fn.widest, F) * S, 0.0f);
    const int64_t widest = std::max({dn.widest, fn.widest, F});
    grad.assign(widest * S, 0.0f);
    tmp.assign(widest * S, 0.0f);
    gx.assign(F * S, 0.0f);
  }
  // the block's encodings, feature-major, zero-padded past n samples
  void load(const float* x, int64_t n, int64_t F) {
    for (int64_t k = 0; k < F; ++k) {
      float* dst = dacts[0].data() + k * S;
      for (int64_t s = 0; s < n; ++s) dst[s] = x[s * F + k];
      std::fill(dst + n, dst + S, 0.0f);
      std::copy(dst, dst + S, facts[0].data() + k * S);
    }
  }
};

}  // namespace

// enc [N,F]; bias [N]; density / feature weights in torch layout. Returns sigma [N], rgb [N,3] (rgb empty
// when the feature network has no layers: density only).
std::vector<torch::Tensor> forward(torch::Tensor enc, torch::Tensor bias, std::vector<torch::Tensor> density,
                                   std::vector<torch::Tensor> feature) {
  const Net dn(density), fn(feature);
  const int64_t N = enc.size(0), F = enc.size(1);
  auto sigma = torch::empty({N}, torch::kFloat32);
  const bool colour = fn.layers() > 0;
  auto rgb = torch::empty({colour ? N : 0, 3}, torch::kFloat32);
  const float* x = enc.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  float* out_s = sigma.data_ptr<float>();
  float* out_c = rgb.data_ptr<float>();
  const int64_t blocks = (N + S - 1) / S;
#pragma omp parallel
  {
    Workspace ws(dn, fn, F);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t s0 = blk * S, n = std::min(S, N - s0);
      ws.load(x + s0 * F, n, F);
      dn.forward(ws.dacts);
      const float* raw = ws.dacts[dn.layers()].data();
      for (int64_t s = 0; s < n; ++s) out_s[s0 + s] = softplus(raw[s] + b[s0 + s]);
      if (!colour) continue;
      fn.forward(ws.facts);
      const float* z = ws.facts[fn.layers()].data();
      for (int64_t s = 0; s < n; ++s)
        for (int c = 0; c < 3; ++c) out_c[3 * (s0 + s) + c] = sigmoid(z[c * S + s]);
    }
  }
  return {sigma, rgb};
}

// Gradients of forward for d(loss)/d(sigma) [N] and d(loss)/d(rgb) [N,3] (empty: zero). Returns g_enc [N,F]
// (empty unless want_enc), then the weight gradients of the density and feature networks in torch layout.
std::vector<torch::Tensor> backward(torch::Tensor enc, torch::Tensor bias, std::vector<torch::Tensor> density,
                                    std::vector<torch::Tensor> feature, torch::Tensor g_sigma, torch::Tensor g_rgb,
                                    bool want_enc) {
  const Net dn(density), fn(feature);
  const int64_t N = enc.size(0), F = enc.size(1);
  const int64_t nw = dn.params + fn.params;
  const int64_t blocks = (N + S - 1) / S;
  std::vector<float> partial(static_cast<size_t>(std::max<int64_t>(blocks, 1) * nw), 0.0f);
  auto g_enc = want_enc ? torch::empty({N, F}, torch::kFloat32) : torch::empty({0}, torch::kFloat32);
  const float* x = enc.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  const float* gs = g_sigma.numel() ? g_sigma.data_ptr<float>() : nullptr;
  const float* gc = g_rgb.numel() ? g_rgb.data_ptr<float>() : nullptr;
  float* gx_all = want_enc ? g_enc.data_ptr<float>() : nullptr;
#pragma omp parallel
  {
    Workspace ws(dn, fn, F);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t s0 = blk * S, n = std::min(S, N - s0);
      float* gw = partial.data() + blk * nw;
      ws.load(x + s0 * F, n, F);
      std::fill(ws.gx.begin(), ws.gx.end(), 0.0f);
      if (gs) {
        dn.forward(ws.dacts);
        const float* raw = ws.dacts[dn.layers()].data();
        std::fill(ws.grad.begin(), ws.grad.begin() + S, 0.0f);
        for (int64_t s = 0; s < n; ++s) {
          const float r = raw[s] + b[s0 + s];
          ws.grad[s] = gs[s0 + s] * (r > 20.0f ? 1.0f : sigmoid(r));
        }
        dn.backward(ws.dacts, ws.grad, ws.tmp, gw, ws.gx.data());
      }
      if (gc) {
        fn.forward(ws.facts);
        const float* z = ws.facts[fn.layers()].data();
        std::fill(ws.grad.begin(), ws.grad.begin() + 3 * S, 0.0f);
        for (int64_t s = 0; s < n; ++s)
          for (int c = 0; c < 3; ++c) {
            const float y = sigmoid(z[c * S + s]);
            ws.grad[c * S + s] = gc[3 * (s0 + s) + c] * y * (1.0f - y);
          }
        fn.backward(ws.facts, ws.grad, ws.tmp, gw + dn.params, ws.gx.data());
      }
      if (gx_all)
        for (int64_t s = 0; s < n; ++s)
          for (int64_t k = 0; k < F; ++k) gx_all[(s0 + s) * F + k] = ws.gx[k * S + s];
    }
  }
  // blocks in order, one weight at a time (parallel over weights)
  std::vector<float> total(nw, 0.0f);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < nw; ++i) {
    float acc = 0.0f;
    for (int64_t blk = 0; blk < blocks; ++blk) acc += partial[blk * nw + i];
    total[i] = acc;
  }
  std::vector<torch::Tensor> result{g_enc};
  int64_t offset = 0;
  for (const Net* net : {&dn, &fn})
    for (int64_t l = 0; l < net->layers(); ++l) {
      const int64_t count = net->in[l] * net->out[l];
      auto g = torch::empty({net->out[l], net->in[l]}, torch::kFloat32);
      std::copy(total.begin() + offset, total.begin() + offset + count, g.data_ptr<float>());
      offset += count;
      result.push_back(g);
    }
  return result;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "NeRF density and colour heads, blocked");
  m.def("backward", &backward, "gradients of forward");
}
