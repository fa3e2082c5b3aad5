"""Generate the demo task's datasets: strict JSON field extraction.

The task: a short sentence mentions one person; the model must answer with ONLY
a JSON object ``{"name": str, "age": int, "city": str, "job": str | null}``
(exactly those keys, the age a number, the job null when the text names none;
no prose, no code fence). The bundled SmolLM2-135M-Instruct mostly drops keys,
quotes the age, invents a job or adds prose; a few minutes of LoRA teach it the
format.

Writes, next to this script (deterministic for a given seed)::

    demo_sft.jsonl         OpenAI-style {"messages": [user, assistant]} rows
    demo_preference.jsonl  TRL-style {"prompt", "chosen", "rejected"} strings
    demo_eval.jsonl        held-out {"prompt", "expected"} rows (people and prompts not in training)

Run it again with ``python resources/datasets/make_demo.py``; the files it writes
are committed, so the demo never needs to run it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240601
N_SFT = 400
N_PREFERENCE = 400
N_EVAL = 64

INSTRUCTION = (
    'Reply with only a JSON object with the keys "name", "age" (a number), "city" and "job" (null if not given).'
)


FIRST_NAMES = [
    "Maria",
    "James",
    "Aiko",
    "Liam",
    "Fatima",
    "Noah",
    "Ingrid",
    "Mateo",
    "Priya",
    "Oliver",
    "Chen",
    "Amara",
    "Lucas",
    "Sofia",
    "Kwame",
    "Elena",
    "Hiroshi",
    "Zara",
    "Diego",
    "Freya",
    "Omar",
    "Hannah",
    "Ravi",
    "Chloe",
    "Tomasz",
    "Leila",
    "Ethan",
    "Yuki",
    "Samuel",
    "Nadia",
    "Felix",
    "Ana",
    "Kofi",
    "Emma",
    "Arjun",
    "Lena",
    "Pablo",
    "Mei",
    "Jonas",
    "Aisha",
    "Victor",
    "Clara",
    "Dmitri",
    "Grace",
    "Rahul",
    "Isla",
    "Marco",
    "Sara",
    "Henrik",
    "Lucia",
    "Tariq",
    "Julia",
    "Mohammed",
    "Nora",
    "Andrei",
    "Eva",
    "Kenji",
    "Rosa",
    "Daniel",
    "Ayla",
]
LAST_NAMES = [
    "Lopez",
    "Smith",
    "Tanaka",
    "Murphy",
    "Haddad",
    "Johansson",
    "Rossi",
    "Patel",
    "Nguyen",
    "Okafor",
    "Schmidt",
    "Silva",
    "Kowalski",
    "Dubois",
    "Garcia",
    "Kim",
    "Mensah",
    "Andersen",
    "Costa",
    "Ivanova",
    "Brown",
    "Sato",
    "Fischer",
    "Moreau",
    "Ali",
    "Novak",
    "Reyes",
    "Larsen",
    "Walker",
    "Khan",
    "Bianchi",
    "Petrov",
    "Owusu",
    "Jensen",
    "Romero",
    "Yamamoto",
    "Weber",
    "Fernandes",
    "Hughes",
    "Berg",
]
CITIES = [
    "Lisbon",
    "Oslo",
    "Osaka",
    "Dublin",
    "Beirut",
    "Stockholm",
    "Turin",
    "Mumbai",
    "Hanoi",
    "Lagos",
    "Hamburg",
    "Porto",
    "Krakow",
    "Lyon",
    "Seville",
    "Busan",
    "Accra",
    "Aarhus",
    "Recife",
    "Kazan",
    "Leeds",
    "Kyoto",
    "Munich",
    "Marseille",
    "Cairo",
    "Prague",
    "Manila",
    "Bergen",
    "Toronto",
    "Karachi",
    "Naples",
    "Sofia",
    "Kumasi",
    "Odense",
    "Valencia",
    "Sapporo",
    "Vienna",
    "Curitiba",
    "Glasgow",
    "Gothenburg",
    "Denver",
    "Nairobi",
    "Melbourne",
    "Montreal",
    "Quito",
    "Tunis",
    "Zurich",
    "Austin",
]
JOBS = [
    "nurse",
    "teacher",
    "baker",
    "pilot",
    "architect",
    "chef",
    "translator",
    "engineer",
    "librarian",
    "photographer",
    "carpenter",
    "pharmacist",
    "journalist",
    "gardener",
    "dentist",
    "mechanic",
]

# Each template names the person, the age in digits and the city exactly once; some name a job too.
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old {job} from {city}.",
    "{city} resident {name} turned {age} last month.",
    "I'm {name}, I am {age} and I live in {city}.",
    "After years abroad, {name} ({age}) settled in {city}.",
    "{name}, aged {age}, works as {a_job} in {city}.",
    "Born {age} years ago, {name} now calls {city} home.",
    "Our new {job}, {name}, is {age} and commutes from {city}.",
    "Name: {name}. Age: {age}. Home town: {city}.",
    "At {age}, {name} opened a small shop in {city}.",
    "The {age}-year-old {job} {name} was interviewed in {city} yesterday.",
    "{name} from {city} celebrated turning {age} with friends.",
    "Greetings from {city}! My name is {name} and I'm {age}.",
    "In {city}, {name}, {age}, has been {a_job} for years.",
    "{name} ({age}, {city}) signed up for the marathon.",
    "Having just turned {age}, {name} moved to {city} to work as {a_job}.",
]


def expected(person: dict) -> dict:
    return {k: person[k] for k in ("name", "age", "city", "job")}


def answer(person: dict) -> str:
    """The one correct answer: compact JSON with the keys in order."""
    return json.dumps(expected(person), ensure_ascii=False)


def prompt_for(text: str) -> str:
    return f"{INSTRUCTION}\n\nText: {text}"


def _wrong_answer(rng: random.Random, person: dict) -> str:
    """A plausible answer in the wrong format (the 'rejected' side of a preference pair)."""
    name, age, city, job = person["name"], person["age"], person["city"], person["job"]
    right = expected(person)
    kind = rng.randrange(8)
    if kind == 0:  # prose
        return f"The person's name is {name}, they are {age} years old and they live in {city}."
    if kind == 1:  # a fenced block
        return f"```json\n{answer(person)}\n```"
    if kind == 2:  # the age as a string
        return json.dumps({**right, "age": str(age)})
    if kind == 3:  # other keys
        return json.dumps({"Name": name, "Age": age, "Location": city, "Occupation": job})
    if kind == 4:  # JSON plus chatter
        return f"Here is the extracted information:\n{answer(person)}"
    if kind == 5:  # a key left out
        return json.dumps({"name": name, "age": age} if job is None else {"name": name, "age": age, "city": city})
    if kind == 6:  # a wrong value: first name only, or a made-up job
        if job is None:
            return json.dumps({**right, "job": "unknown"})
        return json.dumps({**right, "name": name.split()[0]})
    # a nested object with an extra field
    return json.dumps({"person": right, "source": "text"})


def _people(rng: random.Random, n: int, taken: set[str]) -> list[dict]:
    """People with a sentence about each; ``job`` is None when the sentence does not mention one."""
    out = []
    while len(out) < n:
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        if name in taken:
            continue
        taken.add(name)
        template = rng.choice(TEMPLATES)
        person = {
            "name": name,
            "age": rng.randint(18, 89),
            "city": rng.choice(CITIES),
            "job": rng.choice(JOBS) if "job}" in template else None,
        }
        article = "an" if person["job"] and person["job"][0] in "aeiou" else "a"
        person["text"] = template.format(a_job=f"{article} {person['job']}", **person)
        out.append(person)
    return out


def build(seed: int = SEED) -> dict[str, list[dict]]:
    """All three datasets as lists of rows. The eval people (full names) never occur in training."""
    rng = random.Random(seed)
    taken: set[str] = set()
    eval_people = _people(rng, N_EVAL, taken)
    train_people = _people(rng, N_SFT + N_PREFERENCE, taken)

    eval_rows = [{"prompt": prompt_for(p["text"]), "expected": expected(p)} for p in eval_people]
    sft_rows = [
        {"messages": [{"role": "user", "content": prompt_for(p["text"])}, {"role": "assistant", "content": answer(p)}]}
        for p in train_people[:N_SFT]
    ]
    pref_rows = [
        {"prompt": prompt_for(p["text"]), "chosen": answer(p), "rejected": _wrong_answer(rng, p)}
        for p in train_people[N_SFT:]
    ]
    return {"demo_sft.jsonl": sft_rows, "demo_preference.jsonl": pref_rows, "demo_eval.jsonl": eval_rows}


def dumps(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write to (default: next to this script)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in build(args.seed).items():
        (args.out / name).write_text(dumps(rows), encoding="utf-8")
        print(f"{args.out / name}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
