"""The real pair's task: chat prompts whose reference answers the teacher writes itself, plus a checkable
subset whose answers a checker verifies against the truth (not against the teacher).

Open prompts ("Explain what a volcano is in one sentence.") measure how close the student gets to the
teacher (teacher-forced KL on the teacher's answers, the teacher's NLL of the student's own answers).
Checkable prompts (two-number sums, capitals, the alphabetically first of three words) have one right
answer, so accuracy says whether what the student writes is right, whatever the teacher wrote.
Everything is generated from fixed lists with a fixed seed: every machine builds the same prompts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

SUBJECTS = (
    "a volcano", "the moon", "photosynthesis", "a bicycle", "rain", "music", "bread", "a library", "the ocean",
    "electricity", "a computer", "friendship", "honey bees", "a river", "the sun", "chess", "trees", "a map",
    "snow", "a bridge", "coffee", "the internet", "a telescope", "gravity", "a forest", "a train", "clouds",
    "soap", "a piano", "the heart", "paper", "glass", "a desert", "recycling", "a camera", "salt", "wind",
    "a garden", "exercise", "sleep", "a clock", "the alphabet", "a rainbow", "an island", "a city", "milk",
    "a battery", "a mountain", "the weather", "a dictionary", "an airplane", "a hospital", "the brain",
    "a farm", "cheese", "a museum", "lightning", "a magnet", "a school", "the seasons", "a candle", "money",
    "a calendar", "a thermometer", "the stars", "a newspaper", "a bakery", "an umbrella", "a volcano's lava",
    "the desert sun", "a lighthouse", "a compass", "bamboo", "a kite", "a spider web", "the tide",
    "a fire truck", "an orchestra", "a microscope", "a wheel",
)
TEMPLATES = (
    "Explain what {x} is in one sentence.",
    "Give one interesting fact about {x}.",
    "Describe {x} to a child in two short sentences.",
    "Why is {x} useful? Answer briefly.",
    "Write one sentence about {x}.",
)
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra",
    "Brazil": "Brasilia", "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Austria": "Vienna", "Hungary": "Budapest", "Turkey": "Ankara", "India": "Delhi", "Kenya": "Nairobi",
    "Peru": "Lima", "Chile": "Santiago", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Cuba": "Havana", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Switzerland": "Bern", "South Korea": "Seoul", "Iran": "Tehran",
    "Iraq": "Baghdad", "Ukraine": "Kyiv", "Indonesia": "Jakarta", "the United Kingdom": "London",
}
WORDS = (
    "apple", "banana", "cherry", "dog", "elephant", "forest", "garden", "house", "island", "jacket", "kite",
    "lemon", "mountain", "night", "orange", "pencil", "queen", "river", "stone", "tiger", "umbrella", "violin",
    "window", "yellow", "zebra", "bread", "cloud", "dream", "eagle", "flower", "grape", "honey", "lamp",
    "music", "ocean", "paper", "rabbit", "sugar", "table", "water",
)
KINDS = ("open", "sum", "capital", "first_word")


@dataclass(frozen=True)
class RealTaskSpec:
    """How many prompts of each kind, and the splits (heal: the student's healing; train: the methods'
    prompts; eval: held out of both)."""

    num_sums: int = 120
    num_first_word: int = 80
    num_heal: int = 320
    num_train: int = 192
    seed: int = 0

    def total(self) -> int:
        return len(SUBJECTS) * len(TEMPLATES) + self.num_sums + len(CAPITALS) + self.num_first_word


def build_prompts(spec: RealTaskSpec = RealTaskSpec()) -> list[dict]:
    """Every prompt as {"prompt": [chat message], "kind", "answer" ("" for open prompts)}, shuffled by the
    seed; `split_prompts` cuts them into heal / train / eval."""
    rng = random.Random(spec.seed)
    rows = [{"text": t.format(x=x), "kind": "open", "answer": ""} for x in SUBJECTS for t in TEMPLATES]
    sums = set()
    while len(sums) < spec.num_sums:
        sums.add((rng.randint(1, 40), rng.randint(1, 40)))
    rows += [{"text": f"What is {a} + {b}? Reply with just the number.", "kind": "sum", "answer": str(a + b)}
             for a, b in sorted(sums)]
    rows += [{"text": f"What is the capital of {c}? Answer in one word.", "kind": "capital", "answer": city}
             for c, city in CAPITALS.items()]
    triples = set()
    while len(triples) < spec.num_first_word:
        triples.add(tuple(rng.sample(WORDS, 3)))
    rows += [{"text": f"Which word comes first in alphabetical order: {a}, {b} or {c}? Answer with the word only.",
              "kind": "first_word", "answer": min(a, b, c)} for a, b, c in sorted(triples)]
    rng.shuffle(rows)
    return [{"prompt": [{"role": "user", "content": r["text"]}], "kind": r["kind"], "answer": r["answer"]}
            for r in rows]


def split_prompts(rows: list[dict], spec: RealTaskSpec = RealTaskSpec()) -> dict[str, list[dict]]:
    """Heal / train / eval, each kind of prompt cut in the same proportions (num_heal : num_train : the
    rest), so that every split holds its share of every checkable kind."""
    if spec.num_heal + spec.num_train >= len(rows):
        raise ValueError(f"num_heal + num_train must leave prompts for eval: {spec.num_heal} + {spec.num_train} "
                         f">= {len(rows)} prompts")
    out = {"heal": [], "train": [], "eval": []}
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        heal = round(len(mine) * spec.num_heal / len(rows))
        train = round(len(mine) * spec.num_train / len(rows))
        out["heal"] += mine[:heal]
        out["train"] += mine[heal : heal + train]
        out["eval"] += mine[heal + train :]
    order = {id(r): i for i, r in enumerate(rows)}
    return {name: sorted(split, key=lambda r: order[id(r)]) for name, split in out.items()}


_INT = re.compile(r"-?\d+")


def check_answer(kind: str, answer: str, prediction: str) -> bool:
    """Whether `prediction` answers a checkable prompt right: a sum's last number on the first line
    ("13 + 29 = 42" and "42" are right); a capital named anywhere (whole words, any case); of the three
    words, the first one the answer names is the alphabetically first."""
    if kind not in KINDS or kind == "open":
        raise ValueError(f"kind must be one of {KINDS[1:]}, got {kind!r}")
    text = prediction.strip()
    if kind == "sum":
        first = next((line for line in text.splitlines() if line.strip()), "")
        numbers = _INT.findall(first.replace(",", ""))
        return bool(numbers) and numbers[-1] == answer
    if kind == "capital":
        return re.search(rf"\b{re.escape(answer)}\b", text, flags=re.IGNORECASE) is not None
    named = [(m.start(), m.group(0).lower()) for m in re.finditer(r"[A-Za-z]+", text)]
    named = [w for _, w in named if w in WORDS]
    return bool(named) and named[0] == answer
