// quantkit CPU extension: x @ W^T directly on ggml block bytes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), as
// GGUF stores them: integer VNNI kernels for few activation rows, a dequantize-a-tile + bf16 at::mm path for many.
// Built on first use by quantkit/kernels/cpu_ext.py (torch.utils.cpp_extension.load, -O3 -march=native; the
// Python module docstring describes the arithmetic). The operators are registered with TORCH_LIBRARY as
// torch.ops.quantkit_cpu.* (no pybind module: the library is loaded with torch.ops.load_library).
//
// load_inline, which built this before, put `#include <torch/extension.h>` in front of the source; it stays, so the
// translation unit is the one that was compiled before.
#include <torch/extension.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define QK_AVX512 1
#endif

namespace {

constexpr int QK = 256;
constexpr int Q6K_BYTES = 210;

inline float half_bits(const uint8_t* p) {
  return static_cast<float>(c10::Half(static_cast<uint16_t>(p[0] | (p[1] << 8)), c10::Half::from_bits()));
}

constexpr float XQ_MAX = 16383.f;  // activations become 15-bit integers: x = 128 * hi + lo, hi int8, lo 0..127

// x row [K] -> q [K] int16 (|q| <= 16383) and d [K/256]: x ~= q * d (rounding error <= 3e-5 of max|x| per block)
void quantize_x15(const float* x, int64_t k, int16_t* q, float* d) {
  for (int64_t b = 0; b < k / QK; ++b) {
    const float* xb = x + b * QK;
    float amax = 0.f;
    for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(xb[i]));
    float iscale = amax > 0.f ? XQ_MAX / amax : 0.f;
    d[b] = amax > 0.f ? 1.f / iscale : 0.f;
    for (int i = 0; i < QK; ++i) {
      float v = std::nearbyint(xb[i] * iscale);
      q[b * QK + i] = static_cast<int16_t>(std::min(XQ_MAX, std::max(-XQ_MAX, v)));
    }
  }
}

// one weight row, one activation row: sum_b d_w * d_x * sum_j sc_j * sum_{i in j} (code_i - 32) * xq_i
float q6k_row_scalar(const uint8_t* row, int64_t nb, const int16_t* xq, const float* xd) {
  float acc = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * Q6K_BYTES;
    const uint8_t* ql = blk;
    const uint8_t* qh = blk + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    const int16_t* x = xq + b * QK;
    int32_t sums[16] = {0};
    for (int h = 0; h < 2; ++h) {
      const int base = h * 128;
      for (int l = 0; l < 32; ++l) {
        int c1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        int c2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        int c3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        int c4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        sums[(base + l) / 16] += c1 * x[base + l];
        sums[(base + l + 32) / 16] += c2 * x[base + l + 32];
        sums[(base + l + 64) / 16] += c3 * x[base + l + 64];
        sums[(base + l + 96) / 16] += c4 * x[base + l + 96];
      }
      ql += 64;
      qh += 32;
    }
    float blk_acc = 0.f;
    for (int j = 0; j < 16; ++j) blk_acc += static_cast<float>(sc[j]) * static_cast<float>(sums[j]);
    acc += half_bits(blk + 208) * xd[b] * blk_acc;
  }
  return acc;
}

#ifdef QK_AVX512
// The weight rows stream from memory once per decode step: each kernel asks for the bytes PREFETCH_AHEAD past the
// block it is about to read (rows of a tile are adjacent, so this runs on into the next row). The hardware
// prefetcher alone kept ~4.8 GB/s of Q4_K streaming on one core; with this, ~9.5 (benchmarks/cpu_kernel_bandwidth.py).
constexpr int PREFETCH_AHEAD = 2048;

inline void prefetch_ahead(const uint8_t* p, int bytes) {
  for (int l = 0; l < bytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH_AHEAD + l), _MM_HINT_T0);
}

// 15-bit activations as two int8 digits for vpdpbusd: x = 128 * hi + lo
void split_digits(const int16_t* q, int64_t k, int8_t* hi, int8_t* lo) {
  for (int64_t i = 0; i < k; ++i) {
    hi[i] = static_cast<int8_t>(q[i] >> 7);  // arithmetic shift: floor division by 128
    lo[i] = static_cast<int8_t>(q[i] & 127);
  }
}

// Activations for the Q6_K VNNI kernel: the digits and, per 16-value sub-block, -32 * sum(x) (the codes are used
// unsigned, 0..63; this restores the -32 offset).
void split_x15(const int16_t* q, int64_t k, int8_t* hi, int8_t* lo, float* neg32sum) {
  split_digits(q, k, hi, lo);
  for (int64_t j = 0; j < k / 16; ++j) {
    int32_t s = 0;
    for (int i = 0; i < 16; ++i) s += q[j * 16 + i];
    neg32sum[j] = -32.f * static_cast<float>(s);
  }
}

// 16 vectors -> one vector holding their 16 horizontal sums (in a fixed lane order, see reduce16_order)
inline __m512 reduce16(const __m512* v) {
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    z[i] = _mm512_add_ps(_mm512_unpacklo_ps(y[2 * i], y[2 * i + 1]), _mm512_unpackhi_ps(y[2 * i], y[2 * i + 1]));
  return _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x44), _mm512_shuffle_ps(z[0], z[1], 0xEE));
}

// the permutation that puts reduce16's output in input order (found by running it on v[i] = i)
__m512i reduce16_order() {
  __m512 v[16];
  for (int i = 0; i < 16; ++i) v[i] = _mm512_set1_ps(static_cast<float>(i) / 16.f);
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, reduce16(v));
  alignas(64) int32_t inv[16];
  for (int l = 0; l < 16; ++l) inv[static_cast<int>(lanes[l] + 0.5f)] = l;
  return _mm512_load_si512(inv);
}

