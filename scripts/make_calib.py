"""Generate quantkit's built-in calibration set into `calib/` (deterministic; all text written by the project).

    python scripts/make_calib.py            # rewrites calib/*.txt, calib/chat.jsonl and calib/manifest.json,
                                            # and the held-out evaluation text evaltext/prose.txt

The set mixes four kinds of text so that calibration activations cover what a chat model sees:
  prose.txt         hand-written passages + essays, stories, letters and explanations composed from templates
  chat.jsonl        multi-turn conversations ({"messages": [{"role", "content"}, ...]}), rendered with the
                    model's chat template ([INST] ... [/INST]) when the set is loaded
  code.txt          Python, JavaScript, SQL and shell snippets
  lists.txt         lists, tables, schedules, recipes, arithmetic, dates and measurements
Nothing is copied from an existing corpus; the vocabulary and templates below are original.

evaltext/prose.txt is prose composed the same way from another seed, without the hand-written passages: text for
evaluating quantized models that no calibration run has seen (no paragraph of it is in calib/).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "calib"
SEED = 20240601
EVAL_SEED = 20261206
EVAL_OUT = ROOT / "evaltext"
VERSION = 1

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------------
NAMES = ["Amara", "Bruno", "Chen", "Dalia", "Emil", "Farah", "Gustav", "Hana", "Ivo", "Jasmine", "Kofi", "Lena",
         "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Samir", "Tova", "Ulrich", "Vera", "Wendell",
         "Ximena", "Yusuf", "Zofia", "Marguerite", "Tobias", "Ines", "Rafael", "Edith", "Noor", "Callum", "Beatrix"]
PLACES = ["a harbour town on the northern coast", "a mountain village above the tree line", "a busy river port",
          "a quiet university city", "an island reached by a single ferry", "a desert oasis", "a market town",
          "the old quarter of a capital city", "a farming valley", "a lighthouse station", "a mining settlement",
          "a lakeside resort out of season", "a railway junction in the plains", "a fishing village in the fog"]
CITIES = ["Aldmere", "Brackenford", "Corvale", "Dunmarrow", "Eastwick Bay", "Fallowmere", "Glenhollow", "Harrowgate",
          "Ironbridge", "Juniper Falls", "Kestrel Point", "Larkspur", "Millbrook", "Northcliff", "Oakhaven"]
OBJECTS = ["a brass compass", "a bundle of letters", "a cracked violin", "an old map", "a silver key", "a notebook",
           "a wooden chest", "a telescope", "a jar of seeds", "a pocket watch", "a lantern", "a photograph",
           "a ledger", "a woollen scarf", "a clay bowl", "a folding knife", "a railway ticket", "a paper kite"]
SEASONS = ["spring", "summer", "autumn", "winter"]
WEATHER = ["a cold wind came off the water", "rain fell steadily through the night", "the sky was clear and pale",
           "fog rolled in before noon", "the heat pressed down on the roofs", "snow covered the roads by evening",
           "a storm gathered over the hills", "the air smelled of cut grass", "thin clouds hid the sun",
           "frost silvered the fences at dawn"]
FEELINGS = ["uneasy", "hopeful", "tired but content", "curious", "restless", "calm", "embarrassed", "proud",
            "nervous", "relieved", "amused", "determined", "homesick", "grateful"]
ACTIONS = ["mended the fence", "wrote a long letter", "walked to the station", "baked bread", "counted the money twice",
           "repaired the roof", "climbed the hill behind the house", "sorted the old papers", "fed the animals",
           "painted the shutters", "read until the candle burned down", "cleaned the workshop", "planted beans",
           "waited at the window", "argued with the shopkeeper", "tuned the radio", "sharpened the tools"]
JOBS = ["baker", "engineer", "nurse", "teacher", "carpenter", "librarian", "pilot", "farmer", "chemist", "tailor",
        "journalist", "surveyor", "architect", "gardener", "accountant", "translator", "mechanic", "potter"]
TOPICS = {
    "photosynthesis": ("Plants capture light with chlorophyll", "carbon dioxide and water become sugar and oxygen",
                       "the reactions happen in two stages, one driven by light and one that fixes carbon"),
    "tides": ("The moon pulls on the oceans", "the water bulges on the side facing the moon and on the far side",
              "most coasts see two high tides and two low tides each day"),
    "vaccines": ("A vaccine shows the immune system a harmless version of a threat",
                 "the body builds antibodies and memory cells", "a later infection is recognised and cleared faster"),
    "compound interest": ("Interest is paid on the original sum and on the interest already earned",
                          "the balance grows faster each year", "small rates add up over long periods"),
    "plate tectonics": ("The outer shell of the earth is broken into moving plates",
                        "where plates meet, mountains rise and earthquakes happen",
                        "the plates move a few centimetres a year, about as fast as fingernails grow"),
    "batteries": ("A battery stores energy in chemical form", "during discharge, ions move between the electrodes",
                  "charging pushes them back, which slowly wears the materials"),
    "rainbows": ("Sunlight is a mixture of colours", "raindrops bend and reflect the light",
                 "each colour leaves the drop at a slightly different angle"),
    "hash tables": ("A hash table maps keys to slots with a hash function", "lookups take constant time on average",
                    "collisions are handled by chaining or by probing for another slot"),
    "inflation": ("Inflation is a general rise in prices", "each unit of money buys a little less",
                  "central banks raise interest rates to slow it down"),
    "sleep": ("Sleep comes in cycles of roughly ninety minutes", "deep sleep restores the body",
              "dreaming sleep seems to help memory and mood"),
    "bridges": ("A bridge carries loads across a gap", "arches push outward, cables pull inward",
                "engineers choose the shape by span, ground and budget"),
    "bread": ("Yeast feeds on sugars in the dough", "it releases gas that is trapped by gluten",
              "baking sets the structure and browns the crust"),
    "gradient descent": ("Gradient descent lowers a loss step by step",
                         "each step moves the parameters against the gradient",
                         "the step size decides between slow progress and overshooting"),
    "quantization": ("Quantization stores numbers with fewer bits",
                     "a scale maps a small range of integers back to real values",
                     "careful rounding keeps the error small where it matters most"),
}
ADJ = ["small", "narrow", "crowded", "empty", "bright", "ancient", "modern", "forgotten", "famous", "humble",
       "stubborn", "patient", "careful", "generous", "noisy", "silent", "crooked", "elegant", "plain", "busy"]
FOODS = ["lentil soup", "roast vegetables", "apple cake", "rice with beans", "grilled fish", "pancakes",
         "barley stew", "tomato salad", "flatbread", "mushroom risotto", "plum jam", "potato dumplings"]
UNITS = [("kg", "kilograms"), ("m", "metres"), ("km", "kilometres"), ("L", "litres"), ("h", "hours"), ("°C", "degrees")]


def pick(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


# ---------------------------------------------------------------------------------------------------------------
# Hand-written passages
# ---------------------------------------------------------------------------------------------------------------
PASSAGES = [
    """The first thing anyone noticed about the workshop was the smell: linseed oil, sawdust and something sweet that
