"""A compiled CPU kernel for the fused decode read (:mod:`.fused_decode`): one call per batch row and layer.

**What it computes.** Exactly :func:`.fused_decode.fused_attention`'s algebra (that module's docstring), per kv head
``h`` and its ``R = G q`` query rows: the scores of the sink/window (``dense``) tokens, of the head's kept middle
tokens read from the bit-packed codes (each segment of :class:`.fused_decode.RoleLayout`, scale and zero folded in:
token groups ``q.k_t = sum_c (q_c s_cj) code_ct + sum_c q_c z_cj``, channel groups
``q.k_t = sum_u s_tu (q_u . code_tu) + z_tu sum(q_u)``) and of the appended tokens (causal among themselves), one
softmax over all of them, and ``o = sum_t p_t v_t`` with ``p_t s_tu`` folded into the per-token value scales. Codes
are decoded from the stream into a small stack buffer (one unit's tokens, or one token's channel group) and used at
once: nothing the size of the prefix is materialized, and the cache holds exactly its packed bytes. QuaRot's query
rotation and the rotation of the output's quantized part back stay in PyTorch (one Hadamard transform each, cheap).

**Why a C++ extension, not ``torch.compile`` or numba.** The plain PyTorch path pays for the number of small ops
(unpack, convert, scale, index, matmul, add per (kv head, width) segment: hundreds of aten calls per layer, a few
microseconds each) at short context, and for several passes over each code at long context. A compiled loop removes
both. ``torch.compile`` traces the segment loop into a graph whose shapes are the plan's ragged segment sizes, so
each layer (and each prompt's plan) is a new graph. Measured (``benchmarks/results/decode_torch_compile.json``:
``python benchmarks/decode.py --contexts 1024 --retentions 0.25 --probe-torch-compile 3 --name
decode_torch_compile``, torch 2.13 CPU, cold inductor cache): with static shapes 5.9 / 6.6 / 7.2 s of CPU to compile
each of the first three layers (one graph each), and a compiled call then took 0.80 ms against 0.65 ms eager; with
``dynamic=True`` 30 s for the first layer and an inductor code-generation error (``NameError``) on the second.
numba would be a new dependency (with its own LLVM) for the same loop. A C++ loop over the segment table takes any
plan without recompiling: it is compiled once per machine and torch version (``g++ -O3 -march=native``, about 16 s
here) and cached under
``~/.cache/rdalloc/kernels`` (or ``$RDALLOC_KERNEL_CACHE``). It is built with the compiler directly against libtorch
and registered as a torch operator (``torch.ops.rdalloc_fused.attention``), so neither ninja nor pybind11 is needed.
CPU only; on a GPU the plain PyTorch path runs.

**Measured** (``benchmarks/results/decode_compiled.md``, SmolLM2-135M, 1 thread, process CPU time): one step's
attention over all layers at 1024 tokens and 25 % retention took 7.1 ms compiled, 31.2 ms plain, 6.0 ms for SDPA
over the full cache; at 8064 tokens 37.9 / 114.5 / 69.1 ms. The whole decode step: 0.92x the full cache's time at
1K, 0.52x at 8064 (plain: 1.39x, 1.06x).

**Fallback.** :func:`load` returns ``None`` (and warns once, naming the reason) when no compiler is found or the build
or load fails; :func:`.fused_decode.fused_attention` then runs the plain PyTorch path, which stays the oracle the
kernel is tested against. ``RDALLOC_FUSED_KERNEL=0`` disables the kernel.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["SOURCE", "load", "kernel_error", "row_attention"]

SOURCE = r"""
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using at::Half;

// per-segment columns of the meta table (see fused_kernel.py)
enum { HEAD, WIDTH, CODE_START, N_UNITS, N_TOKENS, PARAM_START, N_BLOCKS, UNITS, SLOTS, BLOCKS, STREAM, NCOL };

template <int B>
inline void decode_aligned(const uint8_t* s, int64_t start, int64_t n, float* out) {
  constexpr int per = 8 / B;
  constexpr int mask = (1 << B) - 1;
  int64_t i = 0, k = start;
  for (; i < n && (k % per); ++i, ++k) out[i] = float((s[k / per] >> ((k % per) * B)) & mask);
  const uint8_t* p = s + k / per;
  const int64_t whole = (n - i) / per;
  float* o = out + i;
  for (int64_t j = 0; j < whole; ++j) {
    const int byte = p[j];
    for (int m = 0; m < per; ++m) o[j * per + m] = float((byte >> (m * B)) & mask);
  }
  i += whole * per;
  k += whole * per;
  for (; i < n; ++i, ++k) out[i] = float((s[k / per] >> ((k % per) * B)) & mask);
}