// Q6_K codes 0..63 of values 128h .. 128h+127 of a super-block, in value order, as two 64-byte vectors
inline void q6k_codes128(const uint8_t* blk, int h, __m512i* c) {
  const __m512i m4 = _mm512_set1_epi8(0x0F), m6 = _mm512_set1_epi8(0x3F);
  // the 2 high bits of the 4 values sharing a qh byte sit at bits 0-1, 2-3, 4-5, 6-7; move each pair to bits 4-5
  const __m512i shl_ab = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
  const __m512i shr_cd = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
  const __m512i lo = _mm512_loadu_si512(blk + 64 * h);
  const __m512i hi = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h)));
  // ternary-logic 0xE4 = m4 ? low-nibble source : high-bits source; then keep 6 bits
  c[0] = _mm512_and_si512(_mm512_ternarylogic_epi32(lo, _mm512_sllv_epi16(hi, shl_ab), m4, 0xE4), m6);
  c[1] = _mm512_and_si512(
      _mm512_ternarylogic_epi32(_mm512_srli_epi16(lo, 4), _mm512_srlv_epi16(hi, shr_cd), m4, 0xE4), m6);
}

// one activation row (decode): accumulators stay in registers, 16 rows share one horizontal reduction
void q6k_rows_avx512_m1(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t nb,
                        const int8_t* xhi, const int8_t* xlo, const float* xneg, const float* xd, float* out) {
  __m512i idx[4];
  for (int v = 0; v < 4; ++v) {
    alignas(64) int32_t t[16];
    for (int i = 0; i < 16; ++i) t[i] = 4 * v + i / 4;
    idx[v] = _mm512_load_si512(t);
  }
  const __m512i order = reduce16_order();
  __m512 tile[16];
  for (int64_t j0 = n0; j0 < n1; j0 += 16) {
    const int64_t rows = std::min<int64_t>(16, n1 - j0);
    for (int64_t i = 0; i < 16; ++i) {
      __m512 acc = _mm512_setzero_ps();
      if (i < rows) {
        const uint8_t* row = w + (j0 + i) * row_bytes;
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* blk = row + b * Q6K_BYTES;
          prefetch_ahead(blk, Q6K_BYTES);
          const __m512 scf = _mm512_cvtepi32_ps(
              _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192))));
          __m512 blk_acc = _mm512_mul_ps(scf, _mm512_loadu_ps(xneg + b * 16));
          for (int h = 0; h < 2; ++h) {
            __m512i c[2];
            q6k_codes128(blk, h, c);
            for (int e = 0; e < 2; ++e) {
              const int v = 2 * h + e;
              const int64_t off = b * QK + 64 * v;
              const __m512i zero = _mm512_setzero_si512();
              __m512i dh = _mm512_dpbusd_epi32(zero, c[e], _mm512_loadu_si512(xhi + off));
              __m512i dl = _mm512_dpbusd_epi32(zero, c[e], _mm512_loadu_si512(xlo + off));
              __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(dh, 7), dl);
              blk_acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(idx[v], scf), blk_acc);
            }
          }
          acc = _mm512_fmadd_ps(blk_acc, _mm512_set1_ps(half_bits(blk + 208) * xd[b]), acc);
        }
      }
      tile[i] = acc;
    }
    const __m512 sums = _mm512_permutexvar_ps(order, reduce16(tile));
    _mm512_mask_storeu_ps(out + j0, static_cast<__mmask16>((1u << rows) - 1u), sums);
  }
}

// weight rows [n0, n1) against all M activation rows; codes are unpacked once per super-block
void q6k_rows_avx512(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t nb, int64_t m,
                     int64_t k, const int8_t* xhi, const int8_t* xlo, const float* xneg, const float* xd, float* out,
                     int64_t n) {
  __m512i idx[4];
  for (int v = 0; v < 4; ++v) {
    alignas(64) int32_t t[16];
    for (int i = 0; i < 16; ++i) t[i] = 4 * v + i / 4;  // lane i of a 64-value chunk sums values 4i..4i+3
    idx[v] = _mm512_load_si512(t);
  }
  std::vector<__m512> acc(m);
  for (int64_t j = n0; j < n1; ++j) {
    const uint8_t* row = w + j * row_bytes;
    for (int64_t r = 0; r < m; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * Q6K_BYTES;
      __m512i codes[4];  // 4 chunks of 64 unsigned codes, in value order
      for (int h = 0; h < 2; ++h) q6k_codes128(blk, h, codes + 2 * h);
      const __m512 scf = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192))));
      __m512 scv[4];
      for (int v = 0; v < 4; ++v) scv[v] = _mm512_permutexvar_ps(idx[v], scf);
      const float dw = half_bits(blk + 208);
      for (int64_t r = 0; r < m; ++r) {
        const int64_t off = r * k + b * QK;
        __m512 blk_acc = _mm512_mul_ps(scf, _mm512_loadu_ps(xneg + off / 16));
        for (int v = 0; v < 4; ++v) {
          const __m512i zero = _mm512_setzero_si512();
          __m512i dh = _mm512_dpbusd_epi32(zero, codes[v], _mm512_loadu_si512(xhi + off + 64 * v));
          __m512i dl = _mm512_dpbusd_epi32(zero, codes[v], _mm512_loadu_si512(xlo + off + 64 * v));
          __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(dh, 7), dl);
          blk_acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scv[v], blk_acc);
        }
        acc[r] = _mm512_fmadd_ps(blk_acc, _mm512_set1_ps(dw * xd[r * nb + b]), acc[r]);
      }
    }
    for (int64_t r = 0; r < m; ++r) out[r * n + j] = _mm512_reduce_add_ps(acc[r]);
  }
}
#endif

// The common front of the three matmuls: checked inputs, x as float32 and rounded to 15-bit integers per 256 values
// (quantize_x15), and the block bytes made contiguous.
struct Front {
  int64_t m, k, n, nb, row_bytes;
  at::Tensor x, d8, out;  // out: [m, n] float32, to be filled
  std::vector<int16_t> xq;
  std::vector<float> xd;
  const uint8_t* w;  // the block bytes, row j at w + j * row_bytes
  float* op;
};

