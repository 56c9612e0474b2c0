"""The same kept tokens on every CPU (issue #25, docs/diversity.md "Same result on every CPU"): the
selections of the diversity methods do not move with the BLAS kernel, torch's CPU capability or the thread
count. Each environment must be set before torch is imported, so each runs in its own process, which
selects on every case and prints the kept indices. The cases are drawn once, here, and handed over in a
file: torch's random normals are themselves computed by the CPU kernels and differ between the environments.

Run as a script (`python tests/test_portability.py CASES`) it prints those indices as JSON.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prunevlm
from prunevlm.methods import METHODS as REGISTRY
from prunevlm.methods.diversity import DENSE_TOKENS

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("flashvlm", "vispruner", "divprune", "cdpruner")
ENVIRONMENTS = {
    "default": {},
    "sse4_2": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ATEN_CPU_CAPABILITY": "default"},
    "one_thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
}
TOKENS, BUDGET, DIM, TEXT = 576, 64, 1024, 16


def case(kind: str, seed: int, tokens: int = TOKENS) -> dict:
    """Signals of one case: `exact` duplicates (a few distinct tokens, each repeated, saliency repeated with
    them), `ulp` near duplicates (the same, then one in three entries moved by one ulp), or `random`."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        tokens_ = torch.randn(tokens, DIM, generator=g)
        saliency = torch.rand(tokens, generator=g)
    else:
        distinct = 12 + seed % 13
        labels = torch.randint(distinct, (tokens,), generator=g)
        tokens_ = torch.randn(distinct, DIM, generator=g)[labels]
        saliency = torch.rand(distinct, generator=g)[labels]
        if kind == "ulp":
            moved = torch.rand(tokens, DIM, generator=g) < 1 / 3
            tokens_ = torch.where(moved, torch.nextafter(tokens_, torch.full_like(tokens_, torch.inf)), tokens_)
    text = torch.randn(1, TEXT, DIM, generator=g)
    return {"image_tokens": tokens_[None], "saliency": saliency[None], "text_embeds": text}


def cases() -> dict:
    """24 cases at N = 576 (8 of each kind), for every method, and one case of exact duplicates above
    DENSE_TOKENS for the neighbour-list path of FlashVLM and VisPruner: name -> (method, budget, signals)."""
    out = {}
    for kind in ("exact", "ulp", "random"):
        for seed in range(8):
            signals = case(kind, seed)
            for method in METHODS:
                wanted = REGISTRY[method].signals + REGISTRY[method].optional_signals
                taken = {name: value for name, value in signals.items() if name in wanted}
                out[f"{method}/{kind}/{seed}"] = (method, BUDGET, taken)
    large = case("exact", 0, tokens=DENSE_TOKENS + 256)
    out["flashvlm/lists"] = ("flashvlm", 256, large)
    out["vispruner/lists"] = ("vispruner", 256, {k: v for k, v in large.items() if k != "text_embeds"})
    return out


def kept_indices(path: str) -> dict:
    """The kept indices of every case in the file at `path`."""
    return {name: prunevlm.select(method, budget, **signals).keep[0].tolist()
            for name, (method, budget, signals) in torch.load(path).items()}


def run_in(environment: dict, path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in {"MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY",
                                                               "OMP_NUM_THREADS", "MKL_NUM_THREADS"}}
    env.update(environment, PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("portability") / "cases.pt"
    torch.save(cases(), path)
    return {name: run_in(environment, path) for name, environment in ENVIRONMENTS.items()}


@pytest.mark.parametrize("environment", [name for name in ENVIRONMENTS if name != "default"])
def test_kept_tokens_do_not_move_with_the_cpu_kernels(results, environment):
    """Index-identical kept sets under another MKL / ATen kernel path and under one thread: compares what
    the rule of docs/diversity.md guarantees (fp64 similarities rounded to fp32, ties by position)."""
    default, other = results["default"], results[environment]
    assert default.keys() == other.keys()
    assert len(default) == 24 * len(METHODS) + 2
    moved = sorted(key for key in default if default[key] != other[key])
    assert moved == []


if __name__ == "__main__":
    print(json.dumps(kept_indices(sys.argv[1])))
