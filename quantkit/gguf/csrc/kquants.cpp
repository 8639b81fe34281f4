// Q3_K and Q6_K block encoders in C++: the same arithmetic as quantkit/gguf/kquants.py (the numpy reference these
// are tested against, block for block), which is ggml's quantize_row_q3_K_ref / q6_K_ref and their imatrix forms.
//
// Built by quantkit/gguf/native.py as a plain shared library (no Python or torch headers: the encoder worker
// processes load it with ctypes) with -ffp-contract=off, so that no multiply-add is fused: every float operation
// rounds where the reference's does. Sums run in the reference's order (sequentially over the elements of a
// sub-block); the 16 sub-blocks of a super-block are searched side by side (element-major arrays, the sub-block
// index innermost), which the compiler turns into vector code without reordering any sum.

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: nearest_int's rounding constant
constexpr float kGroupMaxEps = 1e-15f;
constexpr int kQK = 256;
constexpr int kSub = 16;  // values per sub-block, sub-blocks per super-block

inline int32_t nearest_int(float f) {
    float v = f + kMagic;
    int32_t i;
    std::memcpy(&i, &v, sizeof i);
    return (i & 0x007FFFFF) - 0x00400000;
}

inline int32_t clamp(int32_t v, int32_t lo, int32_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// float -> IEEE half, round to nearest even; every NaN becomes a quiet NaN with the input's sign
uint16_t f32_to_f16(float value) {
    uint32_t f;
    std::memcpy(&f, &value, sizeof f);
    const uint32_t sign = f & 0x80000000u;
    f ^= sign;
    uint16_t h;
    if (f >= 0x47800000u) {  // too large for a half (>= 65536), inf or NaN
        h = f > 0x7F800000u ? 0x7E00 : 0x7C00;
    } else if (f < 0x38800000u) {  // a half subnormal or zero: let a float addition round the low bits
        float g;
        std::memcpy(&g, &f, sizeof g);
        g += 0.5f;  // 2^-1: the sum's last mantissa bits are the half's subnormal significand
        uint32_t gb;
        std::memcpy(&gb, &g, sizeof gb);
        h = static_cast<uint16_t>(gb - 0x3F000000u);
    } else {
        const uint32_t odd = (f >> 13) & 1u;
        f += 0xC8000FFFu + odd;  // rebias the exponent (-112 << 23) and round half to even
        h = static_cast<uint16_t>(f >> 13);
    }
    return static_cast<uint16_t>(h | (sign >> 16));
}

float f16_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu;
    const uint32_t man = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else {  // zero or subnormal: man * 2^-24, exact in float
        const float v = static_cast<float>(man) * 5.9604644775390625e-08f;
        std::memcpy(&bits, &v, sizeof bits);
        bits |= sign;
    }
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

// `if (fabsf(v) > amax) { amax = fabsf(v); max = v; }` from amax = 0 over n values (stride apart): the value of
// largest magnitude, the first of equals; never a NaN
inline float signed_absmax(const float* v, int n, int stride) {
    float amax = 0.0f, mx = 0.0f;
    for (int i = 0; i < n; ++i) {
        const float a = std::fabs(v[i * stride]);
        if (a > amax) {
            amax = a;
            mx = v[i * stride];
        }
    }
    return mx;
}

// ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, w) for L groups side by side: x and w element-major [n][L]
// (w null: x*x). Per group: scale, the winning candidate's iscale (the codes are clamp(nearest_int(iscale*x),
// -nmax, nmax-1) + nmax) and whether the group is all zero (codes 0, scale 0). kquants._qx_search is the reference.
template <int L>
void make_qx(int n, int nmax, const float* x, const float* w_in, float* scale, float* iscale_best, bool* all_zero) {
    float mx[L], w[kSub * L], wx[kSub * L];
    for (int b = 0; b < L; ++b) {
        mx[b] = signed_absmax(x + b, n, L);
        all_zero[b] = std::fabs(mx[b]) < kGroupMaxEps;
        if (all_zero[b]) mx[b] = 1.0f;
    }
    for (int i = 0; i < n * L; ++i) {
        w[i] = w_in ? w_in[i] : x[i] * x[i];
        wx[i] = w[i] * x[i];
    }
    float best[L], win_lx[L], win_l2[L], win_is[L], zero_l2[L];
    bool won[L];
    for (int r = 0; r < 19; ++r) {
        float is[L], sumlx[L], suml2[L];
        // candidate 0: -nmax/max; then -(nmax + 0.1f*s)/max for s = -9..-1, 1..9
        const float num = r == 0 ? static_cast<float>(-nmax)
                                 : -(static_cast<float>(nmax) + 0.1f * static_cast<float>(r <= 9 ? r - 10 : r - 9));
        for (int b = 0; b < L; ++b) {
            is[b] = num / mx[b];
            sumlx[b] = 0.0f;
            suml2[b] = 0.0f;
        }
        for (int i = 0; i < n; ++i) {
            for (int b = 0; b < L; ++b) {
                const float l = static_cast<float>(clamp(nearest_int(is[b] * x[i * L + b]), -nmax, nmax - 1));
                sumlx[b] += wx[i * L + b] * l;
                suml2[b] += w[i * L + b] * l * l;
            }
        }
        for (int b = 0; b < L; ++b) {
            if (r == 0) {
                const float s = suml2[b] == 0.0f ? 0.0f : sumlx[b] / suml2[b];
                best[b] = s * sumlx[b];
                win_lx[b] = sumlx[b];
                win_l2[b] = suml2[b];
                zero_l2[b] = suml2[b];
                win_is[b] = is[b];
                won[b] = false;
            } else if (suml2[b] > 0.0f && sumlx[b] * sumlx[b] > best[b] * suml2[b]) {
                best[b] = sumlx[b] / suml2[b] * sumlx[b];
                win_lx[b] = sumlx[b];
                win_l2[b] = suml2[b];
                win_is[b] = is[b];
                won[b] = true;
            }
        }
    }
    for (int b = 0; b < L; ++b) {
        float s = win_lx[b] / win_l2[b];
        if (!won[b] && zero_l2[b] == 0.0f) s = 0.0f;
        scale[b] = all_zero[b] ? 0.0f : s;
        iscale_best[b] = win_is[b];
    }
}

// make_qx's codes of group b (x element-major [16][16])
inline void qx_codes(const float* xt, int b, float iscale, bool all_zero, int nmax, uint8_t* codes) {
    for (int i = 0; i < kSub; ++i)
        codes[i] = all_zero ? 0 : static_cast<uint8_t>(clamp(nearest_int(iscale * xt[i * kSub + b]), -nmax, nmax - 1) + nmax);
}

// ggml's make_q3_quants(16, 4, x, L, do_rmse=true) of one sub-block: RTN at -4/max, then up to 5 coordinate-descent
// passes with weights x^2 (search.make_q3_quants is the reference). Codes 0..7 (0 for an all-zero sub-block).
float make_q3(const float* x, uint8_t* codes) {
    constexpr int nmax = 4;
    const float mx = signed_absmax(x, kSub, 1);
    if (std::fabs(mx) < kGroupMaxEps) {
        std::memset(codes, 0, kSub);
        return 0.0f;
    }
    const float iscale = static_cast<float>(-nmax) / mx;
    int32_t l[kSub];
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < kSub; ++i) {
        l[i] = clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * static_cast<float>(l[i]);
        suml2 += w * static_cast<float>(l[i]) * static_cast<float>(l[i]);
    }
    if (mx < 0.0f) {  // with max > 0 every term of sumlx is <= 0 and no pass can change anything
        for (int itry = 0; itry < 5; ++itry) {
            int changed = 0;
            for (int i = 0; i < kSub; ++i) {
                const float w = x[i] * x[i];
                const float li = static_cast<float>(l[i]);
                float slx = sumlx - w * x[i] * li;
                if (slx > 0.0f) {
                    float sl2 = suml2 - w * li * li;
                    const int32_t nl = clamp(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1);
                    if (nl != l[i]) {
                        const float nlf = static_cast<float>(nl);
                        slx += w * x[i] * nlf;
                        sl2 += w * nlf * nlf;
                        if (sl2 > 0.0f && slx * slx * suml2 > sumlx * sumlx * sl2) {
                            l[i] = nl;
                            sumlx = slx;
                            suml2 = sl2;
                            ++changed;
                        }
                    }
                }
            }
            if (!changed) break;
        }
    }
    for (int i = 0; i < kSub; ++i) codes[i] = static_cast<uint8_t>(l[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// the final loop of quantize_row_q3_K / q6_K: the codes of a sub-block re-quantized with its effective scale
// dq != 0 (where dq == 0 the search's codes stay)
inline void requant(const float* x, float dq, int lo, int hi, uint8_t* codes) {
    for (int i = 0; i < kSub; ++i) codes[i] = static_cast<uint8_t>(clamp(nearest_int(x[i] / dq), lo, hi) - lo);
}

inline void transpose16(const float* x, float* xt) {  // [16 sub-blocks][16] -> [16 elements][16 sub-blocks]
    for (int b = 0; b < kSub; ++b)
        for (int i = 0; i < kSub; ++i) xt[i * kSub + b] = x[b * kSub + i];
}

void q6_k_block(const float* x, const float* qw, uint8_t* out) {
    float xt[kQK], wt[kQK], scales[kSub], iscale_best[kSub];
    bool all_zero[kSub];
    transpose16(x, xt);
    if (qw) transpose16(qw, wt);
    make_qx<kSub>(kSub, 32, xt, qw ? wt : nullptr, scales, iscale_best, all_zero);
    const float max_scale = signed_absmax(scales, kSub, 1);
    if (std::fabs(max_scale) < kGroupMaxEps) {
        std::memset(out, 0, 210);
        return;
    }
    const float iscale = -128.0f / max_scale;
    const uint16_t d16 = f32_to_f16(1.0f / iscale);
    const float d = f16_to_f32(d16);
    int8_t sc[kSub];
    uint8_t codes[kQK];
    for (int b = 0; b < kSub; ++b) {
        const int32_t v = nearest_int(iscale * scales[b]);
        sc[b] = static_cast<int8_t>(v < 127 ? v : 127);
        const float dq = d * static_cast<float>(sc[b]);
        if (dq == 0.0f)
            qx_codes(xt, b, iscale_best[b], all_zero[b], 32, codes + b * kSub);
        else
            requant(x + b * kSub, dq, -32, 31, codes + b * kSub);
    }
    for (int h = 0; h < 2; ++h) {  // ql: low nibbles of quarters 0|2 and 1|3 of each half; qh: their top 2 bits
        const uint8_t* q = codes + 128 * h;
        for (int m = 0; m < 32; ++m) {
            out[64 * h + m] = static_cast<uint8_t>((q[m] & 0xF) | ((q[64 + m] & 0xF) << 4));
            out[64 * h + 32 + m] = static_cast<uint8_t>((q[32 + m] & 0xF) | ((q[96 + m] & 0xF) << 4));
            out[128 + 32 * h + m] = static_cast<uint8_t>((q[m] >> 4) | ((q[32 + m] >> 4) << 2) |
                                                         ((q[64 + m] >> 4) << 4) | ((q[96 + m] >> 4) << 6));
        }
    }
    std::memcpy(out + 192, sc, kSub);
    out[208] = static_cast<uint8_t>(d16 & 0xFF);
    out[209] = static_cast<uint8_t>(d16 >> 8);
}

void q3_k_block(const float* x, const float* qw, uint8_t* out) {
    float scales[kSub];
    uint8_t codes[kQK], ls[kSub];
    uint16_t d16;
    bool packed = true;  // the scales are stored (all zero bytes where every sub-block scale is 0)
    if (!qw) {
        for (int b = 0; b < kSub; ++b) scales[b] = make_q3(x + b * kSub, codes + b * kSub);
        const float max_scale = signed_absmax(scales, kSub, 1);
        if (max_scale != 0.0f) {
            const float iscale = -32.0f / max_scale;
            for (int b = 0; b < kSub; ++b) {
                const int8_t l = static_cast<int8_t>(nearest_int(iscale * scales[b]));  // narrows (wraps) first
                ls[b] = static_cast<uint8_t>(clamp(l, -32, 31) + 32);
            }
            d16 = f32_to_f16(1.0f / iscale);
        } else {  // d = 0: every sub-block keeps the search's codes
            std::memset(ls, 0, kSub);
            d16 = 0;
            packed = false;
        }
    } else {
        float xt[kQK], w[kQK], wt[kQK], sw[kSub], iscale_best[kSub], d_block, ls_iscale;
        bool all_zero[kSub], ls_zero;
        float sumsq = 0.0f;
        for (int j = 0; j < kQK; ++j) sumsq += x[j] * x[j];
        const float sigma2 = 2.0f * sumsq / static_cast<float>(kQK);
        for (int j = 0; j < kQK; ++j) w[j] = qw[j] * std::sqrt(sigma2 + x[j] * x[j]);
        for (int b = 0; b < kSub; ++b) {
            float s = 0.0f;
            for (int i = 0; i < kSub; ++i) s += w[b * kSub + i];
            sw[b] = s;
        }
        transpose16(x, xt);
        transpose16(w, wt);
        make_qx<kSub>(kSub, 4, xt, wt, scales, iscale_best, all_zero);
        for (int b = 0; b < kSub; ++b) qx_codes(xt, b, iscale_best[b], all_zero[b], 4, codes + b * kSub);
        make_qx<1>(kSub, 32, scales, sw, &d_block, &ls_iscale, &ls_zero);
        for (int b = 0; b < kSub; ++b)
            ls[b] = ls_zero ? 0 : static_cast<uint8_t>(clamp(nearest_int(ls_iscale * scales[b]), -32, 31) + 32);
        d16 = f32_to_f16(d_block);
    }
    const float d = f16_to_f32(d16);
    for (int b = 0; b < kSub; ++b) {
        const float dq = d * static_cast<float>(static_cast<int>(ls[b]) - 32);
        if (dq != 0.0f) requant(x + b * kSub, dq, -4, 3, codes + b * kSub);
    }
    std::memset(out, 0, 32);  // hmask: bit k of byte m is code[32k + m] > 3
    for (int k = 0; k < 8; ++k)
        for (int m = 0; m < 32; ++m) out[m] |= static_cast<uint8_t>((codes[32 * k + m] > 3) << k);
    for (int h = 0; h < 2; ++h) {  // qs: the low 2 bits, 4 quarters of each half in one byte
        const uint8_t* q = codes + 128 * h;
        for (int m = 0; m < 32; ++m)
            out[32 + 32 * h + m] = static_cast<uint8_t>((q[m] & 3) | ((q[32 + m] & 3) << 2) | ((q[64 + m] & 3) << 4) |
                                                        ((q[96 + m] & 3) << 6));
    }
    if (packed) {  // the 16 6-bit scales in 12 bytes
        for (int j = 0; j < 8; ++j) out[96 + j] = static_cast<uint8_t>((ls[j] & 0xF) | ((ls[j + 8] & 0xF) << 4));
        for (int k = 0; k < 4; ++k)
            out[104 + k] = static_cast<uint8_t>((ls[k] >> 4) | ((ls[4 + k] >> 4) << 2) | ((ls[8 + k] >> 4) << 4) |
                                                ((ls[12 + k] >> 4) << 6));
    } else {
        std::memset(out + 96, 0, 12);
    }
    out[108] = static_cast<uint8_t>(d16 & 0xFF);
    out[109] = static_cast<uint8_t>(d16 >> 8);
}

}  // namespace

extern "C" {

int quantkit_kquants_abi(void) { return 1; }

// n super-blocks of x [n, 256] (float32), importance qw [n, 256] or null -> out [n, 210] (Q6_K) / [n, 110] (Q3_K)
void quantkit_q6_k(const float* x, const float* qw, int64_t n, uint8_t* out) {
    for (int64_t i = 0; i < n; ++i) q6_k_block(x + i * kQK, qw ? qw + i * kQK : nullptr, out + i * 210);
}

void quantkit_q3_k(const float* x, const float* qw, int64_t n, uint8_t* out) {
    for (int64_t i = 0; i < n; ++i) q3_k_block(x + i * kQK, qw ? qw + i * kQK : nullptr, out + i * 110);
}

}  // extern "C"
