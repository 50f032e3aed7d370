"""
Speed of one TerraMind pretraining step, ours vs the official implementation, same run, same machine.

One step = forward + backward + AdamW of `tiny` on a batch of 8 samples with 256 input + 256 target
tokens (224 px, every v1 modality present, all2all masking from masking.py), fp32, 2 CPU threads. Both
models hold the same weights (ours loaded with TerraMind.from_official) and see the same masked batch
(the official one through masking.to_official). Timed steps alternate between the two models in one
process, so load from other processes hits both alike; the median step time is reported.

Needs both the project and the official package importable, i.e. the oracle venv (never a project
dependency). Measure under the CPU lock:

    flock /tmp/cpu.lock ~/oracle/bin/python bench/bench_terramind.py
    flock /tmp/cpu.lock ~/oracle/bin/python bench/bench_terramind.py --official-attention snapshot
    flock /tmp/cpu.lock ~/oracle/bin/python bench/bench_terramind.py --fused-adamw ours
    flock /tmp/cpu.lock ~/oracle/bin/python bench/bench_terramind.py --no-onednn
    flock /tmp/cpu.lock ~/oracle/bin/python bench/bench_terramind.py --matmul-precision medium

--matmul-precision: importing terratorch sets torch's float32 matmul precision to "medium" for the whole
process (terratorch/models/backbones/clay_v15/model.py does it at import). "medium" lets PyTorch compute fp32
matmuls with bf16 arithmetic and sends CPU matmuls to oneDNN rather than MKL. Whether oneDNN then uses bf16
depends on the CPU; on this project's AMD EPYC machines its results stay at fp32 accuracy. The benchmark
therefore sets the precision again after the imports, for both sides:
  * `highest` (the default, and PyTorch's own default): fp32 arithmetic, as the benchmark is specified;
  * `medium`: the state terratorch leaves, for comparison.
At "highest", ours routes its CPU fp32 matmuls to oneDNN itself (cpu_linear.py); `--no-onednn` turns that off.

--fused-adamw: `none` (default) times both sides with torch's default AdamW (foreach), so the ratio compares the
models alone; `both` gives both sides torch's fused AdamW; `ours` gives ours the fused AdamW that pretrain.py
uses, and the official side the default (the official package ships no pretraining loop).

Prints per side: median ms/step, tokens/s (input + target tokens), peak RSS and its rise over two training
steps (measured in a child process per side), then `ratio <ours/official>` (tokens/s). Both sides start
from the same weights and batch, so their loss curves agree (when every target modality has targets in the
batch, as at batch 8: the official mean over modalities counts a modality without targets as a 0 loss).
"""
import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def official_tiny():
    from torch import nn
    from terratorch.models.backbones.terramind.model.modality_info import MODALITY_INFO
    from terratorch.models.backbones.terramind.model.terramind import TerraMind as Official
    from terratorch.models.backbones.terramind.model.tm_utils import LayerNorm
    from entries import OFFICIAL_INPUTS, OFFICIAL_TARGETS, official_key

    info = {official_key(e): {**MODALITY_INFO[official_key(e)]} for e in OFFICIAL_INPUTS}
    for v in info.values():
        v["max_tokens"] = v["max_tokens"] or 196

    def build(side, entries):
        return {official_key(e): info[official_key(e)][side](
            image_size=224, dim_tokens=None,
            **{k: v for k, v in info[official_key(e)].items() if k not in ("encoder_embedding", "decoder_embedding")})
            for e in entries}
    # the terramind_v1_tiny_encdec arguments (terramind_register.py), built directly
    return Official(build("encoder_embedding", OFFICIAL_INPUTS), build("decoder_embedding", OFFICIAL_TARGETS), info,
                    dim=192, encoder_depth=12, decoder_depth=4, num_heads=3, mlp_ratio=4, qkv_bias=True,
                    proj_bias=True, mlp_bias=True, act_layer=nn.GELU,
                    norm_layer=partial(LayerNorm, eps=1e-6, bias=False), gated_mlp=False)


def make_batch(batch_size, n_in, n_tgt):
    from torch.utils.data import default_collate
    from masking import Masking
    from modalities import MODALITIES
    from entries import OFFICIAL_INPUTS, OFFICIAL_TARGETS, entry_kind

    g = torch.Generator().manual_seed(0)
    masking = Masking(OFFICIAL_INPUTS, OFFICIAL_TARGETS, n_in, n_tgt, alphas="all2all", grid=14)
    samples = []
    for b in range(batch_size):
        s = {}
        for e in OFFICIAL_INPUTS:
            if entry_kind(e) == "pixels":
                s[e] = torch.randn(MODALITIES[e].channels, 224, 224, generator=g)
            elif entry_kind(e) == "tokens":
                s[e] = torch.randint(0, MODALITIES[e.removeprefix("tok_")].vocab_size, (14, 14), generator=g)
        s["coords"] = torch.randint(4204, 6366, (2,), generator=g)
        samples.append(masking(s, np.random.default_rng([0, b])))
    return default_collate(samples)


