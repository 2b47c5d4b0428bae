"""What LIME costs: parameters added by the metadata tables, and training step time against the backbone.

Usage: python benchmarks/overhead.py [--repeats 30]
Writes benchmarks/results/overhead.json and overhead.csv.
"""

import argparse
import platform
import statistics
import time

import torch
from common import save_results  # the benchmarks' shared helpers
from transformers import AutoConfig, AutoModelForCausalLM

from lime_hf import LimeConfig, LimeForCausalLM

# Llama-architecture configs of the paper's three sizes (their Gemma-style decoders are not public).
SIZE_CLASSES = {
    "500M": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=20, num_attention_heads=20),
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32),
    "2B": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=18),
}
STEP_CONFIG = dict(
    model_type="llama", vocab_size=8192, hidden_size=256, intermediate_size=768,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
)  # fmt: skip


def parameter_overhead() -> list[dict]:
    rows = []
    for name, sizes in SIZE_CLASSES.items():
        text_config = dict(model_type="llama", vocab_size=50_304, tie_word_embeddings=True, **sizes)
        with torch.device("meta"):
            model = LimeForCausalLM(LimeConfig(text_config=text_config))
        metadata = sum(p.numel() for p in model.metadata_embeddings.parameters())
        backbone = sum(p.numel() for p in model.language_model.parameters())
        rows.append(
            {
                "size_class": name,
                "backbone_params": backbone,
                "metadata_params": metadata,
                "metadata_rows": metadata // sizes["hidden_size"],
                "overhead_percent": 100 * metadata / backbone,
            }
        )
    return rows


def time_steps(batch_size: int, seq_len: int, repeats: int) -> dict:
    """Forward+backward+AdamW step of LIME (with pos+ner tags) vs the bare backbone, interleaved."""
    torch.manual_seed(0)
    lime = LimeForCausalLM(LimeConfig(text_config=STEP_CONFIG)).train()
    backbone = AutoModelForCausalLM.from_config(AutoConfig.for_model(**STEP_CONFIG)).train()
    backbone.load_state_dict(lime.language_model.state_dict())
    ids = torch.randint(0, STEP_CONFIG["vocab_size"], (batch_size, seq_len))
    tags = {"pos_ids": torch.randint(2, 53, ids.shape), "ner_ids": torch.randint(2, 40, ids.shape)}
    runs = {
        "backbone": (backbone, {}, torch.optim.AdamW(backbone.parameters())),
        "lime": (lime, tags, torch.optim.AdamW(lime.parameters())),
    }

    def step(name: str) -> float:
        model, extra, optimizer = runs[name]
        start = time.perf_counter()
        model(input_ids=ids, labels=ids, **extra).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for name in runs:  # warm-up
        step(name)
    times = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved so that machine noise hits both alike
        for name in runs:
            times[name].append(step(name))
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "batch_size": batch_size,
        "seq_len": seq_len,
        "repeats": repeats,
        "backbone_median_s": medians["backbone"],
        "lime_median_s": medians["lime"],
        "lime_over_backbone": medians["lime"] / medians["backbone"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    params = parameter_overhead()
    print(f"{'size':>6} {'backbone params':>16} {'metadata params':>16} {'overhead':>9}")
    for row in params:
        print(
            f"{row['size_class']:>6} {row['backbone_params']:>16,} {row['metadata_params']:>16,} "
            f"{row['overhead_percent']:>8.4f}%"
        )
    timing = time_steps(args.batch_size, args.seq_len, args.repeats)
    print(
        f"\ntrain step (batch {timing['batch_size']} x {timing['seq_len']}, median of {timing['repeats']}): "
        f"backbone {timing['backbone_median_s'] * 1e3:.1f} ms, LIME {timing['lime_median_s'] * 1e3:.1f} ms, "
        f"ratio {timing['lime_over_backbone']:.3f} (target <= 1.03)"
    )

    device = {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    report = {"parameters": params, "step_time": timing, "step_config": STEP_CONFIG, "device": device}
    save_results("overhead", report, params)


if __name__ == "__main__":
    main()
