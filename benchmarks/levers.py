"""Each speed lever on its own, at the preset's shapes: one transformer call (the CFG batch of 2, the benchmark's
prompts) or one VAE decode, with the lever on and off, warmed up and then timed in alternating rounds.

    python -m benchmarks.levers                                   # wide preset, 512^2 and 1024^2
    python -m benchmarks.levers --size 512 --levers gemm,fold --repeats 7

Levers: ``gemm`` (the float32 CPU GEMM: torch's BLAS against oneDNN, aura_flow.weights.linear), ``fold`` (the padding
fold), ``qkv`` (the q/k/v projections of each attention as one GEMM: a prototype here, measured before it is built),
``compile`` (torch.compile of the blocks; its build is timed apart), ``vae`` (the VAE decode channels-last or not),
``threads`` (half of torch's CPU threads against all), ``diffusers`` (diffusers' own transformer on the same
weights, for the cost of the pack's layers).
Prints min, median, spread and the other load on the machine for every variant, and each lever's gain.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.measure import OtherLoad, load_diffusers, machine  # noqa: E402

LEVERS = ("gemm", "fold", "qkv", "compile", "vae", "threads", "diffusers")


class FusedQKV:
    """Prototype: the pack's attention (with or without the fold's key bias) with each attention's q/k/v (and the
    context's) projected by one GEMM over the three weights stacked (stacked once, here; not patch-aware)."""

    def __init__(self, bias_processor):
        self.inner = bias_processor
        self.stacked = {}

    def _qkv(self, attn, names, x):
        from aura_flow.weights.linear import linear

        key = (id(attn), names[0])
        if key not in self.stacked:
            layers = [getattr(attn, n) for n in names]
            self.stacked[key] = (torch.cat([m.weight for m in layers]),
                                 None if layers[0].bias is None else torch.cat([m.bias for m in layers]))
        w, b = self.stacked[key]
        return linear(x, w, b).chunk(3, dim=-1)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_bias=None, **kwargs):
        import torch.nn.functional as F

        b, heads, width = hidden_states.shape[0], attn.heads, attn.to_q.out_features

        def split(t, norm=None):
            t = t.reshape(b, -1, heads, width // heads)
            return norm(t) if norm is not None else t

        q, k, v = self._qkv(attn, ("to_q", "to_k", "to_v"), hidden_states)
        q, k, v = split(q, attn.norm_q), split(k, attn.norm_k), split(v)
        if encoder_hidden_states is not None:
            eq, ek, ev = self._qkv(attn, ("add_q_proj", "add_k_proj", "add_v_proj"), encoder_hidden_states)
            q = torch.cat([split(eq, attn.norm_added_q), q], dim=1)
            k = torch.cat([split(ek, attn.norm_added_k), k], dim=1)
            v = torch.cat([split(ev), v], dim=1)
        mask = None if attention_bias is None else attention_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, -1, width)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        n = encoder_hidden_states.shape[1]
        return attn.to_out[1](attn.to_out[0](out[:, n:])), attn.to_add_out(out[:, :n])


def _processors(transformer, make):
    """Set ``make(old)`` as every attention's processor; -> a function that puts the old ones back."""
    from diffusers.models.attention_processor import Attention

    attns = [m for m in transformer.modules() if isinstance(m, Attention)]
    old = [a.processor for a in attns]
    for a in attns:
        a.set_processor(make(a.processor))
    return lambda: [a.set_processor(p) for a, p in zip(attns, old)]


