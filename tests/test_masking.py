"""masking.py against the 4M recipe (4M, Mizrahi et al. 2023, §3): budgets, disjoint image masks, T5 span
masking, whole-sequence coords, fixed shapes for the default collate, the official mod-dict format."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from entries import ENTRIES, entry_kind, official_key
from masking import (EOS, MIXTURES, SENTINEL, Masking, cross_scale_overlap, fit_target,
                     mask_caption, parse_mixture, sample_budgets, span_mask, to_official)
from modalities import MODALITIES
from terramind import PRESETS

S1, S2 = SENTINEL + 1, SENTINEL + 2
INPUTS, TARGETS = PRESETS["smoke"].inputs, PRESETS["smoke"].targets


def sample(seed=0, grid=4, caption_len=20, drop=()):
    g = torch.Generator().manual_seed(seed)
    s = {e: torch.randn(MODALITIES[e].channels, 16 * grid, 16 * grid, generator=g) for e in ENTRIES
         if entry_kind(e) == "pixels"}
    s.update({e: torch.randint(0, 4375, (grid, grid), generator=g) for e in ENTRIES if entry_kind(e) == "tokens"})
    s["caption"] = torch.randint(6366, 30000, (caption_len,), generator=g).tolist()
    s["coords"] = [4707, 5164]
    s["LULC"] = torch.zeros(16 * grid, 16 * grid, dtype=torch.long)        # the dataset's class map: ignored
    return {k: v for k, v in s.items() if k not in drop}


def test_budgets_sum_exactly_and_respect_caps():
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = rng.integers(1, 15)
        alphas = rng.choice([0.0, 0.01, 0.1, 0.5, 1.0, 10.0], size=n)
        caps = rng.integers(0, 200, size=n)
        total = int(rng.integers(0, 400))
        b = sample_budgets(alphas, total, caps, rng)
        eligible = (alphas > 0) & (caps > 0)
        assert b.sum() == min(total, caps[eligible].sum())
        assert (b <= caps).all() and (b >= 0).all() and (b[~eligible] == 0).all()


def test_alpha_1000_puts_the_whole_input_budget_on_one_entry():
    rng = np.random.default_rng(1)
    alphas = np.full(13, 0.01)
    alphas[4] = 1000.0
    hits = sum(sample_budgets(alphas, 256, np.full(13, 256), rng)[4] == 256 for _ in range(200))
    assert hits >= 195                                       # Dirichlet(1000, 0.01 x 12): p ~ 0.9999
    masking = Masking(INPUTS, TARGETS, 16, 32, alphas="s2l2a2all", grid=4)     # 4M rgb2all analogue
    for seed in range(20):
        out = masking(sample(seed), np.random.default_rng(seed))
        assert (out["input_mod"] == ENTRIES.index("S2L2A")).all()


def test_image_inputs_and_targets_are_disjoint_and_capped():
    masking = Masking(INPUTS, TARGETS, 64, 64, alphas="all2allmix", grid=4)
    for seed in range(50):
        out = masking(sample(seed, drop=() if seed % 2 else ("caption", "coords")), np.random.default_rng(seed))
        for e in ENTRIES:
            if entry_kind(e) == "sequence":
                continue
            i = ENTRIES.index(e)
            ins = out["input_pos"][out["input_mod"] == i].tolist()
            tgt = out["target_pos"][out["target_mod"] == i].tolist()
            assert not set(ins) & set(tgt), e
            assert len(set(ins)) == len(ins) and len(set(tgt)) == len(tgt) and len(ins) + len(tgt) <= 16
            assert all(0 <= p < 16 for p in ins + tgt)
        if seed % 2 == 0:   # images only: budgets are filled as far as the caps allow (sequences may not)
            room = sum(16 - int((out["input_mod"] == ENTRIES.index(e)).sum()) for e in TARGETS if e.startswith("tok_"))
            assert (out["input_mod"] >= 0).sum() == 64 and (out["target_mod"] >= 0).sum() == min(64, room)
        assert all(ENTRIES[m] in INPUTS for m in out["input_mod"].tolist() if m >= 0)
        assert all(ENTRIES[m] in TARGETS for m in out["target_mod"].tolist() if m >= 0)


def test_span_masking_is_t5():
    rng = np.random.default_rng(0)
    ids = list(range(6400, 6430)) + [EOS]
    for keep in (0.0, 0.3, 0.7, 1.0):
        inp, tgt = span_mask(ids, keep, rng)
        assert tgt[0] == S1 and tgt[-1] == SENTINEL + sum(SENTINEL <= t < SENTINEL + 200 for t in inp) + 1
        # filling every sentinel of the input with its span from the target gives the sequence back
        spans, cur = {}, None
        for t in tgt[:-1]:
            if SENTINEL <= t < SENTINEL + 200:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        rebuilt = [x for t in inp for x in (spans[t] if t in spans else [t])]
        assert rebuilt == ids
    assert span_mask(ids, 1.0, rng) == (ids, [S1])
    assert span_mask(ids, 0.0, rng) == ([S1], [S1] + ids + [S2])


def test_caption_budgets_and_target_truncation():
    rng = np.random.default_rng(0)
    ids = list(range(200, 240)) + [EOS]
    assert mask_caption(ids, 0, 100, rng) == ([], [S1] + ids + [S2])      # input budget 0: all to the target
    for n_in, n_tgt in ((5, 8), (30, 60), (1, 3)):
        for _ in range(20):
            inp, tgt = mask_caption(ids, n_in, n_tgt, rng)
            assert len(inp) <= n_in and len(tgt) <= n_tgt and SENTINEL <= tgt[0] < SENTINEL + 200
    tgt = [S1, 701, 702, 703, S2, 704, SENTINEL + 3, 705, 706, SENTINEL + 4]
    for _ in range(20):
        cut = fit_target(tgt, 4, rng)                           # starts at a sentinel, never the last one
        assert len(cut) == 4 and cut[0] in (S1, S2, SENTINEL + 3)
    assert fit_target(tgt, 5, np.random.default_rng(3))[0] in (S1, S2, SENTINEL + 3)


def test_coords_whole_sequence_and_fixed_shapes():
    masking = Masking(INPUTS, TARGETS, 24, 24, alphas="all2all", grid=4)
    c, seen = ENTRIES.index("coords"), set()
    for seed in range(200):
        out = masking(sample(seed), np.random.default_rng(seed))
        n_in = int((out["input_mod"] == c).sum())
        n_tgt = int((out["target_mod"] == c).sum())
        coords = out["coords"].tolist()
        if n_in == 3:
            assert coords[:3] == [4707, 5164, EOS] and n_tgt == 0
            seen.add("input")
        elif n_tgt:
            assert coords[5:5 + n_tgt + 1] == [S1, 4707, 5164, EOS, S2][:n_tgt + 1]
            assert n_in in (0, 1) and coords[:n_in] == [S1][:n_in]
            seen.add("target")
        else:
            assert n_in == 0
    assert seen == {"input", "target"}
    batch = default_collate([masking(sample(s), np.random.default_rng(s)) for s in range(4)])
    assert batch["caption"].shape == (4, 2 * 257) and batch["coords"].shape == (4, 10)
    assert batch["input_mod"].shape == batch["target_pos"].shape == (4, 24)


def test_missing_modalities_and_bad_input():
    masking = Masking(INPUTS, TARGETS, 64, 64, alphas="all2all", grid=4)
    out = masking(sample(0, drop=("S1GRD", "tok_DEM", "caption")), np.random.default_rng(0))
    for e in ("S1GRD", "tok_DEM", "caption"):
        assert not (out["input_mod"] == ENTRIES.index(e)).any() and not (out["target_mod"] == ENTRIES.index(e)).any()
        assert not out[e].any()                                 # zeros, so samples still collate
    with pytest.raises(ValueError, match="S2L2A"):
        masking({**sample(0), "S2L2A": torch.zeros(12, 32, 32)})
    with pytest.raises(ValueError, match="caption is text"):
        masking({**sample(0), "caption": "a river"})
    words = Masking(INPUTS, TARGETS, 64, 64, grid=4, tokenize=lambda text: [7000 + len(w) for w in text.split()])
    out = words({**sample(0), "caption": "a wide river"}, np.random.default_rng(0))
    assert sorted(t for t in out["caption"].tolist() if t >= 7000) == [7001, 7004, 7005]
    with pytest.raises(ValueError, match="none of the input entries"):
        Masking(INPUTS, TARGETS, 16, 16, alphas="s2l2a2all", grid=4)(sample(0, drop=("S2L2A",)))
    with pytest.raises(ValueError, match="all2allmix"):
        Masking(INPUTS, TARGETS, alphas="nope")



def test_missing_entries_take_no_share_of_the_budgets():
    """4M splits the budgets over the modalities a sample has: without some entries, the whole input and
    target budgets go to the others (no sequences here, whose targets end on a token that is no slot)."""
    masking = Masking(INPUTS, TARGETS, 24, 24, alphas="all2all", grid=4)
    dropped = ("S1GRD", "S1RTC", "DEM", "tok_S1GRD", "tok_S1RTC", "tok_DEM", "caption", "coords")
    for seed in range(30):
        out = masking(sample(seed, drop=dropped), np.random.default_rng(seed))
        assert (out["input_mod"] >= 0).sum() == 24 and (out["target_mod"] >= 0).sum() == 24

def test_dataloader_workers_draw_differently():
    masking = Masking(INPUTS, TARGETS, 32, 32, alphas="mix", grid=4)

    class Same(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return masking(sample(0))

    torch.manual_seed(0)
    batches = list(DataLoader(Same(), batch_size=4, num_workers=2))
    assert not torch.equal(batches[0]["input_pos"], batches[1]["input_pos"])
    assert len({tuple(r) for r in batches[0]["input_mod"].tolist()}) > 1
    assert set(MIXTURES) >= {"all2all", "all2allmix", "s2l2a2all", "mix"}


def test_official_mod_dict_format():
    masking = Masking(INPUTS, TARGETS, 48, 48, alphas="all2all", grid=4)
    batch = default_collate([masking(sample(s, caption_len=12), np.random.default_rng(s)) for s in range(3)])
    d = to_official(batch)
    assert set(d) == {official_key(e) for e in INPUTS}
    n_in = sum((~v["input_mask"]).sum() for v in d.values())
    assert n_in == (batch["input_mod"] >= 0).sum()
    for e in ENTRIES:
        v = d[official_key(e)]
        assert not (~v["input_mask"] & ~v["target_mask"]).any(), e      # an input is never a target
        n_tgt = int((batch["target_mod"] == ENTRIES.index(e)).sum())
        if entry_kind(e) == "tokens":
            assert int(v["decoder_attention_mask"].sum()) == int((~v["target_mask"]).sum()) == n_tgt
        elif entry_kind(e) == "sequence":   # every target token but the last of each sample is a query
            rows = (~v["target_mask"]).any(1).sum()
            assert int((~v["target_mask"]).sum()) == n_tgt + rows


def test_command_line_alphas_and_mixture_weights():
    """parse_mixture: an alpha of 1000 on one entry takes its whole budget even beside small nonzero alphas
    (Dirichlet(1000, 0.01, ...): that share is ~0.9999); @weights set how often each component is drawn."""
    masking = Masking(INPUTS, TARGETS, 16, 32, alphas="tok_DEM=1000,*=0.01/*=0.5", grid=4)
    alone = [(masking(sample(seed), np.random.default_rng(seed))["input_mod"] == ENTRIES.index("tok_DEM")).all()
             for seed in range(100)]
    assert sum(alone) >= 95
    masking = Masking(INPUTS, TARGETS, 16, 32, alphas="all2all@1; S1GRD=1000/*=0.5@3", grid=4)
    only_s1 = [(masking(sample(0), np.random.default_rng(seed))["input_mod"] == ENTRIES.index("S1GRD")).all()
               for seed in range(600)]
    assert 0.68 < np.mean(only_s1) < 0.82                    # 3/4 of the draws (binomial sd 0.018)
    weighted = parse_mixture("all2allmix@2;s2l2a2all")
    assert [w for _, _, w in weighted] == [0.5, 0.5, 0.5, 0.5, 1.0]
    assert weighted[0][0](["S2L2A", "caption"]) == {"S2L2A": 0.01, "caption": 0.01}
    with pytest.raises(ValueError, match="unknown entry 'S2'"):
        parse_mixture("S2=1/*=1")
    with pytest.raises(ValueError, match="is not ENTRY=ALPHA"):
        parse_mixture("S2L2A/*=1")


def test_disjoint_scales_never_put_a_token_target_under_a_visible_pixel_patch():
    """Independent masking (4M) leaves some token targets under visible pixels of the same modality;
    disjoint masking none, with the same budgets filled."""
    shares, outs = {}, {}
    for scales in ("independent", "disjoint"):
        masking = Masking(INPUTS, TARGETS, 64, 64, alphas="mix", grid=4, scales=scales)
        outs[scales] = [masking(sample(seed), np.random.default_rng(seed)) for seed in range(200)]
        shares[scales] = cross_scale_overlap(outs[scales])
        for out in outs[scales]:
            for e in ("tok_S2L2A", "tok_S1GRD", "tok_S1RTC", "tok_DEM"):
                tgt = set(out["target_pos"][out["target_mod"] == ENTRIES.index(e)].tolist())
                inp = set(out["input_pos"][out["input_mod"] == ENTRIES.index(e)].tolist())
                assert not tgt & inp                          # the token scale itself stays disjoint
    for a, b in zip(outs["independent"], outs["disjoint"]):     # the same image input budgets
        for e in ("S2L2A", "S1GRD", "tok_S2L2A", "tok_DEM"):
            assert (a["input_mod"] == ENTRIES.index(e)).sum() == (b["input_mod"] == ENTRIES.index(e)).sum()
    assert all(v > 0.05 for v in shares["independent"].values()), shares
    assert shares["disjoint"] and all(v == 0 for v in shares["disjoint"].values()), shares
    with pytest.raises(ValueError, match="independent, disjoint"):
        Masking(INPUTS, TARGETS, scales="never")