Front front(const at::Tensor& x_in, const at::Tensor& data, int64_t bytes_per_256, const char* name,
            const char* layout) {
  TORCH_CHECK(x_in.dim() == 2 && data.dim() == 2 && data.scalar_type() == at::kByte, name, ": bad inputs");
  Front f;
  f.m = x_in.size(0);
  f.k = x_in.size(1);
  f.n = data.size(0);
  f.nb = f.k / QK;
  TORCH_CHECK(f.k % QK == 0 && data.size(1) == f.nb * bytes_per_256, name,
              ": K must be a multiple of 256 and data ", layout);
  f.x = x_in.to(at::kFloat).contiguous();
  f.d8 = data.contiguous();
  f.xq.resize(f.m * f.k);
  f.xd.resize(f.m * f.nb);
  const float* xp = f.x.data_ptr<float>();
  for (int64_t r = 0; r < f.m; ++r) quantize_x15(xp + r * f.k, f.k, f.xq.data() + r * f.k, f.xd.data() + r * f.nb);
  f.row_bytes = f.nb * bytes_per_256;
  f.out = at::empty({f.m, f.n}, f.x.options());
  f.w = f.d8.data_ptr<uint8_t>();
  f.op = f.out.data_ptr<float>();
  return f;
}

// out[r, j] = row_value(bytes of weight row j, r) for weight rows [n0, n1) and every activation row r.
template <class RowValue>
void scalar_rows(const Front& f, int64_t n0, int64_t n1, RowValue row_value) {
  for (int64_t j = n0; j < n1; ++j)
    for (int64_t r = 0; r < f.m; ++r) f.op[r * f.n + j] = row_value(f.w + j * f.row_bytes, r);
}

#ifdef QK_AVX512
// The same from 16-lane partial sums, row_vector(bytes of weight row j, r): 16 weight rows at a time are reduced
// together and stored with one masked store; each tile of 16 weight rows serves every activation row before the next
// tile is read.
template <class RowVector>
void tiled_rows_avx512(const Front& f, int64_t n0, int64_t n1, RowVector row_vector) {
  const __m512i order = reduce16_order();
  __m512 tile[16];
  for (int64_t j0 = n0; j0 < n1; j0 += 16) {  // the 16 weight rows stay in cache for all M activation rows
    const int64_t rows = std::min<int64_t>(16, n1 - j0);
    for (int64_t r = 0; r < f.m; ++r) {
      for (int64_t i = 0; i < 16; ++i)
        tile[i] = i < rows ? row_vector(f.w + (j0 + i) * f.row_bytes, r) : _mm512_setzero_ps();
      _mm512_mask_storeu_ps(f.op + r * f.n + j0, static_cast<__mmask16>((1u << rows) - 1u),
                            _mm512_permutexvar_ps(order, reduce16(tile)));
    }
  }
}
#endif

at::Tensor q6k_matmul(const at::Tensor& x_in, const at::Tensor& data, bool portable) {
  Front f = front(x_in, data, Q6K_BYTES, "q6k_matmul", "[N, K/256*210]");
  const int64_t m = f.m, k = f.k, n = f.n, nb = f.nb, row_bytes = f.row_bytes;
  const std::vector<int16_t>& xq = f.xq;
  const std::vector<float>& xd = f.xd;
  float* op = f.op;
  const uint8_t* w = f.w;
#ifdef QK_AVX512
  std::vector<int8_t> xhi(portable ? 0 : m * k), xlo(portable ? 0 : m * k);
  std::vector<float> xneg(portable ? 0 : m * k / 16);
  if (!portable) split_x15(xq.data(), m * k, xhi.data(), xlo.data(), xneg.data());
#endif
  at::parallel_for(0, n, 256, [&](int64_t n0, int64_t n1) {
#ifdef QK_AVX512
    if (!portable && m == 1) {
      q6k_rows_avx512_m1(w, row_bytes, n0, n1, nb, xhi.data(), xlo.data(), xneg.data(), xd.data(), op);
      return;
    }
    if (!portable) {
      q6k_rows_avx512(w, row_bytes, n0, n1, nb, m, k, xhi.data(), xlo.data(), xneg.data(), xd.data(), op, n);
      return;
    }
#endif
    scalar_rows(f, n0, n1, [&](const uint8_t* row, int64_t r) {
      return q6k_row_scalar(row, nb, xq.data() + r * k, xd.data() + r * nb);
    });
  });
  return f.out;
}

// ---- Q8_0: blocks of 34 bytes (f16 d, 32 int8 codes), w = d * code ----
constexpr int Q80_BYTES = 34;

float q8_0_row_scalar(const uint8_t* row, int64_t nb32, const int16_t* xq, const float* xd) {
  float acc = 0.f;
  for (int64_t b = 0; b < nb32; ++b) {
    const uint8_t* blk = row + b * Q80_BYTES;
    const int8_t* qs = reinterpret_cast<const int8_t*>(blk + 2);
    int32_t sum = 0;
    for (int i = 0; i < 32; ++i) sum += qs[i] * xq[b * 32 + i];
    acc += half_bits(blk) * xd[b / 8] * static_cast<float>(sum);
  }
  return acc;
}

#ifdef QK_AVX512
// Activations for the 32-value block types: hi/lo digits and, per 64 values, a 16-lane vector holding
// factor * sum(x) of its first 32-value block in lane 0 and of its second in lane 8 (Q8_0: factor -128, its codes
// are used as unsigned code + 128; Q4_0/Q4_1/Q5_0/Q5_1: factor 1, the kernel applies the offset or the min)
void prepare_pair_sums(const int16_t* q, int64_t k, int8_t* hi, int8_t* lo, float* sums, float factor) {
  split_digits(q, k, hi, lo);
  for (int64_t c = 0; c < k / 64; ++c) {
    for (int l = 0; l < 16; ++l) sums[c * 16 + l] = 0.f;
    for (int h = 0; h < 2; ++h) {
      int32_t s = 0;
      for (int i = 0; i < 32; ++i) s += q[c * 64 + h * 32 + i];
      sums[c * 16 + h * 8] = factor * static_cast<float>(s);
    }
  }
}

