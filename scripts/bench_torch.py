"""tinymoe's training step side by side with PyTorch (CPU) running transformers'
DeepseekV3ForCausalLM on the same shape (the `bench` preset, batch 8 x 128, float32, forward +
backward + AdamW), quiet and with one competing CPU-bound process, in ONE run so the ratios
compare like with like. A measurement tool only: torch and transformers are never dependencies
of tinymoe. Run it with an environment that has them and sees tinymoe, e.g.

    python3 -m venv --system-site-packages /tmp/ref && /tmp/ref/bin/pip install torch transformers
    /tmp/ref/bin/python scripts/bench_torch.py            # --rounds 3 --repeats 7 (default)

Every measurement is a fresh interpreter; rounds alternate torch and tinymoe so background load
hits both alike; medians. Thread settings per row:
    1 / 2      forced: torch.set_num_threads(n); tinymoe TINYMOE_THREADS=n
    default    torch's default (all cores); tinymoe's default policy (tinymoe/threads.py)
`--worker torch N` measures one torch configuration and prints JSON (used by the main run).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

B, T = 8, 128
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
               "TINYMOE_THREADS")


def torch_worker(threads: str, repeats: int) -> dict:
    """Median step seconds of DeepseekV3ForCausalLM (threads: "1", "2" or "default")."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from tinymoe.config import ModelConfig
    from tinymoe.hf import config_to_hf

    if threads != "default":
        torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    cfg = ModelConfig.preset("bench")
    hf = config_to_hf(cfg, include_mtp=False)
    hf.pop("tinymoe", None)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf)).float()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, cfg.vocab_size, (B, T))

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()

    step()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(ts), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def _run(cmd: list, env: dict) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    full.update(env)
    full["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, full.get("PYTHONPATH")) if p)
    out = subprocess.run(cmd, env=full, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench_torch: {' '.join(cmd[:4])}... failed:\n{out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(threads: str, repeats: int) -> dict:
    """{"torch": result, "tinymoe": result} for one thread setting, each in a fresh interpreter."""
    torch_env = {} if threads == "default" else {"OMP_NUM_THREADS": threads}
    tiny_env = {} if threads == "default" else {"TINYMOE_THREADS": threads}
    code = ("import json, tinymoe.bench.train as t; "
            f"print(json.dumps(t.step_worker({repeats})))")
    return {"torch": _run([sys.executable, __file__, "--worker", threads, str(repeats)], torch_env),
            "tinymoe": _run([sys.executable, "-c", code], tiny_env)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per measurement")
    ap.add_argument("--threads", nargs="+", default=["1", "2", "default"],
                    help="thread settings to run (default: 1 2 default)")
    ap.add_argument("--no-busy", action="store_true", help="skip the busy-machine rows")
    ap.add_argument("--worker", nargs=2, metavar=("THREADS", "REPEATS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, REPO)
    if args.worker:
        print(json.dumps(torch_worker(args.worker[0], int(args.worker[1]))))
        return
    from tinymoe.bench._timing import Competitor

    loads = ["quiet"] + ([] if args.no_busy else ["busy"])
    res: dict = {}
    for _ in range(args.rounds):
        for load in loads:
            if load == "busy":
                with Competitor():
                    for th in args.threads:
                        res.setdefault((load, th), []).append(measure(th, args.repeats))
            else:
                for th in args.threads:
                    res.setdefault((load, th), []).append(measure(th, args.repeats))
    print(f"bench preset step, batch {B} x {T}, float32, forward + backward + AdamW; medians of "
          f"{args.rounds} alternating round(s) x {args.repeats} steps; busy = one competing "
          f"CPU-bound process; cpus {os.cpu_count()}")
    print(f"{'load':>6} {'threads':>8} {'torch ms':>9} {'tinymoe ms':>11} {'torch/tinymoe':>14}")
    for (load, th), rs in res.items():
        t_torch = statistics.median(r["torch"]["step_s"] for r in rs)
        t_tiny = statistics.median(r["tinymoe"]["step_s"] for r in rs)
        print(f"{load:>6} {th:>8} {1e3 * t_torch:>9.1f} {1e3 * t_tiny:>11.1f} "
              f"{t_torch / t_tiny:>13.2f}x")


if __name__ == "__main__":
    main()
