"""``embed_all`` throughput on an NVIDIA GPU: bf16 autocast + channels_last, both backbones.

    python bench/gpu_embed.py --batches 64 128 256   # JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from agman_milvus.core.model import build_model
from agman_milvus.core.schema import AttributeSchema

SCHEMA = AttributeSchema.from_dict({f"attribute_{i}": 6 for i in range(8)})


def throughput(model, batch: int, rounds: int, dtype: torch.dtype | None) -> list[float]:
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    rates = []
    with torch.inference_mode():
        for _ in range(3):  # warm-up (cuDNN autotuning)
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                model.embed_all(x)
        for _ in range(rounds):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                    model.embed_all(x)
            torch.cuda.synchronize()
            rates.append(10 * batch / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    results: dict[str, object] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for backbone in ("resnet50", "mobilenet_v2"):
        model = build_model("agman", schema=SCHEMA, backbone=backbone).cuda().eval()
        model = model.to(memory_format=torch.channels_last)
        for batch in args.batches:
            for label, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
                rates = throughput(model, batch, args.rounds, dtype)
                results[f"{backbone}.batch{batch}.{label}.images_per_second"] = round(
                    statistics.median(rates), 1
                )
        results[f"{backbone}.peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