// the two fp16 scales at a and b as a vector: lanes 0-7 a, lanes 8-15 b
inline __m512 pair_scales(const uint8_t* a, const uint8_t* b) {
  uint16_t d0, d1;
  std::memcpy(&d0, a, 2);
  std::memcpy(&d1, b, 2);
  return _mm512_cvtph_ps(_mm256_set_m128i(_mm_set1_epi16(static_cast<short>(d1)), _mm_set1_epi16(static_cast<short>(d0))));
}

// one weight row against one activation row -> a 16-lane partial-sum vector
inline __m512 q8_0_row_avx512(const uint8_t* row, int64_t k, const int8_t* xhi, const int8_t* xlo,
                              const float* corr, const float* xd) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b256 = 0; b256 < k / QK; ++b256) {
    prefetch_ahead(row + b256 * 8 * Q80_BYTES, 8 * Q80_BYTES);
    __m512 blk_acc = _mm512_setzero_ps();
    for (int p = 0; p < 4; ++p) {  // pairs of 32-value blocks
      const int64_t c = b256 * 4 + p;
      const uint8_t* blk = row + c * 2 * Q80_BYTES;
      __m512i u = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + Q80_BYTES + 2)), 1);
      u = _mm512_xor_si512(u, flip);
      const __m512i zero = _mm512_setzero_si512();
      __m512i dh = _mm512_dpbusd_epi32(zero, u, _mm512_loadu_si512(xhi + c * 64));
      __m512i dl = _mm512_dpbusd_epi32(zero, u, _mm512_loadu_si512(xlo + c * 64));
      __m512 dot = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(dh, 7), dl)),
                                 _mm512_loadu_ps(corr + c * 16));
      blk_acc = _mm512_fmadd_ps(dot, pair_scales(blk, blk + Q80_BYTES), blk_acc);
    }
    acc = _mm512_fmadd_ps(blk_acc, _mm512_set1_ps(xd[b256]), acc);
  }
  return acc;
}
#endif


// ---- Q4_K / Q5_K super-blocks of 256: f16 d, f16 dmin, 12 bytes of 6-bit (scale, min) x 8, then Q5_K qh[32],
// then qs[128]; value 32s + l = (nibble s%2 of qs[32(s/2) + l]) [| (bit s of qh[l]) << 4 for Q5_K];
// w = d * sc_s * q - dmin * m_s. KQ<true> is Q5_K (176 bytes), KQ<false> Q4_K (144 bytes). ----
template <bool Q5>
struct KQ {
  static constexpr int bytes = Q5 ? 176 : 144;
  static constexpr int qs = Q5 ? 48 : 16;
};

inline void k_scale_min(const uint8_t* s, int32_t* sc, int32_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    mn[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

template <bool Q5>
float kq_row_scalar(const uint8_t* row, int64_t nb, const int16_t* xq, const float* xd) {
  float acc = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * KQ<Q5>::bytes;
    int32_t sc[8], mn[8];
    k_scale_min(blk + 4, sc, mn);
    const uint8_t* qh = blk + 16;
    const uint8_t* qs = blk + KQ<Q5>::qs;
    const int16_t* x = xq + b * QK;
    float dots = 0.f, mins = 0.f;
    for (int sb = 0; sb < 8; ++sb) {
      int32_t dot = 0, xs = 0;
      for (int l = 0; l < 32; ++l) {
        int q = (qs[32 * (sb / 2) + l] >> (4 * (sb % 2))) & 0xF;
        if (Q5) q |= ((qh[l] >> sb) & 1) << 4;
        dot += q * x[32 * sb + l];
        xs += x[32 * sb + l];
      }
      dots += static_cast<float>(sc[sb]) * static_cast<float>(dot);
      mins += static_cast<float>(mn[sb]) * static_cast<float>(xs);
    }
    acc += xd[b] * (half_bits(blk) * dots - half_bits(blk + 2) * mins);
  }
  return acc;
}

#ifdef QK_AVX512
// per 256 values: a 16-lane vector with the 8 sub-block sums of x in lanes 0-7
void kq_prepare_x(const int16_t* q, int64_t k, int8_t* hi, int8_t* lo, float* xs) {
  split_digits(q, k, hi, lo);
  for (int64_t b = 0; b < k / QK; ++b)
    for (int l = 0; l < 16; ++l) {
      int32_t s = 0;
      if (l < 8)
        for (int i = 0; i < 32; ++i) s += q[b * QK + l * 32 + i];
      xs[b * 16 + l] = static_cast<float>(s);
    }
}

// the 12 packed bytes -> 8 scales in lanes 0-7 and 8 mins in lanes 8-15 (as k_scale_min, in registers: a vector load
// of scalar stores would stall on store forwarding once per super-block)
inline __m512 kq_scale_min_vec(const uint8_t* s) {
  uint32_t u[3];
  std::memcpy(u, s, 12);
  const uint32_t m6 = 0x3f3f3f3fu, m4 = 0x0f0f0f0fu, m2 = 0x03030303u;
  const uint32_t sc_lo = u[0] & m6, mn_lo = u[1] & m6;
  const uint32_t sc_hi = (u[2] & m4) | (((u[0] >> 6) & m2) << 4);
  const uint32_t mn_hi = ((u[2] >> 4) & m4) | (((u[1] >> 6) & m2) << 4);
  const __m128i bytes = _mm_set_epi32(static_cast<int>(mn_hi), static_cast<int>(mn_lo), static_cast<int>(sc_hi),
                                      static_cast<int>(sc_lo));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
}

// the codes of values 64j .. 64j+63 of a super-block (sub-blocks 2j in bytes 0-31, 2j+1 in bytes 32-63)
template <bool Q5>
inline __m512i kq_codes64(const uint8_t* blk, int j) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i cnt_lo = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(4), 1);
  const __m512i qsv = _mm512_broadcast_i64x4(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + KQ<Q5>::qs + 32 * j)));
  __m512i codes = _mm512_and_si512(_mm512_srlv_epi16(qsv, cnt_lo), m4);
  if (Q5) {
    const __m512i cnt_hi = _mm512_inserti64x4(_mm512_set1_epi16(2 * j), _mm256_set1_epi16(2 * j + 1), 1);
    const __m512i qhv = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16)));
    codes = _mm512_or_si512(
        codes, _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qhv, cnt_hi), _mm512_set1_epi8(1)), 4));
  }
  return codes;
}