// codes [start, start + n) of a stream packed LSB first (rdalloc.bitpack.pack_bits), as floats
inline void decode(const uint8_t* s, int64_t nbytes, int64_t start, int64_t n, int b, float* out) {
  switch (b) {
    case 8: for (int64_t i = 0; i < n; ++i) out[i] = float(s[start + i]); return;
    case 4: decode_aligned<4>(s, start, n, out); return;
    case 2: decode_aligned<2>(s, start, n, out); return;
    case 1: decode_aligned<1>(s, start, n, out); return;
    default: break;
  }
  const uint32_t mask = (1u << b) - 1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t bit = (start + i) * b, by = bit >> 3;
    uint32_t w = s[by];
    if (by + 1 < nbytes) w |= uint32_t(s[by + 1]) << 8;
    out[i] = float((w >> (bit & 7)) & mask);
  }
}

struct Role {
  std::vector<const uint8_t*> streams;
  std::vector<int64_t> nbytes;
  std::vector<const Half*> params;
  std::vector<int64_t> groups;
  std::vector<int> absmax;  // per stream: 1 symmetric absmax (zero = -c s), 0 affine (scale, zero)
  const float* full = nullptr;
  const int64_t* meta = nullptr;
  int64_t nseg = 0;
  const int64_t* idx = nullptr;
  bool token_axis = false;
  int64_t g = 1;
};

inline void scale_zero(const Role& role, int64_t k, int b, int64_t i, float& s, float& z) {
  const Half* p = role.params[k];
  s = float(p[i]);
  if (role.absmax[k]) {
    const float c = b == 1 ? 0.5f : float((1 << (b - 1)) - 1);
    z = -c * s;
  } else {
    z = float(p[role.groups[k] + i]);
  }
}

Role make_role(const std::vector<at::Tensor>& streams, const std::vector<at::Tensor>& params,
               const at::Tensor& full, const at::Tensor& meta, const at::Tensor& idx, bool token_axis, int64_t g) {
  Role r;
  TORCH_CHECK(streams.size() == params.size(), "rdalloc_fused.attention: one parameter tensor per stream");
  for (size_t k = 0; k < streams.size(); ++k) {
    TORCH_CHECK(streams[k].is_contiguous() && streams[k].scalar_type() == at::kByte,
                "rdalloc_fused.attention: streams must be contiguous uint8");
    TORCH_CHECK(params[k].is_contiguous() && params[k].scalar_type() == at::kHalf,
                "rdalloc_fused.attention: parameters must be contiguous float16");
    r.streams.push_back(streams[k].data_ptr<uint8_t>());
    r.nbytes.push_back(streams[k].numel());
    r.params.push_back(params[k].data_ptr<Half>());
    r.absmax.push_back(params[k].size(0) == 1);
    r.groups.push_back(params[k].numel() / params[k].size(0));
  }
  TORCH_CHECK(full.is_contiguous() && meta.is_contiguous() && idx.is_contiguous() && meta.size(1) == NCOL,
              "rdalloc_fused.attention: full elements, segment table and indices must be contiguous");
  r.full = full.numel() ? full.data_ptr<float>() : nullptr;
  r.meta = meta.data_ptr<int64_t>();
  r.nseg = meta.size(0);
  r.idx = idx.numel() ? idx.data_ptr<int64_t>() : nullptr;
  r.token_axis = token_axis;
  r.g = g;
  return r;
}

inline int64_t at_or(const Role& role, int64_t off, int64_t i) { return off < 0 ? i : role.idx[off + i]; }

// channel group u of token t in a channel-grouped segment m: the full-precision elements in place, or the codes
// decoded into buf; s, z its scale and zero (1, 0 at full precision)
inline const float* channel_group(const Role& role, const int64_t* m, int64_t k, int b, int64_t t, int64_t u,
                                  int64_t nu, int64_t g, std::vector<float>& buf, float& s, float& z) {
  const int64_t e = (t * nu + u) * g;
  s = 1.f;
  z = 0.f;
  if (k < 0) return role.full + m[CODE_START] + e;
  decode(role.streams[k], role.nbytes[k], m[CODE_START] + e, g, b, buf.data());
  scale_zero(role, k, b, m[PARAM_START] + t * nu + u, s, z);
  return buf.data();
}

