"""A deliberately naive RIM step, written from the paper (§2) with per-unit Python loops and plain autograd.

It shares the parameters of a :class:`rims_rl.rim.RIM` but none of its code paths: the null element is a real row
of zeros pushed through the key/value projections, attention is an explicit softmax over ``N + 1`` elements, the
winners come from sorting, and every unit is computed on its own. Tests compare the fast module against it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rims_rl.rim import RIM


def reference_forward(
    rim: RIM, x: Tensor, h0: Tensor, c0: Tensor, episode_starts: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``output (L, B, K*H)``, ``h_n``, ``c_n``, ``masks (L, B, K)``, ``null attention (L, B, K)``.

    Dropout is not modelled: call it in eval mode or with ``dropout=0``.
    """
    if x.dim() == 3:
        x = x.unsqueeze(2)
    L, B, N, D = x.shape
    K, H = rim.num_units, rim.unit_size
    Hi, dk = rim.input_heads, rim.input_key_size
    dv = rim.input_value_size // Hi
    h = [h0[:, k * H : (k + 1) * H] for k in range(K)]
    c = [c0[:, k * H : (k + 1) * H] for k in range(K)]
    outputs, masks, nulls = [], [], []
    for t in range(L):
        if episode_starts is not None:
            keep = (1.0 - episode_starts[t].to(x.dtype)).unsqueeze(-1)
            h = [hk * keep for hk in h]
            c = [ck * keep for ck in c]
        X = torch.cat([torch.zeros(B, 1, D, dtype=x.dtype), x[t]], dim=1)  # eq. 3: the null row first
        values = rim.input_value(X).view(B, N + 1, Hi, dv)
        reads, null = [], []
        for k in range(K):
            if rim.input_attention:
                keys = rim.input_key(X).view(B, N + 1, Hi, dk)
                q = (h[k] @ rim.query_weight[k] + rim.query_bias[k]).view(B, Hi, dk)
                att = torch.softmax(torch.einsum("bhd,bnhd->bhn", q, keys) / math.sqrt(dk), dim=-1)
            else:  # ablation: uniform over the real elements, nothing on the null
                att = torch.cat([torch.zeros(B, Hi, 1), torch.full((B, Hi, N), 1.0 / N)], dim=-1).to(x.dtype)
            null.append(att[:, :, 0].mean(-1))
            reads.append(torch.einsum("bhn,bnhv->bhv", att, values).reshape(B, Hi * dv))
        null_t = torch.stack(null, dim=1)  # (B, K)
        active = torch.zeros(B, K, dtype=torch.bool)
        if rim.input_attention:
            order = torch.argsort(null_t, dim=1)  # least null attention first
            for b in range(B):
                active[b, order[b, : rim.k_active]] = True
        else:
            active[:] = True
        new_h, new_c = [], []
        for k in range(K):
            m = active[:, k : k + 1]
            if rim.cell == "lstm":
                gates = reads[k] @ rim.weight_ih[k] + rim.bias_ih[k, 0] + h[k] @ rim.weight_hh[k]
                i, f, o, g = gates.split(H, dim=-1)
                ck = torch.sigmoid(f) * c[k] + torch.sigmoid(i) * torch.tanh(g)
                hk = torch.sigmoid(o) * torch.tanh(ck)
                new_c.append(torch.where(m, ck, c[k]))
            else:
                gx = reads[k] @ rim.weight_ih[k] + rim.bias_ih[k, 0]
                gh = h[k] @ rim.weight_hh[k] + rim.bias_hh[k, 0]
                r = torch.sigmoid(gx[:, :H] + gh[:, :H])
                z = torch.sigmoid(gx[:, H : 2 * H] + gh[:, H : 2 * H])
                n = torch.tanh(gx[:, 2 * H :] + r * gh[:, 2 * H :])
                hk = (1 - z) * n + z * h[k]
                new_c.append(torch.zeros_like(hk))
            new_h.append(torch.where(m, hk, h[k]))
        if rim.communication:
            Hc, ck_, cv = rim.comm_heads, rim.comm_key_size, rim.comm_value_size
            qkv = [(new_h[k] @ rim.comm_qkv[k]).view(B, Hc, 2 * ck_ + cv) for k in range(K)]
            keys_c = torch.stack([p[..., ck_ : 2 * ck_] for p in qkv], dim=2)  # (B, Hc, K, ck)
            vals_c = torch.stack([p[..., 2 * ck_ :] for p in qkv], dim=2)  # (B, Hc, K, cv)
            out_h = []
            for k in range(K):
                q = qkv[k][..., :ck_]  # (B, Hc, ck)
                att = torch.softmax(torch.einsum("bhd,bhjd->bhj", q, keys_c) / math.sqrt(ck_), dim=-1)
                read = torch.einsum("bhj,bhjv->bhv", att, vals_c).reshape(B, Hc * cv)
                pre = read @ rim.comm_out[k] + rim.comm_out_bias[k, 0]
                update, gate = pre[:, :H], pre[:, H:]
                m = active[:, k : k + 1]
                out_h.append(torch.where(m, new_h[k] + torch.sigmoid(gate) * torch.tanh(update), new_h[k]))
            new_h = out_h
        h, c = new_h, new_c
        outputs.append(torch.cat(h, dim=-1))
        masks.append(active)
        nulls.append(null_t)
    return (
        torch.stack(outputs),
        torch.cat(h, dim=-1),
        torch.cat(c, dim=-1),
        torch.stack(masks),
        torch.stack(nulls),
    )