def variants(args, pipe, dpipe, size: int) -> dict:
    """name -> (set-up, call, tear-down) for one size; the calls return nothing."""
    from aura_flow.pipeline.speed import FastTransformer, _install_bias_processors
    from aura_flow.weights.linear import set_cpu_gemm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size // 8, size // 8, generator=g)
    ctx = torch.cat([pipe.encode_prompt(args.prompt), pipe.encode_prompt(args.negative_prompt)])
    t = torch.tensor([0.7, 0.7])
    tr = pipe.transformer
    nothing = lambda: None  # noqa: E731
    gemm = lambda name: lambda: set_cpu_gemm(name)  # noqa: E731

    def call(model):
        return lambda: model(hidden_states=x, encoder_hidden_states=ctx, timestep=t, return_dict=False)

    out = {}
    if "gemm" in args.levers or "diffusers" in args.levers:
        out["exact, blas"] = (gemm("blas"), call(tr), nothing)
    out["exact, onednn"] = (gemm("onednn"), call(tr), nothing)
    if "diffusers" in args.levers:
        out["diffusers transformer"] = (gemm("onednn"), call(dpipe.transformer), nothing)
    if {"fold", "qkv", "compile"} & set(args.levers):
        out["fold, onednn"] = (gemm("onednn"), call(FastTransformer(tr, fold=True)), nothing)
    if "qkv" in args.levers:
        _install_bias_processors(tr)
        state = {}

        def on():
            set_cpu_gemm("onednn")
            state["undo"] = _processors(tr, lambda p: FusedQKV(p))

        out["fold + fused qkv, onednn"] = (on, call(FastTransformer(tr, fold=True)), lambda: state.pop("undo")())
    if "threads" in args.levers:
        n = torch.get_num_threads()
        state = {}

        def one():
            set_cpu_gemm("onednn")
            state["n"] = torch.get_num_threads()
            torch.set_num_threads(max(1, n // 2))

        out[f"fold, onednn, {max(1, n // 2)} threads"] = (one, call(FastTransformer(tr, fold=True)),
                                                         lambda: torch.set_num_threads(state["n"]))
    if "compile" in args.levers:
        out["fold + compile, onednn"] = (gemm("onednn"), call(FastTransformer(tr, fold=True, compile=True)), nothing)
    if "vae" in args.levers:
        z = torch.randn(1, 4, size // 8, size // 8, generator=g)
        for layout, fmt in (("contiguous", torch.contiguous_format), ("channels-last", torch.channels_last)):
            out[f"vae decode, {layout}"] = (nothing, lambda fmt=fmt: pipe.vae.decode(
                z.contiguous(memory_format=fmt), return_dict=False), nothing)
    return out


GAINS = (("gemm", "exact, blas", "exact, onednn"), ("fold", "exact, onednn", "fold, onednn"),
         ("qkv", "fold, onednn", "fold + fused qkv, onednn"), ("compile", "fold, onednn", "fold + compile, onednn"),
         ("vae", "vae decode, contiguous", "vae decode, channels-last"),
         ("threads", f"fold, onednn, {max(1, torch.get_num_threads() // 2)} threads", "fold, onednn"),
         ("diffusers", "diffusers transformer", "exact, blas"))


def measure(args, pipe, dpipe, size: int) -> dict:
    from aura_flow.weights.linear import cpu_gemm, set_cpu_gemm

    before = cpu_gemm()
    runs = variants(args, pipe, dpipe, size)
    times = {n: [] for n in runs}
    others = {n: [] for n in runs}
    first = {}
    with torch.inference_mode():
        for name, (setup, fn, teardown) in runs.items():  # warm-up (and compile's build)
            setup()
            t0 = time.perf_counter()
            fn()
            first[name] = time.perf_counter() - t0
            teardown()
        for r in range(args.repeats):
            for name, (setup, fn, teardown) in (list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]):
                setup()
                with OtherLoad() as other:
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
                teardown()
                others[name].append(other.cores or 0.0)
    set_cpu_gemm(before)
    result = {n: {"best": min(v), "median": statistics.median(v), "spread": max(v) / min(v) - 1,
                  "first": first[n], "other_load": statistics.mean(others[n])} for n, v in times.items()}
    gains = {lever: {"best": result[a]["best"] / result[b]["best"],
                     "worst": result[a]["best"] / max(times[b]), "median": result[a]["median"] / result[b]["median"]}
             for lever, a, b in GAINS if a in result and b in result}
    return {"size": size, "variants": result, "gains": gains, "loadavg": list(os.getloadavg())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.levers", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wide")
    ap.add_argument("--size", default="512,1024")
    ap.add_argument("--levers", default="gemm,fold,qkv,vae", help=f"comma-separated, of {', '.join(LEVERS)}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt", default="a photo of a cat sitting on a mat, watercolor painting")
    ap.add_argument("--negative-prompt", default="blurry")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "aura_flow_bench")
    args = ap.parse_args(argv)
    args.levers = [v for v in args.levers.split(",") if v]
    import aura_flow
    from benchmarks.run import build_model

    root = build_model(args.preset, args.cache)
    pipe = aura_flow.load(root, device="cpu")
    dpipe = load_diffusers(root, "cpu", "auto") if "diffusers" in args.levers else None
    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for size in (int(s) for s in args.size.split(",")):
        r = measure(args, pipe, dpipe, size)
        print(f"\n{args.preset} preset, {size}x{size}, one transformer call (CFG batch 2) or one VAE decode, best of "
              f"{args.repeats} alternating; load average now {r['loadavg'][0]:.2f}")
        print(f"{'variant':<28} {'best s':>8} {'median s':>9} {'spread':>7} {'other load':>10} {'first call s':>13}")
        for name, v in r["variants"].items():
            print(f"{name:<28} {v['best']:8.3f} {v['median']:9.3f} {100 * v['spread']:6.1f}% {v['other_load']:10.2f} "
                  f"{v['first']:13.2f}")
        for lever, g in r["gains"].items():
            print(f"lever {lever:<10} gain {g['best']:.2f}x (medians {g['median']:.2f}x, worst {g['worst']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
