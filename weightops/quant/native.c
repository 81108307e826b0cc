/* Fused passes of the mixed 2/4-bit quantizer over a matrix's groups (weightops.quant.native).

Each function reads the groups [g0, g1) (or rows [r0, r1)) of `gs` float32 weights once
and leaves per-group values; the Python side splits a matrix's groups over threads. The
group size is a multiple of LANES, at most 1024 (weightops.quant.native.GROUP_SIZES).

Written with the compiler's vector types (GCC and Clang) rather than left to its
auto-vectoriser: with strict float semantics, which keep each weight's arithmetic that of
the torch path operation for operation, the compiler may not reorder a running sum, and
the clamps compile to branches that mispredict on real weights. Compiled with
-ffp-contract=off (no fused multiply-adds), so the results are the same on every CPU.
A group's sums are taken in LANES interleaved partial sums (weight j in lane j mod LANES)
added up in a fixed order; only that order differs from torch's reductions.
*/
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 8
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * LANES)));
typedef uint8_t vb __attribute__((vector_size(LANES)));

static inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vf splat(float x) { return (vf){0} + x; }

static inline vf pick(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* clamp(x, lo, hi) as torch computes it for finite x: min(max(x, lo), hi). A NaN goes
   to lo (x ≥ lo is false for it), so whatever is indexed or converted by the result
   stays in range. */
static inline vf clamp(vf x, vf lo, vf hi) {
    x = pick(x >= lo, x, lo);
    return pick(x > hi, hi, x);
}

/* Round half to even (torch.round) by adding and taking away 1.5·2²³: exact for
   |x| < 2²², and anything larger is clamped to the grid's ends by every caller. */
static inline vf round_even(vf x) {
    const vf magic = splat(12582912.0f);
    return (x + magic) - magic;
}

static inline float total(vf acc) {
    float t = 0;
    for (int l = 0; l < LANES; l++) t += acc[l];
    return t;
}

/* A group's minimum and maximum; NaN for both when it holds a NaN (as torch's amin and
   amax give), so that the caller's finiteness check sees it. */
static void extremes(const float *x, int64_t gs, float *lo, float *hi) {
    vf a = splat(x[0]), b = a;
    vi nan = {0};
    for (int64_t j = 0; j < gs; j += LANES) {
        vf v = load(x + j);
        a = pick(v < a, v, a);
        b = pick(v > b, v, b);
        nan |= v != v;
    }
    float mn = a[0], mx = b[0];
    int bad = 0;
    for (int l = 0; l < LANES; l++) {
        mn = a[l] < mn ? a[l] : mn;
        mx = b[l] > mx ? b[l] : mx;
        bad |= nan[l];
    }
    *lo = bad ? NAN : mn;
    *hi = bad ? NAN : mx;
}

/* bf16 → float32 into dst, with each group's extremes. */
void wo_stack_bf16(const uint16_t *src, float *dst, float *lo, float *hi, int64_t gs,
                   int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; g++) {
        const uint16_t *s = src + g * gs;
        float *d = dst + g * gs;
        for (int64_t j = 0; j < gs; j += LANES) {
            vh half;
            memcpy(&half, s + j, sizeof half);
            vu bits = __builtin_convertvector(half, vu) << 16;
            memcpy(d + j, &bits, sizeof bits);
        }
        extremes(d, gs, lo + g, hi + g);
    }
}

void wo_extremes(const float *w, float *lo, float *hi, int64_t gs, int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; g++) extremes(w + g * gs, gs, lo + g, hi + g);
}

/* A group's per-key sums for the 2-bit clip search (weightops.quant.clipsearch, h
   absent): with v = (x − mid)·scale + cells and the key ⌊v⌋ clamped to [0, keys − 1],
   each key's count and Σv (sums: [2][keys]), and Σv² (returned). The keys are taken a
   vector at a time, then added into four histograms in turn: consecutive weights mostly
   share a key, and with one histogram each add would wait for the last one's store.
   keys ≤ 64. */
