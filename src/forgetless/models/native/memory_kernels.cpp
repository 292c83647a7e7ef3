// The memory layer's CPU kernels (forgetless/models/native). First, the product-key top-k:
//
// For every (token, head) row of the sub-key scores s (two halves of n scores each):
//   1. the k best sub-keys of each half, best first;
//   2. the candidate pairs (a, b) of the k x k products that can reach the top k (the caller's
//      list: (a + 1)(b + 1) <= k), scored a's score + b's score in float (one rounding, the
//      same sum as the PyTorch reference);
//   3. the k best candidates, best first, as (score, slot = i1 * n + i2).
// Ties go to the lower sub-key index and then to the lower slot index, so the result does not
// depend on the order of the work (-0.0 ranks below +0.0). torch.topk spends most of the
// lookup's time on step 1 (docs/performance.md): here each row first takes a threshold that at
// least k scores reach (the smallest of the maxima of k interleaved groups, one vectorisable
// pass), raises it by bisection while k scores still reach it (vectorised counts), keeps only
// the scores at or above it (about 36 of 256 or 1,024 for k = 32), and ranks those without
// branches. Returns 1 when a row holds a NaN (the caller then uses the PyTorch reference).
//
// Second, the weights' gradient of the memory's weighted bag (at the end of the file).
//
// Plain C ABI, called through ctypes (forgetless/models/native/__init__.py); no Python or
// PyTorch headers, so it builds in about a second.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

// A score and its index as one unsigned key: larger key = better (higher score, then lower
// index), so selection is integer comparisons without branches. Indices must fit 32 bits.
inline uint64_t make_key(float v, uint32_t i) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // order-preserving float -> uint32
  return (uint64_t(u) << 32) | uint64_t(0xFFFFFFFFu - i);
}
inline float key_score(uint64_t key) {
  uint32_t u = uint32_t(key >> 32);
  u = (u & 0x80000000u) ? (u ^ 0x80000000u) : ~u;
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}
inline uint32_t key_index(uint64_t key) { return 0xFFFFFFFFu - uint32_t(key); }

// The k largest of c distinct keys, largest first: each key's rank is the number of keys above
// it (a vectorisable count, no data-dependent branch), and the k of rank < k go to their place.
// out must hold k + 1 keys (the last is scratch).
inline void rank_select(const uint64_t* keys, int64_t c, int64_t k, uint64_t* out) {
  for (int64_t i = 0; i < c; ++i) {
    const uint64_t ki = keys[i];
    int64_t r = 0;
    for (int64_t j = 0; j < c; ++j) r += keys[j] > ki;
    out[r < k ? r : k] = ki;
  }
}

// How many of x[0..n) are at least t (vectorisable).
inline int64_t count_at_least(const float* x, int64_t n, float t) {
  int32_t c = 0;
  for (int64_t j = 0; j < n; ++j) c += x[j] >= t;
  return c;
}

// Scores of x[0..n) at or above t and their ids (ids[j], or j when ids is null), packed to
// the front of vals and out_ids; returns the count.
inline int64_t compact(const float* x, const uint32_t* ids, int64_t n, float t, float* vals, uint32_t* out_ids) {
  int64_t c = 0, j = 0;
#ifdef __AVX512F__
  const __m512 tv = _mm512_set1_ps(t);
  __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  for (; j + 16 <= n; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    const __mmask16 m = _mm512_cmp_ps_mask(v, tv, _CMP_GE_OQ);
    const __m512i id = ids ? _mm512_loadu_si512(ids + j) : iv;
    _mm512_mask_compressstoreu_ps(vals + c, m, v);
    _mm512_mask_compressstoreu_epi32(out_ids + c, m, id);
    c += __builtin_popcount(unsigned(m));
    iv = _mm512_add_epi32(iv, step);
  }
#endif
  for (; j < n; ++j) {
    vals[c] = x[j];
    out_ids[c] = ids ? ids[j] : uint32_t(j);
    c += x[j] >= t;
  }
  return c;
}

struct Scratch {
  std::vector<float> vals, gmax, cand;
  std::vector<uint32_t> ids, cand_ids;
  std::vector<uint64_t> keys;
  Scratch(int64_t n, int64_t k, int64_t pairs)
      : vals(std::max(n, pairs)), gmax(k), cand(pairs), ids(std::max(n, pairs)), cand_ids(pairs),
        keys(std::max(n, pairs)) {}
};

