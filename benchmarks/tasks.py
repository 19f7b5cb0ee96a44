"""Long-context tasks on the embedded corpora, shared by the tests, `make eval` and `make bench`."""

from __future__ import annotations

import random
from dataclasses import dataclass

from vllm_caote.models import load_essays, load_kjv

NEEDLE = " The secret passkey is {key}. Remember it: {key}. "
QUESTION = "\n\nWhat is the secret passkey? Answer with the number only."


@dataclass(frozen=True)
class PasskeyCase:
    prompt: str  # chat-formatted, ready for generation
    passkey: str
    context_tokens: int
    depth: float


def _essay_ids(tokenizer) -> list[int]:
    cache = getattr(tokenizer, "_caote_essay_ids", None)
    if cache is None:
        cache = tokenizer.encode(load_essays(), add_special_tokens=False)
        try:
            tokenizer._caote_essay_ids = cache
        except AttributeError:
            pass
    return cache


def passkey_case(tokenizer, context_tokens: int, depth: float, seed: int = 0) -> PasskeyCase:
    """A passkey hidden at ``depth`` (0..1) of ``context_tokens`` tokens of essays."""
    rng = random.Random(f"{seed}-{context_tokens}-{depth}")
    key = str(rng.randint(10000, 99999))
    ids = _essay_ids(tokenizer)
    start = rng.randint(0, max(0, len(ids) - context_tokens - 1))
    hay = ids[start : start + context_tokens]
    cut = int(len(hay) * depth)
    text = tokenizer.decode(hay[:cut]) + NEEDLE.format(key=key) + tokenizer.decode(hay[cut:])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text + QUESTION}], tokenize=False, add_generation_prompt=True
    )
    return PasskeyCase(prompt, key, context_tokens, depth)


MULTIKEY_NAMES = ("amber", "cobalt", "crimson", "olive", "silver", "violet", "saffron", "teal")
MULTIKEY_NEEDLE = " The special magic number for {name} is {key}. "
MULTIKEY_QUESTION = "\n\nWhat is the special magic number for {name}? Answer with the number only."


def multikey_case(tokenizer, context_tokens: int, n_keys: int = 4, seed: int = 0) -> PasskeyCase:
    """RULER's multi-key needle: ``n_keys`` labelled 5-digit numbers spread over
    ``context_tokens`` tokens of essays; the question names one of them. A policy must keep
    the asked-for needle although the others look just as important before the question."""
    rng = random.Random(f"mk-{seed}-{context_tokens}-{n_keys}")
    names = rng.sample(MULTIKEY_NAMES, n_keys)
    keys = [str(rng.randint(10000, 99999)) for _ in names]
    ids = _essay_ids(tokenizer)
    start = rng.randint(0, max(0, len(ids) - context_tokens - 1))
    hay = ids[start : start + context_tokens]
    depths = [(i + 0.5) / n_keys for i in range(n_keys)]
    cuts = [0] + [int(len(hay) * d) for d in depths] + [len(hay)]
    text = tokenizer.decode(hay[: cuts[1]])
    for i, (name, key) in enumerate(zip(names, keys, strict=True)):
        text += MULTIKEY_NEEDLE.format(name=name, key=key) + tokenizer.decode(
            hay[cuts[i + 1] : cuts[i + 2]]
        )
    target = rng.randrange(n_keys)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text + MULTIKEY_QUESTION.format(name=names[target])}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return PasskeyCase(prompt, keys[target], context_tokens, depths[target])


# -- the retrieval suite: several phrasings, two haystacks, each key stated once -------------

#: passkey needles, each stating the key once: at a sentence end, mid-sentence, sentence start
PASSKEY_NEEDLES = {
    "end": " The secret passkey is {key}. ",
    "mid": " The passkey {key} opens the archive door, so keep it safe. ",
    "lead": " {key} is the secret passkey that you must remember. ",
}
#: multi-key needles (one per labelled number), as above
MULTIKEY_NEEDLES = {
    "end": " The special magic number for {name} is {key}. ",
    "mid": " The special magic number {key} belongs to {name}, and nobody else. ",
    "lead": " {key} is the special magic number for {name}. ",
}
HAYSTACKS = ("essays", "kjv")


@dataclass(frozen=True)
class RetrievalCase:
    prompt: str  # chat-formatted, ready for generation
    answer: str  # the 5-digit key asked for
    task: str  # "passkey" | "multikey"
    phrasing: str  # a key of PASSKEY_NEEDLES / MULTIKEY_NEEDLES
    haystack: str  # "essays" | "kjv"
    depth: float  # where the asked-for needle sits (0..1)
    context_tokens: int


