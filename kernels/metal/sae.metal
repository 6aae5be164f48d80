// Epilogue kernels of the SAE step for Apple GPUs, compiled by torch.mps.compile_shader.
//
// The matrix products run in MPS (Apple's tuned GEMMs); these kernels do everything that
// touches a [B, F] tensor between them in one pass each, mirroring kernels/reference.py:
//
//   encode_epilogue       pre + b_enc -> ReLU in place, per-chunk column sums and firing counts
//   encode_grad_epilogue  (g @ w_dec^T + l1_w) masked by feats > 0 in place, per-chunk column sums
//   sq_err_rows           per-row squared error of x_hat against x
//
// Column statistics are written per chunk of ROWS rows ([chunks, F]) and summed by the host:
// no float atomics (not in every Metal version), and the result is deterministic.
// Arguments bind to buffers in call order; Python ints arrive as `constant long&`.

#include <metal_stdlib>
using namespace metal;

constant long ROWS = 64;

template <typename T>
kernel void encode_epilogue(
    device T* feats [[buffer(0)]],              // [B, F] pre-activations in, features out
    const device T* b_enc [[buffer(1)]],        // [F]
    device float* col_sum [[buffer(2)]],        // [chunks, F] written
    device int* fired [[buffer(3)]],            // [chunks, F] written
    constant long& n_rows [[buffer(4)]],
    constant long& d_sae [[buffer(5)]],
    constant long& relu [[buffer(6)]],          // 0: add the bias only (TopK selects on the host)
    uint2 pos [[thread_position_in_grid]]) {    // x: feature, y: chunk of rows
  const long f = pos.x;
  const long chunk = pos.y;
  if (f >= d_sae) {
    return;
  }
  const float bias = float(b_enc[f]);
  float sum = 0.0f;
  int count = 0;
  const long end = (chunk + 1) * ROWS < n_rows ? (chunk + 1) * ROWS : n_rows;
  for (long r = chunk * ROWS; r < end; ++r) {
    float v = float(feats[r * d_sae + f]) + bias;
    if (relu != 0) {
      v = max(v, 0.0f);
    }
    const T stored = T(v);
    feats[r * d_sae + f] = stored;
    // Statistics of the stored (rounded) value, as the backward pass will read it.
    sum += float(stored);
    count += float(stored) > 0.0f ? 1 : 0;
  }
  col_sum[chunk * d_sae + f] = sum;
  fired[chunk * d_sae + f] = count;
}

template <typename T>
kernel void encode_grad_epilogue(
    device T* d_pre [[buffer(0)]],              // [B, F] g @ w_dec^T in, d_pre out
    const device T* feats [[buffer(1)]],        // [B, F]
    const device float* l1_w [[buffer(2)]],     // [F] g_l1 * w / B
    device float* d_b_enc [[buffer(3)]],        // [chunks, F] written
    constant long& n_rows [[buffer(4)]],
    constant long& d_sae [[buffer(5)]],
    uint2 pos [[thread_position_in_grid]]) {
  const long f = pos.x;
  const long chunk = pos.y;
  if (f >= d_sae) {
    return;
  }
  const float l1 = l1_w[f];
  float sum = 0.0f;
  const long end = (chunk + 1) * ROWS < n_rows ? (chunk + 1) * ROWS : n_rows;
  for (long r = chunk * ROWS; r < end; ++r) {
    const long i = r * d_sae + f;
    const float v = float(feats[i]) > 0.0f ? float(d_pre[i]) + l1 : 0.0f;
    const T stored = T(v);
    d_pre[i] = stored;
    sum += float(stored);
  }
  d_b_enc[chunk * d_sae + f] = sum;
}

template <typename T>
kernel void sq_err_rows(
    const device T* x_hat [[buffer(0)]],        // [B, D]
    const device T* x [[buffer(1)]],            // [B, D]
    device float* out [[buffer(2)]],            // [B] written
    constant long& n_rows [[buffer(3)]],
    constant long& d_in [[buffer(4)]],
    uint r [[thread_position_in_grid]]) {
  if (long(r) >= n_rows) {
    return;
  }
  float sum = 0.0f;
  for (long d = 0; d < d_in; ++d) {
    const float e = float(x_hat[long(r) * d_in + d]) - float(x[long(r) * d_in + d]);
    sum += e * e;
  }
  out[r] = sum;
}

// Explicit instantiations repeat the attributed signatures, as Metal requires.
#define INSTANTIATE(T, SUFFIX)                                                              \
  template [[host_name("encode_epilogue_" #SUFFIX)]] kernel void encode_epilogue<T>(        \
      device T* feats [[buffer(0)]], const device T* b_enc [[buffer(1)]],                   \
      device float* col_sum [[buffer(2)]], device int* fired [[buffer(3)]],                 \
      constant long& n_rows [[buffer(4)]], constant long& d_sae [[buffer(5)]],              \
      constant long& relu [[buffer(6)]], uint2 pos [[thread_position_in_grid]]);            \
  template [[host_name("encode_grad_epilogue_" #SUFFIX)]] kernel void                       \
  encode_grad_epilogue<T>(                                                                  \
      device T* d_pre [[buffer(0)]], const device T* feats [[buffer(1)]],                   \
      const device float* l1_w [[buffer(2)]], device float* d_b_enc [[buffer(3)]],          \
      constant long& n_rows [[buffer(4)]], constant long& d_sae [[buffer(5)]],              \
      uint2 pos [[thread_position_in_grid]]);                                               \
  template [[host_name("sq_err_rows_" #SUFFIX)]] kernel void sq_err_rows<T>(                \
      const device T* x_hat [[buffer(0)]], const device T* x [[buffer(1)]],                 \
      device float* out [[buffer(2)]], constant long& n_rows [[buffer(3)]],                 \
      constant long& d_in [[buffer(4)]], uint r [[thread_position_in_grid]]);

INSTANTIATE(float, float)
INSTANTIATE(half, half)
#if __METAL_VERSION__ >= 310
INSTANTIATE(bfloat, bfloat)
#endif