def snapshot_attention(official_module):
    """Switches the official Attention/CrossAttention to the attention of IBM/terratorch at
    85467a9 (.../model/terramind.py): explicit softmax(q k^T * scale) with masks filled with -finfo.max.
    The installed terratorch uses SDPA instead; everything else is the installed code."""
    def attend(self, q, k, v, mask, B, N):
        a = (q @ k.transpose(-2, -1)) * self.scale                                   # (B, H, N, M)
        if mask is not None:
            a = a.masked_fill(mask.unsqueeze(1), -torch.finfo(a.dtype).max)
        return self.proj((a.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, -1))

    def self_attention(self, x, mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return attend(self, q, k, v, mask, B, N)

    def cross_attention(self, x, context, mask=None):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        k, v = self.kv(context).reshape(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return attend(self, q, k, v, mask, B, N)
    official_module.Attention.forward = self_attention
    official_module.CrossAttention.forward = cross_attention


def setup(side, args):
    """-> (model, step function returning the loss) for 'ours' or 'official' (same weights, same batch)."""
    import random
    from masking import to_official
    from terramind import TerraMind
    torch.manual_seed(0)
    random.seed(0)
    official = official_tiny()
    if args.official_attention == "snapshot":
        from terratorch.models.backbones.terramind.model import tm_utils
        snapshot_attention(tm_utils)
    batch = make_batch(args.batch_size, args.n_in, args.n_tgt)
    torch.set_float32_matmul_precision(args.matmul_precision)   # after the terratorch import, which sets "medium"
    if side == "ours":
        import cpu_linear
        cpu_linear.ENABLED = not args.no_onednn
        model = TerraMind.from_official(official.state_dict(), "tiny")
        del official
        return model, lambda: model(batch)[0]
    mod_dict = to_official(batch)
    return official, lambda: official({k: dict(v) for k, v in mod_dict.items()}, num_encoder_tokens=args.n_in,
                                      num_decoder_tokens=args.n_tgt)[0]


def train_steps(model, step, n, fused=False):
    """n steps of forward + backward + AdamW (lr 1e-4, weight decay 0.05; torch's default foreach
    implementation, or its fused one) -> [(s, loss)]."""
    if not hasattr(model, "_opt"):
        model.train()
        model._opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=fused)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        loss = step()
        model._opt.zero_grad(set_to_none=True)
        loss.backward()
        model._opt.step()
        out.append((time.perf_counter() - t0, loss.item()))
    return out


def fused(side, args):
    return args.fused_adamw == "both" or args.fused_adamw == side


def rss_mb(field="VmRSS"):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def memory_child(side, args):
    """Child process: peak RSS of one side over two training steps; prints one JSON line."""
    torch.set_num_threads(args.threads)
    model, step = setup(side, args)
    gc.collect()
    base = rss_mb()
    with open("/proc/self/clear_refs", "w") as f:   # reset the peak (VmHWM) to now: model building excluded
        f.write("5")
    train_steps(model, step, 2, fused(side, args))
    print(json.dumps({"peak_mb": rss_mb("VmHWM"), "rise_mb": rss_mb("VmHWM") - base}))


def main():
    p = argparse.ArgumentParser(description="TerraMind pretraining step: ours vs official (tokens/s)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side (alternating ours / official)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per side")
    p.add_argument("--batch-size", type=int, default=8, help="samples per step")
    p.add_argument("--n-in", type=int, default=256, help="input token budget per sample")
    p.add_argument("--n-tgt", type=int, default=256, help="target token budget per sample")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--official-attention", choices=["sdpa", "snapshot"], default="sdpa",
                   help="sdpa: the installed terratorch; snapshot: its attention as at the snapshot "
                        "85467a9 (explicit masked softmax)")
    p.add_argument("--fused-adamw", choices=["none", "both", "ours"], default="none",
                   help="which sides use torch's fused AdamW (default none: both use the foreach default)")
    p.add_argument("--matmul-precision", choices=["highest", "medium"], default="highest",
                   help="torch float32 matmul precision for both sides (highest: fp32 arithmetic; medium: what "
                        "importing terratorch sets)")
    p.add_argument("--no-onednn", action="store_true",
                   help="ours without cpu_linear's oneDNN route for CPU fp32 matmuls (plain F.linear)")
    p.add_argument("--memory-of", choices=["ours", "official"], help=argparse.SUPPRESS)  # internal: child
    args = p.parse_args()
    if args.memory_of:
        return memory_child(args.memory_of, args)
    torch.set_num_threads(args.threads)
    tokens = args.batch_size * (args.n_in + args.n_tgt)
    print(f"tiny | batch {args.batch_size} x ({args.n_in} input + {args.n_tgt} target) tokens | fp32 | "
          f"{args.threads} threads | torch {torch.__version__} | official attention: {args.official_attention} | "
          f"fused AdamW: {args.fused_adamw} | matmul precision: {args.matmul_precision} | "
          f"ours' oneDNN route: {'off' if args.no_onednn else 'on'} | "
          f"{args.warmup} warm-up + {args.steps} timed steps each, alternating")
    sides = {s: setup(s, args) for s in ("official", "ours")}
    for s in sides:
        train_steps(*sides[s], args.warmup, fused(s, args))
    runs = {s: [] for s in sides}
    for _ in range(args.steps):  # alternate, so load from other processes hits both sides alike
        for s in sides:
            runs[s] += train_steps(*sides[s], 1, fused(s, args))
    del sides
    rate = {}
    for s, r in runs.items():
        ms = 1000 * statistics.median(t for t, _ in r)
        rate[s] = tokens / ms * 1000
        mem = json.loads(subprocess.run([sys.executable, __file__, "--memory-of", s] + sys.argv[1:], check=True,
                                        capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"{s:8s} | {ms:7.1f} ms/step (median) | {rate[s] / 1000:5.2f}k tok/s | peak RSS {mem['peak_mb']:5.0f} MB"
              f" (+{mem['rise_mb']:.0f} MB in training) | loss {r[0][1]:.4f} -> {r[-1][1]:.4f}")
    print(f"ratio {rate['ours'] / rate['official']:.2f}")


if __name__ == "__main__":
    main()