static float search_sums(const float *x, float mid, float scale, float cells, int64_t keys,
                         float *sums, int64_t gs) {
    const float top = (float)(keys - 1);
    /* Histogram i's counts at [2i·keys, (2i + 1)·keys), its sums of v after them. */
    float hist[8 * 64], vs[LANES];
    int32_t ks[LANES];
    vf acc = {0};
    memset(hist, 0, 8 * keys * sizeof(float));
    for (int64_t j = 0; j < gs; j += LANES) {
        vf v = (load(x + j) - mid) * scale + cells;
        vi key = __builtin_convertvector(clamp(v, splat(0), splat(top)), vi);
        acc += v * v;
        memcpy(vs, &v, sizeof v);
        memcpy(ks, &key, sizeof key);
        for (int l = 0; l < LANES; l++) {
            float *h = hist + 2 * (l & 3) * keys + ks[l];
            h[0] += 1;
            h[keys] += vs[l];
        }
    }
    for (int64_t i = 0; i < 2 * keys; i++)
        sums[i] = (hist[i] + hist[2 * keys + i]) + (hist[4 * keys + i] + hist[6 * keys + i]);
    return total(acc);
}

/* The weighted least-squares line through a group's (code, weight) pairs: clipsearch's
   solve_line, for one group. */
static void solve_line(float a, float b, float d, float c, float e, float *s, float *lo) {
    float det = a * c - b * b;
    float s_new = (c * d - b * e) / (det > 1e-30f ? det : 1e-30f);
    float lo_new = (e - b * s_new) / (c > 1e-30f ? c : 1e-30f);
    float ac = a * c;
    if (det > 1e-9f * (ac > 1e-30f ? ac : 1e-30f) && s_new > 1e-12f) {
        *s = s_new;
        *lo = lo_new;
    }
}

static inline float dot(const float *x, const float *y, int64_t len) {
    vf acc = {0};
    for (int64_t i = 0; i < len; i += LANES) acc += load(x + i) * load(y + i);
    return total(acc);
}

/* The whole 2-bit clip search of weightops.quant.clipsearch for h absent, per group:
   the per-key sums as in search_sums, each factor's error from them (map_err,
   [2·keys][LANES]: column j factor j's coefficients, n ≤ LANES), the first factor of
   least error (values equal to 2⁻¹⁸ relative count as ties, as in _first_argmin), and
   the first least-squares step on its grid from its codes' sums (map_t, [4n + 2][K]: the
   key map's columns, each as a row, K = 2·keys rounded up to LANES, zero past 2·keys).
   Per group out: factor, error (need_error, else 0), s, lo, Σ1, Σx and Σx², each an
   array of groups. */
void wo_search_2bit(const float *w, const float *lo0, const float *hi0, const float *map_err,
                    const float *map_t, const float *clips, int64_t n, float k, float cells,
                    int64_t keys, int64_t need_error, float *factor, float *err, float *s,
                    float *lo, float *c_out, float *e_out, float *g2_out, int64_t gs,
                    int64_t g0, int64_t g1) {
    const int64_t width = (2 * keys + LANES - 1) / LANES * LANES;
    float sums[2 * 64] = {0};
    for (int64_t g = g0; g < g1; g++) {
        const float mid = (lo0[g] + hi0[g]) * 0.5f, r = (hi0[g] - lo0[g]) * 0.5f;
        /* No range, or a denormal one that overflows k/r: every weight at the middle. */
        const float ratio = k / r, scale = ratio <= FLT_MAX ? ratio : 0;
        const float quad = search_sums(w + g * gs, mid, scale, cells, keys, sums, gs);
        vf errs = {0};
        for (int64_t i = 0; i < 2 * keys; i++) errs += sums[i] * load(map_err + i * LANES);
        const float c = dot(sums, map_t + n * width, width);
        const float sv = dot(sums, map_t + (n + 1) * width, width);
        const float quad_v = quad - (2 * cells) * sv + (cells * cells) * c;
        const float q_k = quad_v / (k * k);
        int64_t best = 0;
        int32_t best_bits = 0;
        for (int64_t j = 0; j < n; j++) {
            float e_j = errs[j] + q_k;
            int32_t bits;
            e_j = e_j > 0 ? e_j : 0;
            memcpy(&bits, &e_j, 4);
            bits &= ~31;
            if (j == 0 || bits < best_bits) {
                best = j;
                best_bits = bits;
            }
        }
        const float f = clips[best];
        factor[g] = f;
        err[g] = need_error ? errs[best] + q_k : 0;
        const float a = dot(sums, map_t + (n + 2 + best) * width, width);
        const float b = dot(sums, map_t + (2 * n + 2 + best) * width, width);
        const float qv = dot(sums, map_t + (3 * n + 2 + best) * width, width);
        const float r_k = r / k, sum_v = sv - cells * c;
        const float d = mid * b + r_k * qv;
        const float e = mid * c + r_k * sum_v;
        const float rc = r * f, s0 = rc * (2.0f / 3.0f);
        float s_g = s0 > 1e-12f ? s0 : 1e-12f, lo_g = mid - rc;
        solve_line(a, b, d, c, e, &s_g, &lo_g);
        s[g] = s_g;
        lo[g] = lo_g;
        c_out[g] = c;
        e_out[g] = e;
        g2_out[g] = mid * mid * c + 2 * mid * r_k * sum_v + r_k * r_k * quad_v;
    }
}

