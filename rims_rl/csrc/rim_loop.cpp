// The RIM's per-step loop and its backward through time, in C++ against ATen (see rims_rl/rim_fast.py).
//
// This is a transcription of `_run_loop` (with its step helpers `_read_input`, `_select`, `_cell`, `_communicate`)
// and `_RIMSequence.backward` in rims_rl/rim_fast.py for the common case: input attention over one vector per step
// (the "per-step", "folded" and "projected" paths), LSTM or GRU units, communication on or off, attention dropout on
// or off (its masks are drawn before the loop, in rim_fast.py), no dropped units. Same ops, same order, so the same
// numbers; what it saves is the Python interpreter between ~30 small ops per step (forward) and ~45 (backward). The
// Python code remains the reference: the tests run every RIM test on both. Compiled on first use by
// torch.utils.cpp_extension (rim_fast.py).
//
// Layouts: the state is unit-major (K, B, H). Per-sequence buffers are (K, L, B, .) where a weight gradient is
// formed from all steps at once (h_in, read, h1, rc and their gradients), (L, K, B, .) otherwise.
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <vector>

using at::Tensor;

namespace {

struct Sizes {
  int64_t L, K, B, H, Hi, dk, dv, dq, G;
};

Sizes sizes_of(const Tensor& keys, const Tensor& values, const Tensor& h, const Tensor& wih) {
  Sizes s{};
  s.L = keys.size(0);
  s.K = h.size(0);
  s.B = h.size(1);
  s.H = h.size(2);
  s.Hi = keys.size(2);
  s.dk = keys.size(3);
  s.dv = values.size(3);
  s.dq = s.Hi * s.dk;
  s.G = wih.size(2);
  return s;
}

}  // namespace

