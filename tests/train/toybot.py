"""A templated three-intent restaurant bot (one entity type) for the training tests.

Big enough to hold out a useful number of examples (16 per intent), small enough to
fine-tune a 2-layer encoder in about a second.
"""
BOOK = ["book a table for {n} people", "reserve a table for {n}", "i need a table for {n} tonight",
        "table for {n} please", "can i book for {n} people tomorrow", "get me a table for {n}"]
HOURS = ["when do you open", "what are your opening hours", "are you open on sunday", "what time do you close",
         "how late are you open", "opening times please", "are you open today", "when do you close tonight",
         "what are your hours on monday", "do you open early", "are you open late on friday",
         "what time do you open tomorrow", "is the restaurant open now", "hours for the weekend please",
         "until when are you open", "when does the kitchen close"]
MENU = ["show me the menu", "what dishes do you serve", "do you have vegan food", "can i see the menu please",
        "what is on the menu today", "which desserts do you have", "do you serve pasta", "any gluten free dishes",
        "what drinks do you have", "is there a kids menu", "do you have soup today", "what are the specials",
        "do you serve fish", "can i get the wine list", "what salads are there", "do you have pizza"]
NUMS = ["2", "3", "4", "5", "6", "8", "10", "12"]


def toy_examples(n_per_intent=16, offset=0):
    """[(text, intent, entities)]: `n_per_intent` of book (with a `people` entity), hours, menu.

    `offset` shifts which book templates/numbers are used, to get unseen book examples.
    """
    out = []
    for i in range(offset, offset + n_per_intent):
        n = NUMS[(i + i // len(BOOK)) % len(NUMS)]
        text = BOOK[i % len(BOOK)].format(n=n)
        start = text.index(" " + n) + 1
        out.append((text, "book", [{"start": start, "end": start + len(n), "entity": "people"}]))
    out += [(t, "hours", []) for t in HOURS[:n_per_intent]]
    out += [(t, "menu", []) for t in MENU[:n_per_intent]]
    return out


def columns(data):
    """(texts, intents, entities) lists from [(text, intent, entities)]."""
    return [d[0] for d in data], [d[1] for d in data], [d[2] for d in data]
