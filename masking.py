"""
4M masking for TerraMind pretraining: per sample, split an input and a target token
budget across the model's entries, then choose which tokens fill them (4M, Mizrahi et
al. 2023, §3 and its masking code; paper §3.2).

Consumes one sample dict as terramesh.TerraMeshDataset returns it (standardized pixels
(C, H, W) under the modality name) plus the token inputs, keyed by entry name (see
terramind.py):
  * "tok_S2L2A", ..., "tok_LULC", "tok_NDVI": FSQ token grids, LongTensor (h, w) (from
    fsq_tokenizer.py);
  * "caption", "coords": WordPiece ids (list or LongTensor) from text_tokenizer.py,
    without [EOS] (it is appended here); strings are accepted when a `tokenize` callable
    is given.
Produces a dict of fixed-shape tensors that batches with torch's default collate and
feeds `TerraMind`:
  * per entry: pixels (C, S, S) float, token grids (g, g) long, sequences (2 *
    (max_length + 1),) long with the span-masked input at [0, ...) and the target at
    [max_length + 1, ...) (4M layout); zeros when the sample lacks the modality;
  * "input_mod", "input_pos" (N_in,) and "target_mod", "target_pos" (N_tgt,): per slot
    the entry index (terramind.ENTRIES, -1 = padding) and the position (raster index or
    sequence index). A sequence target slot at position p reads token p and predicts
    token p + 1 (teacher forcing).

The recipe (4M `UnifiedMasking`):
  1. pick one component of the alpha mixture; input budgets ~ Dirichlet(input alphas)
     over the entries the sample has, floored, the remainder handed out one token at a
     time to the argmax of fresh draws; caps are what an entry can hold (image: its g*g
     tokens; caption: its length; coords: 3, whole or nothing);
  2. target budgets the same way with the target alphas; an image entry's target cap is
     g*g minus its input budget, so input and target never overlap;
  3. image entries: one random permutation, the first tokens are inputs, the next ones
     targets (scales "disjoint": one permutation per modality for its pixel and token
     entries, see Masking); captions: T5 span masking with sentinels [S_k]; coords: the
     whole sequence is input or target.

    from masking import Masking
    masking = Masking(inputs, targets, input_budget=64, target_budget=64,
                      alphas="all2allmix", grid=4)
    masking = Masking(inputs, targets, 64, 64, alphas="S2L2A=1000/*=0.5@1;mix@4",
                      grid=4, scales="disjoint")
    batch = torch.utils.data.default_collate([masking(s) for s in samples])
Budgets: official-like 256/256 at 224 px (grid 14); 64/64 suits 64 px tiles (grid 4, 16
tokens per image).
"""
from __future__ import annotations

import numpy as np
import torch

from entries import ENTRIES, ENTRY_INDEX, PAD, entry_kind, entry_modality, official_key
from modalities import PATCH

UNK, SOS, EOS = 1, 2, 3       # text_tokenizer.py ids (official WordPiece vocabulary)
SENTINEL = 4                  # [S_k] = SENTINEL + k, k = 0..199; 4M counts from [S_1]
NUM_SENTINELS = 200
COORDS_LEN = 3                # [lat, lon, EOS] (official CoordsTokenizer)


def _all(alpha):
    return lambda entries: {e: alpha for e in entries}


# Named alpha mixtures: components (input alphas, target alphas), each a function
# entries -> {entry: alpha}; alpha 0 means "never". Components are picked uniformly per
# sample (4M without sampling_weights).
MIXTURES = {
    # 4M all2all, alpha 0.5
    "all2all": [(_all(0.5), _all(0.5))],
    # 4M-21 components 0-3
    "all2allmix": [(_all(a), _all(a)) for a in (0.01, 0.1, 1.0, 10.0)],
    # like 4M rgb2all
    "s2l2a2all": [(lambda es: {"S2L2A": 1000.0}, _all(0.5))],
}
MIXTURES["mix"] = MIXTURES["all2allmix"] + MIXTURES["s2l2a2all"]
# how the pixel and token entries of one modality are masked (Masking)
SCALES = ("independent", "disjoint")


def _alphas(text: str, spec: str):
    """'S2L2A=1000,*=0' -> entries -> {entry: alpha}; '*' stands for every entry not named
    (default 0)."""
    named, rest = {}, 0.0
    for item in filter(None, (t.strip() for t in text.split(","))):
        entry, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--alphas {spec!r}: {item!r} is not ENTRY=ALPHA")
        if entry != "*" and entry not in ENTRY_INDEX:
            raise ValueError(f"--alphas {spec!r}: unknown entry {entry!r}; "
                             f"entries are * {' '.join(ENTRIES)}")
        alpha = float(value)
        if alpha < 0:
            raise ValueError(f"--alphas {spec!r}: alpha {alpha} of {entry} is negative")
        if entry == "*":
            rest = alpha
        else:
            named[entry] = alpha
    return lambda entries: {e: named.get(e, rest) for e in entries}


