"""Write the example prompts of the README: 16 unlabeled prompts per example adapter, written for this repo
(not rows of the benchmark's datasets), in the prompt template the adapters were trained with.

    python examples/make_prompts.py     # -> examples/prompts/{rt_polarity,snips_intent,hyperbaton}.jsonl

They are what a user who trained the adapters would have at hand: a few inputs of each task, no answers.
"""

import json
import random
from pathlib import Path

REVIEWS = [
    "A warm, funny and surprisingly moving film that earns every one of its tears.",
    "The plot wanders for two hours and never finds anything worth saying.",
    "Sharp dialogue and a terrific lead performance make this a small gem.",
    "Flat, joyless and far too long; even the actors look bored.",
    "An inventive thriller that keeps you guessing until the final frame.",
    "The jokes land with a thud and the story is a mess of clichés.",
    "Beautifully shot, tenderly acted, and quietly devastating.",
    "A lazy sequel that recycles the original's best moments badly.",
    "One of the most charming comedies of the year, smart and generous.",
    "It looks expensive, but there is nothing inside it but noise.",
    "The director balances horror and heartbreak with real skill.",
    "Tedious and confused, a waste of a promising premise.",
    "A gripping, beautifully paced drama with a knockout ending.",
    "Wooden performances sink what little script there is.",
    "Funny, sweet and smarter than it has any right to be.",
    "I checked my watch every ten minutes; nothing here works.",
]
REQUESTS = [
    "Add this Miles Davis track to my late night jazz playlist.",
    "Book a table for four at an Italian place near the station tonight.",
    "Will it snow in Denver on Saturday morning?",
    "Play something by Fleetwood Mac on Spotify.",
    "Give this novel four out of six stars.",
    "Find the TV series called The Long Road Home.",
    "What animated movies are showing at the nearest cinema this evening?",
    "Put the new Adele song on my workout playlist.",
    "Reserve a table at a sushi restaurant in Brooklyn for two at 8 pm.",
    "How hot will it be in Cairo next week?",
    "Play the latest album by Radiohead.",
    "Rate The Silent Forest one star.",
    "Look for the soundtrack called Northern Lights.",
    "Which theatres are showing the new Pixar film on Sunday?",
    "Add Blue Monday to my eighties party list.",
    "Is it going to rain in Lisbon tomorrow afternoon?",
]
ADJECTIVES = [  # the usual English order: opinion, size, age, shape, colour, origin, material, purpose
    ["lovely", "ugly", "nice", "terrible", "good", "obnoxious"],
    ["big", "small", "tiny", "enormous", "little", "huge"],
    ["old", "new", "ancient", "brand-new", "old-fashioned"],
    ["square", "circular", "triangular", "rectangular", "spherical"],
    ["red", "blue", "green", "gray", "black", "white"],
    ["German", "Japanese", "Brazilian", "Egyptian", "Mexican", "Indian"],
    ["wooden", "plastic", "steel", "glass", "paper", "wool"],
    ["hiking", "drinking", "typing", "smoking", "exercise", "eating"],
]
NOUNS = ["knife", "ship", "shoe", "sweater", "car", "chair", "bag", "box"]
INSTRUCTIONS = {
    "rt_polarity": "Is the sentiment of this movie review positive or negative?",
    "snips_intent": "What is the intent of this request: playlist, restaurant, weather, music, rate, search or cinema?",
    "hyperbaton": "Which sentence has the correct adjective order, a or b?",
}


def hyperbaton(rng: random.Random) -> str:
    groups = sorted(rng.sample(range(len(ADJECTIVES)), 3))
    right = [rng.choice(ADJECTIVES[g]) for g in groups] + [rng.choice(NOUNS)]
    wrong = right[:3]
    while wrong == right[:3]:
        rng.shuffle(wrong)
    first, second = (right[:3], wrong) if rng.random() < 0.5 else (wrong, right[:3])
    return f'a " {" ".join(first)} {right[3]} " b " {" ".join(second)} {right[3]} " ?'


def main() -> None:
    rng = random.Random(0)
    texts = {"rt_polarity": REVIEWS, "snips_intent": REQUESTS, "hyperbaton": [hyperbaton(rng) for _ in range(16)]}
    folder = Path(__file__).parent / "prompts"
    folder.mkdir(exist_ok=True)
    for task, items in texts.items():
        lines = [json.dumps({"text": f"{INSTRUCTIONS[task]}\n{text}\nAnswer:"}, ensure_ascii=False) for text in items]
        (folder / f"{task}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(folder / f"{task}.jsonl")


if __name__ == "__main__":
    main()