// The k best of x[0..n) (ids as in compact) as keys, best first, into out (k + 1 keys), given
// a score t that at least k of them reach and an upper bound top of the scores. t is first
// raised by bisection while at least k scores still reach it (a counting pass costs about n/16
// vector compares), so that few more than k are left to rank. False if fewer than k reach t
// (only with NaNs).
bool select_top(const float* x, const uint32_t* ids, int64_t n, int64_t k, float t, float top, uint64_t* out,
                Scratch& w) {
  int64_t at_t = count_at_least(x, n, t);
  for (int it = 0; it < 8 && at_t > k + k / 4; ++it) {
    const float mid = t + (top - t) * 0.5f;
    if (!(mid > t && mid < top)) break;  // the interval cannot be split further
    const int64_t at_mid = count_at_least(x, n, mid);
    if (at_mid >= k) t = mid, at_t = at_mid; else top = mid;
  }
  const int64_t c = compact(x, ids, n, t, w.vals.data(), w.ids.data());
  if (c < k) return false;  // never read past what was written
  uint64_t* keys = w.keys.data();
  for (int64_t j = 0; j < c; ++j) keys[j] = make_key(w.vals[j], w.ids[j]);
  rank_select(keys, c, k, out);
  return true;
}

// The k best of x[0..n) (1 <= k <= n) as keys, best first, into out (k + 1 keys).
// Returns false when x holds a NaN (out is then unspecified).
bool top_row(const float* x, int64_t n, int64_t k, uint64_t* out, Scratch& w) {
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) nan |= x[j] != x[j];
  if (nan) return false;
  float* gmax = w.gmax.data();
  for (int64_t j = 0; j < k; ++j) gmax[j] = x[j];
  for (int64_t c = k; c < n; c += k) {
    const int64_t m = std::min(k, n - c);
    for (int64_t j = 0; j < m; ++j) gmax[j] = std::max(gmax[j], x[c + j]);
  }
  // each group's maximum is a distinct score >= t: at least k scores reach t
  float t = gmax[0], top = gmax[0];
  for (int64_t j = 1; j < k; ++j) t = std::min(t, gmax[j]), top = std::max(top, gmax[j]);
  return select_top(x, nullptr, n, k, t, top, out, w);
}

struct Args {
  const float* s;
  int64_t heads, n, k, stride_m, stride_h, stride_s;
  const int64_t* pi;
  const int64_t* pj;
  int64_t n_pairs;
  float* scores;
  int64_t* slots;
};

// rows [lo, hi) of the (tokens x heads) rows; returns 1 on a NaN
int run_rows(const Args& a, int64_t lo, int64_t hi) {
  Scratch w(a.n, a.k, a.n_pairs);
  const int64_t k = a.k;
  std::vector<uint64_t> t0(k + 1), t1(k + 1), best(k + 1);
  std::vector<float> v0(k), v1(k);
  std::vector<uint32_t> i0(k), i1(k);
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t m = r / a.heads, h = r % a.heads;
    const float* row = a.s + m * a.stride_m + h * a.stride_h;
    if (!top_row(row, a.n, k, t0.data(), w) || !top_row(row + a.stride_s, a.n, k, t1.data(), w)) return 1;
    for (int64_t j = 0; j < k; ++j) {
      v0[j] = key_score(t0[j]), i0[j] = key_index(t0[j]);
      v1[j] = key_score(t1[j]), i1[j] = key_index(t1[j]);
    }
    for (int64_t p = 0; p < a.n_pairs; ++p) {
      w.cand[p] = v0[a.pi[p]] + v1[a.pj[p]];
      w.cand_ids[p] = i0[a.pi[p]] * uint32_t(a.n) + i1[a.pj[p]];
    }
    // a score the k-th best pair reaches: every pair (a' < A, b' < B) scores at least
    // v0[A-1] + v1[B-1] (rounding is monotone), and there are A * B >= k of them
    float t = v0[k - 1] + v1[0];
    for (int64_t A = 1; A <= k; ++A) t = std::max(t, v0[A - 1] + v1[(k + A - 1) / A - 1]);
    if (!select_top(w.cand.data(), w.cand_ids.data(), a.n_pairs, k, t, v0[0] + v1[0], best.data(), w))
      return 1;  // a NaN sum (infinite scores of opposite signs)
    for (int64_t j = 0; j < k; ++j) {
      a.scores[r * k + j] = key_score(best[j]);
      a.slots[r * k + j] = int64_t(key_index(best[j]));
    }
  }
  return 0;
}

}  // namespace

