"""gate_ and prune on real models of torchvision, timm and Hugging Face transformers.

    python -m bench.real_models [--libs torchvision timm transformers] [--models NAME ...]

A compatibility report, not a test: those libraries are not dependencies of gatedprune, and
each library missing from the environment is skipped (reported in the notes). Every model is
built from its library with random weights (nothing is downloaded) at tiny sizes where the
constructor allows, gated with ``gate_`` (channels and blocks), its gates set to a random state
(channel and head gates with ``log_alpha`` uniform in [-4, 4], each block gate closed with
probability 1/2), and pruned. Reported per model: what was gated (channel groups, groups kept
whole, residual blocks, attention layers whose heads are gated), the pruned model's FLOPs and
parameter fractions of the dense model's, its largest absolute and relative difference from the
gated model in eval mode on fresh inputs, whether ``cost(pruned) == cost(gated, hard=True)``,
whether the pruned model runs in train mode and gives outputs of the gated model's shapes there
(auxiliary heads run only in training), the largest difference of a fresh instance rebuilt
with ``export_plan`` / ``apply_plan`` and the pruned ``state_dict``, and the first line of any
exception. Hugging Face models are wrapped in ``forward(input) -> tensor`` (the first output),
as a user would to get a tensor.

Each model runs in its own process (tracing patches global state; one failure or a slow model
cannot affect the others) with ``--timeout`` seconds (default 300), one thread.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .common import command_line, write_results

VOCAB = 50


@dataclass(frozen=True)
class Case:
    library: str
    name: str
    build: Callable[[], nn.Module]
    sample: Callable[[int, torch.Generator], Tensor]


class FirstOutput(nn.Module):
    """``model(x)[0]``: a Hugging Face model's main output as a plain tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)[0]  # type: ignore[no-any-return]


def _images(size: int, channels: int = 3) -> Callable[[int, torch.Generator], Tensor]:
    def sample(b: int, gen: torch.Generator) -> Tensor:
        return torch.randn(b, channels, size, size, generator=gen)  # (B, C, H, W)

    return sample


def _tokens(b: int, gen: torch.Generator) -> Tensor:
    return torch.randint(0, VOCAB, (b, 8), generator=gen)  # (B, T)


def _torchvision_cases() -> list[Case]:
    import torchvision.models as tvm
    from torchvision.models import quantization as tvq

    img = _images(64)
    cases = [
        Case("torchvision", n, lambda n=n: getattr(tvm, n)(num_classes=10), img)  # type: ignore[misc]
        for n in (
            "resnet18",
            "resnet50",
            "resnext50_32x4d",
            "mobilenet_v2",
            "mobilenet_v3_small",
            "efficientnet_b0",
            "regnet_x_400mf",
            "regnet_y_400mf",
            "convnext_tiny",
            "densenet121",
            "shufflenet_v2_x0_5",
            "squeezenet1_1",
            "mnasnet0_5",
        )
    ]
    cases += [
        Case(
            "torchvision",
            "googlenet (aux_logits)",
            lambda: tvm.googlenet(num_classes=10, aux_logits=True, init_weights=True),
            img,
        ),
        Case(
            "torchvision",
            "quantization.resnet18 (float)",
            lambda: tvq.resnet18(quantize=False, num_classes=10),
            img,
        ),
        Case(
            "torchvision",
            "VisionTransformer (2 layers, 4 heads)",
            lambda: tvm.VisionTransformer(
                image_size=32,
                patch_size=8,
                num_layers=2,
                num_heads=4,
                hidden_dim=32,
                mlp_dim=64,
                num_classes=10,
            ),
            _images(32),
        ),
        Case(
            "torchvision",
            "SwinTransformer (2 stages, window 4)",
            lambda: tvm.swin_transformer.SwinTransformer(
                patch_size=[2, 2],
                embed_dim=16,
                depths=[2, 2],
                num_heads=[2, 4],
                window_size=[4, 4],
                num_classes=10,
            ),
            _images(32),
        ),
    ]
    return cases