turned out to be the pear tree leaning against the back wall. Inside, the benches were scarred with a century of
small accidents. Nobody remembered who had carved the initials near the vice, but every apprentice added a mark of
their own before leaving, and the old master pretended not to see.""",
    """When the river froze that winter, the town discovered it had two halves that had never really met. Children from
the east bank skated across to stare at the bakery on the west bank, and the baker, who had lived there forty years,
walked over the ice for the first time to see what the east bank sold. He came back with a basket of smoked cheese
and an opinion about it that he shared with every customer until spring.""",
    """A good explanation starts where the listener already is. If someone knows how a bicycle pump warms up as you use
it, you can explain why the air at the bottom of a mountain is warmer than the air at the top. If they have watched
a kettle, you can explain clouds. The trick is to find the thing they have already seen and lead them one step
further, and then one more.""",
    """Dear Mrs. Okafor, thank you for the parcel, which arrived on Tuesday in excellent condition apart from a dent in
the tin of biscuits that I blame entirely on the postal service. The seeds are already in trays on the windowsill.
I have labelled them carefully this year, having learned my lesson when the courgettes turned out to be pumpkins
and took over half the garden. I will send photographs when there is something worth photographing.""",
    """The meeting had been scheduled for nine, but by a quarter past only three people had arrived, and one of them was
the caretaker who had come to fix the projector. They used the time well. By the time the others came in, apologising
about the trains, the three of them had drawn the whole plan on the whiteboard, argued about it, rubbed half of it out
and drawn it again, better.""",
    """Maps lie in useful ways. A subway map straightens every tunnel and spaces the stations evenly, because what the
