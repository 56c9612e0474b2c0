"""`prunevlm bench`: time to first token, LLM prefill, selection, decode, KV cache and peak memory, per method
and budget, on a randomly initialised LLaVA-1.5-shaped model (speed does not depend on the weights).

Every figure is the median of `--repeats` rounds after a warm-up round, in one process; a round runs every
(method, budget) once, so a slow spell of a shared machine spreads over all rows:
- ttft_ms: generate(max_new_tokens=1) wall time: vision tower, selection, LLM prefill and the first token;
- prefill_ms: the language model's forward at prefill only (timed by hooks that run after the pruning hook);
- selection_ms: signal hooks + the LLM-input hook that matches, selects and gathers (`handle.stats.selection_ms`);
- for vflowopt the budget is the layer-averaged count; "tokens at LLM input" is its stage-0 count;
- decode_ms: one decoding step of the whole model (median over steps);
- kv_mb: keys and values held for the prompt after prefill;
- peak_mb: peak memory above the pre-call level during a separate generate(max_new_tokens=1): the CUDA
  allocator's peak, or on CPU the peak resident set size sampled every millisecond (glibc is told to map
  large blocks directly, so freed activations leave the resident set and a new peak is visible; that slows
  everything after it, so the memory runs come after all timings).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import statistics
import sys
import threading
import time

import torch

from .. import prune
from ..budget import Budget
from ..methods.diversity import bipartite_dedup
from ..models import get_adapter
from ..models.base import synchronize
from ..runtime.contract import output_cache
from .models import SHAPES, build_model, prompt_inputs

METHODS = ("none", "flashvlm", "vispruner", "vflowopt", "random", "uniform")
BUDGETS = (576, 192, 128, 64, 32)


def add_arguments(parser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small",
                        help="small: CLIP ViT-L/14-336 + Llama h1024 x 8 layers, for a CPU (default); "
                             "7b: LLaVA-1.5-7B, for a GPU; tiny: for tests")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated; 'none' is the unpruned model")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="comma-separated tokens per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=40, help="prompt tokens around the image")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--diversity-tokens", type=int, default=4608,
                        help="also time the diversity partition alone at this many tokens (8 frames x 576); 0 skips")
    parser.add_argument("--out", default=None,
                        help="JSON file, a .md table beside it (default benchmarks/results/bench-<shape>-<device>.json)")


class Stopwatch:
    """Times the language model's prefill and the whole model's decoding steps through hooks."""

    def __init__(self, model):
        self.model, self.prefill, self.steps = model, [], []
        adapter = get_adapter(model)
        lm = adapter.language_model
        self.handles = [
            lm.register_forward_pre_hook(lambda m, a, kw: self._start("lm"), with_kwargs=True),
            lm.register_forward_hook(lambda m, a, kw, out: self._stop("lm", kw), with_kwargs=True),
            model.register_forward_pre_hook(lambda m, a, kw: self._start("step"), with_kwargs=True),
            model.register_forward_hook(lambda m, a, kw, out: self._stop("step", kw), with_kwargs=True),
        ]
        self.started = {}

    def _start(self, name):
        synchronize(self.model.device)
        self.started[name] = time.perf_counter()

    def _stop(self, name, kwargs):
        synchronize(self.model.device)
        seconds = time.perf_counter() - self.started[name]
        embeds = kwargs.get("inputs_embeds")
        length = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
        if name == "lm" and length > 1:
            self.prefill.append(seconds)
        elif name == "step" and length == 1:
            self.steps.append(seconds)

    def remove(self):
        for handle in self.handles:
            handle.remove()


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator, or sampled resident set size on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _map_large_blocks()
            self.base = self.peak = _rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.running = False
            self.thread.join()
            self.bytes = max(self.peak, _rss()) - self.base


def _map_large_blocks() -> None:
    """glibc: serve blocks >= 128 KiB with mmap (returned to the OS on free) and trim the heap."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; a fixed value also stops its dynamic growth
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def kv_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)


@torch.inference_mode()
def measure_once(model, inputs, method: str, budget: int, decode_tokens: int) -> dict:
    """One run of one (method, budget) with its pruning attached: a one-token generate (TTFT, prefill,
    selection, KV cache), then a `decode_tokens` generate (decode ms per token)."""
    handle = None if method == "none" else prune(model, method, budget)
    watch = Stopwatch(model)
    try:
        synchronize(model.device)
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
        synchronize(model.device)
        ttft = time.perf_counter() - start
        run = {"ttft_ms": 1000 * ttft, "prefill_ms": 1000 * watch.prefill[-1],
               "selection_ms": handle.stats.selection_ms if handle else 0.0,
               "kv_mb": kv_bytes(output_cache(out)) / 2**20,
               "kept": handle.stats.tokens_after[0][0] if handle else get_adapter(model).image_token_counts(inputs)[0]}
        del out
        watch.steps.clear()
        model.generate(**inputs, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False)
        run["decode_ms"] = 1000 * statistics.median(watch.steps)
    finally:
        watch.remove()
        if handle:
            handle.remove()
    return run