def _timm_cases() -> list[Case]:
    import timm

    kwargs: dict[str, dict[str, object]] = {
        "vit_tiny_patch16_224": {
            "img_size": 32,
            "patch_size": 8,
            "depth": 2,
            "embed_dim": 32,
            "num_heads": 4,
        },
        "swin_tiny_patch4_window7_224": {
            "img_size": 32,
            "window_size": 4,
            "depths": (2, 2),
            "embed_dim": 16,
            "num_heads": (2, 4),
        },
        "levit_128s": {"img_size": 64},
    }
    names = [
        "resnet18",
        "resnet26d",
        "seresnext26d_32x4d",
        "efficientnet_b0",
        "mobilenetv3_small_100",
        "regnety_002",
        "convnext_atto",
        "ghostnet_100",
        "repvgg_a0",
        "rexnet_100",
        "dla34",
        "cspresnet50",
        "fastvit_t8",
        "vit_tiny_patch16_224",
        "swin_tiny_patch4_window7_224",
        "levit_128s",
    ]
    size = {"vit_tiny_patch16_224": 32, "swin_tiny_patch4_window7_224": 32}
    return [
        Case(
            "timm",
            n,
            lambda n=n: timm.create_model(  # type: ignore[misc]
                n, pretrained=False, num_classes=10, **kwargs.get(n, {})
            ),
            _images(size.get(n, 64)),
        )
        for n in names
    ]


def _transformers_cases() -> list[Case]:
    import transformers as hf

    small = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 16,
    }
    kv = {"num_key_value_heads": 2, "use_cache": False}
    builders: dict[str, Callable[[], nn.Module]] = {
        "BertModel": lambda: hf.BertModel(hf.BertConfig(**small)),
        "DistilBertModel": lambda: hf.DistilBertModel(
            hf.DistilBertConfig(
                vocab_size=VOCAB,
                dim=32,
                n_layers=2,
                n_heads=4,
                hidden_dim=64,
                max_position_embeddings=16,
            )
        ),
        "GPT2LMHeadModel": lambda: hf.GPT2LMHeadModel(
            hf.GPT2Config(
                vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4, use_cache=False
            )
        ),
        "LlamaForCausalLM": lambda: hf.LlamaForCausalLM(hf.LlamaConfig(**small, **kv)),
        "MistralModel": lambda: hf.MistralModel(hf.MistralConfig(**small, **kv)),
        "Qwen2Model": lambda: hf.Qwen2Model(hf.Qwen2Config(**small, **kv)),
        "T5EncoderModel": lambda: hf.T5EncoderModel(
            hf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        ),
    }
    cases = [
        Case("transformers", f"{n} ({attn})", lambda b=b, attn=attn: _hf(b, attn), _tokens)
        for n, b in builders.items()
        for attn in ("eager", "sdpa")
    ]
    cases.append(
        Case(
            "transformers",
            "ViTForImageClassification (eager)",
            lambda: _hf(
                lambda: hf.ViTForImageClassification(
                    hf.ViTConfig(
                        image_size=32,
                        patch_size=8,
                        hidden_size=32,
                        num_hidden_layers=2,
                        num_attention_heads=4,
                        intermediate_size=64,
                        num_labels=10,
                    )
                ),
                "eager",
            ),
            _images(32),
        )
    )
    return cases


def _hf(build: Callable[[], nn.Module], attn: str) -> nn.Module:
    model = build()
    model.config._attn_implementation = attn  # type: ignore[union-attr]
    return FirstOutput(model)


LIBRARIES: dict[str, Callable[[], list[Case]]] = {
    "torchvision": _torchvision_cases,
    "timm": _timm_cases,
    "transformers": _transformers_cases,
}


def _randomise(model: nn.Module, gen: torch.Generator) -> None:
    """Random gate states; random BatchNorm statistics, so that no layer is an identity."""
    from gatedprune.gates import HardConcreteGate
    from gatedprune.gating import InsertedGating

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0.0, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)  # type: ignore[operator]
        gating = next(m for m in model.modules() if isinstance(m, InsertedGating))
        for gate in gating.group_gates:
            if isinstance(gate, HardConcreteGate):
                gate.log_alpha.uniform_(-4.0, 4.0, generator=gen)
        for gate in gating.block_gates:
            if isinstance(gate, HardConcreteGate):
                closed = bool(torch.rand((), generator=gen) < 0.5)
                gate.log_alpha.fill_(-6.0 if closed else 6.0)


def _shapes(out: object) -> list[tuple[int, ...]]:
    """The shapes of every tensor in a (nested) model output."""
    if isinstance(out, Tensor):
        return [tuple(out.shape)]
    if isinstance(out, (tuple, list)):
        return [s for o in out for s in _shapes(o)]
    if isinstance(out, dict):
        return [s for o in out.values() for s in _shapes(o)]
    return []