/* One least-squares step of weightops.quant.grids' refinement (h absent), per group: the
   codes q = clamp(round(x·inv − lo·inv), 0, top) on the grid (s, lo), inv = 1/s, their
   sums Σq², Σq and Σq·x, the line through them given Σ1 = c and Σx = e (s and lo are
   updated in place), and the error Σ(q·s + lo − x)² of those codes on the new line from
   the same sums and Σx² = g2. */
void wo_refine_step(const float *w, float *s, float *lo, const float *c, const float *e,
                    const float *g2, float top, float *err, int64_t gs, int64_t g0,
                    int64_t g1) {
    const vf zero = {0}, vtop = splat(top);
    for (int64_t g = g0; g < g1; g++) {
        const float *x = w + g * gs;
        const float i = 1 / s[g], l = lo[g] * i;
        vf sa = {0}, sb = {0}, sd = {0};
        for (int64_t j = 0; j < gs; j += LANES) {
            vf v = load(x + j);
            vf q = clamp(round_even(v * i - l), zero, vtop);
            sa += q * q;
            sb += q;
            sd += q * v;
        }
        const float a = total(sa), b = total(sb), d = total(sd);
        float s_g = s[g], lo_g = lo[g];
        solve_line(a, b, d, c[g], e[g], &s_g, &lo_g);
        s[g] = s_g;
        lo[g] = lo_g;
        const float r = s_g * s_g * a + 2 * s_g * lo_g * b + lo_g * lo_g * c[g] - 2 * s_g * d -
                        2 * lo_g * e[g] + g2[g];
        err[g] = r > 0 ? r : 0;
    }
}

/* The final rounding and packing (weightops.quant.rows, weightops.quant.packing) of the
   rows [r0, r1) of `groups` groups each: each weight's code min(max(round(t), 0), top) of
   t = (x − lo)/s, top 15 in the groups is4 marks and 3 in the others, packed little end
   first into the row's 2-bit part (q2, (groups − k4)·gs/4 bytes a row) or 4-bit part
   (q4, k4·gs/2 bytes a row) in group order; per group Σ(t − code)² (the error in steps
   of the grid) and Σx². */
void wo_round_pack(const float *w, const float *s, const float *lo, const uint8_t *is4,
                   uint8_t *q2, uint8_t *q4, float *err, float *norm, int64_t groups,
                   int64_t k4, int64_t gs, int64_t r0, int64_t r1) {
    const vf zero = {0};
    uint8_t code[1024];
    for (int64_t row = r0; row < r1; row++) {
        uint8_t *p2 = q2 + row * (groups - k4) * gs / 4, *p4 = q4 + row * k4 * gs / 2;
        for (int64_t g = row * groups; g < (row + 1) * groups; g++) {
            const float *x = w + g * gs;
            const float step = s[g], low = lo[g];
            const vf vmax = splat(is4[g] ? 15.0f : 3.0f);
            vf se = {0}, sn = {0};
            for (int64_t j = 0; j < gs; j += LANES) {
                vf v = load(x + j);
                vf t = (v - low) / step;
                vf q = clamp(round_even(t), zero, vmax);
                vb c = __builtin_convertvector(__builtin_convertvector(q, vi), vb);
                memcpy(code + j, &c, sizeof c);
                se += (t - q) * (t - q);
                sn += v * v;
            }
            err[g] = total(se);
            norm[g] = total(sn);
            if (is4[g]) {
                for (int64_t j = 0; j < gs / 2; j++) p4[j] = code[2 * j] | code[2 * j + 1] << 4;
                p4 += gs / 2;
            } else {
                for (int64_t j = 0; j < gs / 4; j++)
                    p2[j] = code[4 * j] | code[4 * j + 1] << 2 | code[4 * j + 2] << 4 |
                            code[4 * j + 3] << 6;
                p2 += gs / 4;
            }
        }
    }
}
