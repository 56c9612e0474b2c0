"""Command line: prunevlm demo | methods | generate | bench | eval | calibrate.

Every flag is declared here and every input that can be checked without a model (budgets, methods, options,
configs, files, folders) is checked while parsing, before torch or transformers are imported: `prunevlm
--help` and a mistyped flag answer at once. The commands' work lives in their modules, imported on use.
"""

from __future__ import annotations

import argparse
import json
import os

from . import DEMO_CONFIGS, DEMO_MODEL
from .budget import BUDGET_SCOPES, VIDEO_SCOPES, Budget
from .defaults import BENCH_FAMILIES, RESULTS
from .errors import PruneError

DEMO_TYPE = "llava"  # the model_type of a demo-format folder (prunevlm/demo/build.py)
SEEDS = 2**32  # a calibration seed seeds Optuna's sampler, which takes [0, 2**32)
DTYPES = ("auto", "float32", "bfloat16", "float16")  # loading.DTYPES' names (that module imports torch)
VIDEO_BENCH_FAMILIES = ("qwen2_5vl", "onevision")  # bench/models.py VIDEO_FAMILIES (that module imports torch)


def parse_budget(text: str) -> Budget:
    """'64' -> 64 tokens per image, '0.25' -> a quarter of each image's tokens."""
    try:
        return Budget.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_budgets(text: str) -> list[Budget]:
    """'192,128,0.25' -> the budgets, each checked; a repeated one is kept once."""
    budgets = [parse_budget(part.strip()) for part in text.split(",") if part.strip()]
    if not budgets:
        raise argparse.ArgumentTypeError(f"give at least one budget, comma-separated (e.g. 64,32), got {text!r}")
    return list(dict.fromkeys(budgets))


def parse_option(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as JSON where possible (numbers, true/false, lists), else as a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"options are KEY=VALUE (e.g. eta=0.3), got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except RecursionError:
        raise argparse.ArgumentTypeError(f"option {key}: its JSON value is nested too deeply") from None
    except ValueError:  # not JSON: the text itself
        return key, value


def method_names(allow_none: bool):
    """A parser of comma-separated method names, checked against the registry (plus 'none', the unpruned
    model, where the command measures it); 'all' is every registered method (and 'none')."""

    def parse(text: str) -> list[str]:
        from .methods import METHODS

        known = [*(["none"] if allow_none else []), *METHODS]
        names = known if text.strip() == "all" else list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or [text]}; available: {', '.join(known)}")
        return names

    return parse


def frame_counts(text: str) -> list[int]:
    """'8,32,128' -> the frame counts of the bench's videos, each an int >= 1; a repeated one is kept once."""
    counts = list(dict.fromkeys(positive(part.strip()) for part in text.split(",") if part.strip()))
    if not counts:
        raise argparse.ArgumentTypeError(f"give at least one frame count, comma-separated (e.g. 8,32,128), got {text!r}")
    return counts


def existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no file {text!r}" + (" (it is a folder)" if os.path.isdir(text) else ""))
    return text


def video_source(text: str) -> str:
    """A video file, or a folder holding its frames as images (decoded when generate reads it)."""
    if os.path.isdir(text):
        from .loading import frame_files

        try:
            frame_files(text)
        except PruneError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no video file or folder of frames {text!r}")
    return text


def config_file(text: str) -> dict:
    """A saved pruning config, read and validated field by field (config.load_config)."""
    from .config import load_config

    try:
        return {**load_config(existing_file(text)), "path": text}
    except PruneError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def config_files(text: str) -> list[dict]:
    return [config_file(part.strip()) for part in text.split(",") if part.strip()]


def model_source(text: str) -> str:
    """A hub id (owner/name) or a local folder written by save_pretrained; a path that does not exist is
    refused here rather than by the hub client."""
    # a hub id is "name" or "owner/name"; anything else names a folder
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text or os.path.exists(text)
    if looks_local and not os.path.isdir(os.path.expanduser(text)):
        raise argparse.ArgumentTypeError(
            f"no folder {text!r}: give a local folder written by save_pretrained, or a hub id such as "
            f"llava-hf/llava-1.5-7b-hf"
        )
    if looks_local and not os.path.isfile(os.path.join(os.path.expanduser(text), "config.json")):
        raise argparse.ArgumentTypeError(f"{text!r} holds no config.json: it is not a model folder written by save_pretrained")
    return os.path.expanduser(text) if looks_local else text