traveller needs is the order of the stops and the places to change, not the true distance. A hiking map does the
opposite: it cares about every contour line, because a hundred metres of climbing matters more than a kilometre of
flat path. Choosing what to leave out is most of the work of making a map.""",
    """She kept a list of questions she could not answer. Why do cats knead blankets? Why does the smell of rain seem
stronger in the evening? Why do some songs get stuck in your head and others never do? Once a month she picked one,
went to the library and read until she understood it well enough to explain it to her nephew, who was seven and
did not accept answers he could not repeat.""",
    """The recipe said to let the dough rest for an hour, which is the kind of instruction that tests a person's
character. In that hour the kitchen was cleaned, the kettle boiled twice, and the dough was checked four times,
poked once, and found to be growing at its own pace regardless. Bread, it turns out, is not interested in your
schedule.""",
    """Every version of the software shipped with the same small bug: on the last day of February in a leap year, the
report printed the wrong month at the top of the page. It was harmless and nobody fixed it for eleven years, until
a new engineer found it on her second day, fixed it in four lines, and was thanked by a customer who had apparently
been waiting the whole time.""",
    """On the island there was one road, one shop, one school and one opinion about the ferry timetable, which was that
it had been designed by someone who had never needed to catch a ferry. The timetable was printed on a card pinned
beside the shop door, and beneath it, in several different handwritings, were the times the ferry actually came.""",
    """Learning an instrument as an adult is mostly a lesson in patience. The fingers know what they should do long
before they can do it, and the ear hears every mistake. Progress arrives in steps rather than in a slope: weeks of
nothing, then one morning a passage that was impossible is merely difficult, and a month later it is simply music.""",
    """The lighthouse keeper's log was not exciting reading. Wind south-west, moderate. Lamp lit at 18:42. Two fishing
