"""The bar tinymoe's training step must clear: PyTorch (CPU) running transformers'
DeepseekV3ForCausalLM on the same shape (the `bench` preset, batch 8 x 128), same thread count,
forward + backward + AdamW step. A measurement tool only: torch and transformers are never
dependencies of tinymoe. Run it with an environment that has them, e.g.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 transformers safetensors numpy
    /tmp/ref/bin/pip install -e . --no-deps
    /tmp/ref/bin/python scripts/bench_torch.py --threads 1
    /tmp/ref/bin/python scripts/bench_torch.py --threads 2

and compare with `python -m tinymoe.bench --only train` (same machine, same moment if you can:
the numbers move with background load).
"""
import argparse
import json
import os
import statistics
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from tinymoe.config import ModelConfig
    from tinymoe.hf import config_to_hf

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("bench")
    hf = config_to_hf(cfg, include_mtp=False)
    hf.pop("tinymoe", None)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf)).float()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    B, T = 8, 128
    ids = torch.randint(0, cfg.vocab_size, (B, T))

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()

    step()
    ts = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    med = statistics.median(ts)
    print(json.dumps({"threads": args.threads, "torch": torch.__version__,
                      "step_s": med, "tokens_per_s": B * T / med}))


if __name__ == "__main__":
    main()
