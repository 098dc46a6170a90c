"""Our matched baseline's decode against Hugging Face transformers + torch on the same CPU:
the same Llama shape (the 125m N-vium's parameter-matched baseline), fresh weights, the same
random prompts, float32, sampling at temperature 1. Decode tokens/s exclude the prefill on
both sides: HF's as generate(max_new_tokens=N) minus generate(max_new_tokens=1), ours as
the decode loop's own seconds. Interleaved repeats, medians.

    pip install torch transformers   # in any environment that also has nvium_jax
    python -m scripts.bench_hf [--config configs/nvium-125m.yaml] [--batch 1] \
        [--prompt-tokens 16] [--max-new-tokens 64] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def hf_model(cfg):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.context,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/nvium-125m.yaml")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)

    import torch

    from nvium_jax.config import load_config
    from nvium_jax.inference import DecodeOptions, generate
    from nvium_jax.model import build_model
    from nvium_jax.model.count import matched_baseline_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = matched_baseline_model(load_config(args.config).model)
    ours = build_model(cfg, seed=0)
    theirs = hf_model(cfg)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.prompt_tokens))
    prompts_t = torch.as_tensor(prompts)
    N = args.max_new_tokens

    def hf(n):
        start = time.perf_counter()
        with torch.no_grad():
            theirs.generate(prompts_t, attention_mask=torch.ones_like(prompts_t), do_sample=True,
                            top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=n, min_new_tokens=n,
                            pad_token_id=0)
        return time.perf_counter() - start

    def jax_decode():
        timings = {}
        generate(ours, prompts, N, decode="dense", options=DecodeOptions(timings=timings))
        return timings["decode_s"]

    hf(N), hf(1), jax_decode()  # warm up and compile
    hf_s, jax_s = [], []
    for _ in range(args.repeats):
        hf_s.append(hf(N) - hf(1))
        jax_s.append(jax_decode())
    tokens = args.batch * (N - 1)
    record = {
        "config": args.config, "shape": f"{cfg.n_layers} layers × {cfg.d_model}, d_ff {cfg.d_ff}",
        "batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": N,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "nvium_baseline_tokens_per_s": round(tokens / statistics.median(jax_s), 2),
        "hf_tokens_per_s": round(tokens / statistics.median(hf_s), 2),
    }
    record["ratio"] = round(record["nvium_baseline_tokens_per_s"] / record["hf_tokens_per_s"], 3)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