def parse_mixture(spec: str) -> list:
    """A mixture of Dirichlet components from the command line -> [(input alphas, target
    alphas, weight)]. Components are separated by ';', each `INPUTS/TARGETS@WEIGHT` with
    comma lists of ENTRY=ALPHA (entries as in terramind.ENTRIES: S2L2A is the pixel
    entry, tok_S2L2A the token one; * = every other entry), or a MIXTURES name whose
    components share its weight; @WEIGHT (default 1) is the sampling weight (4M
    sampling_weights). Example: 'S2L2A=1000/*=0.5@1;all2allmix@4'."""
    out = []
    for part in filter(None, (t.strip() for t in spec.split(";"))):
        body, _, weight = part.partition("@")
        w = float(weight) if weight else 1.0
        if w <= 0:
            raise ValueError(f"--alphas {spec!r}: weight {w} of {body!r} is not positive")
        if "/" not in body:
            if body not in MIXTURES:
                raise ValueError(f"--alphas {spec!r}: {body!r} is neither INPUTS/TARGETS "
                                 f"nor a named mixture "
                                 f"({', '.join(MIXTURES)})")
            out += [(a, t, w / len(MIXTURES[body])) for a, t in MIXTURES[body]]
            continue
        inputs, _, targets = body.partition("/")
        out.append((_alphas(inputs, spec), _alphas(targets, spec), w))
    if not out:
        raise ValueError(f"--alphas {spec!r}: no component")
    return out


def sample_budgets(alphas, total: int, caps, rng: np.random.Generator) -> np.ndarray:
    """Splits `total` tokens over entries: p ~ Dirichlet(alphas), floor(p * total) capped,
    then each remaining token to the argmax of a fresh Dirichlet draw among entries
    below their cap (4M's remainder rule; we keep handing out instead of dropping what a
    cap cuts off). Entries with alpha 0 or cap 0 get nothing. The result sums to
    min(total, sum of the eligible caps)."""
    alphas, caps = np.asarray(alphas, float), np.asarray(caps, int)
    budget = np.zeros(len(alphas), int)
    live = np.flatnonzero((alphas > 0) & (caps > 0))
    if total <= 0 or len(live) == 0:
        return budget
    a, cap = alphas[live], caps[live]
    b = np.minimum(np.floor(rng.dirichlet(a) * total).astype(int), cap)
    left = min(total, int(cap.sum())) - int(b.sum())
    while left > 0:
        for draw in rng.dirichlet(a, size=left):
            draw[b >= cap] = -1.0
            b[int(np.argmax(draw))] += 1
        left = min(total, int(cap.sum())) - int(b.sum())
    budget[live] = b
    return budget


def span_mask(ids: list, keep_prob: float, rng: np.random.Generator) -> tuple[list, list]:
    """T5 span masking (4M simple_span_masking): each token kept with prob keep_prob; each
    run of dropped tokens becomes one sentinel [S_k] (k = 1, 2, ...) in the input; the
    target is [S_1] span_1 [S_2] span_2 ... [S_k] span_k [S_k+1]."""
    keep = rng.random(len(ids)) < keep_prob
    inp, tgt, k = [], [], 0
    for i, (t, kept) in enumerate(zip(ids, keep)):
        if kept:
            inp.append(t)
            continue
        if i == 0 or keep[i - 1]:
            k += 1
            inp.append(SENTINEL + k)
            tgt.append(SENTINEL + k)
        tgt.append(t)
    return inp, tgt + [SENTINEL + k + 1]


def _is_sentinel(t):
    return SENTINEL <= t < SENTINEL + NUM_SENTINELS


def fit_target(tgt: list, budget: int, rng: np.random.Generator) -> list:
    """4M: a target longer than its budget starts at a random sentinel (not the last one
    when there are several); if that suffix is too short, at the earliest sentinel whose
    suffix fits."""
    if len(tgt) <= budget:
        return tgt
    starts = [i for i, t in enumerate(tgt) if _is_sentinel(t)]
    start = starts[rng.integers(len(starts) - 1)] if len(starts) > 1 else starts[0]
    if len(tgt) - start >= budget:
        return tgt[start:start + budget]
    return tgt[min(i for i in starts if len(tgt) - i <= budget):]


