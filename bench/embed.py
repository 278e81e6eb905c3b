"""Embedding speed on this machine, side by side in one process (JSON on stdout).

Compares, at batch 16 and 224x224 with 8 attributes:
  * ``embed_all`` (one trunk pass without layer4, all K heads batched) — the product path;
  * the reference path: K full forward passes (layer4 and the classifier included), one per attribute;
  * a plain torchvision ResNet-50 forward (one global embedding, what a user would otherwise run);
  * the product recipe's networks (late taps) on MobileNetV2 and EfficientNet-Lite0;
and reports images/s for both backbones under the product's default settings (channels_last,
allocator tuning), plus optional torch.compile (freezing), bfloat16 autocast (the product's
arithmetic on a CPU that computes bfloat16 natively) and an FX static-int8 trunk, the last two
with their cosine similarity to fp32. Rounds are interleaved and medians reported: this machine
is noisy.

    .venv/bin/python bench/embed.py [--rounds 5] [--compile] [--bf16] [--int8]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.models import resnet50

from agman_milvus.core.model import build_model
from agman_milvus.core.runtime import (
    configure_process,
    inference_autocast,
    native_bfloat16_cpu,
    tcmalloc_loaded,
)
from agman_milvus.core.schema import AttributeSchema
from agman_milvus.training.product import product_taps

SCHEMA = AttributeSchema.from_dict({f"attribute_{i}": 6 for i in range(8)})


def timed(fn: Callable[[], object], batch: int, repeats: int) -> float:
    """Images per second over ``repeats`` calls."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return batch * repeats / (time.perf_counter() - start)