// sc[r * n + j] += q . k_j for the head's kept middle tokens (j = slot); q [R, D]
void key_scores(const Role& role, int64_t h, const float* qa, const float* qr, int64_t R, int64_t D, float* sc,
                int64_t n, std::vector<float>& buf, std::vector<float>& acc, std::vector<float>& zs,
                std::vector<float>& sb) {
  for (int64_t si = 0; si < role.nseg; ++si) {
    const int64_t* m = role.meta + si * NCOL;
    if (m[HEAD] != h) continue;
    const int b = int(m[WIDTH]);
    const int64_t nu = m[N_UNITS], nt = m[N_TOKENS], nb = m[N_BLOCKS], k = m[STREAM];
    const float* q = k < 0 ? qa : qr;
    if (role.token_axis) {  // codes [units, tokens]; params [units, blocks]
      // four units per pass: acc[r, t] += sum_k (q_r,c_k s_k,j(t)) code_k,t over runs of tokens sharing a block
      constexpr int U = 4;
      acc.assign(R * nt, 0.f);
      zs.assign(R * nb, 0.f);
      buf.resize(U * nt);
      std::vector<int64_t> run;  // token index where each run of one block starts, and nt
      for (int64_t t = 0; t < nt; ++t)
        if (k >= 0 && (t == 0 || at_or(role, m[BLOCKS], t) != at_or(role, m[BLOCKS], t - 1))) run.push_back(t);
      if (k < 0) run.push_back(0);
      run.push_back(nt);
      for (int64_t u0 = 0; u0 < nu; u0 += U) {
        const float* v[U];
        int64_t c[U];
        for (int i = 0; i < U; ++i) {
          const int64_t u = u0 + i < nu ? u0 + i : u0;  // tail: repeat the first unit with coefficient 0
          c[i] = at_or(role, m[UNITS], u);
          if (k < 0) {
            v[i] = role.full + m[CODE_START] + u * nt;
          } else {
            if (u0 + i < nu || i == 0) decode(role.streams[k], role.nbytes[k], m[CODE_START] + u * nt, nt, b,
                                              buf.data() + i * nt);
            v[i] = buf.data() + (u0 + i < nu ? i : 0) * nt;
          }
        }
        for (size_t ri = 0; ri + 1 < run.size(); ++ri) {
          const int64_t t0 = run[ri], t1 = run[ri + 1];
          const int64_t j = k < 0 ? 0 : at_or(role, m[BLOCKS], t0);
          float sk[U], zk[U];
          for (int i = 0; i < U; ++i) {
            sk[i] = 1.f;
            zk[i] = 0.f;
            if (k >= 0 && u0 + i < nu) scale_zero(role, k, b, m[PARAM_START] + (u0 + i) * nb + j, sk[i], zk[i]);
            if (u0 + i >= nu) sk[i] = 0.f;
          }
          for (int64_t r = 0; r < R; ++r) {
            float a0 = q[r * D + c[0]] * sk[0], a1 = q[r * D + c[1]] * sk[1];
            float a2 = q[r * D + c[2]] * sk[2], a3 = q[r * D + c[3]] * sk[3];
            if (k >= 0)
              for (int i = 0; i < U; ++i) zs[r * nb + j] += u0 + i < nu ? q[r * D + c[i]] * zk[i] : 0.f;
            float* a = acc.data() + r * nt;
            const float *v0 = v[0], *v1 = v[1], *v2 = v[2], *v3 = v[3];
            for (int64_t t = t0; t < t1; ++t) a[t] += a0 * v0[t] + a1 * v1[t] + a2 * v2[t] + a3 * v3[t];
          }
        }
      }
      for (int64_t r = 0; r < R; ++r)
        for (int64_t t = 0; t < nt; ++t) {
          float x = acc[r * nt + t];
          if (k >= 0) x += zs[r * nb + at_or(role, m[BLOCKS], t)];
          sc[r * n + at_or(role, m[SLOTS], t)] += x;
        }
    } else {  // codes [tokens, units, g]; params [tokens, units]
      const int64_t g = role.g;
      buf.resize(g);
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t slot = at_or(role, m[SLOTS], t);
        for (int64_t u = 0; u < nu; ++u) {
          const int64_t c0 = at_or(role, m[UNITS], u) * g;
          float s, z;
          const float* v = channel_group(role, m, k, b, t, u, nu, g, buf, s, z);
          for (int64_t r = 0; r < R; ++r) {
            const float* qq = q + r * D + c0;
            float d = 0.f, qs = 0.f;
            for (int64_t i = 0; i < g; ++i) { d += qq[i] * v[i]; qs += qq[i]; }
            sc[r * n + slot] += s * d + z * qs;
          }
        }
      }
    }
  }
}