// Forward over a sequence. Returns [outputs (L,K,B,H), h_n, c_n (empty for a GRU), masks (L,K,B) bool,
// attention on the input (L,K,B)] and, with `record`, the tape the backward reads:
// [h_in (K,L,B,H), read (K,L,B,Hi*dv), h1 (K,L,B,H), rc (K,L,B,Hc*cv), c_in (L,K,B,H), mf (L,K,B,1),
//  act (L,K,B,G): LSTM [sigmoid(i,f,o) | tanh(g)], GRU [sigmoid(r,z) | n],
//  aux (L,K,B,H): LSTM tanh(c), GRU W_hn h + b_hn, p (L,K,B,Hi), qkv (L,K,B,Hc*(2ck+cv)), ac_t (L,B*Hc,K,K),
//  ug (L,K,B,2H) [update | gate]].
// drop_in (L,K,B,Hi) and drop_c (L,B*Hc,K queries,K keys), where given, are the attention dropout masks.
std::vector<Tensor> rim_forward(const Tensor& keys, const Tensor& values, Tensor h, std::optional<Tensor> c_opt,
                                const std::optional<Tensor>& keep, const std::vector<bool>& reset_steps,
                                const Tensor& wq, const Tensor& bq, const Tensor& wih, const Tensor& bih,
                                const Tensor& whh, const std::optional<Tensor>& bhh,
                                const std::optional<Tensor>& wqkv, const std::optional<Tensor>& wout,
                                const std::optional<Tensor>& bout, const std::optional<Tensor>& score_weight,
                                const std::optional<Tensor>& score_bias, const std::optional<Tensor>& proj_gates,
                                const std::optional<Tensor>& gate_bias, const std::optional<Tensor>& drop_in,
                                const std::optional<Tensor>& drop_c, int64_t k_active, int64_t Hc, int64_t ck,
                                int64_t cv, bool lstm, bool communication, bool record, bool merged) {
  at::NoGradGuard no_grad;  // also when called from a thread of its own (grad mode is per thread)
  const Sizes s = sizes_of(keys, values, h, wih);
  const int64_t L = s.L, K = s.K, B = s.B, H = s.H, Hi = s.Hi, dk = s.dk, dv = s.dv, dq = s.dq, G = s.G;
  const int64_t dqkv = 2 * ck + cv;
  const auto opt = h.options();
  Tensor c = lstm ? *c_opt : Tensor();
  const bool projected = score_weight.has_value();  // through _VectorProjections (rim_fast.py)
  merged = !projected && (merged || record);
  Tensor w_h, b_h;
  if (merged) {  // [W_q | W_hh]: a unit's queries and its recurrent gate inputs from one product of its state
    w_h = at::cat({wq, whh}, -1);
    b_h = at::cat({bq, lstm ? bih : *bhh}, -1);
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(ck));
  const Tensor zero = at::zeros({}, opt);
  const Tensor no_winner = at::zeros({K, B}, opt.dtype(at::kBool));
  const Tensor all_active = at::ones({K, B}, opt.dtype(at::kBool));

  Tensor outputs = at::empty({L, K, B, H}, opt);
  Tensor masks = at::empty({L, K, B}, opt.dtype(at::kBool));
  Tensor attention = at::empty({L, K, B}, opt);
  Tensor h_in, read_all, h1_all, rc_all, c_in, mf_all, act, aux, p_all, qkv_all, ac_all, ug_all;
  if (record) {
    h_in = at::empty({K, L, B, H}, opt);
    if (!projected) read_all = at::empty({K, L, B, Hi * dv}, opt);
    p_all = at::empty({L, K, B, Hi}, opt);
    mf_all = at::empty({L, K, B, 1}, opt);
    act = at::empty({L, K, B, G}, opt);
    aux = at::empty({L, K, B, H}, opt);
    if (lstm) c_in = at::empty({L, K, B, H}, opt);
    if (communication) {
      h1_all = at::empty({K, L, B, H}, opt);
      rc_all = at::empty({K, L, B, Hc * cv}, opt);
      qkv_all = at::empty({L, K, B, Hc * dqkv}, opt);
      ac_all = at::empty({L, B * Hc, K, K}, opt);
      ug_all = at::empty({L, K, B, 2 * H}, opt);
    }
  }

  for (int64_t t = 0; t < L; ++t) {
    if (reset_steps[t]) {  // sb3-contrib's convention: the state is zeroed before the first step of an episode
      const Tensor k = (*keep)[t];
      h = h * k;
      if (lstm) c = c * k;
    }
    if (record) {
      h_in.select(1, t).copy_(h);
      if (lstm) c_in[t].copy_(c);
    }

    // ---- 1-2. Input attention over one vector and selection (§2.3) ----
    // softmax over {null, x} with the null score exactly 0: the weight on x is sigmoid(score)
    Tensor q, gh, score;
    if (projected) {
      score = at::baddbmm((*score_bias)[t], h.reshape({K * B, 1, H}), (*score_weight)[t]).view({K, B, Hi});
    } else if (merged) {
      Tensor hz = at::baddbmm(b_h, h, w_h);
      q = hz.narrow(2, 0, dq).view({K, B, Hi, dk});
      gh = hz.narrow(2, dq, G);
    } else {
      q = at::baddbmm(bq, h, wq).view({K, B, Hi, dk});
    }
    if (!projected) score = (q * keys[t]).sum(-1);  // (K, B, Hi)
    Tensor p = record ? p_all[t] : at::empty({K, B, Hi}, opt);
    at::sigmoid_out(p, score);
    Tensor on_input = attention[t];  // (K, B) = 1 - null attention
    at::mean_out(on_input, p, at::IntArrayRef{-1}, false);
    const Tensor p_read = drop_in ? p * (*drop_in)[t] : p;  // the winners are chosen before dropout
    Tensor read, gates, gx;
    if (projected) {
      gx = at::baddbmm(*gate_bias, p_read.view({K * B, 1, Hi}), (*proj_gates)[t]).view({K, B, G});
      if (lstm) {
        gates = at::baddbmm(gx, h, whh);
      } else {
        gh = at::baddbmm(*bhh, h, whh);
      }
    } else if (record) {
      read = read_all.select(1, t);
      Tensor read4 = read.view({K, B, Hi, dv});
      at::mul_out(read4, p_read.unsqueeze(-1), values[t]);
    } else {
      read = (p_read.unsqueeze(-1) * values[t]).view({K, B, Hi * dv});
    }
    if (!projected && lstm) {
      gates = merged ? at::baddbmm(gh, read, wih) : at::baddbmm(at::baddbmm(bih, read, wih), h, whh);
    } else if (!projected) {
      gx = at::baddbmm(bih, read, wih);
      if (!merged) gh = at::baddbmm(*bhh, h, whh);
    }
    Tensor active = all_active;
    if (k_active < K) {  // the k_A units with the least attention on the null element
      // rim_fast.select_winners: (on_input desc, log-odds desc, index asc); the log-odds break a saturated
      // softmax's exact ties (std::get<1> of a stable sort keeps equal elements in their order)
      Tensor by_odds = std::get<1>(at::sort(score.mean(-1), /*stable=*/true, 0, /*descending=*/true));
      Tensor order = std::get<1>(at::sort(on_input.gather(0, by_odds), /*stable=*/true, 0, /*descending=*/true));
      Tensor winners = by_odds.gather(0, order.narrow(0, 0, k_active));
      active = no_winner.scatter(0, winners, true);
    }
    masks[t].copy_(active);
    const Tensor m = active.unsqueeze(-1);
    if (record) mf_all[t].copy_(m);

    // ---- 3. Independent dynamics (§2.1): all units computed, the losers' state kept exactly ----
    // the state entering communication; without communication, the step's output itself
    Tensor h1 = !communication ? outputs[t] : (record ? h1_all.select(1, t) : at::empty({K, B, H}, opt));
    if (lstm) {
      Tensor a = record ? act[t] : at::empty({K, B, G}, opt);
      Tensor ifo = a.narrow(2, 0, 3 * H), g = a.narrow(2, 3 * H, H);
      at::sigmoid_out(ifo, gates.narrow(2, 0, 3 * H));
      at::tanh_out(g, gates.narrow(2, 3 * H, H));
      Tensor i = ifo.narrow(2, 0, H), f = ifo.narrow(2, H, H), o = ifo.narrow(2, 2 * H, H);
      Tensor c_new = at::addcmul(f * c, i, g);
      Tensor tanh_c = record ? aux[t] : at::empty({K, B, H}, opt);
      at::tanh_out(tanh_c, c_new);
      at::where_out(h1, m, o * tanh_c, h);
      c = at::where(m, c_new, c);
    } else {
      Tensor a = record ? act[t] : at::empty({K, B, G}, opt);
      Tensor rz = a.narrow(2, 0, 2 * H), n = a.narrow(2, 2 * H, H);
      at::sigmoid_out(rz, gx.narrow(2, 0, 2 * H) + gh.narrow(2, 0, 2 * H));
      Tensor r = rz.narrow(2, 0, H), z = rz.narrow(2, H, H);
      Tensor gh_n = gh.narrow(2, 2 * H, H);
      if (record) aux[t].copy_(gh_n);
      at::tanh_out(n, at::addcmul(gx.narrow(2, 2 * H, H), r, gh_n));
      at::where_out(h1, m, at::addcmul(n, z, h - n), h);  // (1 - z) * n + z * h
    }

    // ---- 4. Communication (§2.4): active units read all units; gated, squashed residual ----
    if (communication) {
      Tensor qkv = record ? qkv_all[t] : at::empty({K, B, Hc * dqkv}, opt);
      at::bmm_out(qkv, h1, *wqkv);
      Tensor qkv_t = qkv.view({K, B * Hc, dqkv}).transpose(0, 1);  // (B*Hc, K, 2ck+cv)
      Tensor q2 = qkv_t.narrow(2, 0, ck), k2 = qkv_t.narrow(2, ck, ck), v2 = qkv_t.narrow(2, 2 * ck, cv);
      // scores key-major (B*Hc, K keys, K queries), normalised over dim 1
      Tensor scores = at::baddbmm(zero, k2, q2.transpose(1, 2), 0.0, scale);
      Tensor ac_t = record ? ac_all[t] : at::empty({B * Hc, K, K}, opt);
      at::_softmax_out(ac_t, scores, 1, false);
      Tensor ac_read = ac_t.transpose(1, 2);  // (B*Hc, K queries, K keys)
      if (drop_c) ac_read = ac_read * (*drop_c)[t];
      Tensor rc4 = at::bmm(ac_read, v2).view({B, Hc, K, cv}).permute({2, 0, 1, 3});
      Tensor rc = record ? rc_all.select(1, t) : at::empty({K, B, Hc * cv}, opt);
      rc.view({K, B, Hc, cv}).copy_(rc4);
      Tensor pre = at::baddbmm(*bout, rc, *wout);
      Tensor ug = record ? ug_all[t] : at::empty({K, B, 2 * H}, opt);
      Tensor update = ug.narrow(2, 0, H), gate = ug.narrow(2, H, H);
      at::tanh_out(update, pre.narrow(2, 0, H));
      at::sigmoid_out(gate, pre.narrow(2, H, H));
      Tensor out_t = outputs[t];
      at::where_out(out_t, m, at::addcmul(h1, gate, update), h1);
    }
    h = outputs[t];
  }
  std::vector<Tensor> result{outputs, h, lstm ? c : at::empty({0}, opt), masks, attention};
  if (record) {
    for (const Tensor& x : {h_in, read_all, h1_all, rc_all, c_in, mf_all, act, aux, p_all, qkv_all, ac_all,
                            ug_all}) {
      result.push_back(x.defined() ? x : at::empty({0}, opt));
    }
  }
  return result;
}

