"""
The output heads of TerraMind's pretraining loss: per target entry, the
cross-entropy sum and the target count over the decoder's target slots (paper
eq. 2 takes their ratio per entry, then the mean over the entries that have
targets; terramind.TerraMind.forward).

Each target entry's head is its decoder token table (tied, as officially). Two
ways to run them, with the same values:
  * `dense_losses`: each entry's head on its own rows, picked by boolean
    selection. Exact work, but shapes follow the masks (host syncs): the CPU
    eager path.
  * `static_losses`: fixed shapes. The target rows are dispatched, entry by
    entry, into chunks that each hold one entry, and every chunk goes through
    its entry's head padded to the largest vocabulary: more work, no sync; the
    compiled and GPU path.
`model` below is a terramind.TerraMind (its config, target_emb tables and the
target_number and head_bias buffers).
"""
import torch
import torch.nn.functional as F

from cpu_linear import linear
from entries import ENTRY_INDEX

HEAD_CHUNK = 1024             # rows per output-head chunk of static_losses


def dense_losses(model, y, ids, mod):
    """y (B, N, D), ids (B, N), mod (B, N) -> cross-entropy sum and target count
    per target entry (T,), (T,): each entry's head on its own rows, picked by
    boolean selection."""
    ce, count = [], []
    for e in model.config.targets:
        sel = mod == ENTRY_INDEX[e]                       # (B, N)
        count.append(sel.sum())
        if not bool(count[-1]):   # no head call: the entry's table stays without gradient
            ce.append(torch.zeros((), device=y.device))
            continue
        logits = linear(y[sel], model.target_emb[e].weight)  # (K, V_e)
        ce.append(F.cross_entropy(logits, ids[sel], reduction="sum"))
    return torch.stack(ce), torch.stack(count)


def static_losses(model, y, ids, mod):
    """dense_losses with fixed shapes. The R = B * N target rows are dispatched,
    entry by entry, into K chunks of `chunk` rows that each hold a single entry
    (K = R // chunk + T covers any split of R rows over T entries); chunk k goes
    through its entry's head, padded to the largest vocabulary V (padded logits
    -inf). Extra work over dense: the empty chunk rows and the vocabulary
    padding."""
    T, D = len(model.config.targets), y.shape[-1]
    g = model.target_number[mod].flatten()               # (R,) target number, T = padding
    R = g.shape[0]
    chunk = max(16, min(HEAD_CHUNK, R // (4 * T)))
    K = R // chunk + T
    src, chunk_entry, count = chunk_rows(g, T, chunk, K)
    y_rows = torch.cat([y.reshape(R, D), y.new_zeros(1, D)])[src]  # (K*chunk, D)
    id_rows = torch.cat([ids.flatten(), ids.new_zeros(1)])[src]  # (K*chunk,)
    weights = stacked_heads(model, y)[chunk_entry]        # (K, V, D)
    outside = model.head_bias[chunk_entry][:, None]       # (K, 1, V) -inf past V_e
    rows = y_rows.view(K, chunk, D)
    logits = torch.baddbmm(outside, rows, weights.transpose(1, 2))  # (K, chunk, V)
    ce = F.cross_entropy(logits.flatten(0, 1), id_rows, reduction="none")  # (K*chunk,)
    ce = (ce * (src < R)).view(K, chunk).sum(1)           # (K,) empty rows count 0
    return torch.zeros(T, device=y.device).index_add(0, chunk_entry, ce), count


def chunk_rows(g, T: int, chunk: int, K: int):
    """Where each of the R rows of target numbers g (R,) goes: src (K*chunk,) the
    row that fills each chunk slot (R = empty), chunk_entry (K,) the entry of
    each chunk, count (T,) the rows per entry."""
    R = g.shape[0]
    one_hot = g[:, None] == torch.arange(T, device=g.device)  # (R, T)
    count = one_hot.sum(0)                                # (T,)
    entry = g.clamp(max=T - 1)                            # (R,) padding: any entry
    rank = (one_hot.cumsum(0) - 1).gather(1, entry[:, None])[:, 0]  # (R,) rank in entry
    n_chunks = (count + chunk - 1) // chunk               # (T,)
    first = n_chunks.cumsum(0) - n_chunks                 # (T,) first chunk per entry
    # (R,) padding -> a spare row past the chunks
    dest = torch.where(g < T, first[entry] * chunk + rank, K * chunk)
    rows = torch.arange(R, device=g.device)
    src = torch.full((K * chunk + 1,), R, device=g.device)
    src = src.scatter(0, dest, rows)[:-1]                 # (K*chunk,)
    chunk_ids = torch.arange(K, device=g.device)[:, None]  # (K, 1)
    chunk_entry = (chunk_ids >= n_chunks.cumsum(0)).sum(1).clamp(max=T - 1)  # (K,)
    return src, chunk_entry, count


def stacked_heads(model, like: torch.Tensor) -> torch.Tensor:
    """The output heads (T, V, D), zero rows past each vocabulary; in the autocast
    dtype when autocast is on (cast before the per-chunk gather, which then
    moves half the bytes)."""
    V = model.head_bias.shape[1]
    tables = [model.target_emb[e].weight for e in model.config.targets]
    padded = [F.pad(w, (0, 0, 0, V - w.shape[0])) for w in tables]
    stacked = torch.stack(padded)                         # (T, V, D)
    if torch.is_autocast_enabled(like.device.type):
        return stacked.to(torch.get_autocast_dtype(like.device.type))
    return stacked