boats returned. Wind veering west. Lamp extinguished at 06:15. But read across a whole year, the plain entries told
a story of their own: the storms of November, the long light evenings of June, the week in March when no boat went
out at all.""",
]


# ---------------------------------------------------------------------------------------------------------------
# Composed prose
# ---------------------------------------------------------------------------------------------------------------
def story(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    job, place, obj = pick(rng, JOBS), pick(rng, PLACES), pick(rng, OBJECTS)
    season, weather, feeling = pick(rng, SEASONS), pick(rng, WEATHER), pick(rng, FEELINGS)
    act1, act2, act3 = rng.sample(ACTIONS, 3)
    years = rng.randint(3, 40)
    sents = [
        f"{a} had worked as a {job} in {place} for {years} years.",
        f"In the {season} of that year, {weather}, and the streets were quieter than usual.",
        f"One morning {a} found {obj} on the doorstep, with no note and no name.",
        f"{a} felt {feeling}, {pick(rng, ['and', 'but', 'so'])} decided to say nothing until the evening.",
        f"That afternoon {a} {act1}, then {act2}, and still the {obj.split(' ', 1)[1]} sat on the table.",
        f"When {b} came by, {b} looked at it for a long time before speaking.",
        f'"I have seen this before," {b} said. "{pick(rng, ["It belonged to my grandmother.", "There used to be two of them.", "You should not have opened it.", "It came from the house by the river."])}"',  # noqa: E501
        f"They talked until it was dark, and by the end {a} {act3} without really noticing.",
        f"{pick(rng, ['Years later', 'Much later', 'The next spring', 'Long after that'])}, {a} would say that the "
        f"{pick(rng, ADJ)} {obj.split(' ', 1)[1]} had changed everything, although nobody quite believed it.",
    ]
    return " ".join(sents)


def explainer(rng: random.Random) -> str:
    topic = pick(rng, list(TOPICS))
    first, second, third = TOPICS[topic]
    openers = [f"How does {topic} work? The short answer is simple.", f"People often ask about {topic}.",
               f"Here is a plain explanation of {topic}.",
               f"{topic.capitalize()} is easier to understand than it sounds."]
    links = ["In other words,", "Put simply,", "As a result,", "This means that", "Because of this,"]
    closers = [f"Once you see it this way, {topic} stops being mysterious.",
               "The details are more complicated, but this is the core of it.",
               f"That is why engineers and scientists keep returning to {topic}.",
               "A good test of understanding is to explain it to someone else in your own words."]
    example = (f"For example, imagine {pick(rng, NAMES)}, a {pick(rng, JOBS)} who wants to understand it for work. "
               f"A {pick(rng, ADJ)} diagram on a napkin is usually enough to get started.")
    return " ".join([pick(rng, openers), first + ".", f"{pick(rng, links)} {second}.", third.capitalize() + ".",
                     example, pick(rng, closers)])


def letter(rng: random.Random) -> str:
    to, frm = rng.sample(NAMES, 2)
    city = pick(rng, CITIES)
    food = pick(rng, FOODS)
    day = pick(rng, ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"])
    return (f"Dear {to},\n\nI hope this finds you well. Things here in {city} are "
            f"{pick(rng, ['much the same', 'busier than ever', 'slowly improving', 'strange and wonderful'])}. "
            f"On {day} we made {food} for the whole street, and there was enough left over for the week. "
            f"The {pick(rng, ['garden', 'workshop', 'new kitchen', 'library', 'bridge repair'])} is nearly finished; "
            "I will believe it when I see it. Please write soon and tell me about "
            f"{pick(rng, ['your new job', 'the journey', 'the children', 'the house', 'your studies'])}.\n\n"
            f"With love,\n{frm}")


def news(rng: random.Random) -> str:
    city = pick(rng, CITIES)
    n = rng.randint(12, 4800)
    pct = rng.randint(2, 68)
    year = rng.randint(1990, 2031)
    thing = pick(rng, ["a new footbridge", "the public library", "a community orchard", "the tram line",
                       "a flood barrier", "the market hall", "a solar farm", "the harbour wall"])
    return (f"{city} council voted on Tuesday to approve {thing}, ending a debate that began in {year}. "
            f"Supporters say it will serve about {n:,} residents and cut "
            f"{pick(rng, ['travel times', 'costs', 'waiting lists', 'emissions'])} "
            f"by roughly {pct} percent. Critics, including the local {pick(rng, JOBS)}s' association, argue that the "
            f"money would be better spent elsewhere. Work is expected to start in the {pick(rng, SEASONS)}.")


def dialogue_prose(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    lines = [f'"Did you {pick(rng, ["lock the door", "bring the map", "call your sister", "finish the report"])}?" '
             f'{a} asked.',
             f'"{pick(rng, ["Of course", "I think so", "Not yet", "Was I supposed to"])}," said {b}.',
             f'"{pick(rng, ["Then we can go", "We will be late again", "That explains a lot", "Good, because I forgot mine"])}."',  # noqa: E501
             f"{b} {pick(rng, ['laughed', 'sighed', 'shrugged', 'looked away'])} and {pick(rng, ACTIONS)}."]
    return " ".join(lines)


def make_prose(rng: random.Random, n: int, passages: bool = True) -> str:
    makers = [story, explainer, letter, news, dialogue_prose]
    parts = list(PASSAGES) if passages else []
    for _ in range(n):
        parts.append(pick(rng, makers)(rng))
    rng.shuffle(parts)
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Conversations
# ---------------------------------------------------------------------------------------------------------------
def conversation(rng: random.Random) -> dict:
    kind = rng.randrange(5)
    msgs = []
    if kind == 0:
        topic = pick(rng, list(TOPICS))
        first, second, third = TOPICS[topic]
        msgs += [{"role": "user", "content": f"Can you explain {topic} in a few sentences?"},
                 {"role": "assistant", "content": f"Sure. {first}. {second.capitalize()}. {third.capitalize()}."},
                 {"role": "user", "content": pick(rng, ["Can you give me an everyday example?", "Why does that matter?",
                                                        "Could you make it simpler, for a child?"])},
                 {"role": "assistant", "content": f"Think of {pick(rng, NAMES)}, a {pick(rng, JOBS)}. "
                                                  f"{second.capitalize()}, which is something you can see in "
                                                  "ordinary life. "
                                                  "The same idea shows up again and again once you start looking."}]
    elif kind == 1:
        food = pick(rng, FOODS)
        k = rng.randint(2, 8)
        msgs += [{"role": "user", "content": f"I want to cook {food} for {k} people. What do I need?"},
                 {"role": "assistant", "content": f"For {k} people you will need about {k * 150} g of the main "
                                                  f"ingredient, {rng.randint(1, 4)} onions, "
                                                  f"{rng.randint(2, 6)} cloves of garlic, salt, pepper and "
                                                  f"{rng.randint(1, 3)} tablespoons of oil. "
                                                  f"Plan on {rng.randint(25, 90)} minutes in total."},
                 {"role": "user", "content": "And if one of the guests is vegetarian?"},
                 {"role": "assistant", "content": "Swap any meat stock for vegetable stock and check the labels of "
                                                  "ready-made sauces. Everything else in the recipe already works."}]
    elif kind == 2:
        a, b = rng.randint(12, 999), rng.randint(2, 99)
        msgs += [{"role": "user", "content": f"What is {a} times {b}?"},
                 {"role": "assistant", "content": f"{a} × {b} = {a * b}."},
                 {"role": "user", "content": f"And divided by {b}?"},
                 {"role": "assistant", "content": f"{a} ÷ {b} ≈ {a / b:.3f}."},
                 {"role": "user", "content": "Thanks! How did you check it?"},
                 {"role": "assistant", "content": f"Multiply back: {b} × {a // b} = {b * (a // b)}, "
                                                  f"and the remainder is {a % b}."}]
    elif kind == 3:
        lang = pick(rng, ["Python", "JavaScript", "SQL"])
        task = pick(rng, ["reverse a list", "count words in a string", "find the largest number",
                          "remove duplicates", "sort records by date"])
        msgs += [{"role": "user", "content": f"How do I {task} in {lang}?"},
                 {"role": "assistant", "content": f"Here is a short way to {task} in {lang}:\n\n" +
                                                  code_snippet(rng, lang) +
                                                  "\n\nIt runs in linear or n log n time depending on the step."},
                 {"role": "user", "content": "Can you explain the second line?"},
                 {"role": "assistant", "content": "The second line does the real work; the rest only sets up the "
                                                  "input and returns the result. "
                                                  "Try it on a small example and print each step."}]
    else:
        city = pick(rng, CITIES)
        d = rng.randint(2, 14)
        msgs += [{"role": "user", "content": f"I'm visiting {city} for {d} days in {pick(rng, SEASONS)}. Any tips?"},
                 {"role": "assistant", "content": f"Pack for changeable weather: {pick(rng, WEATHER)} is common. "
                                                  f"Spend the first day in {pick(rng, PLACES)}, and keep one day free. "
                                                  f"Try the local {pick(rng, FOODS)}."},
                 {"role": "user", "content": "Is it expensive?"},
                 {"role": "assistant", "content": f"Expect about {rng.randint(40, 180)} euros a day for a modest "
                                                  "hotel and meals; "
                                                  "markets and bakeries are cheaper than restaurants."}]
    return {"messages": msgs}


# ---------------------------------------------------------------------------------------------------------------
# Code
# ---------------------------------------------------------------------------------------------------------------
PY_NAMES = ["items", "records", "values", "rows", "words", "scores", "prices", "events", "lines", "nodes"]


def code_snippet(rng: random.Random, lang: str) -> str:
    v = pick(rng, PY_NAMES)
    if lang == "Python":
        return pick(rng, [
            f"def process({v}):\n    result = sorted(set({v}))\n    return result[::-1]",
            f"from collections import Counter\n\ndef top({v}, k={rng.randint(2, 9)}):\n"
            f"    counts = Counter({v})\n    return counts.most_common(k)",
            f"def largest({v}):\n    best = {v}[0]\n    for x in {v}[1:]:\n"
            "        if x > best:\n            best = x\n    return best",
        ])
    if lang == "JavaScript":
        return pick(rng, [
            f"function process({v}) {{\n  const seen = new Set({v});\n  return [...seen].reverse();\n}}",
            f"const total = {v}.reduce((acc, x) => acc + x, 0);\nconsole.log(`total: ${{total}}`);",
            f"{v}.sort((a, b) => new Date(a.date) - new Date(b.date));",
        ])
    return pick(rng, [
        f"SELECT name, COUNT(*) AS n\nFROM {v}\nGROUP BY name\nORDER BY n DESC\nLIMIT {rng.randint(3, 20)};",
        f"SELECT DISTINCT city FROM {v} WHERE created_at >= '20{rng.randint(10, 30)}-01-01';",
        f"UPDATE {v} SET status = 'done' WHERE id IN (SELECT id FROM {v} WHERE due < CURRENT_DATE);",
    ])


def python_module(rng: random.Random) -> str:
    cls = pick(rng, ["Inventory", "Scheduler", "Ledger", "Catalog", "Tracker", "Router", "Cache", "Queue"])
    field = pick(rng, PY_NAMES)
    n = rng.randint(2, 64)
    return f'''class {cls}:
    """Keep {field} in memory and answer simple questions about them."""

    def __init__(self, limit: int = {n}):
        self.limit = limit
        self.{field} = []

    def add(self, value):
        if len(self.{field}) >= self.limit:
            raise ValueError(f"{cls.lower()} is full ({{self.limit}} {field})")
        self.{field}.append(value)

    def mean(self) -> float:
        return sum(self.{field}) / max(len(self.{field}), 1)


def main():
    store = {cls}(limit={n})
    for i in range({rng.randint(3, 30)}):
        store.add(i * {rng.randint(2, 9)} % {rng.randint(5, 17)})
    print(f"mean = {{store.mean():.2f}}")


if __name__ == "__main__":
    main()
'''


def js_module(rng: random.Random) -> str:
    name = pick(rng, ["fetchUsers", "loadOrders", "syncNotes", "pollStatus", "saveDraft"])
    url = pick(rng, ["/api/users", "/api/orders", "/api/notes", "/status", "/drafts"])
    return f'''async function {name}(retries = {rng.randint(1, 5)}) {{
  for (let attempt = 0; attempt <= retries; attempt++) {{
    try {{
      const response = await fetch("{url}");
      if (!response.ok) throw new Error(`HTTP ${{response.status}}`);
      return await response.json();
    }} catch (err) {{
      console.warn(`attempt ${{attempt + 1}} failed:`, err.message);
      await new Promise((r) => setTimeout(r, {rng.randint(100, 2000)} * (attempt + 1)));
    }}
  }}
  throw new Error("{name}: giving up");
}}
'''


def shell_script(rng: random.Random) -> str:
    d = pick(rng, ["logs", "backups", "data", "build", "reports"])
    return f'''#!/usr/bin/env bash
set -euo pipefail
# keep the newest {rng.randint(3, 30)} files in {d}/ and compress the rest
cd "$(dirname "$0")/{d}"
ls -1t | tail -n +{rng.randint(4, 31)} | while read -r f; do
  gzip -9 "$f" && echo "compressed $f"
done
du -sh .
'''


def make_code(rng: random.Random, n: int) -> str:
    parts = []
    for _ in range(n):
        r = rng.randrange(5)
        if r == 0:
            parts.append(python_module(rng))
        elif r == 1:
            parts.append(js_module(rng))
        elif r == 2:
            parts.append(shell_script(rng))
        else:
            parts.append(code_snippet(rng, pick(rng, ["Python", "JavaScript", "SQL"])) + "\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Lists and numbers
# ---------------------------------------------------------------------------------------------------------------
def shopping_list(rng: random.Random) -> str:
    items = rng.sample(["eggs", "flour", "milk", "apples", "rice", "onions", "cheese", "coffee", "lemons", "butter",
                        "carrots", "tea", "oats", "beans", "soap", "candles", "batteries", "bread"], rng.randint(4, 9))
    return "Shopping list:\n" + "\n".join(f"- {rng.randint(1, 6)} x {it}" for it in items)


def table(rng: random.Random) -> str:
    cols = ["city", "population", "area_km2", "founded"]
    rows = [f"| {c} | {rng.randint(2000, 2_000_000):,} | {rng.uniform(5, 900):.1f} | {rng.randint(800, 1950)} |"
            for c in rng.sample(CITIES, rng.randint(3, 7))]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "\n".join(rows)


def schedule(rng: random.Random) -> str:
    h = rng.randint(6, 10)
    out = [f"Schedule for {pick(rng, ['Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday'])}, {rng.randint(1, 28)} "
           f"{pick(rng, ['January', 'March', 'May', 'July', 'September', 'November'])} {rng.randint(2019, 2031)}:"]
    for _ in range(rng.randint(4, 8)):
        m = pick(rng, [0, 15, 30, 45])
        out.append(f"{h:02d}:{m:02d}  {pick(rng, ACTIONS)} ({pick(rng, NAMES)})")
        h += rng.randint(1, 2)
    return "\n".join(out)


def arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(4, 10)):
        a, b = rng.randint(1, 9999), rng.randint(1, 999)
        op = pick(rng, ["+", "-", "*", "/"])
        res = {"+": a + b, "-": a - b, "*": a * b, "/": round(a / b, 4)}[op]
        lines.append(f"{a} {op} {b} = {res}")
    return "Exercises:\n" + "\n".join(lines)


def measurements(rng: random.Random) -> str:
    out = [f"Field notes, station {rng.randint(1, 40)}:"]
    for i in range(rng.randint(3, 7)):
        sym, word = pick(rng, UNITS)
        out.append(f"{i + 1}. {pick(rng, ADJ)} sample: {rng.uniform(0.1, 500):.2f} {sym} ({word}), "
                   f"error ±{rng.uniform(0.01, 3):.2f}")
    return "\n".join(out)


def recipe(rng: random.Random) -> str:
    food = pick(rng, FOODS)
    steps = rng.sample(["Wash and chop the vegetables.", "Heat the oil in a wide pan.", "Add the onions and stir.",
                        "Season with salt and pepper.", "Simmer for twenty minutes.", "Stir in the herbs.",
                        "Let it cool slightly before serving.", "Taste and adjust the seasoning.",
                        "Preheat the oven to 190 °C.", "Bake until golden, about 35 minutes."], rng.randint(4, 7))
    return f"Recipe: {food} (serves {rng.randint(2, 8)})\n" + "\n".join(f"{i + 1}. {s}" for i, s in enumerate(steps))


def make_lists(rng: random.Random, n: int) -> str:
    makers = [shopping_list, table, schedule, arithmetic, measurements, recipe]
    return "\n\n".join(pick(rng, makers)(rng) for _ in range(n)) + "\n"


# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT,
                        help="output directory (default: calib/ at the repository root)")
    parser.add_argument("--eval-out", type=Path, default=EVAL_OUT,
                        help="output directory of the evaluation text (default: evaltext/ at the repository root)")
    args = parser.parse_args(argv)
    out = args.out
    rng = random.Random(SEED)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "prose.txt": make_prose(rng, 900),
        "chat.jsonl": "".join(json.dumps(conversation(rng), ensure_ascii=False) + "\n" for _ in range(420)),
        "code.txt": make_code(rng, 260),
        "lists.txt": make_lists(rng, 420),
    }
    entries = []
    for name, text in files.items():
        data = text.encode("utf-8")
        (out / name).write_bytes(data)
        entries.append({"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                        "kind": name.split(".")[0]})
    set_hash = hashlib.sha256("".join(e["sha256"] for e in entries).encode()).hexdigest()
    manifest = {"name": "quantkit-builtin", "version": VERSION, "generator": "scripts/make_calib.py", "seed": SEED,
                "license": "Apache-2.0 (written by the quantkit project)", "files": entries, "sha256": set_hash}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for e in entries:
        print(f"{e['file']:12s} {e['bytes']:>9,d} bytes  {e['sha256'][:12]}")
    print(f"set sha256 {set_hash[:16]}")
    write_eval_text(args.eval_out, calibration=files["prose.txt"])


def write_eval_text(out: Path, calibration: str) -> None:
    """evaltext/prose.txt (and its manifest): held-out prose; no paragraph of it appears in the calibration prose."""
    seen = set(calibration.split("\n\n"))
    rng = random.Random(EVAL_SEED)
    paragraphs = [p for p in make_prose(rng, 260, passages=False).rstrip("\n").split("\n\n") if p not in seen]
    data = ("\n\n".join(paragraphs) + "\n").encode("utf-8")
    out.mkdir(parents=True, exist_ok=True)
    (out / "prose.txt").write_bytes(data)
    manifest = {"name": "quantkit-evaltext", "version": VERSION, "generator": "scripts/make_calib.py",
                "seed": EVAL_SEED, "license": "Apache-2.0 (written by the quantkit project)",
                "files": [{"file": "prose.txt", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                           "kind": "prose", "paragraphs": len(paragraphs)}]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"evaltext/prose.txt {len(data):>9,d} bytes  {manifest['files'][0]['sha256'][:12]} ({len(paragraphs)} "
          "paragraphs, none in calib/)")


if __name__ == "__main__":
    main()