template <bool Q5>
inline __m512 kq_row_avx512(const uint8_t* row, int64_t nb, const int8_t* xhi, const int8_t* xlo, const float* xs,
                            const float* xd, const __m512i* idx) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * KQ<Q5>::bytes;
    prefetch_ahead(blk, KQ<Q5>::bytes);
    const __m512 smf = kq_scale_min_vec(blk + 4);  // scales in lanes 0-7, mins in 8-15
    __m512 blk_acc = _mm512_setzero_ps();
    for (int j = 0; j < 4; ++j) {  // 64 values: sub-blocks 2j (lanes 0-7), 2j+1 (lanes 8-15)
      const __m512i codes = kq_codes64<Q5>(blk, j);
      const int64_t off = b * QK + 64 * j;
      const __m512i zero = _mm512_setzero_si512();
      __m512i dh = _mm512_dpbusd_epi32(zero, codes, _mm512_loadu_si512(xhi + off));
      __m512i dl = _mm512_dpbusd_epi32(zero, codes, _mm512_loadu_si512(xlo + off));
      __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(dh, 7), dl));
      blk_acc = _mm512_fmadd_ps(dot, _mm512_permutexvar_ps(idx[j], smf), blk_acc);
    }
    // mins: lanes 8-15 of smf against the x sub-block sums (lanes 0-7 of xs): move the mins down first
    const __m512 mins = _mm512_maskz_permutexvar_ps(0x00FF, idx[4], smf);
    const __m512 min_term = _mm512_mul_ps(mins, _mm512_loadu_ps(xs + b * 16));
    const float dx = xd[b];
    acc = _mm512_fmadd_ps(blk_acc, _mm512_set1_ps(half_bits(blk) * dx), acc);
    acc = _mm512_fnmadd_ps(min_term, _mm512_set1_ps(half_bits(blk + 2) * dx), acc);
  }
  return acc;
}
#endif

template <bool Q5>
at::Tensor kq_matmul(const at::Tensor& x_in, const at::Tensor& data, bool portable) {
  Front f = front(x_in, data, KQ<Q5>::bytes, Q5 ? "q5k_matmul" : "q4k_matmul",
                  Q5 ? "[N, K/256*176]" : "[N, K/256*144]");
  const int64_t m = f.m, k = f.k, nb = f.nb;
  const std::vector<int16_t>& xq = f.xq;
  const std::vector<float>& xd = f.xd;
#ifdef QK_AVX512
  std::vector<int8_t> xhi(portable ? 0 : m * k), xlo(portable ? 0 : m * k);
  std::vector<float> xs(portable ? 0 : m * nb * 16);
  if (!portable) kq_prepare_x(xq.data(), m * k, xhi.data(), xlo.data(), xs.data());
#endif
  at::parallel_for(0, f.n, 256, [&](int64_t n0, int64_t n1) {
#ifdef QK_AVX512
    if (!portable) {
      __m512i idx[5];  // idx[j]: lanes 0-7 <- scale 2j, lanes 8-15 <- scale 2j+1; idx[4]: the mins down to 0-7
      for (int j = 0; j < 5; ++j) {
        alignas(64) int32_t t[16];
        for (int i = 0; i < 16; ++i) t[i] = j < 4 ? 2 * j + i / 8 : 8 + (i % 8);
        idx[j] = _mm512_load_si512(t);
      }
      tiled_rows_avx512(f, n0, n1, [&](const uint8_t* row, int64_t r) {
        return kq_row_avx512<Q5>(row, nb, xhi.data() + r * k, xlo.data() + r * k, xs.data() + r * nb * 16,
                                 xd.data() + r * nb, idx);
      });
      return;
    }
#endif
    scalar_rows(f, n0, n1, [&](const uint8_t* row, int64_t r) {
      return kq_row_scalar<Q5>(row, nb, xq.data() + r * k, xd.data() + r * nb);
    });
  });
  return f.out;
}

at::Tensor q5k_matmul(const at::Tensor& x, const at::Tensor& data, bool portable) {
  return kq_matmul<true>(x, data, portable);
}
at::Tensor q4k_matmul(const at::Tensor& x, const at::Tensor& data, bool portable) {
  return kq_matmul<false>(x, data, portable);
}

// ---- Q4_0 (f16 d, qs[16]), Q4_1 (f16 d, f16 m, qs[16]), Q5_0 (f16 d, qh[4], qs[16]), Q5_1 (f16 d, f16 m, qh[4],
// qs[16]): blocks of 32 values; value i: code = nibble i/16 of qs[i%16] [| (bit i of the uint32 qh) << 4];
// w = d * (code - offset) (Q4_0: 8, Q5_0: 16) or d * code + m (Q4_1, Q5_1) ----
template <int BYTES, int QS, int QH, int OFFSET, bool MIN>
struct Legacy {
  static constexpr int bytes = BYTES, qs = QS, qh = QH, offset = OFFSET;
  static constexpr bool has_min = MIN;
};
using Q4_0 = Legacy<18, 2, -1, 8, false>;
using Q4_1 = Legacy<20, 4, -1, 0, true>;
using Q5_0 = Legacy<22, 6, 2, 16, false>;
using Q5_1 = Legacy<24, 8, 4, 0, true>;

template <class L>
inline int legacy_code(const uint8_t* blk, int i) {
  int c = (blk[L::qs + (i & 15)] >> (4 * (i >> 4))) & 0xF;
  if (L::qh >= 0) {
    uint32_t qh;
    std::memcpy(&qh, blk + L::qh, 4);
    c |= static_cast<int>((qh >> i) & 1u) << 4;
  }
  return c;
}

