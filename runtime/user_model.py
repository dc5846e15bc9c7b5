"""Your own model under `zeroplan train` and `zeroplan autotune`: `--model module:function`.

The contract (examples/user_model.py is a complete one):

    def build() -> tuple[torch.nn.Module, Callable[[int, int], Batch]]:
        model = MyModel(...)
        def get_batch(micro_batch_size: int, index: int) -> Batch:
            ...  # this rank's micro-batch number `index` (0, 1, 2, ... over the run)
        return model, get_batch

- `build` takes no arguments and is called once per rank, before the engine exists; the
  batch function is called after, when torch.distributed.get_rank() tells it which rank it
  serves (each rank should get its own data, as with any data-parallel loader);
- the model's forward returns the loss: a scalar tensor, a dict with "loss", or a tuple
  starting with it (as for `engine.train_batch`);
- a Batch is what the forward takes: a dict (called as `model(**batch)`), a tuple or list
  (`model(*batch)`), or one tensor. Integer 2-D tensors are read as token ids [batch, seq];
- `module` is an importable module name (the working directory is on the path) or a path to
  a .py file.

The compiler needs the model's shape (`ModelSpec`) for its memory and cost estimates;
`measure_spec` reads it from the model's Hugging Face config, or measures the module: see
there. A model with a `spec` attribute holding a ModelSpec (as the built-in GPT has) is taken
at its word.

    python -m zeroplan.runtime.user_model module:function -o model_spec.json
"""

from __future__ import annotations

import argparse
import json
import importlib
import importlib.util
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zeroplan.schemas import ConfigError, ModelSpec, Problem
from zeroplan.schemas.atomic import atomic_write_text

from . import lifeline
from .batches import call_model, loss_of
from .model_shape import spec_from_hf_config

BatchFn = Callable[[int, int], Any]
HEAD_ATTRS = ("num_heads", "n_head", "n_heads", "num_attention_heads", "heads")


def load_builder(ref: str) -> Callable[[], Any]:
    """The function `ref` names, or ConfigError saying what is wrong with it."""
    module_name, _, fn_name = ref.rpartition(":")
    if not module_name or not fn_name:
        raise ConfigError(Problem("--model", "expected module:function", given=ref,
                                  suggestion="e.g. --model my_model:build or --model path/to/model.py:build"))
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name).resolve()
            spec = importlib.util.spec_from_file_location(path.stem, path)
            if spec is None or not path.is_file():
                raise FileNotFoundError(str(path))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except (ImportError, FileNotFoundError) as e:
        raise ConfigError(Problem("--model", f"cannot import {module_name!r}: {e}", given=ref,
                                  suggestion="give an importable module or a .py file path")) from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(Problem("--model", f"{module_name!r} has no function {fn_name!r}", given=ref))
    return fn


def build_user_model(ref: str) -> tuple[nn.Module, BatchFn]:
    """Call the builder and check it kept the contract (see the module docstring)."""
    out = load_builder(ref)()
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module) and callable(out[1])):
        got = type(out).__name__ if not isinstance(out, tuple) else f"tuple of {len(out)}"
        raise ConfigError(Problem("--model", f"{ref} must return (nn.Module, get_batch), returned {got}",
                                  given=ref, suggestion="see examples/user_model.py for the contract"))
    return out


def user_batches(get_batch: BatchFn, *, micro_batch_size: int) -> Iterator[Any]:
    """This rank's micro-batches 0, 1, 2, ... for `engine.train_batch`."""
    index = 0
    while True:
        yield get_batch(micro_batch_size, index)
        index += 1


# -- the shape the compiler needs ------------------------------------------------------------

def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters() if p.requires_grad}.values())


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The longest ModuleList/Sequential of two or more children with equal, non-zero parameter counts."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            children = list(module.children())
            counts = {_params(c) for c in children}
            if len(children) >= 2 and len(counts) == 1 and counts != {0} and len(children) > len(best):
                best = children
    return best


def _width(model: nn.Module, blocks: list[nn.Module], embedding: nn.Embedding | None) -> int:
    if embedding is not None:
        return embedding.embedding_dim
    scope = blocks[0] if blocks else model
    widths = Counter(m.in_features for m in scope.modules() if isinstance(m, nn.Linear))
    if not widths:
        raise ConfigError(Problem("--model", f"cannot tell {type(model).__name__}'s width: it has no nn.Embedding "
                                  "and no nn.Linear", suggestion="give the model a `spec` attribute (a ModelSpec)"))
    return widths.most_common(1)[0][0]


def _heads(model: nn.Module, hidden: int) -> int:
    for module in model.modules():
        for attr in HEAD_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1 and hidden % value == 0:
                return value
    return 1


def tokens_per_sample(batch: Any) -> int:
    """Columns of the batch's first 2-D integer tensor (token ids), else 1 (one sample, one 'token')."""
    stack = [batch]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor):
            if not item.is_floating_point() and item.dim() == 2:
                return int(item.shape[1])
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return 1


