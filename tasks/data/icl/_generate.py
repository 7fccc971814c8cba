"""Generate the rule-based ICL tasks in this folder.

Standard library only and deterministic (fixed seeds): running

    python3 tasks/data/icl/_generate.py

rewrites exactly the same JSON files. The lexical/knowledge tasks in this
folder are hand-written and are not touched by this script.
"""

import json
import os
import random
import string

HERE = os.path.dirname(os.path.abspath(__file__))

# --- vocabularies -----------------------------------------------------------
# Neutral concrete nouns: no animals, fruits or colour words, so that they can
# serve as distractors for the choose_<category>_from_list tasks.
OBJECTS = """
chair table window door river mountain pencil book garden bottle candle
bridge castle church desk doctor engine farmer forest guitar hammer island
jacket kettle ladder market needle ocean pillow pocket queen rocket school
shoe spoon tower umbrella valley wagon basket blanket bucket button camera
carpet coffee cookie cotton crown diamond dinner drum feather flag floor
glove hat helmet honey house jar key king kitchen knife lamp letter map
mirror money moon motor nail newspaper notebook office oven paper pen
piano picture plate pot radio ring road roof rope sail salt sand shirt
shovel sink soap sock sofa star stone storm street sugar sun sweater
teacher tent ticket toast towel train truck tunnel wall watch water wheel
whistle wind winter boat bread brush cabin card chain cloud clock coat
dress engine field fire glass grass hill iron lake leaf mail milk nest
park path pipe plant pool rain rock sea ship shop sky snow soup stove
summer table temple thread tool town toy tree violin wood yard
"""

ANIMALS = """
dog cat horse cow sheep goat pig lion tiger bear wolf fox rabbit mouse
elephant giraffe zebra monkey camel deer eagle owl parrot duck goose swan
frog snake turtle shark whale dolphin penguin kangaroo koala donkey hamster
squirrel spider bee ant butterfly chicken
"""

FRUITS = """
apple banana cherry grape lemon mango peach pear pineapple plum strawberry
watermelon melon kiwi apricot coconut fig papaya raspberry blueberry
blackberry grapefruit tangerine pomegranate guava lychee nectarine
cranberry
"""

COLORS = """
red blue green yellow purple pink brown black white gray orange violet
turquoise beige maroon navy crimson indigo silver gold
"""


def _words(text):
    seen, out = set(), []
    for w in text.split():
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


OBJECTS = _words(OBJECTS)
ANIMALS = _words(ANIMALS)
FRUITS = _words(FRUITS)
COLORS = _words(COLORS)
assert not (set(OBJECTS) & (set(ANIMALS) | set(FRUITS) | set(COLORS)))
assert not (set(ANIMALS) & set(FRUITS)) and not (set(FRUITS) & set(COLORS))
assert not (set(ANIMALS) & set(COLORS))

WORDS = OBJECTS + ANIMALS + FRUITS  # generic vocabulary for string tasks

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
            "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December"]

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven",
        "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen",
        "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy",
        "eighty", "ninety"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth",
            "seventh", "eighth", "ninth", "tenth", "eleventh", "twelfth",
            "thirteenth", "fourteenth", "fifteenth", "sixteenth",
            "seventeenth", "eighteenth", "nineteenth", "twentieth"]


def number_to_words(n):
    if n < 20:
        return ONES[n]
    if n < 100:
        t, o = divmod(n, 10)
        return TENS[t] + ("-" + ONES[o] if o else "")
    if n < 1000:
        h, r = divmod(n, 100)
        return ONES[h] + " hundred" + (" " + number_to_words(r) if r else "")
    raise ValueError(n)


