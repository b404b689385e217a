"""Hard (stochastic) attention of Xu et al. 2015, as plain PyTorch.

One key position per query: sampled from the soft weights alpha (``sample=True``)
or their argmax (``sample=False``).  The context is the value at that position and
the log-probability of the choice is returned for REINFORCE.  With the Gaussian
factor of local-p the weights no longer sum to one, so positions are drawn from
the weights renormalised over the row.  A fully masked row returns index 0, a zero
context and a zero log-probability.
"""

from __future__ import annotations

import torch

from fastattn.reference.attention import attention


def hard_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    sample: bool,
    generator: torch.Generator | None,
    **attention_arguments,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (context (N, T, Dv), index (N, T) int64, log_prob (N, T), weights (N, T, S))."""
    _, weights = attention(query, keys, values, return_weights=True, **attention_arguments)
    has_valid = weights.sum(dim=-1) > 0  # not for fully masked rows, nor NaN ones
    if sample:
        # Rows without valid weights draw from a uniform row; their index is reset below.
        probabilities = torch.where(has_valid.unsqueeze(-1), weights, torch.ones_like(weights))
        flat = probabilities.detach().reshape(-1, weights.shape[-1]).float()
        index = torch.multinomial(flat, 1, generator=generator).reshape(has_valid.shape)
    else:
        index = weights.detach().argmax(dim=-1)
    index = torch.where(has_valid, index, torch.zeros_like(index))
    return (*outputs_at(weights, index, values), weights)


def outputs_at(
    weights: torch.Tensor, index: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(context, index, log_prob) of the chosen positions: the values there and
    log(w_index / sum_j w_j); zeros for rows whose weights are all zero, NaN for rows
    whose weights are NaN (a NaN in what a row sees makes the row NaN, as soft attention)."""
    total = weights.sum(dim=-1)
    has_valid = total != 0
    chosen = weights.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    smallest = torch.finfo(weights.dtype).tiny
    log_prob = torch.log(chosen.clamp_min(smallest)) - torch.log(total.clamp_min(smallest))
    log_prob = torch.where(has_valid, log_prob, torch.zeros_like(log_prob))
    # 1 for a row with weights, 0 for a fully masked one, NaN for a NaN one
    row_factor = torch.where(total.isnan(), total, has_valid.to(total.dtype)).detach()
    context = values_at(values, index).mul_(row_factor.unsqueeze(-1))  # in place: no second (N, T, Dv) tensor
    return context, index, log_prob


def values_at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[n, index[n, t]] for values (N, S, Dv) and index (N, T): (N, T, Dv), each row
    picked from the (N S, Dv) rows by index_select (on the CPU about 10x faster than
    gather with the index expanded over Dv)."""
    batch, source_length, value_dim = values.shape
    rows = index + source_length * torch.arange(batch, device=index.device).unsqueeze(-1)
    flat = values.reshape(batch * source_length, value_dim).index_select(0, rows.reshape(-1))
    return flat.reshape(*index.shape, value_dim)
