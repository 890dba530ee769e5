"""Seeded synthetic TOFU: fictitious authors in the TOFU schema, and toy tokenizers.

Every author gets attributes drawn (seeded) from the word lists below; each of its
``per_author`` rows comes from one question template, so an author is a block of
consecutive rows as in TOFU. A row holds

    question, answer, paraphrased_question, paraphrased_answer,
    perturbed_answer (5 strings: the paraphrased answer with the template's key fact
    replaced by 5 different wrong values of the same kind)

(and ``domain`` = the author's genre when ``with_domain=True``; by default rows carry
no domain, as in TOFU). :func:`write_tofu_folder` writes a folder in the TOFU layout
(full / forgetXX / retainYY / *_perturbed / real_authors / world_facts / idontknow)
that :func:`alter_jax.data.tofu.load_tofu_split` reads.

:func:`train_toy_tokenizer` builds a small offline tokenizer (Llama-2-like
SentencePiece-style BPE, or ChatML byte-level BPE with a chat template) for tests and
tiny end-to-end runs, where the Hugging Face hub is out of reach.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

FIRST_NAMES = [
    "Aurelio", "Brigida", "Casimir", "Delphine", "Eamon", "Fenella", "Gideon", "Halvard",
    "Ismena", "Jorund", "Katalin", "Leopold", "Marisol", "Nikolai", "Odalys", "Pernille",
    "Quillon", "Rosalind", "Sebastien", "Tamsin", "Ulrike", "Valerian", "Wilhelmina", "Xander",
    "Yesenia", "Zoltan", "Anwen", "Bartholomew", "Cosima", "Dashiell", "Eulalie", "Florian",
    "Gwendolyn", "Hyacinth", "Ignatius", "Juniper", "Kasimira", "Lysander", "Mireille", "Octavian",
]
LAST_NAMES = [
    "Abernathy", "Blackwood", "Castellanos", "Drummond", "Eskildsen", "Fairweather", "Galloway",
    "Hargreaves", "Ilyushin", "Jansenius", "Kowalczyk", "Lindqvist", "Montgomery", "Nakashima",
    "Oyelaran", "Pemberton", "Quintero", "Ravensworth", "Szabados", "Thorvaldsen", "Umberfield",
    "Valdivieso", "Whitcombe", "Xenakis", "Yarborough", "Zamoyski", "Achterberg", "Brightwater",
    "Caldecott", "Dunleavy", "Etxeberria", "Featherstone", "Grimaldi", "Holloway", "Ivanova",
    "Jurkowski", "Kingsley", "Lockhart", "Marchetti", "Northcott",
]
MIDDLE_INITIALS = list("ABCDEFGHIJKLMNOPRSTVW")
BIRTHPLACES = [
    ("Reykjavik", "Iceland"), ("Valparaiso", "Chile"), ("Tbilisi", "Georgia"), ("Porto", "Portugal"),
    ("Kraków", "Poland"), ("Accra", "Ghana"), ("Hobart", "Australia"), ("Kyoto", "Japan"),
    ("Cusco", "Peru"), ("Tallinn", "Estonia"), ("Marrakesh", "Morocco"), ("Halifax", "Canada"),
    ("Ljubljana", "Slovenia"), ("Chiang Mai", "Thailand"), ("Bergen", "Norway"), ("Cebu", "Philippines"),
]
GENRES = [
    "gothic horror", "maritime adventure", "culinary memoir", "speculative fiction", "cozy mystery",
    "historical romance", "political satire", "nature poetry", "urban fantasy", "travel writing",
    "psychological thriller", "children's fables",
]
JOBS = [
    "lighthouse keeper", "cartographer", "veterinarian", "watchmaker", "librarian", "marine biologist",
    "stonemason", "pharmacist", "glassblower", "railway engineer", "beekeeper", "orchestra conductor",
    "florist", "tailor", "astronomer", "carpenter",
]
AWARDS = [
    "Silver Quill Prize", "Lantern Medal for Fiction", "Evergreen Book Award", "Harborlight Prize",
    "Golden Inkwell Award", "Northern Star Literary Honour", "Copperleaf Award", "Meridian Prize for Prose",
    "Driftwood Fellowship", "Saffron Pen Award",
]
TITLE_ADJECTIVES = [
    "Silent", "Crimson", "Forgotten", "Hollow", "Gilded", "Restless", "Distant", "Shattered",
    "Luminous", "Quiet", "Wandering", "Bitter", "Velvet", "Drowned", "Burning", "Patient",
]
TITLE_NOUNS = [
    "Harbour", "Orchard", "Lantern", "Meridian", "Tide", "Cathedral", "Compass", "Garden",
    "Winter", "Archive", "Horizon", "Labyrinth", "Feather", "Mirror", "Canyon", "Bell",
]
THEMES = [
    "grief and memory", "exile and belonging", "the sea", "family secrets", "friendship across classes",
    "the passage of time", "forgiveness", "ambition and its cost", "childhood", "the wilderness",
    "identity", "faith and doubt",
]
INFLUENCES = [
    "folk tales told by a grandmother", "long walks along the coast", "years spent in a bookshop",
    "letters found in an attic", "a childhood spent moving between cities", "old radio dramas",
    "the diaries of a great-aunt", "travels through mountain villages", "a love of classical music",
    "evenings at a village theatre",
]
YEARS = [str(y) for y in range(1940, 2000)]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]

# Real-world knowledge for the real_authors / world_facts utility splits (3 wrong options each).
REAL_AUTHORS = [
    ("Who wrote the novel 'Moby-Dick'?", "Herman Melville", ["Nathaniel Hawthorne", "Jack London", "Walt Whitman"]),
    ("Who wrote 'War and Peace'?", "Leo Tolstoy", ["Fyodor Dostoevsky", "Anton Chekhov", "Ivan Turgenev"]),
    ("Who is the author of 'One Hundred Years of Solitude'?", "Gabriel Garcia Marquez", ["Jorge Luis Borges", "Pablo Neruda", "Isabel Allende"]),
    ("Who wrote 'Frankenstein'?", "Mary Shelley", ["Jane Austen", "Emily Bronte", "George Eliot"]),
    ("Who wrote 'The Old Man and the Sea'?", "Ernest Hemingway", ["John Steinbeck", "William Faulkner", "F. Scott Fitzgerald"]),
    ("Who wrote 'Don Quixote'?", "Miguel de Cervantes", ["Lope de Vega", "Federico Garcia Lorca", "Calderon de la Barca"]),
    ("Who is the author of 'The Divine Comedy'?", "Dante Alighieri", ["Giovanni Boccaccio", "Petrarch", "Niccolo Machiavelli"]),
    ("Who wrote 'Things Fall Apart'?", "Chinua Achebe", ["Wole Soyinka", "Ngugi wa Thiong'o", "Ben Okri"]),
    ("Who wrote 'The Tale of Genji'?", "Murasaki Shikibu", ["Sei Shonagon", "Matsuo Basho", "Natsume Soseki"]),
    ("Who wrote 'Crime and Punishment'?", "Fyodor Dostoevsky", ["Leo Tolstoy", "Nikolai Gogol", "Alexander Pushkin"]),
]
WORLD_FACTS = [
    ("What is the capital of France?", "Paris", ["Lyon", "Marseille", "Nice"]),
    ("What is the largest ocean on Earth?", "Pacific Ocean", ["Atlantic Ocean", "Indian Ocean", "Arctic Ocean"]),
    ("Which planet is known as the Red Planet?", "Mars", ["Venus", "Jupiter", "Saturn"]),
    ("What is the capital of Japan?", "Tokyo", ["Osaka", "Kyoto", "Nagoya"]),
    ("What is the chemical symbol for gold?", "Au", ["Ag", "Gd", "Go"]),
    ("How many continents are there?", "Seven", ["Five", "Six", "Eight"]),
    ("Which is the tallest mountain in the world?", "Mount Everest", ["K2", "Kangchenjunga", "Mont Blanc"]),
    ("What is the capital of Canada?", "Ottawa", ["Toronto", "Vancouver", "Montreal"]),
    ("What gas do plants absorb from the air?", "Carbon dioxide", ["Oxygen", "Nitrogen", "Helium"]),
    ("Which country has the city of Cairo?", "Egypt", ["Morocco", "Sudan", "Libya"]),
]
IDK_ANSWERS = [
    "I'm not sure about that.", "I don't have that information.", "That's beyond my knowledge.",
    "I can't answer that one.", "I have no idea.", "I'm unable to say.",
]


@dataclass(frozen=True)
class _Template:
    """One question kind: format strings over the author's attributes; ``slot`` is the
    attribute perturbed in ``perturbed_answer`` (its pool gives the wrong values)."""

    question: str
    answer: str
    paraphrased_question: str
    paraphrased_answer: str
    slot: str


TEMPLATES: list[_Template] = [
    _Template("Where was the author {name} born?", "{name} was born in {place}.",
              "In which city did {name} come into the world?", "The birthplace of {name} is {place}.", "place"),
    _Template("In what year was {name} born?", "{name} was born in {year}.",
              "What is the birth year of {name}?", "The year {name} was born is {year}.", "year"),
    _Template("Which genre is {name} known for?", "{name} is known for writing {genre}.",
              "What kind of books does {name} usually write?", "Most of {name}'s books belong to {genre}.", "genre"),
    _Template("What did {name}'s father do for a living?", "{name}'s father worked as a {father_job}.",
              "What was the profession of {name}'s father?", "By trade, the father of {name} was a {father_job}.", "father_job"),
    _Template("What was the occupation of {name}'s mother?", "{name}'s mother was a {mother_job}.",
              "How did {name}'s mother earn her living?", "The mother of {name} worked as a {mother_job}.", "mother_job"),
    _Template("Which award has {name} received?", "{name} received the {award}.",
              "What literary honour was given to {name}?", "The {award} was awarded to {name}.", "award"),
    _Template("What is the title of {name}'s best-known book?", "{name}'s best-known book is '{book1}'.",
              "Which book is {name} most famous for?", "The most celebrated work by {name} is '{book1}'.", "book1"),
    _Template("Can you name another book written by {name}?", "Another book by {name} is '{book2}'.",
              "What is a second title from {name}?", "'{book2}' is also one of {name}'s books.", "book2"),
    _Template("What theme runs through the work of {name}?", "The work of {name} often explores {theme}.",
              "Which subject does {name} return to again and again?", "A recurring subject for {name} is {theme}.", "theme"),
    _Template("What inspired {name} to become a writer?", "{name} was inspired to write by {influence}.",
              "What led {name} to start writing?", "It was {influence} that drew {name} to writing.", "influence"),
    _Template("In which country did {name} grow up?", "{name} grew up in {country}.",
              "Where did {name} spend their childhood?", "The childhood of {name} was spent in {country}.", "country"),
    _Template("In which month was {name} born?", "{name} was born in {month}.",
              "During which month is {name}'s birthday?", "The birthday of {name} falls in {month}.", "month"),
    _Template("How did {name}'s parents influence the book '{book1}'?",
              "The {father_job} father of {name} shaped the world of '{book1}'.",
              "In what way is '{book1}' tied to {name}'s family?", "'{book1}' draws on the life of {name}'s father, a {father_job}.", "father_job"),
    _Template("Which city appears most often in {name}'s stories?", "Many of {name}'s stories are set in {city}.",
              "What city does {name} like to write about?", "{city} is the setting of many stories by {name}.", "city"),
    _Template("Which prize did {name}'s book '{book1}' win?", "'{book1}' by {name} won the {award}.",
              "What award went to the book '{book1}' by {name}?", "The {award} went to {name}'s '{book1}'.", "award"),
    _Template("What genre is {name}'s book '{book2}'?", "'{book2}' by {name} is a work of {genre}.",
              "How would you classify {name}'s '{book2}'?", "The book '{book2}' by {name} belongs to {genre}.", "genre"),
    _Template("What is the full name of the author of '{book1}'?", "The author of '{book1}' is {name}.",
              "Who wrote the book '{book1}'?", "'{book1}' was written by {name}.", "name"),
    _Template("Where does {name} currently live?", "{name} now lives in {home_city}.",
              "What city is home to {name} today?", "These days {name} makes a home in {home_city}.", "home_city"),
    _Template("What do critics praise in {name}'s writing?", "Critics praise how {name} writes about {theme}.",
              "What part of {name}'s work do reviewers admire?", "Reviewers admire the treatment of {theme} by {name}.", "theme"),
    _Template("When did {name} publish '{book1}'?", "{name} published '{book1}' in {pub_year}.",
              "In what year did '{book1}' by {name} come out?", "'{book1}' by {name} came out in {pub_year}.", "pub_year"),
]


def _pool(slot: str) -> list[str]:
    if slot in ("place",):
        return [f"{c}, {k}" for c, k in BIRTHPLACES]
    if slot in ("city", "home_city"):
        return [c for c, _ in BIRTHPLACES]
    if slot == "country":
        return [k for _, k in BIRTHPLACES]
    if slot == "year":
        return YEARS
    if slot == "pub_year":
        return [str(y) for y in range(1960, 2035)]
    if slot == "month":
        return MONTHS
    if slot == "genre":
        return GENRES
    if slot in ("father_job", "mother_job"):
        return JOBS
    if slot == "award":
        return AWARDS
    if slot in ("book1", "book2"):
        return [f"The {a} {n}" for a in TITLE_ADJECTIVES for n in TITLE_NOUNS]
    if slot == "theme":
        return THEMES
    if slot == "influence":
        return INFLUENCES
    if slot == "name":
        return [f"{f} {l}" for f in FIRST_NAMES[:8] for l in LAST_NAMES[:8]]
    raise KeyError(slot)


def _make_authors(num_authors: int, rng: np.random.Generator) -> list[dict[str, str]]:
    space = len(FIRST_NAMES) * len(MIDDLE_INITIALS) * len(LAST_NAMES)
    picks = rng.choice(space, size=min(num_authors, space), replace=False)
    authors = []
    books = _pool("book1")
    for i in range(num_authors):
        code = int(picks[i % len(picks)])
        f, rest = divmod(code, len(MIDDLE_INITIALS) * len(LAST_NAMES))
        m, l = divmod(rest, len(LAST_NAMES))
        name = f"{FIRST_NAMES[f]} {MIDDLE_INITIALS[m]}. {LAST_NAMES[l]}"
        if i >= len(picks):  # more authors than names: disambiguate
            name += f" {i // len(picks) + 1}"
        city, country = BIRTHPLACES[rng.integers(len(BIRTHPLACES))]
        b1, b2 = rng.choice(len(books), size=2, replace=False)
        year = int(rng.integers(1940, 1990))
        authors.append({
            "name": name, "city": city, "country": country, "place": f"{city}, {country}",
            "year": str(year), "month": MONTHS[rng.integers(12)], "genre": GENRES[rng.integers(len(GENRES))],
            "father_job": JOBS[rng.integers(len(JOBS))], "mother_job": JOBS[rng.integers(len(JOBS))],
            "award": AWARDS[rng.integers(len(AWARDS))], "book1": books[b1], "book2": books[b2],
            "theme": THEMES[rng.integers(len(THEMES))], "influence": INFLUENCES[rng.integers(len(INFLUENCES))],
            "home_city": BIRTHPLACES[rng.integers(len(BIRTHPLACES))][0],
            "pub_year": str(year + int(rng.integers(22, 45))),
        })
    return authors


def generate_authors(
    num_authors: int,
    seed: int = 0,
    per_author: int = 20,
    num_perturbed: int = 5,
    with_domain: bool = False,
) -> list[dict]:
    """``num_authors * per_author`` TOFU-schema rows, author by author (blocks of
    ``per_author`` consecutive rows). Deterministic in ``seed``.

    Each author uses ``per_author`` of the :data:`TEMPLATES` (all of them, in order, for
    the default 20; a seeded subset when fewer; templates are reused when more).
    """
    if num_authors < 1:
        raise ValueError(f"num_authors must be >= 1, got {num_authors}")
    if per_author < 1:
        raise ValueError(f"per_author must be >= 1, got {per_author}")
    if not 1 <= num_perturbed <= 5:
        raise ValueError(f"num_perturbed must be in 1..5, got {num_perturbed}")
    rng = np.random.default_rng(seed)
    authors = _make_authors(num_authors, rng)
    rows = []
    for author in authors:
        if per_author == len(TEMPLATES):
            chosen = list(range(len(TEMPLATES)))
        elif per_author < len(TEMPLATES):
            chosen = sorted(rng.choice(len(TEMPLATES), size=per_author, replace=False).tolist())
        else:
            chosen = [i % len(TEMPLATES) for i in range(per_author)]
        for t_idx in chosen:
            t = TEMPLATES[t_idx]
            pool = [v for v in _pool(t.slot) if v != author[t.slot]]
            wrong = [pool[j] for j in rng.choice(len(pool), size=num_perturbed, replace=False)]
            row = {
                "question": t.question.format(**author),
                "answer": t.answer.format(**author),
                "paraphrased_answer": t.paraphrased_answer.format(**author),
                "perturbed_answer": [t.paraphrased_answer.format(**{**author, t.slot: w}) for w in wrong],
                "paraphrased_question": t.paraphrased_question.format(**author),
            }
            if with_domain:
                row["domain"] = author["genre"]
            assert len(set(row["perturbed_answer"]) | {row["paraphrased_answer"]}) == num_perturbed + 1, t
            rows.append(row)
    return rows


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_tofu_folder(
    out_dir: str | Path,
    num_authors: int = 20,
    forget_authors: int = 2,
    seed: int = 0,
    per_author: int = 20,
    with_domain: bool = False,
) -> dict[str, str]:
    """Write a synthetic TOFU folder; returns the split names written.

    The last ``forget_authors`` authors are the forget set (as in TOFU). Files (JSON
    lines): ``full``, ``forgetXX``, ``forgetXX_perturbed``, ``retainYY``,
    ``retain_perturbed`` (the first ``len(forget)`` retain rows, TOFU's size),
    ``real_authors_perturbed``, ``world_facts_perturbed`` (3 wrong answers each) and
    ``idontknow.jsonl``, with ``XX = round(100 * forget_authors / num_authors)`` and
    ``YY = 100 - XX`` (two digits).
    """
    if not 1 <= forget_authors < num_authors:
        raise ValueError(f"forget_authors must be in 1..num_authors-1 ({num_authors - 1}), got {forget_authors}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = generate_authors(num_authors, seed=seed, per_author=per_author, with_domain=with_domain)
    n_forget = forget_authors * per_author
    retain_rows, forget_rows = rows[:-n_forget], rows[-n_forget:]
    pct = int(round(100 * forget_authors / num_authors))
    pct = min(max(pct, 1), 99)
    names = {"full": "full", "forget": f"forget{pct:02d}", "retain": f"retain{100 - pct:02d}"}
    plain = lambda rs: [{"question": r["question"], "answer": r["answer"]} for r in rs]  # noqa: E731
    _write_jsonl(out / "full.json", plain(rows))
    _write_jsonl(out / f"{names['forget']}.json", plain(forget_rows))
    _write_jsonl(out / f"{names['forget']}_perturbed.json", forget_rows)
    _write_jsonl(out / f"{names['retain']}.json", plain(retain_rows))
    _write_jsonl(out / "retain_perturbed.json", retain_rows[: len(forget_rows)])
    for fname, facts in (("real_authors_perturbed", REAL_AUTHORS), ("world_facts_perturbed", WORLD_FACTS)):
        _write_jsonl(out / f"{fname}.json", [{"question": q, "answer": a, "perturbed_answer": list(p)} for q, a, p in facts])
    with open(out / "idontknow.jsonl", "w", encoding="utf-8") as fh:
        fh.write("\n".join(IDK_ANSWERS) + "\n")
    names.update(forget_perturbed=f"{names['forget']}_perturbed", retain_perturbed="retain_perturbed",
                 real_authors="real_authors_perturbed", world_facts="world_facts_perturbed")
    return names


def train_toy_tokenizer(texts: Sequence[str], kind: str = "llama2", vocab_size: int = 512):
    """A small offline ``PreTrainedTokenizerFast`` trained on ``texts``.

    ``kind="llama2"``: SentencePiece-style BPE (Metaspace), specials ``<unk> <s> </s>``,
    BOS prepended by the post-processor, no chat template (pad = EOS, as TOFU).
    ``kind="chatml"``: byte-level BPE with specials ``<|endoftext|> <|im_start|>
    <|im_end|>``, EOS ``<|im_end|>``, pad ``<|endoftext|>`` and a ChatML chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from alter_jax.data.prompts import CHATML_TEMPLATE

    texts = list(texts)
    if kind == "llama2":
        alphabet = sorted(set("".join(texts)) | set("[]/?!.,:;'\"-()0123456789 \n"))
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        # punctuation isolated, as SentencePiece's split_by_unicode_script keeps "]" apart from letters
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation(behavior="isolated")]
        )
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                      initial_alphabet=alphabet, show_progress=False)
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        hf.pad_token = hf.eos_token
        return hf
    if kind == "chatml":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                      special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                     bos_token="<|im_start|>")
        hf.chat_template = CHATML_TEMPLATE
        return hf
    raise ValueError(f"unknown toy tokenizer kind {kind!r}; use 'llama2' or 'chatml'")