// sum_b d_x * (d * (sum(code * x) - offset * sum(x)) [+ m * sum(x)]) over the row's 32-value blocks
template <class L>
float legacy_row_scalar(const uint8_t* row, int64_t nb32, const int16_t* xq, const float* xd) {
  float acc = 0.f;
  for (int64_t b = 0; b < nb32; ++b) {
    const uint8_t* blk = row + b * L::bytes;
    int32_t dot = 0, xs = 0;
    for (int i = 0; i < 32; ++i) {
      dot += legacy_code<L>(blk, i) * xq[b * 32 + i];
      xs += xq[b * 32 + i];
    }
    float v = half_bits(blk) * static_cast<float>(dot - L::offset * xs);
    if (L::has_min) v += half_bits(blk + 2) * static_cast<float>(xs);
    acc += xd[b / 8] * v;
  }
  return acc;
}

#ifdef QK_AVX512
// the codes of two consecutive blocks a, b as 64 bytes in value order (a's 32 values, then b's)
template <class L>
inline __m512i legacy_codes64(const uint8_t* a, const uint8_t* b) {
  const __m256i c0 = _mm256_set_m128i(_mm_set1_epi16(4), _mm_set1_epi16(0));  // low nibbles, then high nibbles
  const __m128i qa = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + L::qs));
  const __m128i qb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + L::qs));
  const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(qa, qa)), _mm256_set_m128i(qb, qb), 1);
  __m512i codes = _mm512_and_si512(_mm512_srlv_epi16(v, _mm512_inserti64x4(_mm512_castsi256_si512(c0), c0, 1)),
                                   _mm512_set1_epi8(0x0F));
  if (L::qh >= 0) {
    uint32_t ha, hb;
    std::memcpy(&ha, a + L::qh, 4);
    std::memcpy(&hb, b + L::qh, 4);
    const __mmask64 high = _cvtu64_mask64(static_cast<uint64_t>(ha) | (static_cast<uint64_t>(hb) << 32));
    codes = _mm512_or_si512(codes, _mm512_maskz_mov_epi8(high, _mm512_set1_epi8(16)));
  }
  return codes;
}

template <class L>
inline __m512 legacy_row_avx512(const uint8_t* row, int64_t k, const int8_t* xhi, const int8_t* xlo,
                                const float* sums, const float* xd) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b256 = 0; b256 < k / QK; ++b256) {
    prefetch_ahead(row + b256 * 8 * L::bytes, 8 * L::bytes);
    __m512 blk_acc = _mm512_setzero_ps();
    for (int p = 0; p < 4; ++p) {  // pairs of 32-value blocks
      const int64_t c = b256 * 4 + p;
      const uint8_t* a = row + c * 2 * L::bytes;
      const uint8_t* b = a + L::bytes;
      const __m512i codes = legacy_codes64<L>(a, b);
      const __m512i zero = _mm512_setzero_si512();
      __m512i dh = _mm512_dpbusd_epi32(zero, codes, _mm512_loadu_si512(xhi + c * 64));
      __m512i dl = _mm512_dpbusd_epi32(zero, codes, _mm512_loadu_si512(xlo + c * 64));
      __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(dh, 7), dl));
      const __m512 xs = _mm512_loadu_ps(sums + c * 16);  // sum(x) of a in lane 0, of b in lane 8
      if (L::offset) dot = _mm512_fmadd_ps(xs, _mm512_set1_ps(-static_cast<float>(L::offset)), dot);
      blk_acc = _mm512_fmadd_ps(dot, pair_scales(a, b), blk_acc);
      if (L::has_min) blk_acc = _mm512_fmadd_ps(xs, pair_scales(a + 2, b + 2), blk_acc);
    }
    acc = _mm512_fmadd_ps(blk_acc, _mm512_set1_ps(xd[b256]), acc);
  }
  return acc;
}
#endif

// Q8_0 goes through the same driver as the 32-value legacy types: only its rows and its pair-sum factor differ.
struct Q8_0Blocks {
  static constexpr int bytes = Q80_BYTES;
};

template <class L>
at::Tensor legacy_matmul(const at::Tensor& x_in, const at::Tensor& data, bool portable, const char* name) {
  constexpr bool q8 = std::is_same_v<L, Q8_0Blocks>;
  Front f = front(x_in, data, 8 * L::bytes, name, "[N, K/32*block bytes]");
  const int64_t m = f.m, k = f.k, nb = f.nb;
  const std::vector<int16_t>& xq = f.xq;
  const std::vector<float>& xd = f.xd;
#ifdef QK_AVX512
  std::vector<int8_t> xhi(portable ? 0 : m * k), xlo(portable ? 0 : m * k);
  std::vector<float> sums(portable ? 0 : m * k / 4);
  if (!portable) prepare_pair_sums(xq.data(), m * k, xhi.data(), xlo.data(), sums.data(), q8 ? -128.f : 1.f);
#endif
  at::parallel_for(0, f.n, 256, [&](int64_t n0, int64_t n1) {
#ifdef QK_AVX512
    if (!portable) {
      tiled_rows_avx512(f, n0, n1, [&](const uint8_t* row, int64_t r) {
        const int8_t *hi = xhi.data() + r * k, *lo = xlo.data() + r * k;
        if constexpr (q8) {
          return q8_0_row_avx512(row, k, hi, lo, sums.data() + r * k / 4, xd.data() + r * nb);
        } else {
          return legacy_row_avx512<L>(row, k, hi, lo, sums.data() + r * k / 4, xd.data() + r * nb);
        }
      });
      return;
    }
#endif
    scalar_rows(f, n0, n1, [&](const uint8_t* row, int64_t r) {
      if constexpr (q8) {
        return q8_0_row_scalar(row, k / 32, xq.data() + r * k, xd.data() + r * nb);
      } else {
        return legacy_row_scalar<L>(row, k / 32, xq.data() + r * k, xd.data() + r * nb);
      }
    });
  });
  return f.out;
}