def _kjv_ids(tokenizer) -> list[int]:
    cache = getattr(tokenizer, "_caote_kjv_ids", None)
    if cache is None:
        verses = load_kjv()
        text = " ".join((v.get("text") or v.get("verse") or "").strip() for v in verses[:12000])
        cache = tokenizer.encode(text, add_special_tokens=False)
        try:
            tokenizer._caote_kjv_ids = cache
        except AttributeError:
            pass
    return cache


def haystack_ids(tokenizer, haystack: str) -> list[int]:
    if haystack == "essays":
        return _essay_ids(tokenizer)
    if haystack == "kjv":
        return _kjv_ids(tokenizer)
    raise ValueError(f"unknown haystack {haystack!r}; valid: {HAYSTACKS}")


def retrieval_case(
    tokenizer,
    task: str,
    context_tokens: int,
    depth: float,
    phrasing: str,
    haystack: str,
    seed: int = 0,
    n_keys: int = 4,
) -> RetrievalCase:
    """One retrieval prompt. ``passkey``: one key at ``depth``. ``multikey``: ``n_keys``
    labelled keys spread over the haystack, the asked-for one at the slot nearest ``depth``."""
    rng = random.Random(f"rs-{task}-{seed}-{context_tokens}-{depth}-{phrasing}-{haystack}")
    ids = haystack_ids(tokenizer, haystack)
    start = rng.randint(0, max(0, len(ids) - context_tokens - 1))
    hay = ids[start : start + context_tokens]
    if task == "passkey":
        keys, names, depths = [str(rng.randint(10000, 99999))], [None], [depth]
        target, question = 0, QUESTION
        needles = [PASSKEY_NEEDLES[phrasing].format(key=keys[0])]
    elif task == "multikey":
        names = rng.sample(MULTIKEY_NAMES, n_keys)
        keys = [str(rng.randint(10000, 99999)) for _ in names]
        depths = [(i + 0.5) / n_keys for i in range(n_keys)]
        target = min(range(n_keys), key=lambda i: abs(depths[i] - depth))
        question = MULTIKEY_QUESTION.format(name=names[target])
        needles = [
            MULTIKEY_NEEDLES[phrasing].format(name=n, key=k)
            for n, k in zip(names, keys, strict=True)
        ]
    else:
        raise ValueError(f"unknown retrieval task {task!r}")
    cuts = [int(len(hay) * d) for d in depths]
    text, prev = "", 0
    for cut, needle in zip(cuts, needles, strict=True):
        text += tokenizer.decode(hay[prev:cut]) + needle
        prev = cut
    text += tokenizer.decode(hay[prev:])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text + question}], tokenize=False, add_generation_prompt=True
    )
    return RetrievalCase(
        prompt, keys[target], task, phrasing, haystack, depths[target], context_tokens
    )


def retrieval_suite(
    tokenizer,
    context_tokens: int,
    n: int,
    tasks: tuple[str, ...] = ("passkey",),
    depths: tuple[float, ...] = (0.25, 0.75),
    seed: int = 0,
) -> list[RetrievalCase]:
    """``n`` cases cycling over task x phrasing x haystack x depth (12 for one task with the
    default depths), so every phrasing and haystack is equally represented and a policy tuned
    to one template shows; each further round takes new keys and haystack offsets."""
    grid = [(t, p, h, d) for t in tasks for p in PASSKEY_NEEDLES for h in HAYSTACKS for d in depths]
    cases = []
    for i in range(n):
        task, phrasing, haystack, depth = grid[i % len(grid)]
        cases.append(
            retrieval_case(
                tokenizer, task, context_tokens, depth, phrasing, haystack, seed + i // len(grid)
            )
        )
    return cases


def filler_prompt_ids(tokenizer, n_tokens: int, offset: int = 0) -> list[int]:
    """Exactly ``n_tokens`` token ids of essay text (for capacity and block-bound checks)."""
    ids = _essay_ids(tokenizer)
    if offset + n_tokens > len(ids):
        raise ValueError(f"offset {offset} + {n_tokens} tokens is past the essays ({len(ids)})")
    return ids[offset : offset + n_tokens]


def kjv_passages(n_passages: int, min_chars: int, seed: int = 0) -> list[str]:
    """Contiguous KJV passages of at least ``min_chars`` characters, fixed by ``seed``."""
    verses = load_kjv()
    text_of = [v.get("text") or v.get("verse") or "" for v in verses]
    rng = random.Random(seed)
    out = []
    for _ in range(n_passages):
        i = rng.randint(0, len(verses) - 2000)
        buf = []
        while sum(map(len, buf)) < min_chars:
            buf.append(text_of[i].strip())
            i += 1
        out.append(" ".join(buf))
    return out


# -- look-alike distractors: many key-value sentences of one shape, the query names one -------

