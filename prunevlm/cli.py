"""Command line: prunevlm demo | methods | generate | bench | eval | calibrate."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .budget import Budget


def parse_budget(text: str) -> Budget:
    """'64' -> 64 tokens per image, '0.25' -> a quarter of each image's tokens."""
    try:
        return Budget.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_option(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as JSON where possible (numbers, true/false), else as a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"options are KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cmd_methods(args) -> None:
    from . import list_methods
    from .models import supported_models

    for info in list_methods():
        print(f"{info['name']:10s} {info['description']}")
        print(f"{'':10s} signals: {', '.join(info['signals'])}"
              + (f" (optional: {', '.join(info['optional_signals'])})" if info["optional_signals"] else ""))
        if info["options"]:
            print(f"{'':10s} options: " + ", ".join(f"{k}={v}" for k, v in info["options"].items()))
    print("\nsupported models: " + ", ".join(supported_models()))


def cmd_generate(args) -> None:
    import torch
    from PIL import Image

    from . import prune
    from .loading import load, prompt_inputs

    model, processor = load(args.model, args.dtype, args.device, args.attn)
    try:
        image = Image.open(args.image).convert("RGB")
    except OSError as error:
        raise SystemExit(f"prunevlm generate: cannot read image {args.image!r}: {error}")
    inputs = prompt_inputs(processor, [image], [args.prompt], model.device)
    handle = None if args.method == "none" else prune(model, args.method, args.budget, positions=args.positions, **dict(args.option))
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    print(answer.strip())
    if handle is not None:
        stats = handle.stats
        print(f"[{args.method}, budget {args.budget}] visual tokens per image {stats.tokens_before[0]} -> "
              f"{stats.tokens_after[0]}; prompt {stats.prefill_before[0]} -> {stats.prefill_after[0]} tokens; "
              f"selection {stats.selection_ms:.1f} ms; generate {seconds:.2f} s", file=sys.stderr)
        handle.remove()
    else:
        print(f"[unpruned] prompt {int(inputs['attention_mask'].sum())} tokens; generate {seconds:.2f} s", file=sys.stderr)


def cmd_bench(args) -> None:
    from .bench.efficiency import run

    run(args)


def cmd_demo(args) -> None:
    from .demo.show import run

    run(args)


def cmd_eval(args) -> None:
    from .bench.evaluation import run

    run(args)


def cmd_calibrate(args) -> None:
    from .calibrate import run

    run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunevlm", description="Visual token pruning for Hugging Face VLMs")
    commands = parser.add_subparsers(dest="command", required=True)

    from .demo.show import add_arguments as demo_arguments

    demo = commands.add_parser("demo", help="the bundled demo model answers questions, unpruned and pruned")
    demo_arguments(demo)
    demo.set_defaults(run=cmd_demo)

    commands.add_parser("methods", help="list the methods, their signals and options").set_defaults(run=cmd_methods)

    gen = commands.add_parser("generate", help="answer a question about an image, pruned")
    gen.add_argument("--model", required=True, help="hub id or local folder (from_pretrained)")
    gen.add_argument("--image", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--method", default="flashvlm", help="a method name (prunevlm methods), or 'none'")
    gen.add_argument("--budget", type=parse_budget, default=Budget(64), help="tokens per image (int) or fraction (float)")
    gen.add_argument("--option", type=parse_option, action="append", default=[], help="method option KEY=VALUE")
    gen.add_argument("--positions", choices=["original", "compact"], default="original")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.add_argument("--device", default="auto")
    gen.add_argument("--attn", default="sdpa", help="attn_implementation of the model")
    gen.set_defaults(run=cmd_generate)

    from .bench.efficiency import add_arguments

    bench = commands.add_parser("bench", help="speed and memory of each method on a random-weight model")
    add_arguments(bench)
    bench.set_defaults(run=cmd_bench)

    from .bench.evaluation import add_arguments as eval_arguments

    evaluation = commands.add_parser("eval", help="accuracy and fidelity against budget on the demo test split")
    eval_arguments(evaluation)
    evaluation.set_defaults(run=cmd_eval)

    from .calibrate import add_arguments as calibrate_arguments

    calibrate = commands.add_parser("calibrate", help="search VFlowOpt's hyper-parameters for a budget (resumable)")
    calibrate_arguments(calibrate)
    calibrate.set_defaults(run=cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as error:
        raise SystemExit(f"prunevlm {args.command}: {error}")


if __name__ == "__main__":
    main()
