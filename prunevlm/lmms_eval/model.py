"""The lmms-eval model `prunevlm` (a "simple" model: requests carry the task's prompt text and its
doc_to_visual). It subclasses lmms-eval's `lmms`; the work is in `harness.PrunedModel`."""

from __future__ import annotations

import statistics

from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm import tqdm

from .harness import PrunedModel, parse_model_args
from ..errors import InvalidSetting, Unsupported


class PruningCounts(TokenCounts):
    """lmms-eval's per-sample token counts (`token_counts` of each logged sample), plus what the pruning did
    (`prunevlm`: visual tokens per image before and after, their layer average, prompt tokens before and
    after, the row's share of the batch's selection time). input_tokens is the prompt the LLM was given,
    after pruning. A response served from the response cache has no counts (lmms-eval stores only text)."""

    def __init__(self, row: dict):
        super().__init__(input_tokens=row["prompt_tokens_kept"], output_tokens=row["output_tokens"])
        self.pruning = {k: v for k, v in row.items() if k != "output_tokens"}

    def to_dict(self) -> dict:
        return {**super().to_dict(), "prunevlm": self.pruning}


class PruneVLM(lmms):
    """`--model prunevlm --model_args pretrained=...,method=flashvlm,budget=64[,option_eta=0.3][,config=FILE]`.

    Every pruning setting is a model_arg, so it is part of lmms-eval's response-cache key. Under `accelerate
    launch` each process holds a full replica on its own GPU (data parallel)."""

    is_simple = True

    def __init__(self, batch_size: int | str = 1, device: str | None = None, **model_args):
        super().__init__()
        settings = parse_model_args(model_args)
        try:
            self.batch_size_per_process = int(batch_size)
        except ValueError:
            raise InvalidSetting(f"prunevlm takes a fixed --batch_size N (rows per generate call), got {batch_size!r}") from None
        if self.batch_size_per_process < 1:
            raise InvalidSetting(f"--batch_size must be >= 1, got {batch_size!r}")
        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:
            device = f"cuda:{self.accelerator.local_process_index}"
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.pruned = PrunedModel(settings, device or "auto")
        self._device = self.pruned.model.device
        self.rows: list[dict] = []  # per computed sample: its pruning stats (padding clones of other ranks excluded)

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_process

    def _visuals(self, request: Instance):
        """The images and video files (paths) of a request's document (a list), or None for a text-only request."""
        args = request.args
        if len(args) < 6:
            return None
        doc_to_visual, doc_id, task, split = args[2:6]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        if any(not isinstance(v, (Image.Image, str)) for v in visuals):
            kinds = sorted({type(v).__name__ for v in visuals})
            raise Unsupported(f"prunevlm prunes images and videos (video files); task {task!r} gives "
                                      f"{', '.join(kinds)} (audio?)")
        return [v if isinstance(v, str) else v.convert("RGB") for v in visuals] or None

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Batches of `batch_size` requests in their given order, one batch per set of generation kwargs."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        results: list = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="prunevlm generate")
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                batch = [requests[i] for i in indices[start:start + self.batch_size]]
                answers, stats = self.pruned.generate([self._visuals(r) for r in batch], [r.args[0] for r in batch],
                                                      dict(batch[0].args[1]))
                for i, request, answer, row in zip(indices[start:start + self.batch_size], batch, answers, stats):
                    results[i] = GenerationResult(answer, PruningCounts(row))
                    if not request.metadata.get("__padding_only__"):
                        self.rows.append(row)
                progress.update(len(batch))
        progress.close()
        self._log_summary()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Batches of `batch_size` requests in their given order (`PrunedModel.loglikelihood`)."""
        results = []
        for start in tqdm(range(0, len(requests), self.batch_size), disable=self.rank != 0, desc="prunevlm loglikelihood"):
            batch = requests[start:start + self.batch_size]
            contexts, continuations = [], []
            for request in batch:
                context, continuation = request.args[:2]
                if not isinstance(continuation, str):  # output_type loglikelihood: the task's doc_to_target
                    continuation = continuation(self.task_dict[request.task_name][request.args[5]][request.doc_id])
                contexts.append(context)
                continuations.append(continuation)
            results += self.pruned.loglikelihood([self._visuals(r) for r in batch], contexts, continuations)
        return results

    def generate_until_multi_round(self, requests) -> list:
        raise Unsupported("prunevlm does not run multi-round generation tasks; "
                                  "use single-turn generate_until or loglikelihood tasks")

    def _log_summary(self) -> None:
        if not self.rows:
            return
        images = [(b, a) for row in self.rows for b, a in zip(row["visual_tokens"], row["visual_tokens_kept"])]
        if images:
            logger.info(f"prunevlm: {len(self.rows)} samples, visual tokens per image "
                        f"{statistics.mean(b for b, _ in images):.1f} -> {statistics.mean(a for _, a in images):.1f}, "
                        f"selection {statistics.mean(r['selection_ms'] for r in self.rows):.2f} ms per sample")