def demo_model(text: str) -> str:
    """A local folder of a demo-format model: its config.json read here (no torch) says a LLaVA, so that a
    text-only LLM or another family is refused before from_pretrained fills in a 7B default around it."""
    folder = os.path.expanduser(text)
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{text!r} holds no config.json: give a demo-format model folder "
                                         f"(python -m prunevlm.demo.train --out DIR writes one)")
    try:
        with open(path) as f:
            config = json.load(f)
        model_type = config.get("model_type") if isinstance(config, dict) else None
    except (OSError, ValueError, RecursionError) as error:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {error}") from None
    if model_type != DEMO_TYPE:
        raise argparse.ArgumentTypeError(
            f"{text!r} holds a {model_type!r} model, not a demo-format {DEMO_TYPE!r} one (a LLaVA written by "
            f"prunevlm.demo.train); for other vision-language models use prunevlm generate --model")
    return folder


def eval_splits(text: str) -> list[str]:
    """Comma-separated held-out splits of the demo dataset for `prunevlm eval`."""
    from .demo.dataset import HELD_OUT

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in HELD_OUT]
    if not names or unknown or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct held-out splits from {', '.join(HELD_OUT)}")
    return names


def positive(text: str, least: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"must be an int >= {least}, got {text!r}")
    return value


def non_negative(text: str) -> int:
    return positive(text, least=0)


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < SEEDS:
        raise argparse.ArgumentTypeError(f"must be an int in [0, 2**32) (Optuna's sampler takes no other), got {text!r}")
    return value


def not_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}")
    return value


def add_machine_flags(parser, dtype_default: str = "auto") -> None:
    parser.add_argument("--device", default="auto", help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=DTYPES, default=dtype_default,
                        help="weights' dtype; auto: the checkpoint's (float32 for the demo model)")
    parser.add_argument("--threads", type=positive, default=None, help="torch CPU threads (default: torch's choice)")


def demo_model_folder(parser) -> None:
    parser.add_argument("--model", type=demo_model, default=DEMO_MODEL,
                        help="a demo-format model folder (default: the bundled demo model)")