def measure_spec(model: nn.Module, *, sample: Any, name: str) -> ModelSpec:
    """The shape its Hugging Face config gives (model_shape.py; seq_len from `sample` when it has
    token ids), else a GPT-shaped ModelSpec with the module's parameter count, depth and width:

    - parameters: every trainable parameter, tied ones once;
    - layers: the longest ModuleList/Sequential of identical-sized children (1 when none);
    - hidden: the largest nn.Embedding's width, else the commonest nn.Linear input width;
    - heads: the first `num_heads`/`n_head`/`heads`-like integer attribute that divides hidden, else 1;
    - vocab: the largest nn.Embedding's rows (whose matrix the LM head is taken to share);
      without one, the parameters outside the blocks, over hidden;
    - seq_len: tokens per sample in `sample` (its token-id tensor), else 1;
    - ffn: what makes the GPT block formula give the module's parameters per layer. A block
      lighter than a GPT block of that width (an MLP) is described at a smaller width with
      the same parameter count, so memory and FLOP estimates, which follow the parameter
      count, stay right; activation estimates are those of a GPT of that shape.
    """
    given = getattr(model, "spec", None)
    if isinstance(given, ModelSpec):
        return given
    seq = tokens_per_sample(sample)
    from_config = spec_from_hf_config(model, seq_len=seq if seq > 1 else None)
    if from_config is not None:
        return from_config.model_copy(update={"name": name})
    total = _params(model)
    if total == 0:
        raise ConfigError(Problem("--model", f"{type(model).__name__} has no trainable parameter"))
    blocks = _repeated_blocks(model)
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    embedding = max(embeddings, key=lambda m: m.weight.numel(), default=None)
    hidden, layers = _width(model, blocks, embedding), max(len(blocks), 1)
    heads = _heads(model, hidden)
    vocab = embedding.num_embeddings if embedding is not None else 1
    outside = vocab * hidden + seq * hidden + 2 * hidden if embedding is not None else 0
    per_layer = max((total - outside) // layers, 1)
    hidden, heads, ffn = _fit_block(per_layer, hidden=hidden, heads=heads)
    spec = ModelSpec(name=name, architecture="gpt", layers=layers, hidden=hidden, heads=heads, ffn=ffn,
                     vocab=vocab, seq_len=seq, tied_embeddings=True)
    if embedding is None:  # the rest of the parameters as an embedding matrix
        rest = total - spec.total_params + spec.vocab * spec.hidden
        spec = spec.model_copy(update={"vocab": max(rest // spec.hidden, 1)})
    return spec


def _fit_block(per_layer: int, *, hidden: int, heads: int) -> tuple[int, int, int]:
    """(hidden, heads, ffn) of a GPT block with about `per_layer` parameters, at `hidden` when it fits.

    A GPT block holds 4h^2 + 9h + f(2h + 1) parameters (schemas/model.py, `layer_params`).
    """
    while hidden > 1 and 4 * hidden * hidden + 11 * hidden + 1 > per_layer:
        hidden -= 1
    if hidden % heads:
        heads = 1
    ffn = max(round((per_layer - 4 * hidden * hidden - 9 * hidden) / (2 * hidden + 1)), 1)
    return hidden, heads, ffn


def measure_ref(ref: str, *, timing_threads: int | None = None) -> tuple[ModelSpec, float | None]:
    """Build `ref`'s model once (one process, no process group) and measure its spec and, when
    `timing_threads` is given, the seconds of one micro-step at micro-batch 1 on that many threads."""
    model, get_batch = build_user_model(ref)
    sample = get_batch(1, 0)
    spec = measure_spec(model, sample=sample, name=ref)
    return spec, None if timing_threads is None else micro_step_seconds(model, sample=sample, threads=timing_threads)


def micro_step_seconds(model: nn.Module, *, sample: Any, threads: int) -> float:
    """Forward + backward of one micro-batch on `threads` threads (a rank's share of the cores),
    best of 3 after one warm-up. The tuner sets its per-micro-step and per-block overhead prior
    from it (autotune/learned_cost.py): `zeroplan probe` times the built-in GPT, whose overheads
    are not this model's. Three steps of a model small enough to tune on one machine stay cheap."""
    from .probe import best_seconds

    torch.set_num_threads(max(threads, 1))

    def step() -> None:
        loss_of(call_model(model, sample)).backward()
        model.zero_grad(set_to_none=True)

    return best_seconds(step, reps=3, sync=lambda: None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zeroplan.runtime.user_model", description=__doc__.splitlines()[0])
    p.add_argument("model", help="module:function or path/to/file.py:function")
    p.add_argument("-o", "--output", type=Path, required=True, help="ModelSpec JSON to write")
    p.add_argument("--timing", type=Path, help="also time one micro-step at micro-batch 1 into this JSON file")
    p.add_argument("--threads", type=int, default=1, help="threads for --timing (a rank's share of the cores)")
    args = p.parse_args(argv)
    if lifeline.bind_to_parent():  # started by the tuner (autotune/models.py): end with it
        lifeline.end_on_sigterm()
    try:
        spec, seconds = measure_ref(args.model, timing_threads=args.threads if args.timing else None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write_text(args.output, spec.model_dump_json(indent=2) + "\n")
    if args.timing:
        atomic_write_text(args.timing, json.dumps({"model": args.model, "micro_batch_size": 1, "threads": args.threads,
                                                   "micro_step_s": seconds}) + "\n")
    print(f"{args.model}: {spec.total_params:,} parameters as layers={spec.layers} hidden={spec.hidden} "
          f"heads={spec.heads} ffn={spec.ffn} vocab={spec.vocab} seq_len={spec.seq_len}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