def roman(n):
    vals = [(10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
    out = ""
    for v, s in vals:
        while n >= v:
            out += s
            n -= v
    return out


# --- writing ----------------------------------------------------------------
def write(name, pairs, minimum=60):
    inputs = [a for a, _ in pairs]
    assert len(pairs) >= minimum, (name, len(pairs))
    assert len(set(inputs)) == len(inputs), name
    for a, b in pairs:
        assert a and b and a == a.strip() and b == b.strip(), (name, a, b)
    data = [{"input": a, "output": b} for a, b in pairs]
    with open(os.path.join(HERE, name + ".json"), "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{name}: {len(pairs)}")


def random_lists(rng, vocab, n, lengths, key=None):
    """n unique comma-separated lists of distinct words from vocab."""
    out, seen = [], set()
    while len(out) < n:
        k = rng.choice(lengths)
        items = rng.sample(vocab, k)
        if key is not None and not key(items):
            continue
        s = ", ".join(items)
        if s in seen:
            continue
        seen.add(s)
        out.append(items)
    return out


# --- tasks ------------------------------------------------------------------
def string_tasks():
    write("capitalize", [(w, w.capitalize()) for w in WORDS])
    write("uppercase", [(w, w.upper()) for w in WORDS])
    write("lowercase", [(w.upper(), w) for w in WORDS])
    write("first_letter", [(w, w[0]) for w in WORDS])
    write("last_letter", [(w, w[-1]) for w in WORDS])
    write("capitalize_first_letter", [(w, w[0].upper()) for w in WORDS])
    write("word_length", [(w, str(len(w))) for w in WORDS])
    write("reverse_word", [(w, w[::-1]) for w in WORDS
                           if 3 <= len(w) <= 5 and w != w[::-1]])


def letter_tasks():
    nxt, prv = [], []
    for alphabet in (string.ascii_lowercase, string.ascii_uppercase):
        for run in (1, 2, 3):
            # next: "a" -> "b", "a, b" -> "c", "a, b, c" -> "d"
            for i in range(0, 26 - run):
                seq = alphabet[i:i + run]
                nxt.append((", ".join(seq), alphabet[i + run]))
            # previous: "b" -> "a", "c, b" -> "a", "d, c, b" -> "a"
            for i in range(1, 27 - run):
                seq = alphabet[i:i + run][::-1]
                prv.append((", ".join(seq), alphabet[i - 1]))
    write("next_letter", nxt)
    write("previous_letter", prv)


def number_tasks():
    write("next_number", [(str(n), str(n + 1)) for n in range(0, 150)])
    write("previous_number", [(str(n), str(n - 1)) for n in range(1, 151)])
    write("number_word", [(str(n), number_to_words(n)) for n in range(0, 121)])
    write("word_number", [(number_to_words(n), str(n)) for n in range(0, 121)])
    write("add_numbers", [(f"{a} + {b}", str(a + b))
                          for a in range(10) for b in range(10)])


def sequence_items():
    """Ordered sequences for next_item / previous_item."""
    seqs = [
        (WEEKDAYS, True),
        (MONTHS, True),
        (ONES[1:] + ["twenty"], False),
        (ORDINALS, False),
        ([roman(n) for n in range(1, 21)], False),
        (list(string.ascii_lowercase), False),
    ]
    nxt, prv = [], []
    for seq, cyclic in seqs:
        n = len(seq)
        for i in range(n):
            if i + 1 < n or cyclic:
                nxt.append((seq[i], seq[(i + 1) % n]))
            if i > 0 or cyclic:
                prv.append((seq[i], seq[(i - 1) % n]))
    write("next_item", nxt)
    write("previous_item", prv)


def list_tasks():
    rng = random.Random(1234)
    lists = random_lists(rng, WORDS, 150, [3, 4, 5])
    write("choose_first_of_list", [(", ".join(l), l[0]) for l in lists])
    lists = random_lists(rng, WORDS, 150, [3, 4, 5])
    write("choose_last_of_list", [(", ".join(l), l[-1]) for l in lists])
    lists = random_lists(rng, WORDS, 150, [3, 5])
    write("choose_middle_of_list",
          [(", ".join(l), l[len(l) // 2]) for l in lists])

    def distinct_initials(items):
        return len({w[0] for w in items}) == len(items)

    lists = random_lists(rng, WORDS, 150, [3, 4, 5], key=distinct_initials)
    write("alphabetically_first", [(", ".join(l), min(l)) for l in lists])
    lists = random_lists(rng, WORDS, 150, [3, 4, 5], key=distinct_initials)
    write("alphabetically_last", [(", ".join(l), max(l)) for l in lists])


def category_tasks():
    rng = random.Random(5678)
    for name, vocab in (("animal", ANIMALS), ("fruit", FRUITS),
                        ("color", COLORS)):
        pairs, seen = [], set()
        while len(pairs) < 120:
            target = rng.choice(vocab)
            items = rng.sample(OBJECTS, 2) + [target]
            rng.shuffle(items)
            s = ", ".join(items)
            if s in seen:
                continue
            seen.add(s)
            pairs.append((s, target))
        write(f"choose_{name}_from_list", pairs)


def main():
    string_tasks()
    letter_tasks()
    number_tasks()
    sequence_items()
    list_tasks()
    category_tasks()


if __name__ == "__main__":
    main()