extern "C" int forgetless_pk_topk(const float* s, int64_t tokens, int64_t heads, int64_t n, int64_t k,
                                  int64_t stride_m, int64_t stride_h, int64_t stride_s, const int64_t* pi,
                                  const int64_t* pj, int64_t n_pairs, float* scores, int64_t* slots,
                                  int64_t threads) {
  // s: (tokens, heads, 2, n) float32 with unit stride along n; scores, slots: (tokens, heads, k)
  const Args a{s, heads, n, k, stride_m, stride_h, stride_s, pi, pj, n_pairs, scores, slots};
  const int64_t rows = tokens * heads;
  int64_t nt = std::max<int64_t>(1, std::min<int64_t>(threads, rows / 256));
  if (nt == 1) return run_rows(a, 0, rows);
  std::vector<int> bad(nt, 0);
  std::vector<std::thread> pool;
  const int64_t per = (rows + nt - 1) / nt;
  for (int64_t t = 1; t < nt; ++t) {
    const int64_t lo = std::min(rows, t * per), hi = std::min(rows, (t + 1) * per);
    try {
      pool.emplace_back([&, t, lo, hi] { bad[t] = run_rows(a, lo, hi); });
    } catch (...) {  // no thread to be had: this one does that share too
      bad[t] = run_rows(a, lo, hi);
    }
  }
  bad[0] = run_rows(a, 0, std::min(rows, per));
  for (auto& th : pool) th.join();
  return *std::max_element(bad.begin(), bad.end());
}

// The weights' gradient of the memory's weighted bag y[m] = sum_r w[m, r] V[idx[m, r]]:
// gw[m, r] = <dL/dy[m], V[idx[m, r]]>, one dot product per read, rows prefetched a few reads
// ahead (the reads are random rows of a table larger than the caches). Float32 throughout,
// with partial sums (fused multiply-adds where AVX-512 is there), so the result differs from a
// sequential sum by rounding.
namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t d = 0;
  float s = 0.f;
#ifdef __AVX512F__
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (; d + 32 <= n; d += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d + 16), _mm512_loadu_ps(b + d + 16), acc1);
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
  float acc[16] = {0};
  for (; d + 16 <= n; d += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[d + l] * b[d + l];
  for (int l = 0; l < 16; ++l) s += acc[l];
#endif
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

void bag_rows(const float* values, int64_t dim, const int64_t* idx, int64_t reads, const float* grad, float* out,
              int64_t lo, int64_t hi) {
  constexpr int64_t ahead = 8;
  for (int64_t m = lo; m < hi; ++m) {
    const float* g = grad + m * dim;
    const int64_t* ids = idx + m * reads;
    for (int64_t r = 0; r < reads; ++r) {
      if (r + ahead < reads) {
        const float* next = values + ids[r + ahead] * dim;
        for (int64_t d = 0; d < dim; d += 16) __builtin_prefetch(next + d);
      }
      out[m * reads + r] = dot(values + ids[r] * dim, g, dim);
    }
  }
}

}  // namespace

extern "C" void forgetless_bag_weight_grad(const float* values, int64_t dim, const int64_t* idx, int64_t tokens,
                                           int64_t reads, const float* grad, float* out, int64_t threads) {
  // values: (N, dim); idx, out: (tokens, reads); grad: (tokens, dim); all contiguous
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(threads, tokens / 64));
  if (nt == 1) return bag_rows(values, dim, idx, reads, grad, out, 0, tokens);
  std::vector<std::thread> pool;
  const int64_t per = (tokens + nt - 1) / nt;
  for (int64_t t = 1; t < nt; ++t) {
    const int64_t lo = std::min(tokens, t * per), hi = std::min(tokens, (t + 1) * per);
    try {
      pool.emplace_back([=] { bag_rows(values, dim, idx, reads, grad, out, lo, hi); });
    } catch (...) {  // no thread to be had: this one does that share too
      bag_rows(values, dim, idx, reads, grad, out, lo, hi);
    }
  }
  bag_rows(values, dim, idx, reads, grad, out, 0, std::min(tokens, per));
  for (auto& th : pool) th.join();
}
