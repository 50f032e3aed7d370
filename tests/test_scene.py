"""scene.py and the scene paths of generate.py / tim_finetune.py: windowed reads equal tifffile's whole-image
read on every layout, written GeoTIFFs are tiled and keep the georeferencing, misregistered inputs are refused,
a scene streamed window by window equals the in-memory path bit for bit, and a killed run (a real SIGKILL, and
an injected stop) resumes into a byte-identical file."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import generate
import geotiff
import scene
import tim_finetune
import tim_scene
import windows
from fsq_tokenizer import ImageTokenizer, TokenizerConfig, tokenizer_path
from scene import Raster, TiledWriter, open_scene
from terramind import TerraMind, TerraMindConfig

ROOT = Path(__file__).resolve().parents[1]
SITES = ("637U_59R_1_3", "38D_378R_2_3")
SAMPLING = generate.Sampling("maskgit", 2, temperature=0.7, top_p=0)   # stochastic: the random stream must line up


def real_mosaic(modality: str, height: int, width: int) -> tuple[np.ndarray, dict]:
    """(C, height, width) from the two real TerraMesh sites tiled in a checkerboard, and the first site's tags."""
    tiles = [np.moveaxis(geotiff.read_tiff(ROOT / "assets" / "terramesh" / modality / f"{s}.tif")[0], -1, 0)
             for s in SITES]
    rows = [np.concatenate([tiles[(i + j) % 2] for j in range(-(-width // 224))], -1) for i in range(-(-height // 224))]
    return np.concatenate(rows, -2)[:, :height, :width], geotiff.read_tiff(ROOT / "assets" / "terramesh" / modality /
                                                                            f"{SITES[0]}.tif")[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Random smoke TerraMind and tokenizers (S1GRD diffusion, LULC ViT), saved as a user's checkpoints."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("scene_models")
    model = TerraMind(TerraMindConfig.preset("smoke")).eval()
    model.save_checkpoint(folder / "terramind.safetensors")
    tokenizers = {m: ImageTokenizer(TokenizerConfig.preset("smoke", m)).eval() for m in ("S1GRD", "LULC")}
    torch.nn.init.normal_(tokenizers["S1GRD"].decoder.out[-1].weight, std=0.05)   # zero at init: x0 = 0 whatever
    # the tokens, which would make every S1GRD output blind to them
    for m, t in tokenizers.items():
        t.save_checkpoint(tokenizer_path(folder, m))
    return model, tokenizers, folder


@pytest.mark.parametrize("layout", [dict(tile=(32, 48)), dict(rowsperstrip=7), dict(tile=(16, 16), compression="zlib"),
                                    dict(planarconfig="separate", rowsperstrip=5, compression="zlib")])
def test_windows_equal_the_whole_image(tmp_path, layout):
    x = np.random.default_rng(0).normal(size=(3, 70, 90)).astype(np.float32)
    planar = layout.get("planarconfig") == "separate"
    tifffile.imwrite(tmp_path / "x.tif", x if planar else np.moveaxis(x, 0, -1), photometric="minisblack",
                     **({} if planar else {"planarconfig": "contig"}), **layout)
    r, rng = Raster(tmp_path / "x.tif"), np.random.default_rng(1)
    for _ in range(30):
        r0, c0 = rng.integers(0, 69), rng.integers(0, 89)
        r1, c1 = rng.integers(r0 + 1, 71), rng.integers(c0 + 1, 91)
        assert np.array_equal(r.read(r0, r1, c0, c1), x[:, r0:r1, c0:c1])
    padded = torch.nn.functional.pad(torch.from_numpy(x)[None], (0, 12, 0, 10), mode="reflect")[0].numpy()
    assert np.array_equal(r.read_reflected(48, 80, 60, 102), padded[:, 48:80, 60:102])   # past both edges


def test_reads_only_the_segments_a_window_needs(tmp_path):
    tifffile.imwrite(tmp_path / "x.tif", np.zeros((512, 512), np.uint8), tile=(64, 64), photometric="minisblack")
    r = Raster(tmp_path / "x.tif")
    r.read(70, 100, 130, 200)        # rows in tile row 1, columns in tile columns 2 and 3
    assert sorted(r.cache) == [1 * 8 + 2, 1 * 8 + 3]


def test_real_cloud_layout_planar_tiled_deflate():
    """Sen1Floods11's S2 chip: 13 planes, one 512 px deflate tile each."""
    path = ROOT / "assets" / "sen1floods11" / "S2" / "Spain_7370579_S2Hand.tif"
    whole, _ = geotiff.read_tiff(path)
    assert np.array_equal(Raster(path).read(100, 300, 7, 500), whole[:, 100:300, 7:500])


def test_writer_tiled_georeferenced_and_refuses_misregistration(tmp_path):
    x, geo = real_mosaic("S2L2A", 300, 530)
    w = TiledWriter(tmp_path / "s2.tif", 12, 300, 530, np.int16, geo)
    for r0 in range(0, 300, 37):     # bands that straddle the 256 px tiles
        w.write_rows(r0, x[:, r0:r0 + 37])
    assert not (tmp_path / "s2.tif").exists()   # renamed into place by finish only
    w.finish()
    with tifffile.TiffFile(tmp_path / "s2.tif") as tif:
        page = tif.pages.first
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
        assert np.array_equal(np.moveaxis(page.asarray(), -1, 0), x)
        assert {t.code: t.value for t in page.tags.values() if t.code in geotiff.GEO_TAGS} == geo
    shifted = {**geo, 33922: (0, 0, 0, geo[33922][3] + 10, geo[33922][4], 0)}
    geotiff.write_geotiff(tmp_path / "s1.tif", np.zeros((2, 300, 530), np.float32), shifted)
    with pytest.raises(ValueError, match="not co-registered: tie point"):
        open_scene({"S2L2A": tmp_path / "s2.tif", "S1GRD": tmp_path / "s1.tif"})
    geotiff.write_geotiff(tmp_path / "s1.tif", np.zeros((2, 300, 520), np.float32), geo)
    with pytest.raises(ValueError, match="300x530 px.*300x520 px"):
        open_scene({"S2L2A": tmp_path / "s2.tif", "S1GRD": tmp_path / "s1.tif"})


def scene_file(tmp_path, height=300, width=330) -> tuple[Path, np.ndarray, dict]:
    x, geo = real_mosaic("S2L2A", height, width)
    tifffile.imwrite(tmp_path / "s2.tif", np.moveaxis(x, 0, -1), rowsperstrip=16, photometric="minisblack",
                     planarconfig="contig", extratags=scene._extratags(geo))   # a striped input
    return tmp_path / "s2.tif", x, geo


def assert_scene_equals_in_memory(models, tmp_path, height, width, batch_size):
    """The scene path's files equal generate() on the same pixels in memory, bit for bit."""
    model, tokenizers, _ = models
    path, x, geo = scene_file(tmp_path, height, width)
    ref = generate.generate(model, tokenizers, {"S2L2A": x.astype(np.float32)}, ["LULC", "S1GRD"], SAMPLING,
                            diffusion_steps=2, batch_size=batch_size)
    generate.generate_scene(model, tokenizers, {"S2L2A": path}, ["LULC", "S1GRD"], tmp_path / "out", SAMPLING, 2,
                            batch_size=batch_size)
    lulc, tags = geotiff.read_tiff(tmp_path / "out" / "LULC.tif")
    s1, _ = geotiff.read_tiff(tmp_path / "out" / "S1GRD.tif")
    assert tags == geo and lulc.dtype == np.uint8 and s1.dtype == np.float32
    assert np.array_equal(lulc, ref["LULC"][0].numpy())
    assert np.array_equal(np.moveaxis(s1, -1, 0), ref["S1GRD"][0].numpy())
    assert not (tmp_path / "out" / "scene.progress.npz").exists()


def test_scene_equals_in_memory_generation(models, tmp_path):
    """300 x 330 px of real S2L2A (reflect padding at both edges, 42 windows in 4 waves): the scene path's files
    equal generate() in memory bit for bit (one token grid, one windowed decoding for both)."""
    assert_scene_equals_in_memory(models, tmp_path, 300, 330, batch_size=5)


def test_one_tile_scene_equals_in_memory_generation(models, tmp_path):
    """A scene of one 64 px tile: one window, decoded whole with the sampling generator as the official code
    decodes a tile (diffusion noise from the generator, not per patch), in both paths."""
    assert_scene_equals_in_memory(models, tmp_path, 64, 64, batch_size=5)


@pytest.mark.slow
def test_2048_px_scene_equals_in_memory_generation(models, tmp_path):
    """The issue's size: a 2048 px scene (1849 generation windows, 3969 decoding windows per target) run in
    windows from the file equals the in-memory large-tile path bit for bit."""
    assert_scene_equals_in_memory(models, tmp_path, 2048, 2048, batch_size=16)


def test_killed_scene_run_resumes_into_identical_files(models, tmp_path):
    """generate.py --scene killed with SIGKILL after its first checkpoint, then --resume: the same bytes as an
    uninterrupted run."""
    _, _, folder = models
    path, _, _ = scene_file(tmp_path, 330, 300)
    cmd = [sys.executable, "generate.py", "--model", str(folder / "terramind.safetensors"), "--tokenizers",
           str(folder), "--input", f"S2L2A={path}", "--targets", "LULC,S1GRD", "--scene", "--scheme", "maskgit",
           "--steps", "2", "--temperature", "0.7", "--diffusion-steps", "2", "--batch-size", "4", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + ["--out", str(tmp_path / "whole")], cwd=ROOT, env=env, check=True, capture_output=True)
    killed = subprocess.Popen(cmd + ["--out", str(tmp_path / "killed")], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "killed" / "scene.progress.npz"
    while not progress.exists() and killed.poll() is None:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL and progress.exists()
    out = subprocess.run(cmd + ["--out", str(tmp_path / "killed"), "--resume"], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert "resuming" in out and "peak RSS" in out
    for name in ("LULC", "S1GRD"):
        assert (tmp_path / "whole" / f"{name}.tif").read_bytes() == (tmp_path / "killed" / f"{name}.tif").read_bytes()


class Stop(Exception):
    pass


def stop_after(monkeypatch, n: int):
    """TiledWriter.write_rows raises on its n-th call: a crash in the middle of writing, after a checkpoint."""
    calls, write = [], TiledWriter.write_rows

    def failing(self, r0, rows):
        calls.append(r0)
        if len(calls) == n:
            write(self, r0, rows[:, :rows.shape[1] // 2])   # half the rows on disk, then the crash
            raise Stop
        write(self, r0, rows)
    monkeypatch.setattr(TiledWriter, "write_rows", failing)


def test_stops_in_either_stage_resume_into_identical_files(models, tmp_path, monkeypatch):
    """A crash while generating tokens (the 7th batch of windows), then one while writing decoded rows: each
    resumed run continues from its checkpoint into the bytes of an uninterrupted run."""
    model, tokenizers, _ = models
    path, _, _ = scene_file(tmp_path, 300, 200)
    run = dict(sampling=SAMPLING, diffusion_steps=2, batch_size=4)
    generate.generate_scene(model, tokenizers, {"S2L2A": path}, ["S1GRD"], tmp_path / "whole", **run)
    calls, tokens = [], generate.generate_tokens

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 7:
            raise Stop
        return tokens(*args, **kw)
    monkeypatch.setattr(generate, "generate_tokens", failing)
    with pytest.raises(Stop):
        generate.generate_scene(model, tokenizers, {"S2L2A": path}, ["S1GRD"], tmp_path / "cut", **run)
    monkeypatch.undo()
    stop_after(monkeypatch, 3)
    with pytest.raises(Stop):
        generate.generate_scene(model, tokenizers, {"S2L2A": path}, ["S1GRD"], tmp_path / "cut", resume=True, **run)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="another run"):   # other settings: refused
        generate.generate_scene(model, tokenizers, {"S2L2A": path}, ["S1GRD"], tmp_path / "cut", SAMPLING, 3,
                                batch_size=4, resume=True)
    generate.generate_scene(model, tokenizers, {"S2L2A": path}, ["S1GRD"], tmp_path / "cut", resume=True, **run)
    assert (tmp_path / "whole" / "S1GRD.tif").read_bytes() == (tmp_path / "cut" / "S1GRD.tif").read_bytes()


@pytest.fixture(scope="module")
def segmenter():
    """A TiM segmenter from a random smoke TerraMind, head weights spread so that both classes occur."""
    torch.manual_seed(0)
    model = tim_finetune.TiMSegmenter.from_pretrained(TerraMind(TerraMindConfig.preset("smoke")),
                                                      modalities=("S1GRD",), tim=("LULC",), tile=64, channels=16)
    for p in model.head.parameters():
        p.data.normal_(0, 0.3)
    return model.eval()


def test_tim_predict_scene_equals_predict_and_resumes(segmenter, tmp_path, monkeypatch):
    """A 150 x 230 px S1 scene with no-data holes, batches of 3 windows that straddle window rows: the streamed
    mask equals `predict` (stochastic TiM sampling, temperature 1) bit for bit; a crash mid-write resumes."""
    x = (np.random.default_rng(0).normal(size=(2, 150, 230)) * 5 - 12).astype(np.float32)
    x[:, :20, :30] = np.nan                         # every band no data: NODATA
    x[0, 50:60, 50:70] = np.nan                     # one band: fed as the mean, predicted
    geotiff.write_geotiff(tmp_path / "s1.tif", x, {33550: (10.0, 10.0, 0.0)})
    ref = tim_scene.predict(segmenter, {"S1GRD": x}, 3, 0).numpy().astype(np.uint8)
    ref[:20, :30] = tim_scene.NODATA
    assert set(np.unique(ref)) == {0, 1, tim_scene.NODATA}
    tim_finetune.predict_scene(segmenter, {"S1GRD": tmp_path / "s1.tif"}, tmp_path / "mask.tif", 3, 0)
    mask, tags = geotiff.read_tiff(tmp_path / "mask.tif")
    assert np.array_equal(mask, ref) and tags[42113] == "255" and tags[33550] == (10.0, 10.0, 0.0)
    stop_after(monkeypatch, 2)
    with pytest.raises(Stop):
        tim_finetune.predict_scene(segmenter, {"S1GRD": tmp_path / "s1.tif"}, tmp_path / "cut.tif", 3, 0)
    monkeypatch.undo()
    tim_finetune.predict_scene(segmenter, {"S1GRD": tmp_path / "s1.tif"}, tmp_path / "cut.tif", 3, 0, resume=True)
    assert (tmp_path / "mask.tif").read_bytes() == (tmp_path / "cut.tif").read_bytes()


def test_windowed_decode_is_seamless(pretrained, tokenizers):
    """The scene path's decoding, window by window (half-tile stride, noise of each 16 px patch shared by the
    windows over it, ramp weights), on a 512 px synthetic tile with the pretrained smoke stack: the column and row
    jumps at decoding-window edges are within 1.2x those at the other patch borders (measured 0.94x, 0.68x; a plain
    average measured 1.37x, 1.46x, cutting each window to its centre part 1.6x, 2.0x, tiles generated apart over
    2x, tests/test_generate.py)."""
    from fsq_tokenizer import load_tokenizers
    from synthetic import synth_sample
    model = TerraMind.from_checkpoint(pretrained.checkpoint).eval()
    s2 = torch.from_numpy(synth_sample(7, 0, size=512)["S2L2A"]).permute(2, 0, 1).float()
    out = generate.generate(model, load_tokenizers(tokenizers), {"S2L2A": s2}, ["DEM"],
                            generate.Sampling(steps=1, temperature=0.0), diffusion_steps=2,
                            batch_size=128)["DEM"][0, 0]
    edges = sorted({s + d for s in generate.decode_starts(512, 64) for d in (0, 64)} - {0, 512})
    inner = [c for c in range(16, 512, 16) if c not in edges]
    for jumps in ((out[:, 1:] - out[:, :-1]).abs().mean(0), (out[1:] - out[:-1]).abs().mean(1)):
        ratio = float(jumps[[c - 1 for c in edges]].mean() / jumps[[c - 1 for c in inner]].mean())
        print(f"seam ratio {ratio:.2f}")
        assert ratio < 1.2


def windowed_and_whole(model, toks, s2, targets, monkeypatch) -> tuple[dict, dict, dict]:
    """generate() on s2 (windowed decoding), the token grids it decoded, and the same grids decoded at once."""
    grids, decode_rows = {}, generate.decode_rows

    def capture(tokenizer, name, ids, *args, **kw):   # the token grid each target is decoded from
        grids[name] = ids
        return decode_rows(tokenizer, name, ids, *args, **kw)
    monkeypatch.setattr(generate, "decode_rows", capture)
    out = generate.generate(model, toks, {"S2L2A": s2}, targets, generate.Sampling(steps=1, temperature=0.0),
                            diffusion_steps=2, batch_size=128)
    monkeypatch.undo()
    whole = {}
    with torch.no_grad():
        for name in targets:   # from the same noise per 16 px patch as the windows (seed 0)
            ids = grids[name]
            shape = (ids.shape[0], toks[name].channels, ids.shape[1] * 16, ids.shape[2] * 16)
            noise = windows.window_noise(0, name, 0, 0, shape)
            whole[name] = windows.decoded(name, toks[name].decode(ids, steps=2, noise=noise))
    return out, grids, whole


@pytest.mark.slow
def test_windowed_decode_against_the_whole_grid_decode(pretrained, tokenizers, monkeypatch):
    """The README's figures, on a synthetic S2L2A tile through the pretrained smoke stack: its token grid
    decoded in tile-sized windows (the default since issue 22) and at once (the decoding before; here from
    the windows' noise of each 16 px patch, so only the windows differ), per target in physical units.
    LULC at 2048 px, also decoded tile by tile 64 px apart as the decoder was trained: the windowed map
    is nearer to that than the whole-grid map. Diffusion targets at 512 px (a whole 2048 px grid through
    the diffusion decoder took over 23 GB and was killed)."""
    from fsq_tokenizer import load_tokenizers
    from synthetic import synth_sample
    model = TerraMind.from_checkpoint(pretrained.checkpoint).eval()
    toks = load_tokenizers(tokenizers)
    s2 = torch.from_numpy(synth_sample(7, 0, size=2048)["S2L2A"]).permute(2, 0, 1).float()
    out, grids, whole = windowed_and_whole(model, toks, s2, ["LULC"], monkeypatch)
    with torch.no_grad():
        cells = grids["LULC"][0].unfold(0, 4, 4).unfold(1, 4, 4).reshape(-1, 4, 4)   # (32 * 32, 4, 4)
        tiles = toks["LULC"].decode(cells).argmax(1)                                  # (1024, 64, 64)
    tiles = tiles.reshape(32, 32, 64, 64).permute(0, 2, 1, 3).reshape(2048, 2048)
    windowed_off = float((out["LULC"][0] != tiles).double().mean())
    whole_off = float((whole["LULC"][0] != tiles).double().mean())
    share = float((whole["LULC"] != out["LULC"]).double().mean())
    print(f"LULC 2048 px: windowed vs whole grid {100 * share:.2f}% of pixels in another class; against "
          f"the 64 px tiles decoded apart: windowed {100 * windowed_off:.2f}%, whole grid {100 * whole_off:.2f}%")
    out, _, whole = windowed_and_whole(model, toks, s2[:, :512, :512], ["DEM", "S1GRD"], monkeypatch)
    for name in ("DEM", "S1GRD"):
        diff = (whole[name] - out[name]).abs()[0]                                   # (C, H, W)
        spread = out[name][0].std((1, 2))
        for band in range(diff.shape[0]):
            print(f"{name} 512 px band {band}: max abs {diff[band].max():.3f}, mean abs "
                  f"{diff[band].mean():.3f} (output std {spread[band]:.3f})")
        assert (diff.mean((1, 2)) < spread).all()
    assert windowed_off < whole_off