def mask_caption(ids: list, n_in: int, n_tgt: int, rng) -> tuple[list, list]:
    """Span-masked input (at most n_in tokens) and target (at most n_tgt tokens) of one
    caption."""
    if n_in == 0:
        return [], fit_target([SENTINEL + 1, *ids, SENTINEL + 2], n_tgt, rng)
    keep_prob = rng.random()                                   # 4M keep scheme "random"
    for _ in range(200):                      # 4M: shrink keep_prob until the input fits
        inp, tgt = span_mask(ids, keep_prob, rng)
        if len(inp) <= n_in:
            break
        keep_prob *= 0.9
    else:
        inp, tgt = span_mask(ids, 0.0, rng)
    return inp, fit_target(tgt, n_tgt, rng)


def mask_coords(ids: list, n_in: int, n_tgt: int, rng) -> tuple[list, list]:
    """Coords are never split: the whole [lat, lon, EOS] is input, or the target [S_1] lat
    lon EOS [S_2] with [S_1] as input when the input budget allows (as the official
    generation prompts it)."""
    as_input, as_target = n_in >= len(ids), n_tgt >= 2
    if as_input and (not as_target or rng.random() < 0.5):
        return list(ids), []
    if as_target:
        target = fit_target([SENTINEL + 1, *ids, SENTINEL + 2], n_tgt, rng)
        return [SENTINEL + 1][:n_in], target
    return [], []