def measure(model, inputs, configs: list[tuple[str, int | None]], repeats: int, decode_tokens: int) -> list[dict]:
    """Median figures per (method, budget) over `repeats` rounds after a warm-up round.

    Each round runs every configuration once, so a slow spell of a shared machine spreads over all of
    them instead of landing on the few measured back to back while it lasts."""
    runs = {config: [] for config in configs}
    for round_ in range(repeats + 1):
        for method, budget in configs:
            run = measure_once(model, inputs, method, budget, decode_tokens)
            if round_:  # round 0 warms every configuration up
                runs[(method, budget)].append(run)
    rows = []
    for (method, budget), measured in runs.items():
        row = {"method": method, "budget": budget}
        for key in measured[0]:
            row[key] = measured[0][key] if key == "kept" else statistics.median(r[key] for r in measured)
        rows.append(row)
    return rows


@torch.inference_mode()
def peak_memory(model, inputs, method: str, budget: int) -> float:
    """MB above the pre-call level during generate(max_new_tokens=1). On CPU this changes how glibc maps
    memory for the rest of the process, which slows it down, so it runs after every timing."""
    handle = None if method == "none" else prune(model, method, budget)
    try:
        with PeakMemory(model.device) as memory:
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        if handle:
            handle.remove()
    return memory.bytes / 2**20


def diversity_timing(num_tokens: int = 4608, dim: int = 1024, repeats: int = 3) -> dict:
    """The diversity partition alone (default N = 4608, 8 frames x 576 tokens), keeping N/9, both schedules:
    median time after one untimed warm-up call, and the number of rounds."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, num_tokens, dim, generator=g)
    order = torch.randperm(num_tokens, generator=g)[None]
    timings, rounds = {}, {}
    for schedule in ("fixed", "geometric"):
        times, stats = [], {}
        for _ in range(repeats + 1):
            start = time.perf_counter()
            bipartite_dedup(features, order, num_tokens // 9, schedule=schedule, stats=stats)
            times.append(time.perf_counter() - start)
        timings[schedule], rounds[schedule] = 1000 * statistics.median(times[1:]), stats["rounds"]
    return {"tokens": num_tokens, "dim": dim, "keep": num_tokens // 9, "median_ms": timings, "rounds": rounds,
            "threads": torch.get_num_threads()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model_name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model_name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["method"] == "none"), None)
    lines = ["| method | budget | tokens at LLM input | TTFT ms | LLM prefill ms | prefill speed-up | selection ms "
             "| selection / prefill | decode ms/tok | KV cache MB | peak MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = f"{base['prefill_ms'] / r['prefill_ms']:.2f}x" if base else "-"
        share = f"{100 * r['selection_ms'] / r['prefill_ms']:.1f} %" if r["method"] != "none" else "-"
        lines.append(f"| {r['method']} | {r['budget'] or 'all'} | {r['kept']} | {r['ttft_ms']:.0f} | {r['prefill_ms']:.1f} | {speedup} "
                     f"| {r['selection_ms']:.2f} | {share} | {r['decode_ms']:.1f} | {r['kv_mb']:.2f} | {r['peak_mb']:.0f} |")
    return "\n".join(lines)


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # a repeated method or budget is measured once (dict keys keep the given order)
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    budgets = list(dict.fromkeys(Budget.parse(b).value for b in args.budgets.split(",") if b.strip()))
    print(f"building a random {args.shape}-shaped LLaVA ({dtype}, {device}, attn={args.attn})...", file=sys.stderr)
    model = build_model(args.shape, dtype, device, args.attn)
    inputs = prompt_inputs(model, args.text_tokens, device)
    configs = [(method, budget) for method in methods for budget in ([None] if method == "none" else budgets)]
    print(f"{len(configs)} configurations x {args.repeats + 1} rounds (the first warms up)...", file=sys.stderr)
    rows = measure(model, inputs, configs, args.repeats, args.decode_tokens)
    diversity = diversity_timing(args.diversity_tokens) if args.diversity_tokens else None
    for row in rows:
        row["peak_mb"] = peak_memory(model, inputs, row["method"], row["budget"])
    report = {
        "command": "prunevlm bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "prunevlm bench",
        "device": device_name(device), "shape": args.shape, "dtype": str(dtype).replace("torch.", ""),
        "attn": args.attn, "repeats": args.repeats, "decode_tokens": args.decode_tokens,
        "text_tokens": args.text_tokens, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "rows": rows, "diversity_partition": diversity,
    }
    summary = (f"`{report['command']}` on {report['device']}, {args.shape} shape, {report['dtype']}, "
               f"median of {args.repeats} runs, torch {torch.__version__}\n\n{table(rows)}\n")
    if diversity:
        summary += (f"\nDiversity partition alone, N = {diversity['tokens']} -> {diversity['keep']} ("
                    + ", ".join(f"{k} schedule {v:.0f} ms" for k, v in diversity["median_ms"].items()) + ")\n")
    print("\n" + summary)
    out = args.out or f"benchmarks/results/bench-{args.shape}-{device.type}.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(summary)
    print(f"\nwrote {out} and its .md table")
    return report