def options_markdown() -> str:
    """Every method's options as markdown tables (docs/methods.md holds this text; a test keeps it equal)."""
    from . import list_methods

    parts = []
    for info in list_methods():
        if not info["option_help"]:
            continue
        lines = [f"**{info['name']}**", "", "| option | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for o in info["option_help"]:
            cells = [f"`{o['name']}`", o["type"], f"`{o['default']!r}`", o["allowed"] or "any",
                     o["help"] + (" (set by calibration)" if o["calibrated"] else "")]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def cmd_methods(args) -> None:
    from . import list_methods
    from .models import supported_models

    if args.markdown:
        print(options_markdown(), end="")
        return
    for info in list_methods():
        print(f"{info['name']:10s} {info['description']}")
        print(f"{'':10s} signals: {', '.join(info['signals'])}"
              + (f" (optional: {', '.join(info['optional_signals'])})" if info["optional_signals"] else ""))
        if args.verbose:
            for option in info["option_help"]:
                allowed = f", {option['allowed']}" if option["allowed"] else ""
                print(f"{'':12s}{option['name']} ({option['type']}{allowed}; default {option['default']!r}): {option['help']}")
        elif info["options"]:
            print(f"{'':10s} options: " + ", ".join(f"{k}={v}" for k, v in info["options"].items()))
    print("\nsupported models: " + ", ".join(supported_models()))


def cmd_generate(args) -> None:
    from .generate import run

    run(args)


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


def cmd_export_lmms_tasks(args) -> None:
    from .lmms_eval.tasks import export, usage

    print(usage(export(args.dir, args.images)))


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("prunevlm")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to a flag's help where the help does not say its default itself and there is one to
    say (not None, [] or False, nor a required flag's)."""

    def _get_help_string(self, action) -> str:
        help = action.help or ""
        if "(default" in help or action.required or action.default is None or action.default is False or action.default == []:
            return help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    formatter = HelpFormatter
    parser = argparse.ArgumentParser(prog="prunevlm", description="Visual token pruning for Hugging Face VLMs",
                                     formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"prunevlm {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, run) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, formatter_class=formatter)
        sub.set_defaults(run=run)
        return sub

    demo = command("demo", "the bundled demo model answers questions, unpruned and pruned, and draws the kept tokens", cmd_demo)
    demo_model_folder(demo)
    demo.add_argument("--questions", type=not_negative, default=4, help="test questions to show (one per image)")
    demo.add_argument("--crowded", type=not_negative, default=2,
                      help="questions about crowded scenes (12-30 small shapes) to show after them")
    demo.add_argument("--out", default="prunevlm-demo.png", help="PNG of the kept tokens (its folder is created)")
    add_machine_flags(demo)

    methods = command("methods", "list the methods, their signals and options", cmd_methods)
    methods.add_argument("--verbose", "-v", action="store_true", help="each option's type, allowed values, default and meaning")
    methods.add_argument("--markdown", action="store_true", help="the options as the markdown tables of docs/methods.md")

    gen = command("generate", "answer questions about images and videos, pruned (one prompt per image or video, or a "
                              "JSONL of rows, in batches)", cmd_generate)
    gen.add_argument("--model", type=model_source, required=True, help="hub id or local folder (from_pretrained)")
    gen.add_argument("--image", action="append", default=[], type=existing_file,
                     help="an image file; repeat for a batch (each image gets --prompt)")
    gen.add_argument("--video", action="append", default=[], type=video_source,
                     help="a video file (decoded with PyAV: pip install 'prunevlm[video]') or a folder of its frames "
                          "as images, in name order; repeat for a batch (each video gets --prompt, in a row after "
                          "the --image rows)")
    gen.add_argument("--video-frames", type=positive, default=16, help="frames sampled evenly from each --video")
    gen.add_argument("--video-scope", choices=VIDEO_SCOPES, default=None,
                     help="per_frame: the budget counts in each frame of a video; per_clip: over the whole video, whose "
                          "frames compete (Qwen2-VL/2.5-VL/3-VL, LLaVA-OneVision) (default: the config's, else "
                          "per_frame)")
    gen.add_argument("--prompt", default=None, help="the question, plain text: the chat template adds the image placeholder")
    gen.add_argument("--jsonl", type=existing_file, default=None,
                     help='rows {"image": path or [paths] or null, "prompt": text}; relative paths from the file\'s folder')
    gen.add_argument("--method", type=method_names(allow_none=True), default=None,
                     help="a method (prunevlm methods), or none for the unpruned model (default: flashvlm, or the config's)")
    gen.add_argument("--budget", type=parse_budget, default=None,
                     help="tokens per image (int) or fraction of each image (float in (0, 1]) (default: 64, or the config's)")
    gen.add_argument("--config", type=config_file, default=None, help="a saved config (e.g. from prunevlm calibrate)")
    gen.add_argument("--option", type=parse_option, action="append", default=[], help="method option KEY=VALUE (repeatable)")
    gen.add_argument("--positions", choices=["original", "compact"], default="original",
                     help="RoPE positions of kept tokens: original (required for Qwen's M-RoPE) or renumbered")
    gen.add_argument("--budget-scope", choices=BUDGET_SCOPES, default=None,
                     help="per_image: the budget counts over all of an image's crops; per_crop: in each crop, on its "
                          "unpadded tokens (LLaVA-NeXT/OneVision) (default: the config's, else per_image)")
    gen.add_argument("--batch-size", type=positive, default=8, help="rows per generate() call")
    gen.add_argument("--max-new-tokens", type=positive, default=64, help="tokens generated per answer, at most")
    gen.add_argument("--save-picture", default=None, metavar="PATH",
                     help="PNG of the kept tokens of the first batch (its folder is created)")
    gen.add_argument("--attn", default="sdpa", help="attn_implementation of the model")
    add_machine_flags(gen)

    bench = command("bench", "speed and memory of each method on a random-weight model", cmd_bench)
    bench.add_argument("--model-family", choices=BENCH_FAMILIES, default="llava",
                       help="llava: LLaVA-1.5, one 336 px crop; next: LLaVA-NeXT, a 672 x 672 image (5 crops); "
                            "onevision: LLaVA-OneVision, 768 x 768 (5 crops); qwen2_5vl: Qwen2.5-VL, 672 x 672 (576 "
                            "tokens); qwen3vl: Qwen3-VL, 768 x 768 (576 tokens)")
    bench.add_argument("--video-frames", type=frame_counts, default=None,
                       help="comma-separated frame counts (e.g. 8,32,128): the prompt is one video of each instead of "
                            "an image, measured in both video scopes (qwen2_5vl: 448 px frames, 128 tokens each, an "
                            "even count; onevision: 384 px, 196 tokens each)")
    bench.add_argument("--shape", default="small",
                       help="small: for a CPU (llava: CLIP ViT-L/14-336 + Llama h1024 x 8 layers; the other families "
                            "keep their tower's width and tokens with 4 tower layers); 7b: the released 7B/8B model, "
                            "for a GPU; tiny: for tests (the shapes of prunevlm/bench/models.py)")
    bench.add_argument("--budget-scope", choices=BUDGET_SCOPES, default="per_image",
                       help="what a budget counts: over the image's crops, or in each crop (docs/models.md §3)")
    bench.add_argument("--methods", type=method_names(allow_none=True), default="all",
                       help="comma-separated, or all; none is the unpruned model")
    bench.add_argument("--budgets", type=parse_budgets, default="576,192,128,64,32",
                       help="comma-separated tokens per image (per crop with --budget-scope per_crop)")
    bench.add_argument("--repeats", type=positive, default=3, help="timed rounds after one warm-up round (medians)")
    bench.add_argument("--decode-tokens", type=non_negative, default=16,
                       help="tokens generated per timed run; decode_ms is the median step (0: no decoding run)")
    bench.add_argument("--text-tokens", type=positive, default=40, help="prompt tokens around the image")
    bench.add_argument("--attn", default="sdpa", help="attn_implementation of the model")
    bench.add_argument("--diversity-tokens", type=not_negative, default=4608,
                       help="also time the diversity partition alone at this many tokens (8 frames x 576); 0 skips")
    bench.add_argument("--out", default=None,
                       help=f"JSON file, a .md table beside it (default {RESULTS}/bench-<shape>-<device>.json; other families bench-<family>-<shape>[-video]-<device>.json)")
    add_machine_flags(bench, dtype_default="auto")

    evaluation = command("eval", "accuracy and fidelity against budget on the demo's test and crowded splits",
                         cmd_eval)
    demo_model_folder(evaluation)
    evaluation.add_argument("--split", type=eval_splits, default="test,crowded",
                            help="comma-separated held-out splits: test (6 questions an image), crowded (3)")
    evaluation.add_argument("--images", type=positive, default=200, help="images per split")
    evaluation.add_argument("--methods", type=method_names(allow_none=False), default="all",
                            help="comma-separated (prunevlm methods), or all; vflowopt runs through --vflowopt's configs")
    evaluation.add_argument("--budgets", type=parse_budgets, default="64,32,16,8",
                            help="comma-separated: tokens per image (int) or fractions (float)")
    evaluation.add_argument("--vflowopt", type=config_files, default=",".join(DEMO_CONFIGS.values()),
                            help="calibrated VFlowOpt configs, comma-separated (default: the two shipped for the demo "
                                 "model); each also runs with the default options at its budget; '' skips")
    evaluation.add_argument("--batch-size", type=positive, default=48, help="questions per generate() call")
    evaluation.add_argument("--kv-samples", type=positive, default=16, help="single-sample runs for the KV-cache size")
    evaluation.add_argument("--out", default=f"{RESULTS}/eval", help="prefix of the .json, .md and .png files")
    add_machine_flags(evaluation)

    calibrate = command("calibrate", "search VFlowOpt's hyper-parameters for a budget (resumable)", cmd_calibrate)
    calibrate.add_argument("--model", type=model_source, default=None, help="hub id or local folder (default: the bundled demo model)")
    calibrate.add_argument("--data", type=existing_file, default=None,
                           help='JSONL, one {"image": path, "prompt": text} per line (default: the demo dataset)')
    calibrate.add_argument("--samples", type=positive, default=30, help="calibration samples (the official code uses 30)")
    calibrate.add_argument("--holdout", type=not_negative, default=100,
                           help="held-out samples to compare the result with the default config (0 skips)")
    calibrate.add_argument("--budget", type=parse_budget, required=True,
                           help="T, the layer-averaged fraction of visual tokens, in (0, 1)")
    calibrate.add_argument("--trials", type=positive, default=300, help="completed trials to reach in the study (official code: 300)")
    calibrate.add_argument("--initial", type=positive, default=27, help="random trials before the GP (official code: 27)")
    calibrate.add_argument("--seed", type=seed, default=0,
                           help="seeds the sampler of the search and the demo questions drawn, in [0, 2**32)")
    calibrate.add_argument("--storage", default=None,
                           help="Optuna storage URL or SQLite file (default: next to --out, .db); share it across workers")
    calibrate.add_argument("--study", default=None, help="study name (default: vflowopt-T<budget>)")
    calibrate.add_argument("--out", default=None, help=f"config JSON to write (default: {RESULTS}/vflowopt-T<budget>.json)")
    calibrate.add_argument("--batch-size", type=positive, default=16, help="samples per forward while scoring a trial")
    add_machine_flags(calibrate)

    lmms = command("export-lmms-tasks", "write the demo test split as lmms-eval tasks (docs/lmms-eval.md)",
                   cmd_export_lmms_tasks)
    lmms.add_argument("dir", help="folder for the images, the JSONL and the task YAML (created)")
    lmms.add_argument("--images", type=positive, default=200, help="test images; 6 questions each (as eval)")
    return parser


def check(args, parser) -> None:
    """Checks across flags, before anything is loaded."""
    if args.command == "generate":
        if args.method and len(args.method) > 1:
            parser.error(f"generate: give one --method, got {','.join(args.method)}")
        given = (("--budget", args.budget), ("--option", args.option), ("--config", args.config),
                 ("--budget-scope", args.budget_scope), ("--video-scope", args.video_scope),
                 ("--save-picture", args.save_picture))
        unused = [flag for flag, value in given if value]
        if args.method == ["none"] and unused:
            parser.error(f"generate: --method none runs the unpruned model, so {', '.join(unused)} would do nothing; "
                         f"drop {'it' if len(unused) == 1 else 'them'}, or give a pruning method")
        if args.jsonl and (args.image or args.video or args.prompt):
            parser.error("generate: give --jsonl, or --image/--video/--prompt, not both")
        if not args.jsonl and args.prompt is None:
            parser.error("generate: give --prompt (with --image or --video files, or alone for a text-only answer), "
                         "or --jsonl")
        if args.video_scope and not args.video:
            parser.error("generate: --video-scope says how the budget counts on a video; give --video, or drop it")
    if args.command == "bench" and args.video_frames:
        if args.model_family not in VIDEO_BENCH_FAMILIES:
            parser.error(f"bench: --video-frames runs on --model-family {' or '.join(VIDEO_BENCH_FAMILIES)}, not "
                         f"{args.model_family}")
        odd = [n for n in args.video_frames if n % 2]
        if args.model_family == "qwen2_5vl" and odd:
            parser.error(f"bench: Qwen2.5-VL merges 2 frames per temporal patch; give even frame counts, got {odd}")
    if args.command == "calibrate" and (args.budget.is_count or args.budget.value == 1):
        parser.error(f"calibrate: --budget is T in (0, 1), the layer-averaged fraction of visual tokens (a float "
                     f"such as 0.25, not a token count), got {args.budget}")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check(args, parser)
    try:
        args.run(args)
    except (PruneError, ValueError, TypeError, NotImplementedError, RuntimeError, OSError) as error:
        raise SystemExit(f"prunevlm {args.command}: {error}")


if __name__ == "__main__":
    main()