class Masking:
    """Callable sample -> fixed-shape masked sample (see the module docstring).
    `inputs`/`targets` are the model's entries (TerraMindConfig.inputs/targets);
    `alphas` a MIXTURES name, a parse_mixture string or a list of components (input
    alphas, target alphas[, weight]). `scales`: "independent" masks the pixel and the
    token entry of one modality with separate permutations (4M, whose rgb@224 and
    tok_rgb@224 are two modalities), so a token target can sit under a visible pixel
    patch; "disjoint" draws one permutation per modality for both scales (pixel inputs,
    then token inputs, then token targets), so never."""

    def __init__(self, inputs, targets, input_budget: int = 256,
                 target_budget: int = 256, alphas="all2all", grid: int = 14,
                 tokenize=None, scales: str = "independent"):
        self.inputs, self.targets = tuple(inputs), tuple(targets)
        for e in self.inputs + self.targets:
            entry_kind(e)
        if bad := [e for e in self.targets if entry_kind(e) == "pixels"]:
            raise ValueError(f"pixel entries cannot be targets: {bad}")
        if scales not in SCALES:
            raise ValueError(f"unknown scale masking {scales!r}; "
                             f"choices: {', '.join(SCALES)}")
        if isinstance(alphas, str):
            mixture = MIXTURES[alphas] if alphas in MIXTURES else parse_mixture(alphas)
        else:
            mixture = list(alphas)
        self.input_budget, self.target_budget = input_budget, target_budget
        self.grid, self.tokenize, self.scales = grid, tokenize, scales
        self.entries = tuple(e for e in ENTRIES if e in self.inputs or e in self.targets)
        # per component: (input alphas, target alphas) over self.entries
        self.components = []
        for c in mixture:
            alpha_in = self._alpha_vector(c[0](self.inputs), self.inputs)
            alpha_tgt = self._alpha_vector(c[1](self.targets), self.targets)
            self.components.append((alpha_in, alpha_tgt))
        self.weights = np.array([c[2] if len(c) > 2 else 1.0 for c in mixture])

    def _alpha_vector(self, alphas: dict, side: tuple) -> np.ndarray:
        """{entry: alpha} -> alphas over self.entries, 0 for entries not on this side."""
        values = [alphas.get(e, 0.0) if e in side else 0.0 for e in self.entries]
        return np.array(values)

    def pixel_twin(self, e: str) -> str | None:
        """The pixel entry of token entry e's modality when the model has it ("tok_S2L2A"
        -> "S2L2A")."""
        twin = e.removeprefix("tok_")
        return twin if entry_kind(e) == "tokens" and twin in self.entries else None

    def _empty(self, e):
        g, kind = self.grid, entry_kind(e)
        if kind == "pixels":
            return torch.zeros(entry_modality(e).channels, g * PATCH, g * PATCH)
        if kind == "tokens":
            return torch.zeros(g, g, dtype=torch.long)
        return torch.zeros(2 * (entry_modality(e).max_length + 1), dtype=torch.long)

    def _read(self, sample, e):
        """The sample's data for entry e (validated), or None when it lacks it."""
        kind, g = entry_kind(e), self.grid
        x = sample.get(e)
        if x is None:
            return None
        if kind == "pixels":
            if tuple(x.shape) != (entry_modality(e).channels, g * PATCH, g * PATCH):
                channels = entry_modality(e).channels
                raise ValueError(f"{e}: expected pixels ({channels}, {g * PATCH}, "
                                 f"{g * PATCH}) for grid {g}, got {tuple(x.shape)}")
            return x.float()
        if kind == "tokens":
            x = torch.as_tensor(x, dtype=torch.long)
            if tuple(x.shape) != (g, g):
                raise ValueError(f"{e}: expected a token grid ({g}, {g}), "
                                 f"got {tuple(x.shape)}")
            return x
        if isinstance(x, str):
            if self.tokenize is None:
                raise ValueError(f"{e} is text; tokenize it (text_tokenizer.py) "
                                 f"or pass Masking(tokenize=...)")
            x = self.tokenize(x)
        flat = torch.as_tensor(x, dtype=torch.long).flatten()
        ids = [int(t) for t in flat if int(t) != PAD]
        ids = ids[:-1] if ids and ids[-1] == EOS else ids
        limit = COORDS_LEN - 1 if e == "coords" else entry_modality(e).max_length - 1
        return ids[:limit] + [EOS]

    def _twin_inputs(self, n_in: np.ndarray) -> np.ndarray:
        """Per entry, the input budget of its pixel twin under "disjoint" scales (0
        otherwise): those positions are not free for its targets."""
        if self.scales == "independent":
            return np.zeros_like(n_in)
        twins = [self.pixel_twin(e) for e in self.entries]
        return np.array([n_in[self.entries.index(t)] if t else 0 for t in twins])

    def _image_positions(self, e: str, n_in, n_tgt, perms: dict, rng):
        """Input and target raster positions of image entry e. Independent: a fresh
        permutation, its first n_in inputs, the next n_tgt targets (4M). Disjoint: the
        modality's permutation, drawn by the pixel entry (which comes first in ENTRIES)
        and continued by the token entry after the pixel inputs."""
        i, n = self.entries.index(e), self.grid ** 2
        twin = self.pixel_twin(e) if self.scales == "disjoint" else None
        if twin is None or twin not in perms:
            perms[e.removeprefix("tok_")] = perm = rng.permutation(n)
            return perm[:n_in[i]], perm[n_in[i]:n_in[i] + n_tgt[i]]
        skip = n_in[self.entries.index(twin)]
        perm = np.roll(perms[twin], -skip)   # the pixel inputs moved to the end
        return perm[:n_in[i]], perm[n_in[i]:n_in[i] + n_tgt[i]]

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        if rng is None:  # per-worker torch seeds make DataLoader workers draw differently
            rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, ())))
        data = {e: self._read(sample, e) for e in self.entries}
        n_in, n_tgt = self._budgets(data, rng)
        out, ins, tgts, perms = {}, [], [], {}
        for i, e in enumerate(self.entries):
            idx, x = ENTRY_INDEX[e], data[e]
            out[e] = self._empty(e) if x is None or entry_kind(e) == "sequence" else x
            if x is None:
                continue
            if entry_kind(e) != "sequence":
                inp, tgt = self._image_positions(e, n_in, n_tgt, perms, rng)
                ins += [(idx, p) for p in np.sort(inp)]
                tgts += [(idx, p) for p in np.sort(tgt)]
                continue
            mask = mask_coords if e == "coords" else mask_caption
            inp, tgt = mask(x, int(n_in[i]), int(n_tgt[i]), rng)
            off = entry_modality(e).max_length + 1
            out[e][:len(inp)] = torch.tensor(inp, dtype=torch.long)
            out[e][off:off + len(tgt)] = torch.tensor(tgt, dtype=torch.long)
            ins += [(idx, p) for p in range(len(inp))]
            # the last target token is only predicted
            tgts += [(idx, off + p) for p in range(len(tgt) - 1)]
        out.update(self._slots("input", ins, self.input_budget))
        out.update(self._slots("target", tgts, self.target_budget))
        return out

    def _budgets(self, data: dict, rng) -> tuple[np.ndarray, np.ndarray]:
        """Input and target token budgets per entry (steps 1 and 2 of the module docstring);
        entries the sample lacks get none."""
        have = np.array([data[e] is not None for e in self.entries])
        tokens = []
        for e in self.entries:
            if entry_kind(e) != "sequence":
                tokens.append(self.grid ** 2)
            else:
                tokens.append(len(data[e]) if data[e] is not None else 0)
        tokens = np.array(tokens)
        alpha_in, alpha_tgt = self._component(have, rng)
        n_in = sample_budgets(alpha_in, self.input_budget, np.where(have, tokens, 0), rng)
        seq_cap = []
        for e in self.entries:
            is_seq = entry_kind(e) == "sequence"
            seq_cap.append(entry_modality(e).max_length + 1 if is_seq else 0)
        seq_cap = np.array(seq_cap)
        image_cap = tokens - n_in - self._twin_inputs(n_in)
        cap_tgt = np.where(seq_cap > 0, np.minimum(tokens + 2, seq_cap), image_cap)
        cap_tgt = np.where(have, np.maximum(cap_tgt, 0), 0)
        n_tgt = sample_budgets(alpha_tgt, self.target_budget, cap_tgt, rng)
        return n_in, n_tgt

    def _component(self, have: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """One (input alphas, target alphas) component of the mixture, among those that draw
        inputs from an entry the sample has."""
        usable = [k for k, c in enumerate(self.components) if (c[0] * have).any()]
        if not usable:
            has = [e for e, h in zip(self.entries, have) if h]
            raise ValueError(f"sample has none of the input entries its alpha mixture "
                             f"draws from (has {has})")
        weights = self.weights[usable]
        if np.all(weights == weights[0]):   # uniform: 4M without sampling_weights
            return self.components[usable[rng.integers(len(usable))]]
        k = rng.choice(len(usable), p=weights / weights.sum())
        return self.components[usable[k]]

    @staticmethod
    def _slots(name: str, slots: list, size: int) -> dict:
        """(entry index, position) pairs -> `name`_mod and `name`_pos (size,);
        mod -1 = padding."""
        assert len(slots) <= size, f"{name} slots {len(slots)} exceed the budget {size}"
        mod = torch.full((size,), -1, dtype=torch.long)
        pos = torch.zeros(size, dtype=torch.long)
        if slots:
            mod[:len(slots)], pos[:len(slots)] = torch.tensor(slots, dtype=torch.long).T
        return {name + "_mod": mod, name + "_pos": pos}

def cross_scale_overlap(samples: list) -> dict:
    """{token entry: share of its target positions that are pixel inputs of the same
    modality in the same sample} over masked samples (Masking outputs); entries without
    a pixel twin or targets are left out."""
    hits, counts = {}, {}
    for s in samples:
        for e in ENTRIES:
            twin = e.removeprefix("tok_")
            if entry_kind(e) != "tokens" or twin not in ENTRY_INDEX:
                continue
            tgt = s["target_pos"][s["target_mod"] == ENTRY_INDEX[e]]
            seen = s["input_pos"][s["input_mod"] == ENTRY_INDEX[twin]]
            hits[e] = hits.get(e, 0) + int(torch.isin(tgt, seen).sum())
            counts[e] = counts.get(e, 0) + len(tgt)
    return {e: hits[e] / counts[e] for e in counts if counts[e]}


def to_official(batch: dict) -> dict:
    """A masked batch in the official/4M mod_dict format ({official key: {tensor,
    input_mask, target_mask, decoder_attention_mask}}, True = not used), for parity
    checks against the official TerraMind.forward."""
    B = batch["input_mod"].shape[0]
    out = {}
    for e in ENTRIES:
        if e not in batch:
            continue
        t = batch[e]
        if entry_kind(e) == "pixels":
            n = t.shape[-2] * t.shape[-1] // PATCH ** 2
        else:
            n = t[0].numel()
        masks = {}
        for side in ("input", "target"):
            b, k = (batch[side + "_mod"] == ENTRY_INDEX[e]).nonzero(as_tuple=True)
            p = batch[side + "_pos"][b, k]
            m = torch.ones(B, n, dtype=torch.bool)
            m[b, p] = False
            if side == "target" and entry_kind(e) == "sequence":
                # the final target token (predicted, never a query)
                m[b, p + 1] = False
            masks[side] = m
        dam = torch.zeros(B, n, dtype=torch.long)
        if entry_kind(e) == "sequence":
            dam[~masks["target"]] = 1          # causal within the sequence
        else:  # one bidirectional block: its size at the first target
            count = (~masks["target"]).sum(1)
            first = torch.where(count > 0, (~masks["target"]).to(torch.uint8).argmax(1), 0)
            dam[torch.arange(B), first] = count
        out[official_key(e)] = {"tensor": t, "input_mask": masks["input"],
                                "target_mask": masks["target"],
                                "decoder_attention_mask": dam}
    return out
