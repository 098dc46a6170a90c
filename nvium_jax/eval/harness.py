"""The lm-evaluation-harness adapter (DESIGN §3). Importing this module registers the lm-eval
model "nvium":

    lm_eval --model nvium --model_args run=runs/nvium-125m,step=20000 --tasks hellaswag
    nvium eval --run runs/nvium-125m --tasks hellaswag,arc_easy

model_args: `run` (a run dir), `step` (default the latest checkpoint), `exit` (score with exit
K's own distribution instead of the mixture, 0-based), `batch_size` (default 8), `sampling`
(how `generate_until` decodes: `mixture`, the default, or `exit`, the paper's decoder).

Encoding: a context is encoded as a prompt is — BOS first when the tokenizer has one; an
empty context is [BOS], else [EOS] — and the continuation is encoded on its own and
appended. `loglikelihood` sums the mixture's (or exit K's) log-probs of the continuation
tokens and says whether each was the argmax; `loglikelihood_rolling` scores a whole text
in windows of `model.context` (every token predicted once, each window but the first with
a full context); `generate_until` decodes with `generate` and cuts at the `until` strings.
Under `sampling=mixture` it samples the mixture (exact and deferred at temperature 1; greedy
and other temperatures act on the whole mixture, dense); under `sampling=exit` it routes
first and draws from the chosen exit, deferred for every task: a greedy task gets greedy
routing (exit where the exit logit wins) and the chosen exit's argmax — the paper's
deterministic decode — and a sampled one the learned gates with the task's temperature.
Scoring (`loglikelihood*`) is the mixture's (or exit K's) whatever `sampling` says.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from nvium_jax.config import ConfigError
from nvium_jax.eval.scoring import score_tokens

MIN_LENGTH = 16  # padded lengths are powers of two from here: few compiled shapes


def padded_length(n: int, context: int) -> int:
    return min(max(MIN_LENGTH, 1 << max(n - 1, 0).bit_length()), context)


def rolling_windows(tokens: list[int], prefix: int, context: int) -> list[tuple[list[int], int]]:
    """(window of at most `context` tokens, how many of its last targets to score) pairs
    that predict every token of `tokens` exactly once: the first window starts at `prefix`,
    each later one ends at its last new target with a full context before it."""
    windows, done, n = [], 0, len(tokens)
    while done < n:
        new = min(n - done, context)
        end = done + new
        start = max(end - context - 1, -1)  # -1 = the prefix token
        window = ([prefix] if start < 0 else []) + tokens[max(start, 0):end]
        windows.append((window, new))
        done = end
    return windows


@register_model("nvium")
class NviumLM(LM):
    """An N-vium (or baseline) run as an lm-eval model."""

    def __init__(self, run: str, step: Optional[int] = None, exit: Optional[int] = None,
                 batch_size: int | str = 8, max_batch_size: Optional[int] = None,
                 device: Optional[str] = None, seed: int = 0, sampling: str = "mixture", **_unused):
        super().__init__()
        from nvium_jax.runs import load_run

        if sampling not in ("mixture", "exit"):
            raise ConfigError(f"sampling={sampling}: use mixture (the learned distribution) or exit "
                              f"(route first, then sample the chosen exit)")
        self.sampling = sampling
        self.loaded = load_run(run, None if step in (None, "") else int(step))
        self.model = self.loaded.model
        cfg = self.model.config
        if self.loaded.tokenizer is None:
            raise ConfigError(f"run {run} has no tokenizer.json: lm-eval tasks need text")
        self.exit = None if exit in (None, "") else int(exit)
        if self.exit is not None and not 0 <= self.exit < cfg.n_exits:
            raise ConfigError(f"exit={exit}: run {run} has exits 0..{cfg.n_exits - 1} "
                              f"(0 = shallowest, {cfg.n_exits - 1} = final)")
        auto = str(batch_size).startswith("auto")  # lm-eval's "auto": a fixed batch here
        self.batch = (max_batch_size or 8) if auto else int(batch_size)
        self.context = cfg.context
        self.seed = int(seed)

    # ---- encoding -------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.loaded.tokenizer.encode(text, add_special_tokens=False).ids

    @property
    def prefix_id(self) -> int:
        run = self.loaded
        return run.bos_id if run.bos_id is not None else run.eos_id

    def context_ids(self, context: str) -> list[int]:
        """A context as a prompt: BOS first when the tokenizer has one; empty → [BOS] or [EOS]."""
        ids = self.encode(context) if context else []
        if self.loaded.bos_id is not None:
            return [self.loaded.bos_id, *ids]
        return ids or [self.loaded.eos_id]

    # ---- scoring --------------------------------------------------------------------
    def score_sequences(self, sequences: list[list[int]], n_scored: list[int]) -> list[tuple[float, bool]]:
        """Σ log p of the last n tokens of each sequence given the tokens before it, and
        whether each of them was the argmax; sequences longer than the context keep their
        last context+1 tokens."""
        results: list[Optional[tuple[float, bool]]] = [None] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        for at in range(0, len(order), self.batch):
            rows = order[at:at + self.batch]
            cut = [sequences[i][-(self.context + 1):] for i in rows]
            T = padded_length(max(len(s) - 1 for s in cut), self.context)
            inputs_BxT = np.zeros((self.batch, T), np.int32)
            targets_BxT = np.zeros((self.batch, T), np.int32)
            for b, seq in enumerate(cut):
                inputs_BxT[b, :len(seq) - 1] = seq[:-1]
                targets_BxT[b, :len(seq) - 1] = seq[1:]
            scores = score_tokens(self.model, inputs_BxT, targets_BxT)
            if self.exit is None:
                logp_BxT, argmax_BxT = scores.mixture_logp_BxT, scores.mixture_argmax_BxT
            else:
                logp_BxT, argmax_BxT = scores.exit_logp_KxBxT[self.exit], scores.exit_argmax_KxBxT[self.exit]
            for b, (i, seq) in enumerate(zip(rows, cut)):
                n = min(n_scored[i], len(seq) - 1)
                span = slice(len(seq) - 1 - n, len(seq) - 1)
                results[i] = (float(np.sum(logp_BxT[b, span], dtype=np.float64)),
                              bool(np.all(argmax_BxT[b, span] == targets_BxT[b, span])))
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        sequences, n_scored = [], []
        for request in requests:
            context, continuation = request.args
            cont = self.encode(continuation)
            sequences.append(self.context_ids(context) + cont)
            n_scored.append(len(cont))
        results = self.score_sequences(sequences, n_scored)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pieces, owner = [], []
        for r, request in enumerate(requests):
            for window in rolling_windows(self.encode(request.args[0]), self.prefix_id, self.context):
                pieces.append(window)
                owner.append(r)
        scored = self.score_sequences([w for w, _ in pieces], [n for _, n in pieces])
        totals = [0.0] * len(requests)
        for r, (logp, _) in zip(owner, scored):
            totals[r] += logp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation -----------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from nvium_jax.inference import DecodeOptions, generate

        results: list[Optional[str]] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(_sampling_key(request.args[1]), []).append(i)
        for (until, max_new, temperature), members in groups.items():
            if self.sampling == "exit":  # deferred always; greedy routing for greedy tasks
                decode, router = "deferred", 0.0 if temperature == 0.0 else 1.0
            else:
                decode, router = "deferred" if temperature == 1.0 else "dense", 1.0
            keep = max(min(self.context - max_new, self.context - 1), 1)  # prompt tokens kept
            for at in range(0, len(members), self.batch):
                rows = members[at:at + self.batch]
                prompts = [self.context_ids(requests[i].args[0])[-keep:] for i in rows]
                prompts += prompts[:1] * (self.batch - len(rows))  # one batch shape: one compile
                out = generate(self.model, prompts, max_new, seed=self.seed, decode=decode,
                               window=self.loaded.config.decode.window, eos_id=self.loaded.eos_id,
                               temperature=temperature, sampling=self.sampling,
                               router_temperature=router, options=DecodeOptions(attention=self.loaded.config.decode.attention))
                for b, i in enumerate(rows):
                    n = int(out.lengths_B[b])
                    ids = [t for t in out.tokens_BxN[b, :n].tolist() if t != self.loaded.eos_id]
                    text = cut_at(self.loaded.tokenizer.decode(ids), until)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results


def _sampling_key(gen_kwargs: dict) -> tuple:
    """(until strings, max new tokens, temperature) of a request; greedy is temperature 0."""
    kwargs = dict(gen_kwargs or {})
    until = kwargs.get("until") or []
    until = (until,) if isinstance(until, str) else tuple(until)
    max_new = int(kwargs.get("max_gen_toks", 256))
    do_sample = bool(kwargs.get("do_sample", False))
    temperature = float(kwargs.get("temperature", 1.0 if do_sample else 0.0))
    return until, max_new, temperature if do_sample else 0.0


def cut_at(text: str, until) -> str:
    """`text` up to the first occurrence of any `until` string."""
    cuts = [text.find(u) for u in until if u and u in text]
    return text[:min(cuts)] if cuts else text


def run_tasks(run_dir, tasks: list[str], *, include_path=None, limit=None, exit=None, step=None,
              batch_size: int = 8, sampling: str = "mixture") -> dict:
    """lm-eval's own evaluator on `tasks` (names, globs or YAML paths) for a run."""
    import lm_eval

    manager = _task_manager(tasks, include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ConfigError(
            f"unknown lm-eval task(s) {', '.join(unknown)}; list them with `lm_eval ls tasks`"
            + ("" if include_path else ", or pass --include-path DIR for your own YAML tasks"))
    args = {"run": str(run_dir), "exit": exit, "step": step}
    model = NviumLM(**{k: v for k, v in args.items() if v is not None}, batch_size=batch_size,
                    sampling=sampling)
    return lm_eval.simple_evaluate(model=model, tasks=list(tasks), limit=limit,
                                   task_manager=manager, log_samples=False)


def _task_manager(tasks, include_path):
    """Only the include path's YAMLs are indexed (fast) when they hold every task asked for."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            return local
    return TaskManager(include_path=str(include_path) if include_path else None)
