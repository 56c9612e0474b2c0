"""Constants the command line shares with the commands it starts, torch-free so that `prunevlm --help` stays
quick; `cli.py` is the top of the house and nothing imports it (tests/test_architecture.py)."""

RESULTS = "prunevlm-results"  # commands write under this folder of the working directory by default
BENCH_FAMILIES = ("llava", "next", "onevision", "qwen2_5vl", "qwen3vl")  # prunevlm bench --model-family (bench/models.py)
