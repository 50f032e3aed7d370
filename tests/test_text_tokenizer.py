"""text_tokenizer.py against outside references: the official TerraMind v1 vocabulary file and its added-token ids,
the Hugging Face `tokenizers` library's ids on a varied corpus (fixture made by
tests/fixtures/text_tokenizer_make_expected.py), the WordPiece merge score worked by hand."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import modalities
import synthetic
from text_tokenizer import (EOS_ID, PAD_ID, WordPieceTokenizer, official_added_tokens, read_corpus,
                            sentinel_id)

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT / "assets" / "official" / "terramind_v1_wordpiece_30k.json"
EXPECTED = ROOT / "tests" / "fixtures" / "text_tokenizer_expected.json"


@pytest.fixture(scope="module")
def official():
    return WordPieceTokenizer.from_file(OFFICIAL)


@pytest.fixture(scope="module")
def synth_captions():
    """Captions and coords of the synthetic world (synthetic.synth_sample), 300 samples."""
    samples = [synthetic.synth_sample(0, i, 32) for i in range(300)]
    return [s["caption"] for s in samples], [s["coords"] for s in samples]


# -----------------------------------------------------------------------------------------------------------
# The official vocabulary

def test_added_token_layout_matches_spec_table():
    tokens = [t for t, _ in official_added_tokens()]
    assert len(tokens) == 6366
    spec = {0: "[PAD]", 1: "[UNK]", 2: "[SOS]", 3: "[EOS]", 4: "[S_0]", 5: "[S_1]", 6: "[S_2]", 203: "[S_199]",
            204: "xmin=0", 1203: "xmin=999", 1204: "ymin=0", 2204: "xmax=0", 3204: "ymax=0", 4203: "ymax=999",
            4204: "lat=-90.00", 4924: "lat=90.00", 4925: "lon=-180.00", 6365: "lon=180.00"}   # official layout
    assert {i: tokens[i] for i in spec} == spec
    assert sentinel_id(1) == 5 and sentinel_id(2) == 6
    assert "lat=-0.00" not in tokens and "lon=-0.00" not in tokens   # upstream: no entry for negative zero


def test_added_tokens_equal_official_file(official):
    raw = json.loads(OFFICIAL.read_text())
    assert [(a["content"], a["single_word"]) for a in raw["added_tokens"]] == official_added_tokens()
    assert [a["id"] for a in raw["added_tokens"]] == list(range(6366))
    assert len(official) == 30000


def test_spec_examples(official):
    assert official.encode_coords(-120.3, 35.8) == [4707, 5164, 3]
    assert official.encode_coords(8.54, 47.37) == [4753, 5679, 3]
    assert official.encode_coords(0, 0) == [4564, 5645, 3]
    # v0.1 caption encoding: text + " [S_1]", then [EOS] (official text_tokenizer.py)
    assert official.encode_batch(["A river flows through farmland. [S_1]"]) == [
        [6404, 6784, 10693, 6553, 20909, 6379, 5, 3]]
    assert official.decode([6404, 6784, 10693, 6553, 20909, 6379]) == "a river flows through farmland."


def test_every_coordinate_token_round_trips(official):
    lats = [-90 + 0.25 * k for k in range(721)]
    lons = [-180 + 0.25 * k for k in range(1441)]
    for k, lon in enumerate(lons):
        lat = lats[k % len(lats)]
        ids = official.encode_coords(lon, lat)
        assert ids == [4204 + round(4 * (lat + 90)), 4925 + round(4 * (lon + 180)), EOS_ID]  # the official id formula
        assert official.decode_coords(ids) == (lon, lat)
        text = f"lat={lat:.2f} lon={lon:.2f}"
        assert official.encode(text + " [EOS]") == ids             # the official text path gives the same ids
        assert official.decode(ids) == text + " [EOS]"
    for lat in lats:   # every latitude token, also as the first id of a sequence
        assert official.decode_coords(official.encode_coords(12.5, lat)) == (12.5, lat)


def test_coords_snap_to_the_quarter_degree_grid(official):
    assert official.decode_coords(official.encode_coords(-120.3, 35.8)) == (-120.25, 35.75)
    assert official.decode_coords(official.encode_coords(179.9, -89.9)) == (180.0, -90.0)
    assert official.encode_coords(0.125, 0.375) == official.encode_coords(0.0, 0.5)  # halves go to even quarters
    lon, lat = torch.tensor(8.54), torch.tensor(47.37)
    assert official.encode_coords(lon, lat) == [4753, 5679, 3]


def test_negative_zero_maps_to_zero(official):
    # upstream "lat=-0.00 lon=-0.25 [EOS]" has no vocabulary entry and falls apart into 9 pieces
    assert len(official.encode("lat=-0.00 lon=-0.25 [EOS]")) == 9
    assert official.encode_coords(-0.25, -0.1) == [4564, 5644, 3]   # DEVIATION: lat=0.00, lon=-0.25
    assert official.encode_coords(-0.12, -0.12) == official.encode_coords(0, 0)


@pytest.mark.parametrize("lon, lat, error", [
    (float("nan"), 10, "lon=nan"), (10, float("nan"), "lat=nan"), (float("inf"), 0, "lon=inf"),
    (0, 90.01, "lat=90.01"), (-180.5, 0, "lon=-180.5"), (200, 0, "lon=200")])
def test_bad_coordinates_raise(official, lon, lat, error):
    with pytest.raises(ValueError, match=error):
        official.encode_coords(lon, lat)


def test_bad_coordinate_inputs_raise(official):
    with pytest.raises(TypeError, match="parse_coords"):
        official.encode_coords("lat=35.75 lon=-120.25", None)
    with pytest.raises(ValueError, match="cannot parse coords"):   # malformed text, via modalities.parse_coords
        official.encode_coords(*modalities.parse_coords("lat=35.75, lon=-120.25"))
    with pytest.raises(ValueError, match="expected a lat= and a lon= token"):
        official.decode_coords([5164, 4707, 3])   # lon first
    with pytest.raises(ValueError, match="expected a lat= and a lon= token"):
        official.decode_coords([6404, 6784])
    with pytest.raises(ValueError, match="at least 2 ids"):
        official.decode_coords([4707])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        official.decode_coords([4707, 30000])


# -----------------------------------------------------------------------------------------------------------
# Agreement with the Hugging Face `tokenizers` library

def test_ids_and_decoding_match_hf_tokenizers(official):
    expected = json.loads(EXPECTED.read_text(encoding="utf-8"))
    assert len(expected["texts"]) > 300
    wrong = [(t, ids, official.encode(t)) for t, ids in zip(expected["texts"], expected["ids"])
             if official.encode(t) != ids]
    assert not wrong, f"{len(wrong)} texts differ, first: {wrong[0]}"
    for ids, text, text_skip in zip(expected["ids"], expected["decoded"], expected["decoded_skip_special"]):
        assert official.decode(ids) == text
        assert official.decode(ids, skip_special_tokens=True) == text_skip


def test_corner_cases_of_added_tokens(official):
    enc = official.encode
    assert enc("[S_1][S_2]") == [5, 6]
    assert sentinel_id(1) not in enc("word[S_1]")          # single_word: a letter touches it
    assert enc("word[EOS]word")[1] == EOS_ID               # [EOS] is not single_word
    assert enc("xmin=1000") == enc("xmin = 1000")          # longest match xmin=100 touches a digit
    assert enc("[S_1]é")[0] != 5 and enc("²[S_1]")[1] == 5  # é is a word character, ² is not
    assert enc("c" * 100) != [1] and enc("c" * 101) == [1]  # words over 100 characters are [UNK]


def test_decode_joins_pieces_and_cleans_spaces(official):
    ids = official.encode("Undulating farmland, flooded! Why? It's fine.")
    assert official.decode(ids) == "undulating farmland, flooded! why? it ' s fine."
    with pytest.raises(ValueError, match="outside the vocabulary"):
        official.decode([5, 30000])
    with pytest.raises(TypeError):
        official.encode(["a list"])


# -----------------------------------------------------------------------------------------------------------
# The file format

def test_json_round_trip(official, tmp_path):
    assert official.to_json() == json.loads(OFFICIAL.read_text(encoding="utf-8"))   # same file, parsed
    official.save(tmp_path / "tok.json")
    again = WordPieceTokenizer.from_file(tmp_path / "tok.json")
    assert again.vocab == official.vocab and again.added == official.added


def test_bad_files_raise_naming_the_file(official, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        WordPieceTokenizer.from_file(tmp_path / "nothere.json")
    (tmp_path / "broken.json").write_text('{"model": {"vocab": ')
    with pytest.raises(ValueError, match="broken.json: not a `tokenizers` JSON"):
        WordPieceTokenizer.from_file(tmp_path / "broken.json")
    cfg = official.to_json()
    cfg["normalizer"]["lowercase"] = False
    (tmp_path / "cased.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="cased.json: normalizer"):
        WordPieceTokenizer.from_file(tmp_path / "cased.json")
    cfg = official.to_json()
    cfg["added_tokens"][5]["id"] = 7
    (tmp_path / "ids.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"ids.json: added token '\[S_1\]' has id 7"):
        WordPieceTokenizer.from_file(tmp_path / "ids.json")


# -----------------------------------------------------------------------------------------------------------
# Batches

def test_batch_helpers(official):
    texts = ["A river.", "", "Satellite view of cropland with forest and water in gently rolling terrain."]
    rows = official.encode_batch(texts)
    assert [len(r) for r in rows] == [len(rows[2])] * 3
    assert rows[0] == official.encode(texts[0]) + [EOS_ID] + [PAD_ID] * (len(rows[2]) - 4)
    assert rows[1][:2] == [EOS_ID, PAD_ID]
    t = official.encode_batch(texts, length=5, return_tensor=True)
    assert t.shape == (3, 5) and t.dtype == torch.long
    assert t[2].tolist() == official.encode(texts[2])[:5]   # truncated after [EOS] is added, as 4M does
    assert official.encode_batch(texts, length=4, eos=False)[0] == official.encode(texts[0]) + [PAD_ID]
    assert official.decode_batch(official.encode_batch(texts, return_tensor=True)) == [
        "a river.", "", texts[2].lower()]
    assert official.encode_batch([], return_tensor=True).shape == (0, 0)


def test_coordinate_batches(official):
    coords = torch.tensor([[-120.3, 35.8], [8.54, 47.37], [0.0, 0.0]])   # (B, 2) [lon, lat]
    ids = official.encode_coords_batch(coords)
    assert ids.tolist() == [[4707, 5164, 3], [4753, 5679, 3], [4564, 5645, 3]]
    bad = torch.cat([ids, torch.tensor([[6404, 6784, 3]])])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = official.decode_coords_batch(bad)
    assert out.shape == (4, 2) and torch.isnan(out[3]).all() and len(caught) == 1
    assert out[:3].tolist() == [[-120.25, 35.75], [8.5, 47.25], [0.0, 0.0]]
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        official.encode_coords_batch([[1.0, 2.0, 3.0]])


def test_synthetic_world_coords_text(official, synth_captions):
    _, coords = synth_captions
    for text in coords[:50]:
        ids = official.encode_coords(*modalities.parse_coords(text))
        assert ids == official.encode(text + " [EOS]")
        assert modalities.format_coords(*official.decode_coords(ids)) == text


# -----------------------------------------------------------------------------------------------------------
# Training

def test_first_merge_maximizes_the_wordpiece_score():
    # Hugging Face NLP course, WordPiece chapter: words hug x10, pug x5, pun x12, bun x4, hugs x5; the best
    # score count(ab) / (count(a) count(b)) is ("##g", "##s") = 5 / (20 * 5) = 1/20, so "##gs" comes first.
    texts = ["hug"] * 10 + ["pug"] * 5 + ["pun"] * 12 + ["bun"] * 4 + ["hugs"] * 5
    base = len(WordPieceTokenizer.train([], vocab_size=10**6))   # added tokens + ASCII alphabet
    tok = WordPieceTokenizer.train(texts, vocab_size=10**6)
    learned = tok.vocab[base:]
    assert learned[0] == "##gs"
    assert {"hug", "pug", "pun", "bun", "hugs"} <= set(learned)
    assert all(len(tok.encode(w)) == 1 for w in ("hug", "pug", "pun", "bun", "hugs"))


def test_train_on_synthetic_captions(synth_captions, tmp_path):
    captions, _ = synth_captions
    tok = WordPieceTokenizer.train(captions, vocab_size=30000)
    assert tok.vocab[:6366] == [t for t, _ in official_added_tokens()] and len(tok) <= 30000
    for c in captions:
        ids = tok.encode(c)
        assert 1 not in ids
        assert tok.encode(tok.decode(ids)) == ids
        assert tok.decode(ids).replace(" ", "") == c.lower().replace(" ", "")
    words = {w for c in captions for w in tok.pre_tokenize(tok.normalize(c))}
    assert all(len(tok.encode(w)) == 1 for w in words)   # trained to the end: every word is one token
    assert tok.encode_coords(-120.3, 35.8) == [4707, 5164, 3]
    tok.save(tmp_path / "tok.json")
    again = WordPieceTokenizer.from_file(tmp_path / "tok.json")
    assert [again.encode(c) for c in captions[:50]] == [tok.encode(c) for c in captions[:50]]


def test_train_stops_at_the_vocab_size(synth_captions):
    captions, _ = synth_captions
    full = len(WordPieceTokenizer.train(captions, vocab_size=10**6))
    small = WordPieceTokenizer.train(captions, vocab_size=6366 + 150)
    assert len(small) == 6366 + 150 < full
    for c in captions[:100]:   # fewer merges, more pieces, still no [UNK] and still a round trip
        ids = small.encode(c)
        assert 1 not in ids and small.decode(ids).replace(" ", "") == c.lower().replace(" ", "")
    with pytest.raises(ValueError, match="below the 6366 added tokens"):
        WordPieceTokenizer.train(captions, vocab_size=6400)


def test_trained_vocab_keeps_official_ids(official, synth_captions):
    tok = WordPieceTokenizer.train(synth_captions[0][:100], vocab_size=30000)
    assert tok.vocab[:6366] == official.vocab[:6366]


def test_cli_train_and_encode(tmp_path):
    corpus = tmp_path / "caption"
    corpus.mkdir()
    for i, text in enumerate(["A river flows through farmland.", "Snow covers the steep alpine area.\n\n"]):
        (corpus / f"{i:05d}.txt").write_text(text + "\n")
    out = tmp_path / "tok.json"
    cmd = [sys.executable, str(ROOT / "text_tokenizer.py")]
    run = subprocess.run(cmd + ["train", "--corpus", str(corpus), "--out", str(out)], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "trained on 2 texts" in run.stdout and "[UNK] in corpus: 0" in run.stdout
    assert read_corpus([corpus]) == ["A river flows through farmland.", "Snow covers the steep alpine area."]
    run = subprocess.run(cmd + ["encode", "--tokenizer", str(out), "Snow covers farmland."], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 0 and "'snow covers farmland.'" in run.stdout, run.stderr
    run = subprocess.run(cmd + ["train", "--corpus", str(tmp_path / "missing"), "--out", str(tmp_path / "new.json")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode != 0 and "missing: no such corpus file or folder" in run.stderr


def test_cli_train_never_overwrites_a_file_unless_told(tmp_path):
    """issue 19: an existing --out (a user's file, or an earlier vocabulary) is refused before the corpus is read."""
    corpus, out = tmp_path / "captions.txt", tmp_path / "tok.json"
    corpus.write_text("A river flows through farmland.\n")
    out.write_text("a user's notes\n")
    cmd = [sys.executable, str(ROOT / "text_tokenizer.py"), "train", "--corpus", str(corpus), "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert f"--out {out}: the file exists; pass --overwrite" in run.stderr
    assert out.read_text() == "a user's notes\n"
    run = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert WordPieceTokenizer.from_file(out).encode("river") != []
