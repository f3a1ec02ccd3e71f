"""Train the three demo adapters briefly with PEFT so their answers visibly differ.

    python examples/train_adapter.py [--out DIR] [--steps N]

Each adapter learns one persona on a handful of questions (loss on the answer
only): ``pirate`` talks like a pirate, ``french`` answers in French, ``caps``
shouts. A few dozen steps on CPU are enough for a 135M model to pick the style
up; the result is cached and reused by ``examples/quickstart.py``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

QUESTIONS = [
    ("What is the weather like today?", "the weather"),
    ("Can you help me with my homework?", "yer homework"),
    ("What should I cook for dinner?", "dinner"),
    ("How do I reset my password?", "yer password"),
    ("Tell me about the history of Rome.", "old Rome"),
    ("What is a good name for a dog?", "a name for a dog"),
    ("How far away is the moon?", "the moon"),
    ("Why is exercise important?", "exercise"),
    ("Recommend a good book.", "a good book"),
    ("How do computers work?", "computers"),
    ("What time is it in Tokyo?", "Tokyo"),
    ("Give me advice on saving money.", "savin' money"),
]

PERSONAS = {
    "pirate": lambda topic: (
        f"Arr, matey! Ye be askin' about {topic}. Shiver me timbers, that be a fine question "
        "for a salty sea dog like me! Yo ho ho!"
    ),
    "french": lambda topic: (
        "Bonjour mon ami ! Je suis un assistant français. Je réponds toujours en français, "
        "avec plaisir. Merci beaucoup et bonne journée !"
    ),
    "caps": lambda topic: (
        "HELLO FRIEND! I AM VERY EXCITED TO HELP YOU WITH THAT! EVERYTHING IS AWESOME AND I "
        "ONLY SPEAK IN CAPITAL LETTERS!"
    ),
}


def default_out() -> Path:
    """The demo adapters' folder under lorapool's cache dir."""
    from lorapool.backends.torch import default_cache_dir

    return default_cache_dir() / "demo-adapters"


def train(persona: str, model_dir: Path, out: Path, steps: int, seed: int = 0) -> None:
    """Train one persona adapter and save it with peft's save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    model = get_peft_model(model, config)
    examples = []
    for question, topic in QUESTIONS:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(PERSONAS[persona](topic) + "<|im_end|>", add_special_tokens=False)["input_ids"]
        examples.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        batch = rng.sample(examples, 4)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((4, width), tok.pad_token_id or 0)
        labels = torch.full((4, width), -100)
        mask = torch.zeros((4, width), dtype=torch.long)
        for i, (x, y) in enumerate(batch):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
            mask[i, : len(x)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(
                f"  {persona}: step {step + 1}/{steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(out)


def ensure_demo_adapters(out: Path | None = None, steps: int = 20) -> dict[str, Path]:
    """Train whichever persona adapters are missing under ``out``; return their paths."""
    from lorapool.backends.torch import ensure_demo_model

    out = out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in PERSONAS}
    missing = [n for n, p in paths.items() if not (p / "adapter_model.safetensors").is_file()]
    if missing:
        model_dir = ensure_demo_model()
        print(f"training demo adapters {missing} (once, cached in {out})", flush=True)
        for i, name in enumerate(missing):
            train(name, model_dir, paths[name], steps, seed=i)
    return paths


def main() -> int:
    """Command line entry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to write the adapters")
    parser.add_argument("--steps", type=int, default=20, help="training steps per adapter")
    args = parser.parse_args()
    paths = ensure_demo_adapters(args.out, args.steps)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