at::Tensor q8_0_matmul(const at::Tensor& x, const at::Tensor& d, bool portable) {
  return legacy_matmul<Q8_0Blocks>(x, d, portable, "q8_0_matmul");
}

at::Tensor q4_0_matmul(const at::Tensor& x, const at::Tensor& d, bool portable) {
  return legacy_matmul<Q4_0>(x, d, portable, "q4_0_matmul");
}
at::Tensor q4_1_matmul(const at::Tensor& x, const at::Tensor& d, bool portable) {
  return legacy_matmul<Q4_1>(x, d, portable, "q4_1_matmul");
}
at::Tensor q5_0_matmul(const at::Tensor& x, const at::Tensor& d, bool portable) {
  return legacy_matmul<Q5_0>(x, d, portable, "q5_0_matmul");
}
at::Tensor q5_1_matmul(const at::Tensor& x, const at::Tensor& d, bool portable) {
  return legacy_matmul<Q5_1>(x, d, portable, "q5_1_matmul");
}

// ---- prefill (many activation rows): dequantize a tile of weight rows to bf16 and multiply with at::mm (oneDNN:
// AMX or AVX512-BF16 where the CPU has them). Every type's codes become unsigned bytes with, per 16 values, a scale
// a and a bias b: w = a * code + b. ----
#ifdef QK_AVX512
// 16 floats -> 16 bf16, rounded to nearest even (the weights are finite)
inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_cvtepi32_epi16(r);
}

// 64 codes with the scale/bias of each 16 of them -> 64 bf16 at dst
inline void store64_bf16(__m512i codes, const float* a, const float* b, uint16_t* dst) {
  for (int g = 0; g < 4; ++g) {
    const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, g)));
    const __m512 w = _mm512_fmadd_ps(q, _mm512_set1_ps(a[g]), _mm512_set1_ps(b[g]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * g), to_bf16(w));
  }
}

template <class L>
void dequant_row_legacy(const uint8_t* row, int64_t k, uint16_t* dst) {
  for (int64_t c = 0; c < k / 64; ++c) {
    const uint8_t* a = row + c * 2 * L::bytes;
    const uint8_t* b = a + L::bytes;
    const float da = half_bits(a), db = half_bits(b);
    const float ma = L::has_min ? half_bits(a + 2) : -L::offset * da, mb = L::has_min ? half_bits(b + 2) : -L::offset * db;
    const float sc[4] = {da, da, db, db}, bias[4] = {ma, ma, mb, mb};
    store64_bf16(legacy_codes64<L>(a, b), sc, bias, dst + 64 * c);
  }
}

void dequant_row_q8_0(const uint8_t* row, int64_t k, uint16_t* dst) {
  for (int64_t c = 0; c < k / 64; ++c) {
    const uint8_t* a = row + c * 2 * Q80_BYTES;
    const uint8_t* b = a + Q80_BYTES;
    const __m512i u = _mm512_xor_si512(
        _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 2))),
                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2)), 1),
        _mm512_set1_epi8(static_cast<char>(0x80)));  // code + 128
    const float da = half_bits(a), db = half_bits(b);
    const float sc[4] = {da, da, db, db}, bias[4] = {-128.f * da, -128.f * da, -128.f * db, -128.f * db};
    store64_bf16(u, sc, bias, dst + 64 * c);
  }
}

template <bool Q5>
void dequant_row_kq(const uint8_t* row, int64_t k, uint16_t* dst) {
  for (int64_t b = 0; b < k / QK; ++b) {
    const uint8_t* blk = row + b * KQ<Q5>::bytes;
    int32_t sc[8], mn[8];
    k_scale_min(blk + 4, sc, mn);
    const float d = half_bits(blk), dmin = half_bits(blk + 2);
    for (int j = 0; j < 4; ++j) {
      const float s0 = d * sc[2 * j], s1 = d * sc[2 * j + 1], m0 = -dmin * mn[2 * j], m1 = -dmin * mn[2 * j + 1];
      const float a[4] = {s0, s0, s1, s1}, bias[4] = {m0, m0, m1, m1};
      store64_bf16(kq_codes64<Q5>(blk, j), a, bias, dst + b * QK + 64 * j);
    }
  }
}

void dequant_row_q6k(const uint8_t* row, int64_t k, uint16_t* dst) {
  for (int64_t b = 0; b < k / QK; ++b) {
    const uint8_t* blk = row + b * Q6K_BYTES;
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    const float d = half_bits(blk + 208);
    for (int h = 0; h < 2; ++h) {
      __m512i c[2];
      q6k_codes128(blk, h, c);
      for (int e = 0; e < 2; ++e) {
        const int v = 2 * h + e;  // values 64v .. 64v+63: sub-blocks 4v .. 4v+3
        float a[4], bias[4];
        for (int g = 0; g < 4; ++g) {
          a[g] = d * static_cast<float>(sc[4 * v + g]);
          bias[g] = -32.f * a[g];
        }
        store64_bf16(c[e], a, bias, dst + b * QK + 64 * v);
      }
    }
  }
}

using DequantRow = void (*)(const uint8_t*, int64_t, uint16_t*);

// (the row function, bytes per 256 values) of a type name
std::pair<DequantRow, int64_t> dequant_for(const std::string& type) {
  if (type == "Q4_0") return {&dequant_row_legacy<Q4_0>, 8 * Q4_0::bytes};
  if (type == "Q4_1") return {&dequant_row_legacy<Q4_1>, 8 * Q4_1::bytes};
  if (type == "Q5_0") return {&dequant_row_legacy<Q5_0>, 8 * Q5_0::bytes};
  if (type == "Q5_1") return {&dequant_row_legacy<Q5_1>, 8 * Q5_1::bytes};
  if (type == "Q8_0") return {&dequant_row_q8_0, 8 * Q80_BYTES};
  if (type == "Q4_K") return {&dequant_row_kq<false>, KQ<false>::bytes};
  if (type == "Q5_K") return {&dequant_row_kq<true>, KQ<true>::bytes};
  if (type == "Q6_K") return {&dequant_row_q6k, Q6K_BYTES};
  TORCH_CHECK(false, "dequant: no kernel for ", type);
}
#endif

