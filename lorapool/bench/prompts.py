"""The prompts the engine benchmarks send (``bench engine`` and its ``--contention`` runs)."""

from __future__ import annotations

__all__ = ["PROMPTS", "chat"]

PROMPTS = [
    "Summarise this support ticket: my order arrived late and the box was damaged.",
    "Write a short poem about the ocean at night.",
    "Explain what a hash table is to a new programmer.",
    "List three tips for staying focused while working from home.",
    "What are the main causes of inflation?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Give me a recipe idea that uses rice, eggs and spinach.",
    "Why do cats purr?",
]


def chat(prompt: str) -> list[dict[str, str]]:
    """One user message: ``prompt`` as a chat."""
    return [{"role": "user", "content": prompt}]
