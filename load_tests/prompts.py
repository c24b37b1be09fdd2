"""The prompts a load test sends: a built-in set of short chat prompts, or a JSONL file.

Built-in prompts ask for explanations and stories so that greedy replies tend to run to
``max_tokens`` rather than stop after a sentence. ``prompt_for(i)`` makes every request
of a pass distinct even when there are more requests than prompts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

BUILTIN_PROMPTS: tuple[str, ...] = (
    "Explain how a rainbow forms, step by step.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Describe the water cycle to a ten-year-old.",
    "What are the main differences between a cat and a dog as pets?",
    "Explain what a computer's CPU does and how it works.",
    "Write a poem about autumn leaves falling in a quiet park.",
    "Give me five tips for learning a new language and explain each one.",
    "Describe a typical day in the life of a medieval blacksmith.",
    "Explain why the sky is blue.",
    "Write a letter to a friend describing your favourite holiday.",
    "How do bees make honey? Explain the whole process.",
    "Describe how to bake a simple loaf of bread.",
    "What is photosynthesis and why does it matter for life on Earth?",
    "Tell me a story about a robot who learns to paint.",
    "Explain how vaccines train the immune system.",
    "Describe the planets of the solar system one by one.",
    "What makes a good friend? Explain with examples.",
    "Write a short fairy tale about a clever fox and a proud crow.",
    "Explain how an airplane stays in the air.",
    "Describe the sounds and smells of a busy market in the morning.",
    "Give a beginner's guide to growing tomatoes at home.",
    "Explain what the internet is and how data travels across it.",
    "Write a diary entry of an astronaut on her first day in space.",
    "Why do we have seasons? Explain the Earth's tilt.",
    "Describe how a river shapes the land over thousands of years.",
    "Explain the rules of chess to someone who has never played.",
    "Write a short adventure story set in a snowy mountain village.",
    "What are the benefits of regular exercise? List and explain them.",
    "Explain how a refrigerator keeps food cold.",
    "Describe the life cycle of a butterfly.",
    "Tell me about the history of writing, from clay tablets to computers.",
    "Explain how money works and why people accept paper bills.",
    "Write a story about a lost puppy finding its way home.",
    "Describe what happens inside a volcano before it erupts.",
    "Give advice to a student starting at a new school, and explain why.",
    "Explain how sound travels and why we hear echoes.",
    "Write a description of a futuristic city in the year 2200.",
    "Explain what DNA is and what it does in our bodies.",
    "Describe how to plan a picnic for a group of friends.",
    "Explain how the moon causes tides in the ocean.",
)


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a JSONL file: one ``{"prompt": "..."}`` object a line, blank lines skipped."""
    prompts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON: {e}") from e
            prompt = obj.get("prompt") if isinstance(obj, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f'{path}:{lineno}: expected {{"prompt": "<non-empty text>"}}')
            prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def prompt_for(prompts: Sequence[str], i: int) -> str:
    """The i-th request's prompt; after one full cycle a suffix keeps each one distinct."""
    base = prompts[i % len(prompts)]
    cycle = i // len(prompts)
    return base if cycle == 0 else f"{base} (take {cycle + 1})"