// one value segment with group size G: per unit, the R output rows accumulate over the tokens in a local block
template <int G>
void value_unit(const Role& role, const int64_t* m, int64_t k, int b, const float* p, int64_t R, int64_t D,
                int64_t n, float* out, std::vector<float>& buf) {
  const int64_t nu = m[N_UNITS], nt = m[N_TOKENS];
  float acc[8][G];
  float zacc[8];
  float v[G];
  for (int64_t u = 0; u < nu; ++u) {
    const int64_t c0 = at_or(role, m[UNITS], u) * G;
    for (int64_t r = 0; r < R; ++r) {
      zacc[r] = 0.f;
      for (int i = 0; i < G; ++i) acc[r][i] = 0.f;
    }
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t slot = at_or(role, m[SLOTS], t), e = (t * nu + u) * G;
      float s = 1.f, z = 0.f;
      const float* x;
      if (k < 0) {
        x = role.full + m[CODE_START] + e;
      } else {
        decode(role.streams[k], role.nbytes[k], m[CODE_START] + e, G, b, v);
        scale_zero(role, k, b, m[PARAM_START] + t * nu + u, s, z);
        x = v;
      }
      for (int64_t r = 0; r < R; ++r) {
        const float pr = p[r * n + slot];
        const float a = pr * s;
        zacc[r] += pr * z;
        for (int i = 0; i < G; ++i) acc[r][i] += a * x[i];
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      float* oo = out + r * D + c0;
      for (int i = 0; i < G; ++i) oo[i] += acc[r][i] + zacc[r];
    }
  }
}

// o[r, :] += sum_t p[r, slot t] v_t over the head's kept middle tokens (values grouped along channels)
void value_sum(const Role& role, int64_t h, const float* p, int64_t R, int64_t D, int64_t n, float* o, float* orot,
               std::vector<float>& buf) {
  const int64_t g = role.g;
  buf.resize(g);
  for (int64_t si = 0; si < role.nseg; ++si) {
    const int64_t* m = role.meta + si * NCOL;
    if (m[HEAD] != h) continue;
    const int b = int(m[WIDTH]);
    const int64_t nu = m[N_UNITS], nt = m[N_TOKENS], k = m[STREAM];
    float* out = k < 0 ? o : orot;
    if (g == 32 && R <= 8) {
      value_unit<32>(role, m, k, b, p, R, D, n, out, buf);
      continue;
    }
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t slot = at_or(role, m[SLOTS], t);
      for (int64_t u = 0; u < nu; ++u) {
        const int64_t c0 = at_or(role, m[UNITS], u) * g;
        float s, z;
        const float* v = channel_group(role, m, k, b, t, u, nu, g, buf, s, z);
        for (int64_t r = 0; r < R; ++r) {
          const float pr = p[r * n + slot];
          const float a = pr * s, pz = pr * z;
          float* oo = out + r * D + c0;
          for (int64_t i = 0; i < g; ++i) oo[i] += a * v[i] + pz;
        }
      }
    }
  }
}

inline float dot(const float* a, const float* b, int64_t D) {
  float s = 0.f;
  for (int64_t i = 0; i < D; ++i) s += a[i] * b[i];
  return s;
}

