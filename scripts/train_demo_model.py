#!/usr/bin/env python
"""Trains gatescope's demo model: a small Llama (SwiGLU) on the Python standard library.

    pip install -e ".[train]"
    python scripts/train_demo_model.py            # about 40 minutes on 2 CPU cores

Data: the running interpreter's `Lib/**/*.py` files (no download), minus the held-out 10% of
files chosen by a stable hash of their path (`gatescope.demo.stdlib`), which gives the
held-out loss here and the demo's corpus later. Each file is one document: BOS, its tokens,
EOS; documents are concatenated into one stream and training windows are drawn from it at
random offsets.

Everything is seeded: the same seed, interpreter and machine (thread count) give the same
tokenizer and weights. The output folder is what the package ships: weights in float16
(safetensors), tokenizer, `training.json` (settings and the loss curve's numbers),
`loss_curve.png` and a model card (`README.md`).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from gatescope.demo import MODEL_FOLDER
from gatescope.demo.stdlib import HELD_OUT_PERCENT, stdlib_texts

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "gatescope" / "demo" / MODEL_FOLDER
BOS, EOS = "<s>", "</s>"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Output folder.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=192)
    parser.add_argument("--d-mlp", type=int, default=768)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2800)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--eval-windows", type=int, default=256)
    return parser.parse_args()


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenization) with BOS and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        add_bos_token=True,  # like Llama's: encoding with special tokens puts BOS first
        model_max_length=1 << 20,
    )


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one stream `[n_tokens]` (int64): BOS, tokens, EOS per document."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return torch.tensor([t for ids in encoded for t in (bos, *ids, eos)], dtype=torch.long)


def build_model(args: argparse.Namespace, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = args.d_model // args.head_dim
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.d_model,
        intermediate_size=args.d_mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=args.context,
        hidden_act="silu",
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def windows(stream: torch.Tensor, starts: torch.Tensor, context: int) -> torch.Tensor:
    """Windows `[len(starts), context + 1]` of the stream: inputs and their next tokens."""
    return stream[starts[:, None] + torch.arange(context + 1)]


@torch.no_grad()
def mean_loss(model, batches: torch.Tensor) -> float:
    """Mean next-token loss over windows `[n, context + 1]`, 16 at a time."""
    model.eval()
    losses = [_loss(model, chunk).item() for chunk in batches.split(16)]
    model.train()
    return sum(losses) / len(losses)


def _loss(model, window: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=window[:, :-1]).logits  # [batch, context, vocab]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())


def main() -> None:
    args = parse_args()
    try:
        import matplotlib
    except ImportError:
        sys.exit("matplotlib is needed for the loss curve: pip install -e '.[train]'")
    matplotlib.use("Agg")
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()

    train_texts = list(stdlib_texts("train").values())
    held_out_texts = list(stdlib_texts("held-out").values())
    print(f"data: {len(train_texts)} training files, {len(held_out_texts)} held-out files")
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train = token_stream(tokenizer, train_texts)
    held_out = token_stream(tokenizer, held_out_texts)
    print(
        f"tokens: {len(train):,} training, {len(held_out):,} held-out "
        f"({time.perf_counter() - started:.0f} s)"
    )

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {args.layers} layers, d_model {args.d_model}, d_mlp {args.d_mlp}, "
        f"{n_params / 1e6:.2f}M parameters"
    )
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    # Fixed held-out windows, evenly spaced over the held-out stream.
    last_start = len(held_out) - args.context - 1
    eval_batches = windows(
        held_out, torch.linspace(0, last_start, args.eval_windows).long(), args.context
    )

    curve = {"step": [0], "tokens": [0], "train": [None], "held_out": []}
    curve["held_out"].append(mean_loss(model, eval_batches))
    print(f"step 0: held-out loss {curve['held_out'][0]:.3f} (untrained)")
    running, train_started = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, args)
        starts = torch.randint(
            0, len(train) - args.context - 1, (args.batch_size,), generator=generator
        )
        loss = _loss(model, windows(train, starts, args.context))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            curve["step"].append(step)
            curve["tokens"].append(step * args.batch_size * args.context)
            curve["train"].append(sum(running) / len(running))
            curve["held_out"].append(mean_loss(model, eval_batches))
            running = []
            elapsed = time.perf_counter() - train_started
            print(
                f"step {step}/{args.steps}: train loss {curve['train'][-1]:.3f}, held-out "
                f"loss {curve['held_out'][-1]:.3f}, {elapsed / 60:.1f} min",
                flush=True,
            )
    minutes = (time.perf_counter() - started) / 60
    save(args, model, tokenizer, curve, minutes, n_params, len(train), len(held_out))
    print(f"saved to {args.out} ({minutes:.1f} min in all)")


def save(args, model, tokenizer, curve, minutes, n_params, n_train, n_held_out) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.iterdir():
        stale.unlink()
    model.to(torch.float16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    # The generic class name loads on transformers 4 as well as 5 (which writes its own).
    config_path = args.out / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.pop("out")
    record = {
        "settings": settings,
        "parameters": n_params,
        "train_tokens": n_train,
        "held_out_tokens": n_held_out,
        "held_out_percent": HELD_OUT_PERCENT,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "minutes": round(minutes, 1),
        "curve": curve,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(curve, args.out / "loss_curve.png")
    (args.out / "README.md").write_text(model_card(record))


def plot(curve: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    tokens = [t / 1e6 for t in curve["tokens"]]
    ax.plot(tokens[1:], curve["train"][1:], label="train (mean since last point)")
    ax.plot(tokens, curve["held_out"], label="held-out files", marker=".")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_ylim(0, min(8.5, max(curve["held_out"]) + 0.2))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("gatescope demo model on the Python standard library")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def model_card(record: dict) -> str:
    s = record["settings"]
    final, untrained = record["curve"]["held_out"][-1], record["curve"]["held_out"][0]
    trained_tokens = s["steps"] * s["batch_size"] * s["context"]
    return f"""# gatescope demo model

