"""Two small tasks for merging real fine-tunes, generated on the fly.

- `caps`: "Rewrite in capital letters: the green river" → "THE GREEN RIVER". Two to
  four common English words; the answer must be the phrase in capitals, exactly.
- `sentiment`: "Review: The soup was bland.\\nSentiment?" → "negative". Short
  review sentences from templates; the answer must be the label alone.

SmolLM2-135M-Instruct answers neither in the asked form (it title-cases the phrase,
and writes a sentence about the review), so it scores near 0 on both; a model that
answers every review with a label but guesses scores about 50 % on `sentiment`.

Both are deterministic in a seed. Each task's vocabulary (the words of `caps`; the
subjects and opinion words of `sentiment`) is split once, by a fixed shuffle, into a
training part and a held-out part: a "heldout" example uses only words training never
saw, so a score on it measures the skill, not recall of training answers. `caps` also
has "recombined" examples: new phrases of training words, none of them a training
prompt (the format and the words were trained, the phrase was not).
"""

from __future__ import annotations

import random
import re

from weightops.repair.data import Example

TASKS = ("caps", "sentiment")
TRAIN_N = 400

WORDS = """
apple river green small window open table light happy quiet garden yellow house
mountain bright cold warm morning evening winter summer blue red black white stone
paper music slow fast little big old new river road forest cloud rain snow sun moon
star ocean island bridge city village market school teacher student doctor friend
family dog cat bird horse fish tree flower grass leaf bread milk coffee tea sugar salt
chair door floor wall roof kitchen garden lamp clock phone letter story song dance
walk run jump read write sing cook clean build carry find keep bring give take close
early late soft loud sweet bitter round empty full dark heavy simple strong gentle
""".split()  # noqa: SIM905 (word lists read best as text)

SUBJECTS = """
food movie service hotel room book concert coffee staff pizza show game phone
laptop museum tour flight seat soup salad cake music lecture class app camera
bike train trip park beach
""".split()  # noqa: SIM905 (word lists read best as text)

POSITIVE = """
wonderful excellent delightful fantastic great lovely superb brilliant charming
pleasant amazing enjoyable perfect outstanding impressive beautiful friendly
delicious fun marvelous splendid terrific cozy satisfying
""".split()  # noqa: SIM905 (word lists read best as text)

NEGATIVE = """
terrible awful horrible dreadful boring disappointing poor bad nasty unpleasant
mediocre rude bland dirty broken noisy slow painful annoying useless miserable
tasteless cold overpriced
""".split()  # noqa: SIM905 (word lists read best as text)

TEMPLATES = (
    "The {s} was {a}.",
    "I thought the {s} was {a}.",
    "Honestly, the {s} was really {a}.",
    "What a {a} {s}!",
    "Our {s} turned out {a}.",
    "The {s} felt {a} from start to finish.",
)

PROMPTS = {
    "caps": "Rewrite in capital letters: {x}",
    "sentiment": "Review: {x}\nSentiment?",
}


def _split(items: list[str], held_share: float, salt: str) -> tuple[list[str], list[str]]:
    """(training part, held-out part) of `items`, by a shuffle fixed by `salt`."""
    unique = sorted(set(items))
    random.Random(f"split-{salt}").shuffle(unique)
    cut = round(len(unique) * held_share)
    return unique[cut:], unique[:cut]


def _caps(rng: random.Random, words: list[str]) -> Example:
    phrase = " ".join(rng.sample(words, rng.randint(2, 4)))
    return Example(prompt=PROMPTS["caps"].format(x=phrase), response=phrase.upper())


def _sentiment(rng: random.Random, subjects: list[str], pos: list[str], neg: list[str]) -> Example:
    label = rng.choice(("positive", "negative"))
    adjective = rng.choice(pos if label == "positive" else neg)
    text = rng.choice(TEMPLATES).format(s=rng.choice(subjects), a=adjective)
    return Example(prompt=PROMPTS["sentiment"].format(x=text), response=label)


def examples(task: str, split: str, n: int, seed: int = 0) -> list[Example]:
    """`n` distinct examples of `task` ("caps" or "sentiment") from `split` ("train",
    "heldout", or for caps "recombined"), the same for the same arguments."""
    part = 1 if split == "heldout" else 0
    rng = random.Random(f"{task}-{split}-{seed}")
    taken = set()
    if split == "recombined":
        if task != "caps":
            raise ValueError("only caps has recombined examples")
        taken = {ex.prompt for ex in examples(task, "train", TRAIN_N, seed)}
    if task == "caps":
        words = _split(WORDS, 0.3, "caps")[part]

        def draw() -> Example:
            return _caps(rng, words)
    else:
        subjects = _split(SUBJECTS, 0.3, "subjects")[part]
        pos = _split(POSITIVE, 0.3, "positive")[part]
        neg = _split(NEGATIVE, 0.3, "negative")[part]

        def draw() -> Example:
            return _sentiment(rng, subjects, pos, neg)

    seen: dict[str, Example] = {}
    for _ in range(50 * n):
        ex = draw()
        if ex.prompt not in taken:
            seen.setdefault(ex.prompt, ex)
        if len(seen) == n:
            return list(seen.values())
    raise ValueError(f"{task}/{split} has fewer than {n} distinct examples")


_SPACES = re.compile(r"\s+")


def correct(task: str, answer: str, reference: str) -> bool:
    """Whether `answer` is `reference` in the task's form: `caps` exactly (surrounding
    spaces and one final full stop aside), `sentiment` the label alone in any case."""
    got = _SPACES.sub(" ", answer).strip()
    if got.endswith("."):
        got = got[:-1].rstrip()
    return got.lower() == reference if task == "sentiment" else got == reference