std::vector<at::Tensor> attention(
    at::Tensor qa, at::Tensor qr, at::Tensor dk, at::Tensor dv, at::Tensor ak, at::Tensor av,
    std::vector<at::Tensor> k_streams, std::vector<at::Tensor> k_params, at::Tensor k_full, at::Tensor k_meta,
    at::Tensor k_idx, bool k_token_axis, int64_t k_g,
    std::vector<at::Tensor> v_streams, std::vector<at::Tensor> v_params, at::Tensor v_full, at::Tensor v_meta,
    at::Tensor v_idx, int64_t v_g, at::Tensor kept, int64_t nq, double scaling, bool rotate) {
  const int64_t H = qa.size(0), R = qa.size(1), D = qa.size(2), nd = dk.size(1), T = ak.size(1);
  TORCH_CHECK(qa.is_contiguous() && qr.is_contiguous() && dk.is_contiguous() && dv.is_contiguous(),
              "rdalloc_fused.attention: query and dense tensors must be contiguous");
  TORCH_CHECK(ak.stride(2) == 1 && av.stride(2) == 1, "rdalloc_fused.attention: appended rows must be contiguous");
  for (const at::Tensor* t : {&qa, &qr, &dk, &dv, &ak, &av})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "rdalloc_fused.attention: query, keys and values must be float32");
  TORCH_CHECK(kept.scalar_type() == at::kLong && kept.is_contiguous() && kept.numel() == H,
              "rdalloc_fused.attention: kept must hold one int64 count per kv head");
  const Role kr = make_role(k_streams, k_params, k_full, k_meta, k_idx, k_token_axis, k_g);
  const Role vr = make_role(v_streams, v_params, v_full, v_meta, v_idx, false, v_g);
  const int64_t* kc = kept.data_ptr<int64_t>();
  at::Tensor o = at::zeros({H, R, D}, qa.options());
  at::Tensor orot = rotate ? at::zeros({H, R, D}, qa.options()) : o;
  const float *pqa = qa.data_ptr<float>(), *pqr = qr.data_ptr<float>();
  const float *pdk = dk.data_ptr<float>(), *pdv = dv.data_ptr<float>();
  const float *pak = ak.data_ptr<float>(), *pav = av.data_ptr<float>();
  float *po = o.data_ptr<float>(), *por = orot.data_ptr<float>();
  const int64_t aks0 = ak.stride(0), aks1 = ak.stride(1), avs0 = av.stride(0), avs1 = av.stride(1);
  const float sc_f = float(scaling);
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> sc, buf, acc, zs, sb;
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t nk = kc[h], n = nd + nk + T;
      const float* q = pqa + h * R * D;
      const float* qrh = pqr + h * R * D;
      sc.assign(R * n, 0.f);
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t j = 0; j < nd; ++j) sc[r * n + j] = dot(q + r * D, pdk + (h * nd + j) * D, D);
        const int64_t last = T - nq + r % nq;  // the query's own position among the appended tokens
        for (int64_t j = 0; j < T; ++j)
          sc[r * n + nd + nk + j] = j > last ? -std::numeric_limits<float>::infinity()
                                             : dot(q + r * D, pak + h * aks0 + j * aks1, D);
      }
      key_scores(kr, h, q, qrh, R, D, sc.data() + nd, n, buf, acc, zs, sb);
      for (int64_t r = 0; r < R; ++r) {
        float* x = sc.data() + r * n;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) { x[j] *= sc_f; mx = x[j] > mx ? x[j] : mx; }
        float tot = 0.f;
        for (int64_t j = 0; j < n; ++j) { x[j] = std::exp(x[j] - mx); tot += x[j]; }
        const float inv = 1.f / tot;
        for (int64_t j = 0; j < n; ++j) x[j] *= inv;
        float* oo = po + (h * R + r) * D;
        for (int64_t j = 0; j < nd; ++j) {
          const float pj = x[j];
          const float* v = pdv + (h * nd + j) * D;
          for (int64_t i = 0; i < D; ++i) oo[i] += pj * v[i];
        }
        for (int64_t j = 0; j < T; ++j) {
          const float pj = x[nd + nk + j];
          const float* v = pav + h * avs0 + j * avs1;
          for (int64_t i = 0; i < D; ++i) oo[i] += pj * v[i];
        }
      }
      value_sum(vr, h, sc.data() + nd, R, D, n, po + h * R * D, por + h * R * D, buf);
    }
  });
  return {o, orot};
}

}  // namespace