// Backward through time for rim_forward's tape. Returns [dh_0, dc_0 (empty for a GRU), d_hz (K,L,B,dq+G): the
// gradients of [queries | recurrent gate inputs], d_gx (K,L,B,G): of the GRU's input-side gates (empty for an
// LSTM, whose d_gx is d_hz's gate part), d_s (K,L,B,Hi): of the input-attention scores, d_pre (K,L,B,2H) and
// d_qkv (K,L,B,Hc*(2ck+cv)): of the communication's products (empty without communication), d_read (L,K,B,Hi*dv): of
// what each unit read (empty on the projected path)].
std::vector<Tensor> rim_backward(const std::optional<Tensor>& d_outputs, const std::optional<Tensor>& d_hn,
                                 const std::optional<Tensor>& d_cn, const Tensor& keys, const Tensor& values,
                                 const std::optional<Tensor>& keep, const std::vector<bool>& reset_steps,
                                 const Tensor& h_in, const Tensor& c_in, const Tensor& mf_all, const Tensor& act,
                                 const Tensor& aux, const Tensor& p_all, const Tensor& qkv_all, const Tensor& ac_all,
                                 const Tensor& ug_all, const Tensor& wq, const Tensor& wih, const Tensor& whh,
                                 const std::optional<Tensor>& wqkv, const std::optional<Tensor>& wout,
                                 const std::optional<Tensor>& score_weight, const std::optional<Tensor>& proj_gates,
                                 const std::optional<Tensor>& drop_in, const std::optional<Tensor>& drop_c,
                                 int64_t Hc, int64_t ck, int64_t cv, bool lstm, bool communication) {
  at::NoGradGuard no_grad;
  const bool projected = score_weight.has_value();
  const int64_t K = h_in.size(0), L = h_in.size(1), B = h_in.size(2), H = h_in.size(3);
  const int64_t Hi = keys.size(2), dk = keys.size(3), dv = values.size(3), G = wih.size(2);
  const int64_t dq = projected ? 0 : Hi * dk;  // d_hz holds [queries | recurrent gate inputs], or only the latter
  const int64_t dqkv = 2 * ck + cv;
  const auto opt = h_in.options();
  const double scale = 1.0 / std::sqrt(static_cast<double>(ck));
  const Tensor zero = at::zeros({}, opt);
  Tensor dh = d_hn ? *d_hn : at::zeros({K, B, H}, opt);
  Tensor dc;
  if (lstm) dc = d_cn ? *d_cn : at::zeros({K, B, H}, opt);
  Tensor d_hz = at::empty({K, L, B, dq + G}, opt);
  Tensor d_gh = d_hz.narrow(3, dq, G);
  Tensor d_gx = lstm ? d_gh : at::empty({K, L, B, G}, opt);
  Tensor d_s_all = at::empty({K, L, B, Hi}, opt);
  Tensor d_pre_all, d_qkv_all, wout_t, wqkv_t;
  const Tensor d_read_all = projected ? Tensor() : at::empty({L, K, B, Hi * dv}, opt);
  if (communication) {
    d_pre_all = at::empty({K, L, B, 2 * H}, opt);
    d_qkv_all = at::empty({K, L, B, Hc * dqkv}, opt);
    wout_t = wout->transpose(1, 2);
    wqkv_t = wqkv->transpose(1, 2);
  }
  const Tensor w_h_t = (projected ? whh : at::cat({wq, whh}, -1)).transpose(1, 2);
  const Tensor wih_t = wih.transpose(1, 2);

  for (int64_t t = L - 1; t >= 0; --t) {
    if (d_outputs) dh = dh + (*d_outputs)[t];
    const Tensor mf = mf_all[t];  // (K, B, 1), 1.0 for the active units

    // ---- 4. communication ----
    Tensor dh1 = dh;
    if (communication) {
      const Tensor ug = ug_all[t];
      const Tensor update = ug.narrow(2, 0, H), gate = ug.narrow(2, H, H);
      const Tensor dh_active = dh * mf;
      Tensor d_pre = d_pre_all.select(1, t);
      Tensor d_update = d_pre.narrow(2, 0, H), d_gate = d_pre.narrow(2, H, H);
      at::tanh_backward_out(d_update, dh_active * gate, update);
      at::sigmoid_backward_out(d_gate, dh_active * update, gate);
      const Tensor d_rc = at::bmm(d_pre, wout_t).view({K, B * Hc, cv}).transpose(0, 1);  // (B*Hc, K, cv)
      const Tensor qkv_t = qkv_all[t].view({K, B * Hc, dqkv}).transpose(0, 1);
      const Tensor q2 = qkv_t.narrow(2, 0, ck), k2 = qkv_t.narrow(2, ck, ck), v2 = qkv_t.narrow(2, 2 * ck, cv);
      const Tensor ac_t = ac_all[t];  // (B*Hc, K keys, K queries)
      Tensor d_ac = at::bmm(d_rc, v2.transpose(1, 2));  // (B*Hc, K queries, K keys)
      Tensor d_v2;
      if (drop_c) {  // through the dropped read, as the forward formed it
        const Tensor drop = (*drop_c)[t];
        d_v2 = at::bmm((ac_t.transpose(1, 2) * drop).transpose(1, 2), d_rc);
        d_ac = d_ac * drop;
      } else {
        d_v2 = at::bmm(ac_t, d_rc);
      }
      const Tensor d_scores_t = at::_softmax_backward_data(d_ac.transpose(1, 2), ac_t, 1, ac_t.scalar_type());
      const Tensor d_q2 = at::baddbmm(zero, d_scores_t.transpose(1, 2), k2, 0.0, scale);
      const Tensor d_k2 = at::baddbmm(zero, d_scores_t, q2, 0.0, scale);
      Tensor d_qkv = d_qkv_all.select(1, t);
      d_qkv.view({K, B, Hc, dqkv}).copy_(at::cat({d_q2, d_k2, d_v2}, -1).view({B, Hc, K, dqkv}).permute({2, 0, 1, 3}));
      dh1 = at::baddbmm(dh, d_qkv, wqkv_t);  // residual + through q, k, v
    }

    // ---- 3. dynamics ----
    const Tensor dh1_active = dh1 * mf;
    Tensor dh_prev;
    const Tensor a = act[t];
    if (lstm) {
      const Tensor i = a.narrow(2, 0, H), f = a.narrow(2, H, H), o = a.narrow(2, 2 * H, H), g = a.narrow(2, 3 * H, H);
      const Tensor tanh_c = aux[t];
      const Tensor dc_active = dc * mf;
      const Tensor dc_new = at::tanh_backward(dh1_active * o, tanh_c).add_(dc_active);
      Tensor d_gates = d_gh.select(1, t);
      Tensor d_i = d_gates.narrow(2, 0, H), d_f = d_gates.narrow(2, H, H), d_o = d_gates.narrow(2, 2 * H, H),
             d_g = d_gates.narrow(2, 3 * H, H);
      at::sigmoid_backward_out(d_i, dc_new * g, i);
      at::sigmoid_backward_out(d_f, dc_new * c_in[t], f);
      at::sigmoid_backward_out(d_o, dh1_active * tanh_c, o);
      at::tanh_backward_out(d_g, dc_new * i, g);
      dc = at::addcmul(dc - dc_active, dc_new, f);
      dh_prev = dh1 - dh1_active;
    } else {
      const Tensor r = a.narrow(2, 0, H), z = a.narrow(2, H, H), n = a.narrow(2, 2 * H, H);
      const Tensor gh_n = aux[t];
      Tensor dgx = d_gx.select(1, t), dgh = d_gh.select(1, t);
      Tensor d_n = dgx.narrow(2, 2 * H, H), d_r = dgx.narrow(2, 0, H), d_z = dgx.narrow(2, H, H);
      at::tanh_backward_out(d_n, at::addcmul(dh1_active, dh1_active, z, -1.0), n);
      at::sigmoid_backward_out(d_r, d_n * gh_n, r);
      at::sigmoid_backward_out(d_z, dh1_active * (h_in.select(1, t) - n), z);
      dgh.narrow(2, 0, 2 * H).copy_(dgx.narrow(2, 0, 2 * H));
      Tensor dgh_n = dgh.narrow(2, 2 * H, H);
      at::mul_out(dgh_n, d_n, r);
      dh_prev = at::addcmul(dh1 - dh1_active, dh1_active, z);
    }

    // ---- 1. input attention over one vector ----
    if (projected) {  // through the step-independent projections; their own gradients are formed after the loop
      dh_prev = at::baddbmm(dh_prev, d_gh.select(1, t), w_h_t);
      Tensor d_p =
          at::bmm(d_gx.select(1, t).reshape({K * B, 1, G}), (*proj_gates)[t].transpose(1, 2)).view({K, B, Hi});
      if (drop_in) d_p = d_p * (*drop_in)[t];
      Tensor d_s = d_s_all.select(1, t);
      at::sigmoid_backward_out(d_s, d_p, p_all[t]);
      dh_prev = at::baddbmm(dh_prev.view({K * B, 1, H}), d_s.reshape({K * B, 1, Hi}),
                            (*score_weight)[t].transpose(1, 2))
                    .view({K, B, H});
      if (reset_steps[t]) {
        const Tensor k = (*keep)[t];
        dh_prev = dh_prev * k;
        if (lstm) dc = dc * k;
      }
      dh = dh_prev;
      continue;
    }
    Tensor d_read = d_read_all[t];  // (K, B, Hi*dv)
    at::bmm_out(d_read, d_gx.select(1, t), wih_t);
    Tensor d_q = d_hz.select(1, t).narrow(2, 0, dq).view({K, B, Hi, dk});
    Tensor d_p = (d_read.view({K, B, Hi, dv}) * values[t]).sum(-1);  // (K, B, Hi)
    if (drop_in) d_p = d_p * (*drop_in)[t];
    Tensor d_s = d_s_all.select(1, t);
    at::sigmoid_backward_out(d_s, d_p, p_all[t]);
    at::mul_out(d_q, d_s.unsqueeze(-1), keys[t]);
    dh_prev = at::baddbmm(dh_prev, d_hz.select(1, t), w_h_t);  // through the queries and the gates

    if (reset_steps[t]) {
      const Tensor k = (*keep)[t];
      dh_prev = dh_prev * k;
      if (lstm) dc = dc * k;
    }
    dh = dh_prev;
  }
  const Tensor none = at::empty({0}, opt);
  return {dh,
          lstm ? dc : none,
          d_hz,
          lstm ? none : d_gx,
          d_s_all,
          communication ? d_pre_all : none,
          communication ? d_qkv_all : none,
          projected ? none : d_read_all};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without the GIL: two loops (an actor's and a critic's RIM) can run at once from two Python threads.
  m.def("forward", &rim_forward, "RIM loop over a sequence (input attention over one vector per step)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("backward", &rim_backward, "Backward through time of the RIM loop",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
