"""
The entries of TerraMind: what the model reads and predicts, derived from the modality table.

An entry is one scale of one modality (modalities.MODALITIES):
  * "S2L2A", "S2L1C", "S2RGB", "S1GRD", "S1RTC", "DEM": standardized pixels, float (B, C, H, W);
  * "tok_S2L2A", "tok_S1GRD", "tok_S1RTC", "tok_DEM", "tok_LULC", "tok_NDVI": FSQ token ids
    (B, h, w);
  * "caption", "coords": WordPiece token ids (B, L) (PAD = 0).
The pixel and token versions of one modality are different entries ("S2L2A" vs "tok_S2L2A"),
everywhere: encode, logits, masking budgets, batches. Only token entries can be targets. A batch
names an entry by its index in ENTRIES (`input_mod`, `target_mod`; -1 = padding).

Used by terramind.py (the model), masking.py (budgets per entry) and official.py (official keys).
"""
from modalities import MODALITIES


def _entries() -> tuple:
    """Pixel entries, then token entries, then sequences, each in the modality table's order."""
    pixels = [m.name for m in MODALITIES.values() if m.pixel_key]
    tokens = []
    for m in MODALITIES.values():
        if m.kind == "image" and m.token_key:
            tokens.append("tok_" + m.name)
    sequences = [m.name for m in MODALITIES.values() if m.kind == "sequence"]
    return tuple(pixels + tokens + sequences)


ENTRIES = _entries()          # fixed order; batch `*_mod` values index into it
ENTRY_INDEX = {e: i for i, e in enumerate(ENTRIES)}
PAD = 0                       # WordPiece [PAD]; sequence positions holding it are not inputs

# the entries of the v1 checkpoints (assets/official/keys)
OFFICIAL_INPUTS = ("S2L2A", "S2L1C", "S2RGB", "S1GRD", "S1RTC", "DEM",
                   "tok_S2L2A", "tok_S1GRD", "tok_S1RTC", "tok_DEM", "tok_LULC", "tok_NDVI",
                   "coords")
OFFICIAL_TARGETS = ("tok_S2L2A", "tok_S1GRD", "tok_S1RTC", "tok_DEM", "tok_LULC", "tok_NDVI",
                    "coords")


def entry_kind(entry: str) -> str:
    """'pixels', 'tokens' or 'sequence'; unknown names raise with the list of entries."""
    if entry not in ENTRY_INDEX:
        raise KeyError(f"unknown entry {entry!r}; entries are {', '.join(ENTRIES)}")
    if entry.startswith("tok_"):
        return "tokens"
    if MODALITIES[entry].kind == "sequence":
        return "sequence"
    return "pixels"


def entry_modality(entry: str):
    """The modality table's row of an entry ("tok_S2L2A" -> MODALITIES["S2L2A"])."""
    entry_kind(entry)
    return MODALITIES[entry.removeprefix("tok_")]


def official_key(entry: str) -> str:
    """The official state-dict / MODALITY_INFO key of an entry, e.g. 'tok_S2L2A' -> 'tok_sen2l2a@224'."""
    m = entry_modality(entry)
    if entry_kind(entry) == "pixels":
        return m.pixel_key
    return m.token_key