// data [N, row bytes] -> [N, K] bfloat16 (rounded to nearest even)
at::Tensor dequant_bf16(const at::Tensor& data, const std::string& type) {
#ifdef QK_AVX512
  TORCH_CHECK(data.dim() == 2 && data.scalar_type() == at::kByte, "dequant_bf16: data must be uint8 [N, row bytes]");
  const auto [row_fn, bytes256] = dequant_for(type);
  TORCH_CHECK(data.size(1) % bytes256 == 0, "dequant_bf16: ", type, " rows must hold whole 256-value units");
  const int64_t n = data.size(0), k = data.size(1) / bytes256 * QK, rb = data.size(1);
  const at::Tensor d8 = data.contiguous();
  at::Tensor out = at::empty({n, k}, at::TensorOptions().dtype(at::kBFloat16));
  const uint8_t* w = d8.data_ptr<uint8_t>();
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row_fn(w + r * rb, k, o + r * k);
  });
  return out;
#else
  TORCH_CHECK(false, "dequant_bf16 needs the AVX512 build of the extension");
#endif
}

// x [M, K] @ W^T for many activation rows: tiles of about 2 MB of bf16 weight rows, each dequantized (split across
// threads) and multiplied with at::mm in bf16; returns [M, N] float32 (bf16-rounded products of the bf16 matmul).
at::Tensor tiled_matmul(const at::Tensor& x_in, const at::Tensor& data, const std::string& type) {
#ifdef QK_AVX512
  TORCH_CHECK(x_in.dim() == 2 && data.dim() == 2 && data.scalar_type() == at::kByte, "tiled_matmul: bad inputs");
  const auto [row_fn, bytes256] = dequant_for(type);
  const int64_t m = x_in.size(0), k = x_in.size(1), n = data.size(0), rb = data.size(1);
  TORCH_CHECK(k % QK == 0 && rb == k / QK * bytes256, "tiled_matmul: K must be a multiple of 256 and data [N, K/256*",
              bytes256, "] for ", type);
  const at::Tensor xb = x_in.to(at::kBFloat16).contiguous();
  const at::Tensor d8 = data.contiguous();
  const int64_t tile = std::max<int64_t>(16, (int64_t{1} << 20) / k / 16 * 16);
  at::Tensor buf = at::empty({std::min(tile, n), k}, xb.options());
  at::Tensor out = at::empty({m, n}, x_in.options().dtype(at::kFloat));
  const uint8_t* w = d8.data_ptr<uint8_t>();
  uint16_t* bp = reinterpret_cast<uint16_t*>(buf.data_ptr());
  for (int64_t n0 = 0; n0 < n; n0 += tile) {
    const int64_t rows = std::min(tile, n - n0);
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) row_fn(w + (n0 + r) * rb, k, bp + r * k);
    });
    out.narrow(1, n0, rows).copy_(at::mm(xb, buf.narrow(0, 0, rows).t()));
  }
  return out;
#else
  TORCH_CHECK(false, "tiled_matmul needs the AVX512 build of the extension");
#endif
}

bool has_avx512() {
#ifdef QK_AVX512
  return true;
#else
  return false;
#endif
}

at::Tensor simd_flag() { return at::scalar_tensor(has_avx512() ? 1 : 0, at::kLong); }

// How many threads ran one at::parallel_for over n items: every kernel here splits its rows with it, and without
// OpenMP at build time (-fopenmp) it runs everything on the calling thread (a test checks this is 2 with 2 threads).
at::Tensor parallel_threads(int64_t n) {
  std::vector<int> seen(at::get_num_threads(), 0);
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { seen[at::get_thread_num()] = 1; });
  int64_t used = 0;
  for (int s : seen) used += s;
  return at::scalar_tensor(used, at::kLong);
}

}  // namespace

TORCH_LIBRARY(quantkit_cpu, m) {
  m.def("q6k_matmul(Tensor x, Tensor data, bool portable=False) -> Tensor");
  m.def("q8_0_matmul(Tensor x, Tensor data, bool portable=False) -> Tensor");
  m.def("q5k_matmul(Tensor x, Tensor data, bool portable=False) -> Tensor");
  m.def("q4k_matmul(Tensor x, Tensor data, bool portable=False) -> Tensor");
  m.def("q4_0_matmul(Tensor x, Tensor data, bool portable=False) -> Tensor");
  m.def("q4_1_matmul(Tensor x, Tensor data, bool portable=False) -> Tensor");
  m.def("q5_0_matmul(Tensor x, Tensor data, bool portable=False) -> Tensor");
  m.def("q5_1_matmul(Tensor x, Tensor data, bool portable=False) -> Tensor");
  m.def("dequant_bf16(Tensor data, str type) -> Tensor");
  m.def("tiled_matmul(Tensor x, Tensor data, str type) -> Tensor");
  m.def("simd_flag() -> Tensor");
  m.def("parallel_threads(int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantkit_cpu, CPU, m) {
  m.impl("q6k_matmul", &q6k_matmul);
  m.impl("q8_0_matmul", &q8_0_matmul);
  m.impl("q5k_matmul", &q5k_matmul);
  m.impl("q4k_matmul", &q4k_matmul);
  m.impl("q4_0_matmul", &q4_0_matmul);
  m.impl("q4_1_matmul", &q4_1_matmul);
  m.impl("q5_0_matmul", &q5_0_matmul);
  m.impl("q5_1_matmul", &q5_1_matmul);
  m.impl("dequant_bf16", &dequant_bf16);
  m.impl("tiled_matmul", &tiled_matmul);
}

TORCH_LIBRARY_IMPL(quantkit_cpu, CompositeExplicitAutograd, m) {
  m.impl("simd_flag", &simd_flag);
  m.impl("parallel_threads", &parallel_threads);
}