TORCH_LIBRARY(rdalloc_fused, m) {
  m.def("attention(Tensor qa, Tensor qr, Tensor dk, Tensor dv, Tensor ak, Tensor av, Tensor[] k_streams, "
        "Tensor[] k_params, Tensor k_full, Tensor k_meta, Tensor k_idx, bool k_token_axis, int k_g, "
        "Tensor[] v_streams, Tensor[] v_params, Tensor v_full, Tensor v_meta, Tensor v_idx, int v_g, "
        "Tensor kept, int nq, float scaling, bool rotate) -> Tensor[]");
  m.impl("attention", c10::DispatchKey::CPU, TORCH_FN(attention));
}
"""

_STATE: dict = {}


def _cache_dir() -> Path:
    return Path(os.environ.get("RDALLOC_KERNEL_CACHE") or Path.home() / ".cache" / "rdalloc" / "kernels")


def _cpu_tag() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _compile(target: Path, cxx: str) -> None:
    """Compile :data:`SOURCE` with ``cxx`` into the shared library ``target`` (written atomically)."""
    from torch.utils import cpp_extension

    target.parent.mkdir(parents=True, exist_ok=True)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "fused.cpp"
        src.write_text(SOURCE)
        out = Path(tmp) / "fused.so"
        cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
               f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in cpp_extension.include_paths()),
               str(src), "-o", str(out), *(f"-L{p}" for p in cpp_extension.library_paths()),
               "-lc10", "-ltorch_cpu", "-ltorch"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise RuntimeError(f"compiler {cxx!r} could not run: {e}") from e
        if r.returncode:
            raise RuntimeError(f"{cxx} failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
        tmp_target = target.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(out, tmp_target)
        os.replace(tmp_target, target)  # atomic: concurrent builders never load a half-written file


def _build() -> None:
    """Load the operator, compiling it first unless this machine's cache has it."""
    if hasattr(torch.ops.rdalloc_fused, "attention"):
        return
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++, c++ or $CXX) on PATH")
    key = hashlib.sha256("\0".join([SOURCE, torch.__version__, cxx, _cpu_tag()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"rdalloc_fused_{key}.so"
    if not target.exists():
        _compile(target, cxx)
    torch.ops.load_library(str(target))


def load():
    """The compiled operator (``torch.ops.rdalloc_fused.attention``), built on first use; ``None`` (with one warning
    naming the reason) when it cannot be built or loaded, or when ``RDALLOC_FUSED_KERNEL=0``."""
    if "op" not in _STATE:
        _STATE["op"], _STATE["error"] = None, None
        if os.environ.get("RDALLOC_FUSED_KERNEL", "1") == "0":
            _STATE["error"] = "disabled by RDALLOC_FUSED_KERNEL=0"
            return None
        try:
            _build()
            _STATE["op"] = torch.ops.rdalloc_fused.attention
        except Exception as e:  # any build or load failure: the plain PyTorch path answers instead
            _STATE["error"] = f"{type(e).__name__}: {e}"
            warnings.warn(f"rdalloc: the compiled fused decode kernel is unavailable ({_STATE['error']}); using "
                          f"the plain PyTorch fused path", RuntimeWarning, stacklevel=2)
    return _STATE["op"]


def kernel_error() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` when it has not run or the kernel loaded)."""
    return _STATE.get("error")


def row_attention(op, layer, b: int, row, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[q_heads, q, D]`` for batch row ``b`` of ``layer`` by the compiled operator ``op`` (float32)."""
    from rdalloc.quantizers import hadamard_transform

    fl = row.fused
    Hq, nq, D = query.shape
    H = len(fl.kept)
    R = Hq // H * nq
    f32 = torch.float32
    qa = query.to(f32).reshape(H, R, D).contiguous()
    qr = hadamard_transform(qa).contiguous() if fl.rotate else qa
    dk, dv = row.dense_kv
    T = layer.keys.shape[-2]
    ak, av = layer.keys[b, :, :T].to(f32), layer.values[b, :, :T].to(f32)
    pk, pv = row.packed.keys, row.packed.values
    km, vm = fl.keys.kernel, fl.values.kernel
    o, o_rot = op(qa, qr, dk[0].to(f32).contiguous(), dv[0].to(f32).contiguous(), ak, av,
                  list(pk.payload), list(pk.params), pk.full.reshape(-1).to(f32), km[0], km[1],
                  fl.keys.axis == "token", fl.keys.g,
                  list(pv.payload), list(pv.params), pv.full.reshape(-1).to(f32), vm[0], vm[1], fl.values.g,
                  fl.kept_counts, nq, float(scaling), bool(fl.rotate))
    if fl.rotate:
        o = o + hadamard_transform(o_rot)
    return o.view(Hq, nq, D)
