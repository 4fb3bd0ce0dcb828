"""R2M — real-time aligned reward model with policy feedback (Huang et al., ICML 2026), §3 pieces.

- Sequence-to-token cross-attention (one query per sequence), H_last ∈ R^{D_rm} the frozen RM's
  last-token hidden state, h ∈ R^{S×D_p} the policy's last-layer hidden states:
      q = H_last W_q,  k = h W_k,  v = h W_v,
      Ĥ = softmax(q kᵀ / √d_head, masked to real tokens) v W_o      (per head, heads concatenated)
- Time-step weighting:  H_fin = (1 − ω(t))·Ĥ + ω(t)·H_last,   ω(t) = max(½cos(πt/T) + ½, Ω)
  so ω(0) = 1 makes R2M at t = 0 exactly the trained RM (W_o keeps its standard init).
- GREBT loss on a group of K responses with recomputed rewards r_j, self-labelled
  winner w = argmax, loser l = argmin of the annotation-time rewards:
      L_BT  = −mean_g log σ(r_w − r_l)
      p_j   = softmax_j((r_j − mean r) / std r)
      L_GRE = mean_g(−Σ_j p_j log p_j)       (minimised: sharpens the group's rewards)
      L     = (1−α)·L_BT + α·L_GRE,  α = 0.3
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def omega(t: float | Tensor, T: int, floor: float) -> float | Tensor:
    """Mixing weight ω(t) = max(½cos(π·t/T) + ½, Ω), Ω = ``floor``; t is clamped to [0, T].

    Clamping matters: past T the cosine would rise again and hand weight back to H_last.
    Returns a float for a number t, a tensor for a tensor t.
    """
    if T <= 0:
        raise ValueError(f"T (total RL steps) must be positive, got {T}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor}")
    if isinstance(t, Tensor):
        frac = t.to(torch.float64).clamp(0, T) / T
        return torch.clamp(0.5 * torch.cos(math.pi * frac) + 0.5, min=floor)
    frac = min(max(float(t), 0.0), float(T)) / T
    return max(0.5 * math.cos(math.pi * frac) + 0.5, floor)


class SequenceToTokenCrossAttention(nn.Module):
    """Single-query cross-attention from the RM's last-token state to the policy's token states.

    Ĥ = concat_heads(softmax(q kᵀ/√d_head, masked) v) W_o with q = H_last W_q, k = h W_k, v = h W_v;
    W_q: D_rm×d, W_k, W_v: D_p×d, W_o: d×D_rm (no biases, as in the formula), d = ``d_attn``.
    """

    def __init__(self, d_rm: int, d_policy: int, d_attn: int = 2048, n_heads: int = 1) -> None:
        """Build the four projections; ``d_attn`` must be divisible by ``n_heads``."""
        super().__init__()
        if n_heads <= 0 or d_attn % n_heads != 0:
            raise ValueError(f"d_attn ({d_attn}) must be a positive multiple of n_heads ({n_heads})")
        self.d_rm, self.d_policy, self.d_attn, self.n_heads = d_rm, d_policy, d_attn, n_heads
        self.d_head = d_attn // n_heads
        self.w_q = nn.Linear(d_rm, d_attn, bias=False)
        self.w_k = nn.Linear(d_policy, d_attn, bias=False)
        self.w_v = nn.Linear(d_policy, d_attn, bias=False)
        self.w_o = nn.Linear(d_attn, d_rm, bias=False)

    def forward(self, h_last: Tensor, h: Tensor, mask: Tensor) -> Tensor:
        """Ĥ [B, D_rm] from h_last [B, D_rm], policy states h [B, S, D_p] and mask [B, S] (1 = real token)."""
        if h_last.dim() != 2 or h_last.shape[1] != self.d_rm:
            raise ValueError(f"h_last must be [B, {self.d_rm}], got shape {tuple(h_last.shape)}")
        if h.dim() != 3 or h.shape[0] != h_last.shape[0] or h.shape[2] != self.d_policy:
            raise ValueError(f"h must be [{h_last.shape[0]}, S, {self.d_policy}], got shape {tuple(h.shape)}")
        if mask.shape != h.shape[:2]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match h [B, S] {tuple(h.shape[:2])}")
        real = mask != 0
        empty = ~real.any(dim=1)
        if empty.any():
            raise ValueError(
                f"mask has no real token in rows {empty.nonzero().flatten().tolist()}: nothing to attend to"
            )
        dtype = self.w_q.weight.dtype
        batch, seq = h.shape[:2]
        # Zero padded states so garbage (even NaN) there cannot leak in through 0·v.
        h = h.to(dtype).masked_fill(~real.unsqueeze(-1), 0.0)
        q = self.w_q(h_last.to(dtype)).view(batch, self.n_heads, self.d_head)
        k = self.w_k(h).view(batch, seq, self.n_heads, self.d_head)
        v = self.w_v(h).view(batch, seq, self.n_heads, self.d_head)
        scores = torch.einsum("bnd,bsnd->bns", q, k) / math.sqrt(self.d_head)
        scores = scores.masked_fill(~real.unsqueeze(1), float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        context = torch.einsum("bns,bsnd->bnd", attn, v).reshape(batch, self.d_attn)
        return self.w_o(context)


def mix_hidden(h_hat: Tensor, h_last: Tensor, w: float | Tensor) -> Tensor:
    """H_fin = (1 − w)·Ĥ + w·H_last; ``w`` a float, a 0-d tensor or a per-row [B] tensor."""
    if h_hat.shape != h_last.shape:
        raise ValueError(f"h_hat shape {tuple(h_hat.shape)} does not match h_last shape {tuple(h_last.shape)}")
    if isinstance(w, Tensor):
        w = w.to(h_hat.dtype)
        if w.dim() == 1:
            w = w.unsqueeze(-1)
    return (1 - w) * h_hat + w * h_last


def grebt_loss(
    r: Tensor,
    winner_idx: Tensor,
    loser_idx: Tensor,
    alpha: float = 0.3,
    use_bt: bool = True,
    use_gre: bool = True,
    eps: float = 1e-8,
) -> tuple[Tensor, dict[str, float]]:
    """GREBT loss on recomputed group rewards r [G, K] → (loss, {"bt", "gre", "loss"}).

    L_BT = −mean_g log σ(r[g, w_g] − r[g, l_g]);
    p_j = softmax_j((r_j − mean r)/std r) with std = sqrt(population var + ``eps``), which keeps
    the gradient finite for an all-equal group; L_GRE = mean_g(−Σ_j p_j log p_j).
    L = (1−α)·L_BT + α·L_GRE. Ablations: ``use_bt=False`` → L = L_GRE (w/o BT);
    ``use_gre=False`` → L = L_BT (w/o GRE); both off is an error. Both parts are
    always reported (as floats) for logging.
    """
    if r.dim() != 2 or r.shape[1] < 2:
        raise ValueError(f"r must be [G, K] with K >= 2, got shape {tuple(r.shape)}")
    groups, k = r.shape
    for name, idx in (("winner_idx", winner_idx), ("loser_idx", loser_idx)):
        if idx.shape != (groups,):
            raise ValueError(f"{name} must be [G]=[{groups}], got shape {tuple(idx.shape)}")
        if ((idx < 0) | (idx >= k)).any():
            raise ValueError(f"{name} has entries outside [0, {k})")
    if (winner_idx == loser_idx).any():
        raise ValueError("winner_idx equals loser_idx in some group; use self_labelled_pairs")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not (use_bt or use_gre):
        raise ValueError("use_bt and use_gre are both False: GREBT would have no loss")

    rows = torch.arange(groups, device=r.device)
    loss_bt = -F.logsigmoid(r[rows, winner_idx.long()] - r[rows, loser_idx.long()]).mean()
    centred = r - r.mean(dim=1, keepdim=True)
    std = torch.sqrt(centred.pow(2).mean(dim=1, keepdim=True) + eps)
    log_p = F.log_softmax(centred / std, dim=1)
    loss_gre = -(log_p.exp() * log_p).sum(dim=1).mean()

    if use_bt and use_gre:
        loss = (1.0 - alpha) * loss_bt + alpha * loss_gre
    elif use_bt:
        loss = loss_bt
    else:
        loss = loss_gre
    parts = {"bt": float(loss_bt.detach()), "gre": float(loss_gre.detach()), "loss": float(loss.detach())}
    return loss, parts


@torch.no_grad()
def self_labelled_pairs(rewards_at_annotation: Tensor) -> tuple[Tensor, Tensor]:
    """Per group (row of [G, K]): winner = FIRST index of the max, loser = LAST index of the min.

    Taking first-max / last-min keeps winner ≠ loser even when every reward in a group is
    equal (then winner = 0, loser = K−1); callers that want to skip such uninformative groups
    can test ``rewards.max(1).values == rewards.min(1).values``.
    """
    r = rewards_at_annotation
    if r.dim() != 2 or r.shape[1] < 2:
        raise ValueError(f"rewards_at_annotation must be [G, K] with K >= 2, got shape {tuple(r.shape)}")
    if torch.isnan(r).any():
        raise ValueError("rewards_at_annotation contains NaN")
    k = r.shape[1]
    max_val = r.max(dim=1, keepdim=True).values
    min_val = r.min(dim=1, keepdim=True).values
    positions = torch.arange(k, device=r.device).expand_as(r)
    # Explicit first/last selection: torch.argmax's tie order is not guaranteed on all backends.
    winner = torch.where(r == max_val, positions, k).min(dim=1).values
    loser = torch.where(r == min_val, positions, -1).max(dim=1).values
    return winner, loser