def paired(samples: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of rate(a) / rate(b)."""
    return round(statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True)), 3)


def in_bfloat16(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``fn(x)`` under the product's bfloat16 autocast, asked for whatever this CPU does natively."""
    def run() -> torch.Tensor:
        with inference_autocast(torch.device("cpu"), "bfloat16"):
            return fn(x)
    return run


def reference_path(model, x: torch.Tensor) -> None:
    """The reference code's cost: one full forward (layer4 + classifier too) per attribute."""
    for k in range(len(SCHEMA)):
        model(x, k)


def int8_trunk(model, x: torch.Tensor):
    """FX static int8 quantisation of the trunk (mid + high stages); heads stay fp32."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    class Stages(torch.nn.Module):
        def __init__(self, trunk):
            super().__init__()
            self.trunk = trunk

        def forward(self, images):
            mid = self.trunk.forward_mid(images)
            return mid, self.trunk.forward_high(mid)

    stages = Stages(model.trunk).eval()
    prepared = prepare_fx(stages, get_default_qconfig_mapping("x86"), example_inputs=(x,))
    with torch.inference_mode():
        for _ in range(2):
            prepared(x)
    return convert_fx(prepared)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(freezing)")
    parser.add_argument("--bf16", action="store_true", help="also time bfloat16 autocast")
    parser.add_argument("--int8", action="store_true", help="also time an FX static-int8 trunk")
    args = parser.parse_args()
    configure_process()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)

    models = {
        bb: build_model("agman", schema=SCHEMA, backbone=bb).eval().to(memory_format=torch.channels_last)
        for bb in ("resnet50", "mobilenet_v2")
    }
    product = {  # the product recipe's networks (late taps, no top stage; Lite0's with the fine level)
        bb: build_model("agman", schema=SCHEMA, backbone=bb, taps=product_taps("agman", bb)).eval()
        .to(memory_format=torch.channels_last)
        for bb in ("mobilenet_v2", "efficientnet_lite0")
    }
    plain = resnet50(weights=None).eval().to(memory_format=torch.channels_last)
    cases: dict[str, Callable[[], object]] = {
        "resnet50.embed_all": lambda: models["resnet50"].embed_all(x),
        "torchvision_resnet50.forward": lambda: plain(x),
        "resnet50.reference_k_passes": lambda: reference_path(models["resnet50"], x),
        "mobilenet_v2.embed_all": lambda: models["mobilenet_v2"].embed_all(x),
        "mobilenet_v2.reference_k_passes": lambda: reference_path(models["mobilenet_v2"], x),
        "product.mobilenet_v2.embed_all": lambda: product["mobilenet_v2"].embed_all(x),
        "product.efficientnet_lite0.embed_all": lambda: product["efficientnet_lite0"].embed_all(x),
    }
    extra: dict[str, object] = {}
    compiled_fns: dict[str, Callable] = {}
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        for bb, model in models.items():
            compiled = torch.compile(model.embed_all)
            start = time.perf_counter()
            with torch.inference_mode():
                compiled(x)
            extra[f"{bb}.compile_seconds"] = round(time.perf_counter() - start, 1)
            cases[f"{bb}.embed_all.compiled"] = lambda c=compiled: c(x)
            compiled_fns[bb] = compiled
    ratios: dict[str, tuple[str, str]] = {}  # name -> (case, baseline case)
    if args.bf16:
        extra["native_bfloat16_cpu"] = native_bfloat16_cpu()
        for bb, model in {**models, **{f"product.{k}": v for k, v in product.items()}}.items():
            bf16_embed_all = in_bfloat16(model.embed_all, x)
            with torch.inference_mode():
                cosine = F.cosine_similarity(bf16_embed_all().float(), model.embed_all(x), dim=-1)
            extra[f"{bb}.bf16_cosine_to_fp32"] = {"median": round(cosine.median().item(), 5),
                                                 "min": round(cosine.min().item(), 5)}
            cases[f"{bb}.embed_all.bf16"] = bf16_embed_all
            ratios[f"{bb}.bf16_speedup"] = (f"{bb}.embed_all.bf16", f"{bb}.embed_all")
        for bb, compiled in compiled_fns.items():  # agman worker's default: compiled, bfloat16 here
            cases[f"{bb}.embed_all.compiled.bf16"] = in_bfloat16(compiled, x)
            ratios[f"{bb}.compiled_bf16_speedup_vs_compiled"] = (f"{bb}.embed_all.compiled.bf16",
                                                                 f"{bb}.embed_all.compiled")
    if args.int8:
        for bb, model in models.items():
            quantized = int8_trunk(model, x.contiguous())

            def int8_embed_all(m=model, q=quantized):
                mid, high = q(x.contiguous())
                fused, _ = m.fusion(mid, high)
                return m.head.forward_all(*m.head.project(fused))

            with torch.inference_mode():
                cosine = F.cosine_similarity(int8_embed_all(), model.embed_all(x), dim=-1)
            extra[f"{bb}.int8_cosine_to_fp32"] = {"median": round(cosine.median().item(), 5),
                                                  "min": round(cosine.min().item(), 5)}
            cases[f"{bb}.embed_all.int8_trunk"] = int8_embed_all

    samples: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(args.rounds):
            for name, fn in cases.items():
                repeats = 1 if "reference" in name else args.repeats
                samples[name].append(timed(fn, args.batch, repeats))
    medians = {name: round(statistics.median(v), 2) for name, v in samples.items()}
    result = {
        "batch": args.batch,
        "image_size": 224,
        "attributes": len(SCHEMA),
        "threads": torch.get_num_threads(),
        "tcmalloc": tcmalloc_loaded(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "images_per_second_median": medians,
        "images_per_second_range": {n: [round(min(v), 2), round(max(v), 2)] for n, v in samples.items()},
        # Paired per round (the cases of one round run back to back), then the median over
        # rounds: far steadier than a ratio of medians when the machine's load drifts.
        "ratios_median_of_rounds": {
            "resnet50.embed_all_speedup_vs_reference": paired(
                samples, "resnet50.embed_all", "resnet50.reference_k_passes"
            ),
            "mobilenet_v2.embed_all_speedup_vs_reference": paired(
                samples, "mobilenet_v2.embed_all", "mobilenet_v2.reference_k_passes"
            ),
            "resnet50.embed_all_cost_vs_plain_resnet50": paired(
                samples, "torchvision_resnet50.forward", "resnet50.embed_all"
            ),
            "product.efficientnet_lite0_cost_vs_mobilenet_v2": paired(
                samples, "product.mobilenet_v2.embed_all", "product.efficientnet_lite0.embed_all"
            ),
            **{name: paired(samples, a, b) for name, (a, b) in ratios.items()},
        },
        **extra,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
