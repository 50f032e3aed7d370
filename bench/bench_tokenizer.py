"""
Benchmark: our tokenizer against the official TerraMind implementation (terratorch DiVAE) on the same
weights, on CPU: encode throughput (images/s) and the time of one denoising step (one UNet call).

Both implementations must import, so run it in an environment with terratorch, with the repository on the
path, under the shared CPU lock (timings are only honest when nothing else runs):

    flock /tmp/cpu.lock ~/oracle/bin/python bench/bench_tokenizer.py                 # official + tiny sizes
    flock /tmp/cpu.lock ~/oracle/bin/python bench/bench_tokenizer.py --size tiny

Without terratorch (e.g. the project venv) it times our implementation only.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fsq_tokenizer import ImageTokenizer, TokenizerConfig, load_state_strict  # noqa: E402

try:
    from terratorch.models.backbones.terramind.tokenizer import vqvae
    from terratorch.models.backbones.terramind.tokenizer.models import vit_models
    from terratorch.models.backbones.terramind.tokenizer.models.unet import unet
except ImportError:
    vqvae = None


def official_divae(cfg: TokenizerConfig, channels: int):
    """The official DiVAE with the widths of `cfg` (the registry's vit_b_enc / unet_patched at 'official')."""
    vit_models.vit_bench_enc = lambda **kw: vit_models.ViTEncoder(
        dim_tokens=cfg.enc_dim, depth=cfg.enc_depth, num_heads=cfg.enc_heads, mlp_ratio=4, qkv_bias=True, **kw)
    unet.unet_bench = lambda **kw: unet.PatchedUNetCondCat(
        patch_size=4, model_channels=cfg.unet_channels, num_res_blocks=cfg.unet_blocks,
        attention_resolutions=list(cfg.unet_attn), channel_mult=cfg.unet_mult, **kw)
    return vqvae.DiVAE(image_size=cfg.image_size, n_channels=channels, enc_type="vit_bench_enc",
                       dec_type="unet_bench", prediction_type="sample", post_mlp=True, patch_size=16,
                       quant_type="fsq", codebook_size="8-8-8-6-5", latent_dim=5, clip_sample=True).eval()


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def bench(size: str, modality: str, image: int, batch_encode: int, batch_step: int, repeats: int):
    cfg = TokenizerConfig.preset(size, modality)
    ours = ImageTokenizer(cfg).eval()
    C = ours.channels
    theirs = None
    if vqvae is not None:
        theirs = official_divae(cfg, C)
        for p in theirs.parameters():            # random non-zero weights everywhere, shared by both
            p.normal_(0, 0.02)
        load_state_strict(ours, theirs.state_dict(), "official DiVAE")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_encode, C, image, image, generator=g)
    x_t = torch.randn(batch_step, C, image, image, generator=g)
    codes = ours.encode_codes(x[:batch_step])[0]
    t = torch.tensor(499)
    if theirs is not None:                      # same weights, same numbers
        assert torch.equal(theirs.tokenize(x), ours.encode(x))
        rel = (theirs.decoder(x_t, t, codes) - ours.decoder(x_t, t, codes)).norm() / theirs.decoder(x_t, t, codes).norm()
        assert rel < 1e-5, rel
    rows = [("encode", "img/s", lambda m: batch_encode / timed(lambda: m.encode(x) if m is ours else m.tokenize(x), repeats)),
            ("denoising step", "ms", lambda m: 1e3 * timed(lambda: m.decoder(x_t, t, codes), repeats))]
    print(f"\n{modality} tokenizer, preset {size}: {image}x{image} px, encode batch {batch_encode}, "
          f"UNet batch {batch_step}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, unit, measure in rows:
        a = measure(ours)
        if theirs is None:
            print(f"  {name:15s} ours {a:9.2f} {unit}")
            continue
        b = measure(theirs)
        speedup = a / b if unit == "img/s" else b / a
        print(f"  {name:15s} ours {a:9.2f} {unit} | official {b:9.2f} {unit} | ours/official speed {speedup:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--size", choices=["official", "tiny", "both"], default="both", help="preset to time")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    args = parser.parse_args()
    if args.size in ("tiny", "both"):
        bench("tiny", "S2L2A", 64, batch_encode=64, batch_step=16, repeats=args.repeats)
    if args.size in ("official", "both"):
        bench("official", "S2L2A", 224, batch_encode=4, batch_step=1, repeats=args.repeats)


if __name__ == "__main__":
    main()
