"""The benchmark's report: the device's name, the markdown summary and table, and the files written."""

from __future__ import annotations

import json
import os
import platform

import torch


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
    """One line per measured row; a video report (rows with "frames") leads with the frames and the video
    scope ("-" for a row measured once for both, `efficiency.scope_free`), compares each row's prefill with
    the unpruned one of the same frame count, and gives the selection's share of the prefill it saves."""
    base = {r.get("frames"): r for r in rows if r["method"] == "none"}
    video = any("frames" in r for r in rows)
    both = {(r["frames"], r["method"], r["budget"]) for r in rows if r.get("video_scope") == "per_clip"}
    lines = [("| frames | video scope " if video else "") + "| method | budget | tokens at LLM input | TTFT ms | LLM prefill "
             "ms | prefill speed-up | selection ms | of which signals ms | selection / prefill "
             + ("| selection / prefill saved " if video else "") + "| decode ms/tok | KV cache MB | peak MB |",
             "|---|---" * video + "|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * video]
    for r in rows:
        if "refused" in r:
            continue
        first = base.get(r.get("frames"))
        speedup = f"{first['prefill_ms'] / r['prefill_ms']:.2f}x" if first else "-"
        share = f"{100 * r['selection_ms'] / r['prefill_ms']:.1f} %" if r["method"] != "none" else "-"
        selection = f"{r['selection_ms']:.2f}" + (f" (in LLM {r['llm_choice_ms']:.2f})" if r.get("llm_choice_ms") else "")
        decode = "-" if r.get("decode_ms") is None else f"{r['decode_ms']:.1f}"
        lead = of_saved = ""  # the video columns
        if video:
            scope = r["video_scope"] if (r["frames"], r["method"], r["budget"]) in both else "-"
            saved = first["prefill_ms"] - r["prefill_ms"] if first and r["method"] != "none" else 0
            lead = f"| {r['frames']} | {scope} "
            of_saved = f"| {100 * r['selection_ms'] / saved:.1f} % " if saved > 0 else "| - "
        lines.append(lead + f"| {r['method']} | {r['budget'] or 'all'} | {r['kept']} | {r['ttft_ms']:.0f} | {r['prefill_ms']:.1f} "
                     f"| {speedup} | {selection} | {r['signal_ms']:.2f} | {share} {of_saved}| {decode} | {r['kv_mb']:.2f} "
                     f"| {r['peak_mb']:.0f} |")
    lines += [f"\n{r['method']} at {r['budget']}" + (f" ({r['frames']} frames, {r['video_scope']})" if video else "")
              + f" refused: {r['refused']}" for r in rows if "refused" in r]
    return "\n".join(lines)


def selection_table(rows: list[dict], batches: list[int]) -> str:
    """Selection per image at each batch size (`timing.selection_per_image`), and the largest batch's share
    of the first's."""
    head = " | ".join(f"ms/image at batch {b}" for b in batches)
    lines = [f"| method | budget | {head} | batch {batches[-1]} / batch {batches[0]} |",
             "|---|---|" + "---|" * (len(batches) + 1)]
    for r in rows:
        times = [r[f"batch_{b}_ms_per_image"] for b in batches]
        ratio = f"{times[-1] / times[0]:.2f}" if times[0] > 0 else "-"
        lines.append(f"| {r['method']} | {r['budget']} | " + " | ".join(f"{t:.3f}" for t in times) + f" | {ratio} |")
    return "\n".join(lines)


def summary(report: dict) -> str:
    """The markdown of a report: what ran where, the table, and the diversity partition's times if measured."""
    prompt = (f"one video of {', '.join(map(str, report['video_frames']))} frames" if report.get("video_frames")
              else f"{report['crops']} crop(s) per image")
    text = (f"`{report['command']}` on {report['device']}, {report['model_family']} family ({prompt}, budgets "
            f"{report['budget_scope']}), {report['shape']} shape, {report['dtype']}, "
            f"median of {report['repeats']} runs, torch {report['torch']}\n\n{table(report['rows'])}\n")
    selection = report.get("selection_per_image")
    if selection:
        text += (f"\nSelection alone, outside the model, on signals of this shape (random values; median ms per "
                 f"image of one call on a batch):\n\n{selection_table(selection['rows'], selection['batches'])}\n")
    diversity = report["diversity_partition"]
    if diversity:
        text += (f"\nDiversity partition alone, N = {diversity['tokens']} -> {diversity['keep']} ("
                 + ", ".join(f"{k} schedule {v:.0f} ms" for k, v in diversity["median_ms"].items()) + ")\n")
    return text


def write(path: str, report: dict, markdown: str) -> None:
    """The report as JSON at `path` and its markdown beside it (same name, .md)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(markdown)