def run_case(case: Case) -> dict[str, object]:
    """Gate, randomise, prune and check one model; a row of the report."""
    import gatedprune as gp
    from gatedprune.gating import apply_plan, export_plan

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    row: dict[str, object] = {"library": case.library, "model": case.name}
    t0 = time.perf_counter()
    try:
        model = case.build().eval()
        x = case.sample(2, gen)
        dense = gp.cost(model, x)
        summary = gp.gate_(model, x)
        row["channel_groups"] = len(summary.channel_groups)
        row["groups_whole"] = len(summary.ungated_groups)
        row["blocks"] = len(summary.blocks)
        row["attention_heads_gated"] = (
            len(summary.transformers) + len(summary.attentions) + len(summary.head_groups)
        )
        row["gates"] = summary.n_gates
        _randomise(model, gen)
        model.eval()
        hard = gp.cost(model, x, hard=True)
        pruned = gp.prune(model).eval()
        c = gp.cost(pruned, x)
        row["flops_fraction"] = c.flops / dense.flops
        row["params_fraction"] = c.params / dense.params
        row["cost_equal"] = (c.flops, c.params) == (float(hard.flops), float(hard.params))
        diff = scale = 0.0
        with torch.no_grad():
            for b in (2, 3):
                xi = case.sample(b, gen)
                ref = model(xi)
                diff = max(diff, float((pruned(xi) - ref).abs().max()))
                scale = max(scale, float(ref.abs().max()))
        row["max_abs_diff"] = diff
        row["relative_diff"] = diff / max(scale, 1e-30)
        with torch.no_grad():  # train mode (on copies: it updates BatchNorm statistics): the
            xi = case.sample(2, gen)  # pruned model must run where the gated one does
            shapes = [_shapes(copy.deepcopy(m).train()(xi)) for m in (model, pruned)]
        row["train_mode_runs"] = shapes[0] == shapes[1]
        fresh = apply_plan(case.build(), json.loads(json.dumps(export_plan(model))))
        fresh.load_state_dict(pruned.state_dict())
        with torch.no_grad():
            xi = case.sample(2, gen)
            row["replay_diff"] = float((fresh.eval()(xi) - model(xi)).abs().max())
    except Exception as e:
        lines = str(e).strip().splitlines()
        row["error"] = f"{type(e).__name__}: {lines[0][:160] if lines else ''}"
        traceback.print_exc(file=sys.stderr)
    row["seconds"] = time.perf_counter() - t0
    return row


def _child(library: str, name: str) -> None:
    case = next(c for c in LIBRARIES[library]() if c.name == name)
    print("ROW " + json.dumps(run_case(case)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--libs", nargs="+", default=list(LIBRARIES), choices=list(LIBRARIES))
    ap.add_argument("--models", nargs="+", default=None, help="only these model names")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        _child(*args.child)
        return
    rows: list[dict[str, object]] = []
    missing: list[str] = []
    versions: list[str] = []
    for lib in args.libs:
        if importlib.util.find_spec(lib) is None:
            missing.append(lib)
            continue
        try:
            cases = LIBRARIES[lib]()
            versions.append(f"{lib} {importlib.import_module(lib).__version__}")
        except Exception as e:
            missing.append(f"{lib} ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
            continue
        for case in cases:
            if args.models and case.name not in args.models:
                continue
            cmd = [sys.executable, "-m", "bench.real_models", "--child", lib, case.name]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            try:
                out = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=args.timeout, env=env
                )
                found = [ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")]
                row = (
                    json.loads(found[-1][4:])
                    if found
                    else {
                        "library": lib,
                        "model": case.name,
                        "error": f"process failed: {out.stderr.strip().splitlines()[-1:]}",
                    }
                )
            except subprocess.TimeoutExpired:
                row = {"library": lib, "model": case.name, "error": f"timeout {args.timeout} s"}
            print(row, flush=True)
            rows.append(row)
    columns = [
        "library",
        "model",
        "channel_groups",
        "groups_whole",
        "blocks",
        "attention_heads_gated",
        "gates",
        "flops_fraction",
        "params_fraction",
        "max_abs_diff",
        "relative_diff",
        "cost_equal",
        "train_mode_runs",
        "replay_diff",
        "seconds",
        "error",
    ]
    write_results(
        "real_models",
        [{k: r.get(k, "") for k in columns} for r in rows],
        title="gate_ and prune on real torchvision / timm / transformers models",
        command=command_line(),
        notes=(
            "Random weights, tiny configurations; gates set to a random state (not trained). "
            "attention_heads_gated: attention layers whose heads are gated. relative_diff: "
            "max_abs_diff / the gated output's largest magnitude. Libraries: "
            f"{', '.join(versions) or 'none'}; skipped (not importable): "
            f"{', '.join(missing) or 'none'}."
        ),
    )


if __name__ == "__main__":
    main()