LOOKALIKE_ADJECTIVES = (
    "amber", "brisk", "cobalt", "crimson", "dusky", "frosty", "golden", "hollow", "ivory",
    "jade", "lunar", "misty", "olive", "quiet", "rusty", "scarlet", "silver", "stony",
    "tawny", "velvet", "violet", "windy", "young", "zesty",
)  # fmt: skip
LOOKALIKE_NOUNS = (
    "badger", "beacon", "canyon", "cedar", "comet", "falcon", "harbor", "heron", "lantern",
    "maple", "meadow", "otter", "pebble", "raven", "river", "saddle", "spruce", "thistle",
    "tiger", "tulip", "walrus", "willow", "wren", "zephyr",
)  # fmt: skip
#: words of the word-valued answers
LOOKALIKE_WORDS = (
    "apple", "bridge", "candle", "desert", "engine", "feather", "garden", "hammer", "island",
    "jacket", "kettle", "ladder", "marble", "needle", "orange", "pillow", "rocket", "shadow",
    "ticket", "umbrella", "valley", "window", "yellow", "zipper",
)  # fmt: skip
LOOKALIKE_NEEDLE = " The value for {key} is {value}. "
LOOKALIKE_QUESTION = "\n\nWhat is the value for {key}? Answer with the value only."
LOOKALIKE_VALUES = ("digits", "words")


@dataclass(frozen=True)
class LookalikeCase:
    prompt: str  # chat-formatted, ready for generation
    answer: str  # the asked-for value
    key: str  # the asked-for key
    values: str  # "digits" (5-9 digits) | "words" (3 words)
    n_pairs: int
    depth: float  # where the asked-for sentence sits (0..1)
    haystack: str
    context_tokens: int  # haystack tokens (the sentences come on top)


def lookalike_case(
    tokenizer,
    context_tokens: int,
    n_pairs: int = 16,
    values: str = "digits",
    haystack: str = "essays",
    seed: int = 0,
) -> LookalikeCase:
    """``n_pairs`` sentences "The value for KEY is VALUE." of the same shape spread evenly over
    ``context_tokens`` tokens of ``haystack``; keys are distinct adjective-noun pairs (sharing
    words with each other), values 5-9 digit numbers (each its own length) or 3 words; the
    question names one key. Before the question every sentence looks alike, so a policy must
    keep the whole asked-for sentence (key *and* value) among near-identical distractors."""
    if values not in LOOKALIKE_VALUES:
        raise ValueError(f"unknown values {values!r}; valid: {LOOKALIKE_VALUES}")
    rng = random.Random(f"la-{seed}-{context_tokens}-{n_pairs}-{values}-{haystack}")
    pairs = [(a, b) for a in LOOKALIKE_ADJECTIVES for b in LOOKALIKE_NOUNS]
    keys = [f"{a} {b}" for a, b in rng.sample(pairs, n_pairs)]
    if values == "digits":
        vals = [str(rng.randint(10 ** (d - 1), 10**d - 1)) for d in rng.choices(range(5, 10), k=n_pairs)]  # fmt: skip
    else:
        vals = [" ".join(rng.sample(LOOKALIKE_WORDS, 3)) for _ in keys]
    ids = haystack_ids(tokenizer, haystack)
    start = rng.randint(0, max(0, len(ids) - context_tokens - 1))
    hay = ids[start : start + context_tokens]
    cuts = [int(len(hay) * (i + 0.5) / n_pairs) for i in range(n_pairs)]
    text, prev = "", 0
    for cut, key, val in zip(cuts, keys, vals, strict=True):
        text += tokenizer.decode(hay[prev:cut]) + LOOKALIKE_NEEDLE.format(key=key, value=val)
        prev = cut
    text += tokenizer.decode(hay[prev:])
    target = rng.randrange(n_pairs)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text + LOOKALIKE_QUESTION.format(key=keys[target])}],
        tokenize=False,
        add_generation_prompt=True,
    )
    depth = (target + 0.5) / n_pairs
    return LookalikeCase(
        prompt, vals[target], keys[target], values, n_pairs, depth, haystack, context_tokens
    )


def lookalike_suite(
    tokenizer, context_tokens: int, n: int, n_pairs: int = 16, seed: int = 0
) -> list[LookalikeCase]:
    """``n`` look-alike cases cycling over values (digits, words) x haystack (essays, KJV),
    each with its own seed (``seed + i``)."""
    grid = [(v, h) for v in LOOKALIKE_VALUES for h in HAYSTACKS]
    return [
        lookalike_case(tokenizer, context_tokens, n_pairs, *grid[i % len(grid)], seed=seed + i)
        for i in range(n)
    ]