A small Llama-architecture language model with a SwiGLU MLP, trained by
`scripts/train_demo_model.py` in the gatescope repository so that `gatescope demo` can show a
real trained gated-MLP model on any machine, offline. It is a toy for looking at neurons, not
a useful code model.

| | |
|---|---|
| architecture | `LlamaForCausalLM`: {s["layers"]} layers, d_model {s["d_model"]}, \
d_mlp {s["d_mlp"]} (SwiGLU), {s["d_model"] // s["head_dim"]} heads, context {s["context"]}, \
tied embeddings |
| parameters | {record["parameters"] / 1e6:.2f}M, stored in float16 |
| tokenizer | byte-level BPE, {s["vocab_size"]} tokens (`<s>` BOS, `</s>` EOS), \
trained on the same files |
| data | the `.py` files of the Python {record["python"]} standard library (`Lib/`), \
one document per file; {record["held_out_percent"]}% of the files held out by a stable \
hash of their path (`gatescope.demo.stdlib.is_held_out`) |
| tokens | {record["train_tokens"] / 1e6:.1f}M training, {record["held_out_tokens"] / 1e6:.2f}M \
held-out |
| training | {s["steps"]} steps of {s["batch_size"]} x {s["context"]} tokens \
({trained_tokens / 1e6:.1f}M tokens), AdamW (lr {s["lr"]}, cosine, weight decay 0.1), seed \
{s["seed"]} |
| time | {record["minutes"]} minutes on {record["threads"]} CPU threads, torch {record["torch"]} |
| held-out loss | **{final:.3f}** nats per token (untrained: {untrained:.3f}) |

![loss curve](loss_curve.png)

Load it like any Hugging Face model:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from gatescope.demo import model_path

model = AutoModelForCausalLM.from_pretrained(model_path())
tokenizer = AutoTokenizer.from_pretrained(model_path())
```
"""


if __name__ == "__main__":
    main()
