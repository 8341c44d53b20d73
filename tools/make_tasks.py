#!/usr/bin/env python3
"""Regenerate smolpeft's built-in datasets (smolpeft/tasks/*) from the phrase banks in this file.

    python tools/make_tasks.py            # write the files, run the checks, print counts
    python tools/make_tasks.py --check    # regenerate in memory and fail if the files on disk differ

Everything here was written for smolpeft and is released as CC0-1.0. The script uses only the
standard library and a fixed seed, so running it again produces byte-identical files.

Train and test come from disjoint material: every phrase bank, template list and entity list has a
train part and a test part (either written as two lists, or one list split by position with
`split_bank`). After generation the script checks that

* no text appears twice anywhere (exactly, or after lower-casing and dropping punctuation),
* every test sentence has token-set Jaccard similarity < 0.7 to every train sentence,
* every classification text is 4 to 40 words long and labels are exactly balanced,

and exits with an error if any check fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import re
import sys
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path

SEED = 20240607
ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = ROOT / "smolpeft" / "tasks"
MAX_JACCARD = 0.7  # test vs. train, token sets
MIN_WORDS, MAX_WORDS = 4, 40


class GenerationError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------------


def split_bank(items, every=3, offset=1):
    """Deterministic disjoint split of one hand-written list: every `every`-th item (from `offset`) goes to test."""
    items = list(items)
    if len(items) < 2:
        raise GenerationError(f"bank too small to split: {items!r}")
    train = [x for i, x in enumerate(items) if i % every != offset]
    test = [x for i, x in enumerate(items) if i % every == offset]
    return train, test


def split_tree(tree):
    """split_bank applied to every list inside nested dicts; returns (train_tree, test_tree)."""
    if isinstance(tree, dict):
        tr, te = {}, {}
        for k, v in tree.items():
            tr[k], te[k] = split_tree(v)
        return tr, te
    return split_bank(tree)


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


_KEEP_CASE = {"I", "I'm", "I've", "I'd", "I'll"}


def lcfirst(s: str) -> str:
    first = s.split(" ", 1)[0]
    if first in _KEEP_CASE or (len(first) > 1 and first[1:2].isupper()):
        return s
    return s[:1].lower() + s[1:]


def n_words(s: str) -> int:
    return len(s.split())


_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(text.lower())


def norm_key(text: str) -> str:
    return " ".join(tokens(text))


def jaccard(a: frozenset, b: frozenset) -> float:
    u = len(a | b)
    return len(a & b) / u if u else 1.0


_SMALL = {
    "a",
    "an",
    "the",
    "and",
    "or",
    "of",
    "in",
    "on",
    "at",
    "to",
    "for",
    "by",
    "as",
    "with",
    "from",
    "after",
    "over",
}


def title_case(s: str) -> str:
    out = []
    for i, w in enumerate(s.split(" ")):
        out.append(w if (i and w.lower() in _SMALL) or not w[:1].isalpha() else cap(w))
    return " ".join(out)


def fmt_num(x) -> str:
    """Exact Fraction/int -> shortest decimal string with at most 2 places, thousands separated."""
    d = Decimal(x.numerator) / Decimal(x.denominator) if isinstance(x, Fraction) else Decimal(x)
    d = d.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    if d == d.to_integral_value():
        return f"{int(d):,}"
    s = f"{d:,.2f}".rstrip("0")
    return s


def round_to(x: Fraction, places: int) -> Decimal:
    d = Decimal(x.numerator) / Decimal(x.denominator)
    return d.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)


def money(cents: int) -> str:
    dollars, c = divmod(cents, 100)
    return f"${dollars:,}" if c == 0 else f"${dollars:,}.{c:02d}"


def draw_unique(rng, make, n, seen, what, min_words=MIN_WORDS, max_words=MAX_WORDS, max_tries=200_000):
    """Call make(rng) until n new texts (unique by norm_key across `seen`, length within bounds) are collected."""
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > max_tries:
            raise GenerationError(f"{what}: only {len(out)}/{n} unique examples after {max_tries} tries; add material")
        text = make(rng)
        k = norm_key(text)
        if k in seen or not (min_words <= n_words(text) <= max_words):
            continue
        seen.add(k)
        out.append(text)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# sentiment: reviews of products, restaurants, movies and services
# ---------------------------------------------------------------------------------------------------------------------
# Each domain has neutral context sentences, positive/negative aspect sentences, closers, and "minor" clauses used for
# mixed-but-leaning reviews. Every list is split by position into train (2/3) and test (1/3) parts.

SENT_DOMAINS = {
    "product": {
        "slots": {
            "product": [
                "blender",
                "pair of wireless earbuds",
                "standing desk",
                "rice cooker",
                "hiking backpack",
                "electric kettle",
                "yoga mat",
                "desk lamp",
                "cordless vacuum",
                "laptop stand",
                "coffee grinder",
                "air fryer",
                "mechanical keyboard",
                "bluetooth speaker",
                "office chair",
                "camping tent",
                "toaster",
                "pair of running shoes",
                "smartwatch",
                "portable charger",
                "cast iron skillet",
                "baby monitor",
                "set of bed sheets",
                "webcam",
            ],
        },
        "context": [
            "Bought the {product} about a month ago.",
            "I ordered this {product} after reading a bunch of reviews.",
            "Got the {product} as a birthday gift from my brother.",
            "Picked up this {product} on sale last week.",
            "This is my second {product} from this brand.",
            "I've been using the {product} every day since March.",
            "Needed a new {product} before our move, so I grabbed this one.",
            "My partner picked this {product} out for us.",
            "Replaced my old {product} with this model.",
            "Ordered the {product} for my daughter's dorm room.",
            "We've had this {product} for about six weeks now.",
            "I was skeptical about buying a {product} online.",
            "Had my eye on this {product} for a while before pulling the trigger.",
            "Bought two of these, one for home and one for the office.",
            "Paid full price for this {product}, no freebie here.",
            "Updating my review after three months of use.",
            "I did a lot of comparison shopping before settling on this {product}.",
            "Long-time customer of the brand, first time trying their {product}.",
        ],
        "positive": [
            "It works exactly as described and feels really solid.",
            "Setup took five minutes and it has worked flawlessly ever since.",
            "The build quality is excellent for the price.",
            "Honestly the best {product} I've owned.",
            "Sturdy, well made, and it looks great in our apartment.",
            "It arrived early and was packed carefully.",
            "Everything about it feels thoughtfully designed.",
            "The quality is far better than the pricier brand I had before.",
            "Still going strong after daily use, no complaints at all.",
            "Even my picky brother was impressed, which says a lot.",
            "The instructions were clear and nothing was missing from the box.",
            "It does one job and does it really well.",
            "Worth every penny.",
            "For the money, you simply can't beat it.",
            "The materials feel premium and nothing rattles or wobbles.",
            "It has made my daily routine a little easier.",
            "The seller answered my question within an hour and was super friendly.",
            "The color is even nicer in person.",
            "I love it and already ordered another one as a gift.",
            "Super easy to clean, which was my main concern.",
            "Lightweight but surprisingly tough.",
            "It exceeded every expectation I had.",
            "Zero issues so far and it still looks brand new.",
            "The size is perfect and it fits right where I wanted it.",
            "I use it constantly and it never lets me down.",
            "Within five minutes I knew this {product} was a keeper.",
            "It feels like something twice the price.",
        ],
        "negative": [
            "It broke within two weeks of normal use.",
            "The {product} arrived scratched and missing a piece.",
            "Cheap plastic that feels like it will snap any second.",
            "It stopped working the day after the return window closed.",
            "Nothing like the photos, the color is completely off.",
            "The instructions were useless and half the screws didn't fit.",
            "Way overpriced for what you actually get.",
            "It wobbles, it squeaks, and it smells like chemicals.",
            "The seller never replied to any of my three emails.",
            "Total waste of money.",
            "I regret buying it and I'm sending it back.",
            "Flimsy, poorly made, and a pain to clean.",
            "Mine died after a month and the warranty claim was a nightmare.",
            "It looks nice, but it barely does what it's supposed to do.",
            "The seams started coming apart almost immediately.",
            "Constant problems from day one.",
            "It's so much smaller than advertised, which is really disappointing.",
            "The finish started peeling after a couple of weeks.",
            "Do not buy this, it's a lemon.",
            "The description promised far more than this thing delivers.",
            "After a few uses it started making a horrible grinding noise.",
            "I had to return two of them because both were defective.",
            "Honestly the worst {product} I have ever owned.",
            "It feels like a cheap knockoff of a better product.",
            "Shipping took three weeks and the box was crushed.",
            "Poor quality control, plain and simple.",
            "Save yourself the headache and buy something else.",
        ],
        "close_positive": [
            "Would buy again.",
            "Highly recommend it to anyone on the fence.",
            "Five stars from me.",
            "Already telling my friends about it.",
            "No regrets at all.",
            "Definitely a keeper.",
            "Couldn't be happier with this purchase.",
            "A great buy.",
            "Money well spent.",
        ],
        "close_negative": [
            "Would not recommend.",
            "Returning it tomorrow.",
            "One star, and that's generous.",
            "Avoid.",
            "Very disappointed overall.",
            "Lesson learned, I'll pay more next time.",
            "Not buying from this brand again.",
            "Huge letdown.",
            "Back in the box it goes.",
        ],
        "minor_negative": [
            "shipping was a little slow",
            "the box it came in was a bit beat up",
            "the manual is poorly translated",
            "it's slightly heavier than I expected",
            "the color options are limited",
            "it's not the cheapest option out there",
        ],
        "minor_positive": [
            "the packaging was nice",
            "it looks good on the shelf",
            "shipping was fast",
            "the price was low",
            "the color is pretty",
            "the box had a handy carrying strap",
        ],
    },
    "restaurant": {
        "slots": {
            # (place, dishes it serves): a review never pairs a dish with a restaurant that wouldn't serve it
            "venue": [
                ("the taqueria on Fifth Street", ["carnitas burrito", "chicken enchilada plate", "fish taco platter"]),
                ("this little ramen spot", ["spicy miso ramen", "karaage rice bowl", "tonkotsu ramen"]),
                ("the new bistro downtown", ["mushroom risotto", "steak frites", "duck confit"]),
                ("the diner near the highway exit", ["pancake stack", "patty melt", "chicken-fried steak"]),
                ("this family-run pizzeria", ["margherita pizza", "lasagna", "sausage calzone"]),
                ("the sushi bar by the station", ["salmon nigiri", "shrimp tempura roll", "chirashi bowl"]),
                ("the vegan cafe on Elm", ["veggie burger", "lentil soup", "jackfruit sandwich"]),
                ("that Ethiopian place near campus", ["doro wat", "lentil stew", "injera platter"]),
                ("the steakhouse at the mall", ["ribeye", "prime rib", "baked potato"]),
                ("the dumpling house on Grant Avenue", ["pork dumpling platter", "wonton soup", "scallion pancake"]),
                ("the corner bakery cafe", ["quiche", "turkey panini", "almond croissant"]),
                ("this Lebanese grill", ["lamb shawarma", "falafel plate", "chicken kebab"]),
                ("the brunch spot by the river", ["shakshuka", "French toast", "avocado toast"]),
                ("the Korean barbecue place on Main", ["bulgogi", "bibimbap", "kimchi fried rice"]),
                ("this tiny noodle counter", ["pad see ew", "beef chow fun", "dan dan noodles"]),
                ("the seafood shack at the pier", ["lobster roll", "clam chowder", "fish and chips"]),
                ("the Greek taverna uptown", ["chicken souvlaki", "moussaka", "grilled octopus"]),
                ("the Indian restaurant on King Street", ["butter chicken", "lamb vindaloo", "chicken tikka masala"]),
                ("the Vietnamese place near the office", ["pho", "banh mi", "lemongrass chicken"]),
                ("the barbecue joint off Route 9", ["beef brisket", "pulled pork sandwich", "rack of ribs"]),
                ("the Italian trattoria on the square", ["eggplant parmesan", "spaghetti carbonara", "osso buco"]),
            ],
        },
        "context": [
            "We went to {place} for my mom's birthday.",
            "Stopped by {place} for a quick lunch on Saturday.",
            "Ordered takeout from {place} last night.",
            "Tried {place} for the first time after a friend suggested it.",
            "My coworkers and I had dinner at {place} on Friday.",
            "Walked into {place} without a reservation around seven.",
            "Date night at {place}.",
            "Grabbed brunch at {place} with my sister.",
            "I've been to {place} maybe a dozen times now.",
            "Got delivery from {place} during the storm.",
            "Our group of six booked a table at {place}.",
            "Came to {place} because the reviews looked promising.",
            "First visit to {place} since they reopened.",
            "Celebrated our anniversary at {place}.",
            "A friend from out of town wanted to try {place}.",
        ],
        "positive": [
            "The {dish} was packed with flavor and came out piping hot.",
            "Our server was attentive without hovering, and refills came fast.",
            "Portions are generous and prices are more than fair.",
            "Everything tasted fresh and homemade.",
            "The {dish} alone is worth the trip.",
            "Cozy atmosphere, friendly staff, and the food was delicious.",
            "They handled my gluten allergy carefully and the kitchen even came out to check on me.",
            "Best {dish} I've had in this city, hands down.",
            "The staff remembered us from last time, which was a lovely touch.",
            "Food arrived quickly even though the place was packed.",
            "Every bite of the {dish} was perfectly seasoned.",
            "The dessert menu is small but everything on it is wonderful.",
            "Clean dining room, great music, and a really warm welcome.",
            "Delivery was early and the food was still hot.",
            "We left full and happy and already planning our next visit.",
            "The chef clearly cares, you can taste it in every dish.",
            "Their homemade sauces are incredible.",
            "The {dish} was cooked perfectly and beautifully presented.",
            "Great value for the quality you get.",
            "The cocktails were creative and well balanced.",
            "Even the bread they bring to the table is excellent.",
            "I keep thinking about that {dish} days later.",
        ],
        "negative": [
            "The {dish} was cold in the middle and bland everywhere else.",
            "We waited forty minutes for our food and nobody apologized.",
            "Our server was rude and kept forgetting our drinks.",
            "The tables were sticky and the bathroom was filthy.",
            "Tiny portions at ridiculous prices.",
            "The {dish} tasted like it had been microwaved twice.",
            "They got our order wrong and then argued with us about it.",
            "Way too salty, I couldn't finish my plate.",
            "The delivery showed up an hour late and everything was soggy.",
            "Overpriced, underseasoned, and the service was painfully slow.",
            "I found a hair in my {dish}, and the manager just shrugged.",
            "The music was so loud we couldn't hear each other talk.",
            "Half the menu was unavailable and the staff seemed annoyed that we asked.",
            "I got sick a few hours after eating there.",
            "The {dish} was greasy and completely flavorless.",
            "We were rushed out before we could even finish dessert.",
            "Stale bread, watery soup, and a burnt main course.",
            "They charged us for items we never ordered.",
            "The whole place smelled like old fryer oil.",
            "Nothing tasted fresh, it all seemed to come out of a freezer bag.",
            "Worst {dish} I've had in years.",
            "The hostess ignored us for ten minutes while chatting on her phone.",
        ],
        "close_positive": [
            "We'll definitely be back.",
            "Can't wait to go again.",
            "A new favorite for us.",
            "Ten out of ten, would eat here again.",
            "Highly recommended for a night out.",
            "Already craving another visit.",
        ],
        "close_negative": [
            "We won't be going back.",
            "Save your money and eat somewhere else.",
            "Never again.",
            "What a disappointing meal.",
            "Not worth the hype.",
            "Hard pass next time.",
        ],
        "minor_negative": [
            "parking nearby is a nightmare",
            "it gets pretty loud on weekends",
            "the wait for a table was long",
            "the dessert was just okay",
            "the menu is a bit pricey",
            "the chairs aren't very comfortable",
        ],
        "minor_positive": [
            "the decor is cute",
            "the drinks were decent",
            "our server was friendly enough",
            "the patio is nice",
            "the fries were good",
            "the location is convenient",
        ],
    },
    "movie": {
        "slots": {
            "film": [
                "this sci-fi thriller",
                "the new superhero sequel",
                "this indie drama",
                "the animated family film",
                "this horror remake",
                "the heist comedy",
                "this war epic",
                "the romantic comedy everyone's talking about",
                "this nature documentary",
                "the courtroom drama",
                "this space western",
                "the musical adaptation",
                "this slow-burn mystery",
                "the sports biopic",
                "this zombie comedy",
                "the fantasy prequel",
                "this coming-of-age story",
                "the spy caper",
                "this period piece",
            ],
        },
        "context": [
            "Watched {film} last night with some friends.",
            "Finally got around to seeing {film}.",
            "Caught {film} at a late showing on opening weekend.",
            "My kids begged me to take them to {film}.",
            "Streamed {film} on a rainy Sunday afternoon.",
            "Went into {film} knowing almost nothing about it.",
            "Saw {film} in IMAX after months of hype.",
            "Our book club picked {film} for movie night.",
            "I rented {film} on a whim.",
            "I'm a huge fan of the director, so I was excited for {film}.",
            "My partner dragged me to {film} on Friday.",
            "Watched {film} on a long flight.",
        ],
        "positive": [
            "The acting is superb, especially the lead.",
            "I was on the edge of my seat the entire time.",
            "Gorgeous cinematography and a soundtrack that gave me chills.",
            "The script is sharp, funny, and genuinely moving.",
            "It's the rare film that gets better the more you think about it.",
            "Every scene felt purposeful and the pacing was perfect.",
            "The ending caught me completely off guard, in the best way.",
            "The performances are so natural you forget you're watching actors.",
            "I laughed, I cried, and I'd happily watch it again tomorrow.",
            "The visual effects are stunning without ever feeling overdone.",
            "A heartfelt story told with real craft.",
            "The villain is one of the most memorable I've seen in years.",
            "Two and a half hours just flew by.",
            "The dialogue is clever and the characters feel real.",
            "It's beautifully shot and wonderfully acted.",
            "The whole theater applauded when it ended.",
            "A masterpiece of tension and atmosphere.",
            "The chemistry between the two leads is fantastic.",
            "Smart, stylish, and surprisingly emotional.",
            "One of the best films I've seen this year.",
            "The final twenty minutes are pure magic.",
        ],
        "negative": [
            "The plot made no sense and the ending was lazy.",
            "I checked my watch at least five times.",
            "Wooden acting and dialogue that made me cringe.",
            "It's two hours of loud explosions and nothing else.",
            "The pacing is painfully slow and nothing really happens.",
            "The jokes fell completely flat, nobody in the theater laughed.",
            "It felt like a long commercial for the next sequel.",
            "The characters were so shallow I didn't care what happened to them.",
            "The special effects looked cheap and unfinished.",
            "A boring, predictable mess.",
            "I almost walked out halfway through.",
            "The twist was obvious from the first ten minutes.",
            "Terrible editing made the action scenes impossible to follow.",
            "It wastes a talented cast on a dull, forgettable script.",
            "Easily the worst movie I've seen this year.",
            "The soundtrack was so overbearing it drowned out the dialogue.",
            "Even the trailer was more entertaining than this.",
            "The story drags, then rushes through a confusing finale.",
            "I fell asleep twice and didn't miss anything.",
            "A dull, joyless slog.",
            "None of the characters made a single sensible decision.",
        ],
        "close_positive": [
            "Go see it on the biggest screen you can.",
            "Absolutely worth the ticket price.",
            "I'll be recommending it to everyone.",
            "An instant favorite.",
            "Don't miss this one.",
            "Already planning a second viewing.",
        ],
        "close_negative": [
            "Skip it.",
            "Save your money for something else.",
            "Not worth the ticket price.",
            "What a waste of an evening.",
            "I want those two hours back.",
            "Wait for it to hit free streaming, or don't.",
        ],
        "minor_negative": [
            "the middle act drags a little",
            "a couple of side characters felt underused",
            "the runtime is a bit long",
            "one subplot didn't quite land",
            "the theater's sound mix was a bit loud",
            "the opening is slow",
        ],
        "minor_positive": [
            "the opening scene is well shot",
            "the score is pretty good",
            "the lead actor tries his best",
            "a few jokes landed",
            "the costumes look great",
            "the posters were cool",
        ],
    },
    "service": {
        "slots": {
            "service": [
                "the plumbing company",
                "this hotel",
                "the airline",
                "the moving company",
                "the bank's phone support",
                "this auto repair shop",
                "the cleaning service",
                "our internet provider",
                "this hair salon",
                "the car rental agency",
                "the dentist's office",
                "this gym",
                "the landscaping crew",
                "the pet groomer",
                "this dry cleaner",
                "the electrician",
                "the vacation rental host",
                "the insurance company",
            ],
        },
        "context": [
            "We went with {service} after a neighbor recommended them.",
            "This was our third time dealing with {service}.",
            "I've been a customer of {service} for about two years.",
            "Needed help in a hurry, so I tried {service}.",
            "Writing this about {service} after a pretty eventful week.",
            "My experience with {service} this month, for anyone curious.",
            "Booked {service} online for the first time.",
            "Our family has used {service} on and off for a while.",
            "A coworker suggested {service}, so I gave them a shot.",
            "Had to deal with {service} twice this week.",
            "Switched to {service} at the start of the year.",
            "Quick review of {service}.",
        ],
        "positive": [
            "They showed up right on time and finished ahead of schedule.",
            "The staff were friendly, professional, and genuinely helpful.",
            "They explained everything clearly and the final bill matched the quote.",
            "Any problem we had was fixed immediately, no fuss.",
            "The person on the phone actually solved my issue in one call.",
            "Spotless work, and they cleaned up after themselves.",
            "They went above and beyond, even following up a week later.",
            "Fair prices, honest advice, and no pressure to upsell.",
            "Everything was quick, easy, and exactly as promised.",
            "They treated us like family.",
            "Incredibly responsive, they answered messages within minutes.",
            "I've never had such a smooth experience with a company like this.",
            "The technician was patient and walked me through everything.",
            "Reliable, courteous, and very reasonably priced.",
            "They fixed a problem two other companies couldn't.",
            "Booking was simple and they kept me updated the whole time.",
            "Top-notch service from start to finish.",
            "Polite staff and excellent attention to detail.",
            "Honest people doing careful work, which is hard to find these days.",
        ],
        "negative": [
            "They showed up three hours late and didn't even call.",
            "I spent forty-five minutes on hold just to get disconnected.",
            "The final bill was nearly double the original quote.",
            "The staff were dismissive and clearly didn't want to help.",
            "They left a mess behind and the job wasn't even finished.",
            "Nobody returned my calls for over a week.",
            "They canceled on us twice with no explanation.",
            "Hidden fees everywhere, it felt like a scam.",
            "The problem came back the very next day.",
            "Rude, unprofessional, and completely unreliable.",
            "I had to explain my issue to five different people.",
            "They damaged our furniture and refused to take responsibility.",
            "Absolutely the worst customer service I've ever experienced.",
            "Promises were made and none of them were kept.",
            "Every interaction was frustrating and slow.",
            "They charged me for work that was never done.",
            "The manager hung up on me when I complained.",
            "Terrible communication from beginning to end.",
            "They lost my paperwork and then blamed me for it.",
        ],
        "close_positive": [
            "I'll be using them again for sure.",
            "Highly recommend them.",
            "Five stars, no hesitation.",
            "So glad we found them.",
            "Already booked them for next time.",
            "Can't say enough good things.",
        ],
        "close_negative": [
            "Stay far away.",
            "I'm switching to a competitor.",
            "Zero stars if I could.",
            "Never using them again.",
            "Do yourself a favor and look elsewhere.",
            "Avoid at all costs.",
        ],
        "minor_negative": [
            "they're a little pricier than others",
            "scheduling took a few days",
            "the office is hard to find",
            "their website is clunky",
            "the waiting area is cramped",
            "they only take calls during business hours",
        ],
        "minor_positive": [
            "the receptionist was pleasant",
            "the booking website is easy to use",
            "the price seemed fair at first",
            "the waiting room was clean",
            "their ads are clever",
            "the first phone call went fine",
        ],
    },
}

SENT_GENERIC = {
    "short_positive": [
        "Absolutely loved it, no complaints.",
        "Fantastic experience from start to finish!",
        "Really happy with this one.",
        "Exceeded my expectations in every way.",
        "Could not be more pleased.",
        "This was simply wonderful.",
        "Great experience all around, thank you!",
        "Everything was just perfect.",
        "Genuinely impressed, well done.",
        "Ten out of ten, would recommend.",
        "A total delight from beginning to end.",
        "So good I told all my friends.",
        "Pleasantly surprised, really solid overall.",
        "Better than I hoped for.",
        "Wow, just wow. Loved every bit of it.",
        "Really great, I have nothing bad to say.",
        "This made my week, honestly.",
        "Superb in every respect.",
    ],
    "short_negative": [
        "Terrible experience, avoid at all costs.",
        "What a complete disappointment.",
        "Not good, not good at all.",
        "Really unhappy with the whole thing.",
        "This was a total mess.",
        "I want my money back.",
        "Awful, just awful. Stay away.",
        "Genuinely the worst, stay away.",
        "So frustrating and a huge waste of time.",
        "Nothing went right, not one thing.",
        "Expected so much more, very let down.",
        "Would give zero stars if possible.",
        "Ugh. What a waste.",
        "Deeply disappointing from start to finish.",
        "Sorry, but this was bad.",
        "I can't believe how bad this was.",
        "A miserable experience all around.",
        "Regret it completely.",
    ],
}

# Frames for the minor clause in a mixed review; {minor} is a lowercase clause, {Minor} the same capitalized.
SENT_MIXED_FRAMES = {
    "positive": [
        "My only complaint is that {minor}.",
        "{Minor}, but that's a small thing.",
        "The one downside: {minor}.",
        "Sure, {minor}, but I can live with that.",
        "Okay, {minor}. Not a dealbreaker.",
        "If I'm being picky, {minor}.",
        "{Minor}, which is a shame, but whatever.",
        "I'll admit {minor}, though it hardly matters.",
        "Minor gripe: {minor}.",
    ],
    "negative": [
        "To be fair, {minor}.",
        "{Minor}, but that doesn't make up for the rest.",
        "I'll give them this: {minor}.",
        "Yes, {minor}, but that's about it.",
        "The only bright spot: {minor}.",
        "Granted, {minor}.",
        "{Minor}, and that's the nicest thing I can say.",
        "Sure, {minor}. So what?",
        "In fairness, {minor}, but still.",
    ],
}

# Compositional opinion sentences ("The pacing was truly flawless."), mixed into reviews next to the hand-written ones
# so that train covers many aspect/adjective combinations. Nouns are singular or mass nouns ("was" agrees).
# The most common polarity adjectives are shared by both splits; everything else is split by position.
SENT_OPINION = {
    "nouns": {
        "product": [
            "build quality",
            "design",
            "price",
            "finish",
            "packaging",
            "customer support",
            "overall quality",
            "material",
            "craftsmanship",
            "value",
            "delivery",
            "durability",
            "assembly",
            "color",
            "manual",
        ],
        "restaurant": [
            "food",
            "service",
            "atmosphere",
            "dessert",
            "staff",
            "wine list",
            "seafood",
            "bread",
            "coffee",
            "menu",
            "decor",
            "value",
            "main course",
            "presentation",
            "music",
        ],
        "movie": [
            "plot",
            "acting",
            "soundtrack",
            "dialogue",
            "ending",
            "cast",
            "pacing",
            "cinematography",
            "script",
            "direction",
            "lead performance",
            "story",
            "humor",
            "set design",
            "editing",
        ],
        "service": [
            "staff",
            "communication",
            "pricing",
            "scheduling",
            "support team",
            "workmanship",
            "customer service",
            "follow-up",
            "booking process",
            "front desk",
            "technician",
            "paperwork",
            "cleanup",
            "manager",
            "response time",
        ],
    },
    "frames": [
        "The {noun} was {adv} {adj}.",
        "I thought the {noun} was {adj}.",
        "{Adj} {noun}, honestly.",
        "What {a_adj} {noun}!",
        "The {noun} was {adj} and the {noun2} was {adv} {adj2}.",
        "Both the {noun} and the {noun2} were {adj}.",
        "Honestly, the {noun} is {adj}.",
        "The {noun}? {Adj}.",
        "Everything from the {noun} to the {noun2} was {adj}.",
        "I'd describe the {noun} as {adv} {adj}.",
        "The {noun} turned out to be {adj}.",
        "Can't get over how {adj} the {noun} was.",
        "The {noun} deserves a mention: {adv} {adj}.",
        "{Adv} {adj} {noun}.",
        "The {noun} was nothing short of {adj}.",
        "{Adj}, {adj2} {noun}.",
        "Just {adj}, that {noun}.",
        "Overall the {noun} felt {adj}.",
        "The {noun} was {adj}, and so was the {noun2}.",
        "Let me say it plainly: the {noun} was {adj}.",
        "My verdict on the {noun}: {adj}.",
    ],
    "adv": ["really", "truly", "genuinely", "just", "so", "incredibly", "honestly", "consistently", "seriously"],
    "positive": [
        "superb",
        "impressive",
        "delightful",
        "top-notch",
        "brilliant",
        "lovely",
        "terrific",
        "first-rate",
        "flawless",
        "stellar",
        "exceptional",
        "marvelous",
        "fabulous",
        "splendid",
        "phenomenal",
    ],
    "negative": [
        "mediocre",
        "sloppy",
        "pathetic",
        "lousy",
        "abysmal",
        "subpar",
        "shoddy",
        "frustrating",
        "atrocious",
        "miserable",
        "unacceptable",
        "appalling",
        "dismal",
        "underwhelming",
        "laughable",
    ],
}
SENT_OPINION_COMMON = {
    "positive": ["great", "excellent", "fantastic", "wonderful", "amazing", "outstanding"],
    "negative": ["terrible", "awful", "horrible", "disappointing", "poor", "dreadful"],
}


def _article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def _opinion(rng, op, domain, polarity, used):
    """One composed opinion sentence; `used` collects nouns already mentioned in the same review."""
    frame = rng.choice(op["frames"])
    nouns = [n for n in op["nouns"][domain] if n not in used]
    noun, noun2 = rng.sample(nouns if len(nouns) >= 2 else op["nouns"][domain], 2)
    used.update((noun, noun2) if "{noun2}" in frame else (noun,))
    adjs = op[polarity] + SENT_OPINION_COMMON[polarity]
    adj, adj2 = rng.sample(adjs, 2)
    adv = rng.choice(op["adv"])
    return frame.format(
        noun=noun, noun2=noun2, adj=adj, adj2=adj2, Adj=cap(adj), a_adj=_article(adj), adv=adv, Adv=cap(adv)
    )


SENT_LABELS = ["negative", "positive"]


def _sentiment_maker(banks, generic, frames, opinion, polarity):
    other = "negative" if polarity == "positive" else "positive"
    domains = list(banks)

    def make(rng):
        domain = rng.choice(domains)
        d = banks[domain]
        fills = {k: rng.choice(v) for k, v in d["slots"].items() if k != "venue"}
        if "venue" in d["slots"]:
            fills["place"], dishes = rng.choice(d["slots"]["venue"])
            fills["dish"] = rng.choice(dishes)
        closers = d["close_" + polarity]

        used: set[str] = set()

        def pick(k):  # k distinct aspect sentences, some hand-written, some composed
            got = rng.sample(d[polarity], k)
            return [_opinion(rng, opinion, domain, polarity, used) if rng.random() < 0.45 else x for x in got]

        r = rng.random()
        parts = []
        if r < 0.12:  # short generic verdict, sometimes with a concrete detail
            parts = [rng.choice(generic["short_" + polarity])]
            if rng.random() < 0.5:
                parts += pick(1)
        elif r < 0.32:  # one concrete sentence, maybe a closer
            parts = pick(1)
            if rng.random() < 0.5:
                parts.append(rng.choice(closers))
        elif r < 0.62:  # context + one or two aspects + maybe closer
            parts = [rng.choice(d["context"])] + pick(rng.choice([1, 1, 2]))
            if rng.random() < 0.55:
                parts.append(rng.choice(closers))
        elif r < 0.82:  # mixed but clearly leaning: two aspects of the label, one minor clause of the other side
            minor = rng.choice(d["minor_" + other])
            frame = rng.choice(frames[polarity]).format(minor=minor, Minor=cap(minor))
            main = pick(2)
            parts = ([rng.choice(d["context"])] if rng.random() < 0.4 else []) + [main[0], frame, main[1]]
            if rng.random() < 0.4:
                parts.append(rng.choice(closers))
        else:  # a list of two or three aspects + closer
            parts = pick(rng.choice([2, 3])) + [rng.choice(closers)]
        text = " ".join(cap(p.format(**fills)) for p in parts)
        u = rng.random()
        if u < 0.05:
            text = text.lower()
        elif u < 0.13 and text.endswith("."):
            text = text[:-1] + ("!" if rng.random() < 0.7 else "!!")
        elif u < 0.17 and text.endswith("."):
            text = text[:-1]
        return text

    return make


def build_sentiment(rng, n_train, n_test):
    dom_train, dom_test = split_tree(SENT_DOMAINS)
    gen_train, gen_test = split_tree(SENT_GENERIC)
    fr_train, fr_test = split_tree(SENT_MIXED_FRAMES)
    op_train, op_test = split_tree(SENT_OPINION)
    seen: set[str] = set()
    out = {"train": [], "test": []}
    for split, banks, generic, frames, opinion, n in (
        ("train", dom_train, gen_train, fr_train, op_train, n_train),
        ("test", dom_test, gen_test, fr_test, op_test, n_test),
    ):
        for label in SENT_LABELS:
            make = _sentiment_maker(banks, generic, frames, opinion, label)
            texts = draw_unique(rng, make, n, seen, f"sentiment/{split}/{label}")
            out[split] += [{"text": t, "label": label} for t in texts]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# topic: news headlines and short news snippets (all people, teams and companies are invented)
# ---------------------------------------------------------------------------------------------------------------------

TOPIC_LABELS = ["sports", "business", "science", "politics"]

TOPIC_TEMPLATES = {
    "sports": {
        "train": [
            "{team} edge {team2} {s1}-{s2} in extra time",
            "{player} scores twice as {team} cruise past {team2}",
            "Injury blow for {team} as star striker {player} is ruled out for six weeks",
            "{player} wins first Grand Slam title after five-set thriller",
            "{team} sack their coach after a winless run of {n} games",
            "{team} clinch the league title with two matches to spare",
            "{player} breaks the national record in the 400 meters",
            "Rain delays the final day of the cricket test between {team} and {team2}",
            "{team} sign a veteran goalkeeper on a two-year deal",
            "{player} announces retirement from professional tennis at {age}",
            "Late penalty earns {team} a draw against {team2}",
            "{player} wins the city marathon in course-record time",
            "Fans celebrate as {team} reach the cup final for the first time in {n} years",
            "{team} overturn a two-goal deficit to stun {team2}",
            "The {team} quarterback threw for {yards} yards and three touchdowns on Sunday.",
            "{player} crashes out of the semifinals in straight sets.",
            "Cyclist {player} takes the leader's jersey after a brutal mountain stage.",
            "{team} extend their unbeaten streak to {n} matches with a comfortable win.",
            "Swimmer {player} claims gold in the 200m butterfly.",
            "The league has confirmed the playoff schedule, with {team} opening at home against {team2}.",
            "{player} signs a record contract extension with {team}.",
            "A late red card left {team} fans furious after Saturday's derby.",
            "{team} goalkeeper keeps a clean sheet for the fifth straight game",
            "{player} sinks a buzzer-beater to lift {team} over {team2}",
            "Hockey: {team} shut out {team2} {s1}-0 behind a 40-save performance",
            "{team} name a new head coach ahead of the season",
            "Olympic hopeful {player} sets a personal best at the national trials.",
            "The derby between {team} and {team2} ended goalless in front of a sellout crowd.",
            "{player} withdraws from the tournament with a wrist injury",
            "Pitcher {player} throws a no-hitter as {team} blank {team2}",
            "{team} relegated after a final-day defeat at {team2}",
            "Golf: {player} leads by three strokes heading into the final round",
            "Boxing: {player} retains the heavyweight belt with a late knockout",
            "{team} complete the signing of midfielder {player} from {team2}.",
            "{team} reportedly bid for {team2} forward {player} as the transfer window nears its close.",
            "{player} named player of the month after scoring {goals} goals in {games} games",
            "A wet track caused three crashes in the opening laps of the grand prix.",
            "Thousands of {team} fans lined the streets for the championship parade.",
            "A hamstring strain will keep {player} out of the weekend's qualifier.",
            "{team} captain {player} marks a 100th appearance with a friendly win.",
        ],
        "test": [
            "{player} powers {team} to a {s1}-{s2} victory over {team2}",
            "Underdogs {team} knock holders {team2} out of the cup",
            "Sprinter {player} storms to a world-leading time in the 100m",
            "{team} manager under pressure after a third consecutive loss",
            "{player} completes a hat-trick in a dominant away win",
            "Tennis: {player} saves match points to reach the quarterfinals",
            "Basketball: {team} guard {player} drops 41 points in overtime win",
            "Season over for {player} after knee surgery",
            "{team} and {team2} share the points in a six-goal thriller",
            "Rugby: {team} hold off a late {team2} comeback to win by two",
            "Veteran striker {player} will retire from the game when this season ends.",
            "Skier {player} wins the downhill by four hundredths of a second",
            "{team} confirm the loan of winger {player} for the rest of the campaign",
            "Ticket prices for the final have angered supporters of both {team} and {team2}.",
            "{player} qualifies fastest for Sunday's race after a stunning final lap.",
            "Volleyball: {team} sweep {team2} to claim the national title",
        ],
    },
    "business": {
        "train": [
            "{company} shares jump {pct}% after quarterly profit beats forecasts",
            "{company} to cut {jobs} jobs as demand slows",
            "{company} agrees to buy rival {company2} for {amt}",
            "Stocks slide as investors worry about rising interest rates",
            "{company} reports record revenue on strong holiday sales",
            "Central bank holds rates steady and signals a possible cut later this year",
            "{company} chief executive {exec} steps down after ten years at the helm",
            "Oil prices climb {pct}% on supply concerns",
            "{company} opens its first factory overseas, creating {jobs} jobs",
            "Retail sales fell unexpectedly last month, according to new figures.",
            "{company} recalls thousands of units over a safety defect",
            "Shareholders of {company} reject the proposed merger with {company2}.",
            "{company} warns that profits will miss expectations because of higher costs.",
            "Unemployment rate ticks down to {rate}% as hiring picks up",
            "Startup behind a popular budgeting app raises {amt} in new funding round",
            "{company} plans to list its shares on the stock exchange next spring.",
            "Inflation eased to {rate}% in the year to March, giving households some relief.",
            "{company} posts a quarterly loss of {amt} amid weak demand",
            "Analysts downgrade {company} stock, citing slowing growth",
            "Competition authorities have cleared the merger between {company} and {company2}.",
            "{company} will raise prices by {pct}% starting next month, the company said.",
            "Supply chain delays push {company}'s product launch to next year",
            "Mortgage rates hit a six-month low, boosting home sales",
            "{company} workers vote to accept a new pay deal after a two-week strike",
            "The dollar weakened against the euro in early trading on Monday.",
            "{company} names former banker {exec} as its new chief financial officer.",
            "Small businesses report rising costs for rent and energy in a new survey.",
            "{company} halves its dividend after a difficult year",
            "Consumer confidence rose for the third straight month.",
            "{company} sells its European unit to a private equity firm for {amt}",
            "Tech stocks led the market higher on Thursday, with the main index up {small_pct}%.",
            "{company} to close {n} stores as shoppers move online",
            "Quarterly earnings at {company} rose {pct}% thanks to cost cuts.",
            "Bankruptcy filing by {company} leaves suppliers unpaid",
            "Gold hits a record high as investors seek safety",
            "{company} signs a multi-year supply deal with {company2}.",
            "Housing starts slowed in the second quarter, a trade group said.",
            "{company} invests {amt} in a new distribution center",
            "Online sales now account for a third of {company}'s revenue.",
            "Coffee prices surge after poor harvests",
        ],
        "test": [
            "{company} profit falls short of Wall Street estimates",
            "{company} explores a sale of its consumer division",
            "Bond yields rise after strong jobs data",
            "{company} to buy back {amt} of its own shares",
            "Factory output shrinks for the second month in a row",
            "Investors cheer {company}'s upbeat sales outlook, sending the stock up {pct}%",
            "{company} and {company2} abandon merger talks",
            "Price of copper slumps on weak demand from builders",
            "{company} hires {jobs} staff for its expanding call centers",
            "The firm's chief executive, {exec}, said margins should improve next year.",
            "A takeover bid values {company} at roughly {amt}.",
            "Wage growth outpaced inflation for the first time in two years.",
            "{company} shares tumble after the company slashes its annual forecast",
            "Venture funding for early-stage startups dropped sharply this quarter.",
            "Market watch: {company} rallies as cost-cutting plan wins over analysts",
            "Freight rates ease as container backlog clears",
        ],
    },
    "science": {
        "train": [
            "Astronomers spot a planet orbiting in its star's habitable zone",
            "New species of {species} discovered in remote rainforest",
            "{Inst} have developed a battery that charges in under five minutes.",
            "Study links poor sleep to higher risk of heart disease",
            "Mars rover finds signs of an ancient lake bed",
            "Gene therapy restores partial vision in early trial",
            "{Inst} say ocean temperatures reached a record high last summer.",
            "Fossil of a feathered dinosaur unearthed in a desert quarry",
            "Physicists measure the mass of a subatomic particle with record precision",
            "A new vaccine candidate produced strong immune responses in early tests.",
            "Space agency launches probe to study Jupiter's icy moons",
            "Ancient DNA reveals surprising migration patterns of early farmers",
            "{Inst} report that bees can learn to recognize simple shapes.",
            "Telescope captures the most detailed image yet of a distant galaxy",
            "Researchers grow miniature human organs in the lab to test drugs.",
            "Melting glaciers are raising sea levels faster than predicted, study finds",
            "Chemists create a plastic that breaks down in seawater within weeks",
            "A comet visible to the naked eye will pass Earth next month.",
            "{Inst} identify a gut bacterium that may influence mood.",
            "Quantum computer solves in minutes a problem that would take classical machines years",
            "Brain scans show how memories are reorganized during sleep.",
            "Scientists revive microbes frozen in permafrost for thousands of years",
            "Solar cell efficiency hits a new record in lab tests",
            "A study of {volunteers} volunteers found that regular walking improves memory.",
            "Coral reefs show early signs of recovery after bleaching, survey finds",
            "Volcanologists warn of increased activity beneath the island's main crater.",
            "Researchers sequence the complete genome of a {species} for the first time.",
            "A meteorite found in the desert contains amino acids, scientists say.",
            "New antibiotic kills drug-resistant bacteria in mouse study",
            "Satellite data suggest tropical forests are losing tree cover faster than expected",
            "{Inst} built a tiny robot that can skate across water like an insect.",
            "Astronauts grow lettuce aboard the space station in nutrition experiment",
            "Earthquake early-warning system gives residents precious seconds to prepare, researchers find",
            "The experiment confirmed a prediction Einstein made more than a century ago.",
            "A total solar eclipse will be visible across parts of the southern hemisphere.",
            "Paleontologists describe a giant sea reptile from a nearly complete skeleton.",
            "Clinical trial results suggest the drug slows the progression of the disease.",
            "Dolphins use signature whistles much like names, according to a long-term study.",
            "Biologists tracking {species} populations found numbers fell by {pct}% in a decade.",
            "Lab experiments show that some spiders can sense electric fields in the air.",
        ],
        "test": [
            "Space telescope detects water vapor in the atmosphere of a distant world",
            "Scientists decode the song patterns of humpback whales",
            "Tiny brain implant helps paralyzed patient control a computer with thoughts",
            "{Inst} found that a common fungus can digest certain plastic waste.",
            "Asteroid sample returned to Earth contains water-bearing minerals",
            "Experimental malaria vaccine shows high protection in trial",
            "New map of the seafloor uncovers thousands of underwater mountains",
            "Ancient cave paintings dated to at least 45,000 years ago",
            "{Inst} describe a {species} that glows under ultraviolet light.",
            "Neutron star collision forged gold and platinum, observations show",
            "Heat-tolerant wheat variety could help farmers in a warming climate, researchers say",
            "Children who read for fun score higher on attention tests, a new study reports",
            "Lunar lander touches down near the moon's south pole",
            "Microplastics found in fresh snow on remote mountain peaks",
            "Engineers report that their fusion reactor held plasma stable for a record {secs} seconds.",
            "Geneticists trace lactose tolerance back to a handful of mutations",
        ],
    },
    "politics": {
        "train": [
            "Parliament passes controversial immigration bill after late-night debate",
            "{Title} {pol} announces bid for re-election",
            "Opposition leader {pol} calls for early elections",
            "Voters head to the polls in a tightly contested mayoral race",
            "{party} wins a majority in regional elections",
            "Senate committee opens hearings on election security",
            "The president signed an executive order on border enforcement on Tuesday.",
            "Coalition talks collapse after {party} walks out",
            "Lawmakers approve a budget that raises defense spending by {pct}%",
            "{Title} {pol} resigns amid ethics investigation",
            "Polls show the incumbent trailing by six points ahead of the vote",
            "Foreign ministers meet to discuss a ceasefire proposal",
            "City council votes to ban cars from downtown streets on weekends",
            "Supreme court agrees to hear a challenge to the new voting law",
            "{pol} sworn in as prime minister after a coalition deal",
            "Thousands protest outside parliament against pension reform",
            "{party} unveils campaign platform focused on healthcare and housing",
            "Diplomats expelled as relations between the two countries sour",
            "The governor vetoed the bill, calling it an overreach by the legislature.",
            "Referendum on electoral reform set for next spring",
            "Cabinet reshuffle sees {pol} promoted to finance minister",
            "Turnout in Sunday's election reached {turnout}%, officials said.",
            "{Title} {pol} faces a no-confidence vote next week.",
            "Negotiators reach a last-minute deal to avert a government shutdown",
            "Leaders pledge closer security cooperation at the regional summit",
            "Campaign finance reform stalls in the lower house",
            "Election officials begin a recount in three disputed districts.",
            "{pol}, a {party} lawmaker, introduced a bill to lower the voting age to 16.",
            "The prime minister defended the government's record during a heated question time.",
            "Embassy reopens after two years as diplomatic ties are restored",
            "{party} candidate concedes defeat in the governor's race",
            "Lawmakers debate term limits for members of parliament",
            "Debate night: candidates clash over taxes, crime and schools",
            "Senators from both parties back a bipartisan infrastructure plan",
            "UN envoy urges warring factions to return to peace talks",
            "{Title} {pol} pardons dozens of nonviolent offenders",
            "Mayor {pol} proposes a new tax on vacant homes",
            "The ruling party lost its majority in the upper house for the first time in a decade.",
            "Activists gather signatures to recall the state's governor",
            "Parliamentary inquiry finds ministers misled the public over contract awards",
        ],
        "test": [
            "Ballots still being counted as both candidates claim victory",
            "{Title} {pol} vows to veto any tax increase",
            "Legislature overrides veto of the clean water act",
            "{party} leadership contest heads to a second round",
            "Prime minister calls a snap election for June",
            "Senate confirms {pol} as ambassador after weeks of delay",
            "Election watchdog fines {party} over campaign spending",
            "Protesters demand the electoral commission resign after a disputed count",
            "The opposition walked out of the chamber in protest over the new surveillance law.",
            "Presidential hopeful {pol} picks a running mate",
            "Constitutional amendment fails to win the required two-thirds majority",
            "{Title} {pol} apologizes after leaked remarks about rival lawmakers",
            "Envoys from both nations agree to a prisoner exchange.",
            "Polling stations opened early as the country elects a new parliament.",
            "Speaker of the house ousted in a dramatic vote",
            "Cabinet minister quits over the handling of the asylum policy",
        ],
    },
}

TOPIC_FOLLOWUPS = {  # written to fit any headline of their label
    "sports": {
        "train": [
            "Highlights will be shown on tonight's sports roundup.",
            "The season resumes after a two-week break.",
            "Broadcasters reported record viewing figures for the event.",
            "Pundits called it a turning point in the season.",
            "Organizers said the event drew a sellout crowd.",
            "It was the main talking point of a busy sporting weekend.",
            "Supporters will be watching the next game closely.",
        ],
        "test": [
            "Ticket sales for the rest of the season have been brisk.",
            "The next round of fixtures is set for the weekend.",
            "The championship race remains wide open.",
        ],
    },
    "business": {
        "train": [
            "Markets in Europe closed slightly lower on the day.",
            "Investors are now looking ahead to next week's inflation figures.",
            "Trading volumes were heavier than usual.",
            "Analysts said the news was broadly in line with expectations.",
            "The wider stock market ended the session flat.",
            "Shares across the sector moved sharply on the news.",
            "Credit rating agencies are expected to review the outlook.",
        ],
        "test": [
            "Economists expect growth to slow in the coming months.",
            "Traders will be watching the upcoming earnings season closely.",
            "The main index finished the day little changed.",
        ],
    },
    "science": {
        "train": [
            "The findings were published this week in a peer-reviewed journal.",
            "Other scientists called the results promising but preliminary.",
            "More observations are planned for next year.",
            "The project involved scientists from several countries.",
            "The team says further work is needed to confirm the result.",
            "The announcement was made at a scientific conference on Tuesday.",
            "The work was funded by a national science foundation.",
        ],
        "test": [
            "Independent experts welcomed the result but urged caution.",
            "A detailed paper is expected later this year.",
            "Researchers say the discovery raises new questions for future study.",
        ],
    },
    "politics": {
        "train": [
            "A final vote is expected later this month.",
            "The opposition has promised to challenge the decision in court.",
            "Critics say the move goes too far.",
            "Campaigning officially begins next week.",
            "Observers expect the issue to shape the next election.",
            "Polls suggest voters are sharply divided on the issue.",
            "Opposition figures were quick to criticize the move.",
        ],
        "test": [
            "Lawmakers return from recess on Monday.",
            "The move is likely to dominate the upcoming campaign.",
            "Both parties claimed the outcome as a win.",
        ],
    },
}

TOPIC_SLOTS = {
    "train": {
        "team": [
            "Harbor City Gulls",
            "Rivertown United",
            "Northside Bears",
            "Eastfield Rovers",
            "Capital Comets",
            "Lakeshore FC",
            "Granite Hawks",
            "Westbrook Athletic",
            "Summit Wolves",
            "Pine Valley Rangers",
        ],
        "player": [
            "Mateo Alvarez",
            "Priya Raman",
            "Jonas Keller",
            "Aisha Bello",
            "Tom Whitaker",
            "Lena Novak",
            "Kenji Mori",
            "Sofia Russo",
            "Marcus Hale",
            "Dana Okafor",
        ],
        "company": [
            "Northwind Logistics",
            "Brightleaf Foods",
            "Copperline Telecom",
            "Halden Motors",
            "Bluepeak Software",
            "Meridian Bank",
            "Orchard Retail Group",
            "Solvara Energy",
            "Tidewater Shipping",
            "Kestrel Airlines",
        ],
        "exec": ["Ruth Calloway", "Daniel Osei", "Mei Lin Zhou", "Patrick Brennan", "Ingrid Solberg"],
        "inst": [
            "researchers at a university in Norway",
            "a team at the national physics laboratory",
            "marine biologists in Australia",
            "scientists at a Canadian research institute",
            "astronomers using a new radio telescope",
            "geologists in Chile",
        ],
        "species": ["tree frog", "beetle", "deep-sea fish", "orchid", "salamander"],
        "pol": ["Helena Marsh", "Victor Almeida", "Grace Odum", "Stefan Brandt", "Nadia Karimi", "Owen Gallagher"],
        "Title": ["Senator", "Governor", "Minister", "Prime Minister"],
        "party": ["the Progressive Party", "the Liberty Alliance", "the Green Union", "the National Reform Party"],
    },
    "test": {
        "team": [
            "Bayview Sharks",
            "Redcliff Titans",
            "Silverton Owls",
            "Marston Albion",
            "Coastal Kings",
            "Ironwood Miners",
        ],
        "player": [
            "Elena Petrova",
            "Rafael Costa",
            "Hannah Lindqvist",
            "Omar Haddad",
            "Grace Whitfield",
            "Yuki Tanaka",
        ],
        "company": [
            "Fernhill Pharma",
            "Crestmoor Insurance",
            "Vantor Semiconductors",
            "Alder & Finch Apparel",
            "Quayside Hotels",
            "Greystone Mining",
        ],
        "exec": ["Laura Pennington", "Samuel Achebe", "Hiro Watanabe"],
        "inst": [
            "a group of chemists in Japan",
            "ecologists working in the Amazon basin",
            "physicists at a European particle lab",
            "neuroscientists in Boston",
        ],
        "species": ["cave-dwelling bat", "gecko", "sea slug"],
        "pol": ["Miriam Castell", "Jonah Whitcombe", "Aylin Demir", "Rupert Vance"],
        "Title": ["Chancellor", "Vice President", "Deputy Prime Minister"],
        "party": ["the Civic Front", "the Labour Coalition", "the People's Movement"],
    },
}


def _topic_fill(rng, slots):
    f = {k: rng.choice(v) for k, v in slots.items()}
    f["team2"] = rng.choice([t for t in slots["team"] if t != f["team"]])
    f["company2"] = rng.choice([c for c in slots["company"] if c != f["company"]])
    f["Inst"] = cap(f["inst"])
    s1 = rng.randint(1, 5)
    f.update(
        s1=s1,
        s2=rng.randint(0, s1 - 1),
        n=rng.randint(3, 15),
        age=rng.randint(30, 38),
        yards=rng.randint(180, 420),
        goals=rng.randint(5, 9),
        games=rng.randint(9, 12),
        pct=rng.randint(3, 35),
        small_pct=f"{rng.randint(5, 25) / 10:.1f}",
        rate=f"{rng.randint(25, 95) / 10:.1f}",
        turnout=rng.randint(41, 79),
        jobs=f"{rng.randint(2, 60) * 100:,}",
        volunteers=f"{rng.randint(4, 90) * 100:,}",
        secs=rng.randint(300, 1200),
        amt=(
            f"${rng.randint(12, 95) / 10:.1f} billion" if rng.random() < 0.5 else f"${rng.randint(5, 95) * 10} million"
        ),
    )
    return f


def _topic_maker(templates, followups, slots):
    def make(rng):
        text = rng.choice(templates).format(**_topic_fill(rng, slots))
        text = cap(text)
        if rng.random() < 0.35:
            if text[-1] not in ".!?":
                text += "."
            text += " " + rng.choice(followups)
        elif text[-1] not in ".!?" and rng.random() < 0.1:
            text = title_case(text)
        return text

    return make


def build_topic(rng, n_train, n_test):
    seen: set[str] = set()
    out = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for label in TOPIC_LABELS:
            make = _topic_maker(TOPIC_TEMPLATES[label][split], TOPIC_FOLLOWUPS[label][split], TOPIC_SLOTS[split])
            out[split] += [
                {"text": t, "label": label} for t in draw_unique(rng, make, n, seen, f"topic/{split}/{label}")
            ]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# intent: requests to a virtual assistant
# ---------------------------------------------------------------------------------------------------------------------

INTENT_LABELS = ["book_flight", "weather", "play_music", "set_alarm", "order_food", "check_balance"]

INTENT_TEMPLATES = {
    "book_flight": {
        "train": [
            "Book me a flight from {city} to {city2} {date}.",
            "I need a one-way ticket to {city} {date}.",
            "Can you find flights to {city} leaving {date}?",
            "Get me on the earliest plane to {city}.",
            "I'd like to fly to {city} {date}, economy please.",
            "Reserve two seats on a flight to {city}.",
            "Find me a cheap round trip to {city} {date} and book it.",
            "Please book plane tickets for me and my wife to {city}.",
            "Book a direct flight from {city} to {city2} if there is one.",
            "I have to be in {city} {date}, can you book a flight?",
            "Schedule a flight to {city}, window seat if possible.",
            "Help me book a flight to {city} {date}.",
            "Look up business class fares to {city} and book the cheapest one.",
            "fly me to {city} {date}",
            "Could you grab me a seat on the next flight out to {city}?",
            "I want to book a red-eye to {city}.",
            "Buy a plane ticket to {city}, coming back a week later.",
            "Can I get a flight booked from {city} to {city2}?",
            "Book the 8 a.m. flight to {city} {date}.",
            "My family of four needs flights to {city} {date}.",
            "Need to fly out to {city} for work {date}, book something.",
            "Put me on a flight to {city} with a short layover.",
            "Use my miles to book a flight to {city}.",
            "Book a flight to {city} for {date} with one checked bag.",
        ],
        "test": [
            "Arrange air tickets for a trip to {city} {date}.",
            "Which airlines fly {city} to {city2}? Reserve me a seat on the cheapest.",
            "Get me airline tickets to {city} please.",
            "Make a plane reservation to {city} departing {date}.",
            "I'm heading to {city} {date}, sort out my flight.",
            "Is there a nonstop to {city}? If so, reserve a seat for me.",
            "Secure me a seat on a morning departure to {city}.",
            "Book an aisle seat, {city} to {city2}.",
            "I need to get to {city} by air {date}.",
            "Could you purchase a return ticket to {city} for me?",
            "Set up air travel to {city} for my boss.",
            "Find an affordable airfare to {city} and confirm it.",
        ],
    },
    "weather": {
        "train": [
            "What's the weather like in {city} {date}?",
            "Will it rain {date}?",
            "Do I need an umbrella today?",
            "How hot is it going to get this afternoon?",
            "Give me the forecast for {city}.",
            "Is it going to snow in {city} {date}?",
            "What's the temperature outside right now?",
            "Should I bring a jacket tonight?",
            "Tell me the weekend forecast.",
            "How windy will it be in {city} {date}?",
            "weather in {city} {date}",
            "Is it sunny in {city} right now?",
            "Any storms expected {date}?",
            "What's the high and low for today?",
            "Check the weather for my trip to {city}.",
            "Will it be warm enough for the beach {date}?",
            "Is there a chance of thunderstorms this evening?",
            "How cold is it in {city} at the moment?",
            "What's the humidity like today?",
            "Is it going to be nice out {date}?",
            "Will the rain stop before the game tonight?",
            "how's the weather looking in {city}",
        ],
        "test": [
            "Is it pouring in {city} at the moment?",
            "Forecast please, for {city} {date}.",
            "Tell me if I'll need sunscreen {date}.",
            "How many degrees is it outside?",
            "Are they predicting frost overnight?",
            "What are conditions like in {city}, clear skies or cloudy?",
            "Should I expect showers during my commute?",
            "Is there a heat wave coming to {city}?",
            "Will it drizzle in {city} {date}?",
            "What's the outlook for {city} over the next few days?",
            "Is it freezing out there this morning?",
            "Do they expect hail or fog near {city}?",
        ],
    },
    "play_music": {
        "train": [
            "Play some {genre}.",
            "Put on my {playlist} playlist.",
            "Can you play {song} by {artist}?",
            "I want to listen to {genre}.",
            "Shuffle my liked songs.",
            "Play something relaxing for me.",
            "Turn on some music while I cook.",
            "Queue up some {genre} please.",
            "Play the latest album by {artist}.",
            "play {artist} on shuffle",
            "Put some upbeat music on.",
            "I'm in the mood for {genre}, play something.",
            "Can we get some background music going?",
            "Play songs similar to {artist}.",
            "Resume my music where I left off.",
            "Crank up some {genre} for my workout.",
            "Put on a {genre} radio station.",
            "Play the song {song}.",
            "I need some music to fall asleep to.",
            "Play my {playlist} mix on the kitchen speaker.",
            "Start playing {artist}'s greatest hits.",
            "Can you play the next song on my playlist?",
        ],
        "test": [
            "Blast some {genre} through the speakers.",
            "I'd love to hear some {genre} right now.",
            "Spin a few tracks by {artist}.",
            "Stream the {playlist} collection.",
            "Could you throw on a few tunes to help me focus?",
            "Let's hear something from {artist}'s first record.",
            "Tunes, please, something mellow.",
            "Start a station based on {artist}.",
            "I feel like hearing {song} again.",
            "Give me a soundtrack for a rainy afternoon.",
            "Can I get {genre} going in the living room?",
            "Fire up a {genre} mix for the party.",
        ],
    },
    "set_alarm": {
        "train": [
            "Set an alarm for {time}.",
            "Wake me up at {time} tomorrow.",
            "Can you set an alarm for {time} on weekdays?",
            "I need an alarm at {time}.",
            "Alarm for {time} please.",
            "Set my alarm for {time} and label it gym.",
            "Make sure I'm up by {time}.",
            "Please create an alarm for {time} tomorrow morning.",
            "Set a wake-up alarm for {time}.",
            "Put an alarm on for {time} so I don't miss my bus.",
            "Change my morning alarm to {time}.",
            "Can you wake me in {minutes} minutes?",
            "set alarm for {time}",
            "Add another alarm at {time} just in case.",
            "I have an early meeting, set an alarm for {time}.",
            "Set a recurring alarm for {time} every Monday.",
            "Wake me at {time} with a gentle sound.",
            "Move tomorrow's alarm to {time}.",
            "I want to wake up at {time}, set that up.",
            "Set two alarms, one at {time} and one ten minutes later.",
        ],
        "test": [
            "Buzz me awake at {time}.",
            "I want to get up at {time}, can you handle that?",
            "Schedule a wake-up call for {time}.",
            "Ring at {time} tomorrow so I'm not late.",
            "Make my phone go off at {time}.",
            "New alarm: {time}, weekdays only.",
            "Don't let me oversleep, get me up at {time}.",
            "Could you rouse me at {time}?",
            "I've got to be awake by {time}, please sort that.",
            "Have the clock sound at {time} on Saturday.",
            "Nap time. Get me up in {minutes} minutes.",
            "Program an alarm: {time} daily.",
        ],
    },
    "order_food": {
        "train": [
            "Order me {food} from {restaurant}.",
            "I want to get {food} delivered.",
            "Can you order {food} for dinner?",
            "Get me {food} for delivery to my place.",
            "Place an order for {food}.",
            "I'm hungry, order {food}.",
            "Order the usual from {restaurant}.",
            "Can I get {food} delivered to the office by noon?",
            "Have {food} sent to my apartment.",
            "Order {food} and add a side of fries.",
            "Reorder my last takeout order.",
            "Get dinner delivered, I'm thinking {food}.",
            "order {food} from {restaurant} pls",
            "Find a place that delivers {food} and order it.",
            "Could you order lunch for three? We want {food}.",
            "Put in a delivery order for {food}, extra spicy.",
            "Order {food} for pickup at {restaurant}.",
            "Let's get takeout from {restaurant} tonight, order {food}.",
            "I'd like {food} delivered in the next half hour.",
            "Add {food} to my delivery order from {restaurant}.",
        ],
        "test": [
            "Have someone bring {food} over here.",
            "I'm craving {food}, sort out a delivery.",
            "Takeout tonight: {food} from {restaurant}.",
            "Send {food} to my address ASAP.",
            "Could you arrange lunch delivery? {Food} would be great.",
            "Get {restaurant} to deliver {food} to me.",
            "Let's get food brought in. {Food}, please.",
            "Buy {food} for collection in 20 minutes.",
            "Feed me! Get {food} on its way.",
            "We're starving, can you get {food} from {restaurant} here?",
            "Arrange a food delivery: {food}.",
            "Can you get {food} brought to the house for supper?",
        ],
    },
    "check_balance": {
        "train": [
            "What's my {account} balance?",
            "How much money do I have in my {account}?",
            "Check my bank balance.",
            "Can you tell me how much is left in my {account}?",
            "Show me the balance on my {account}.",
            "How much do I owe on my credit card?",
            "Do I have enough in my {account} to cover rent?",
            "balance on my {account} please",
            "What's the available balance in my {account} right now?",
            "Tell me my current account balance.",
            "How much is in savings?",
            "Check how much cash I have in the bank.",
            "Has my paycheck hit my {account} yet? What's the balance?",
            "Read me my {account} balance please.",
            "What's my total across all my accounts?",
            "How much money is left in my account after that payment?",
            "Can you check my {account} and tell me the balance?",
            "Quick, what's in my {account}?",
            "What does my {account} balance look like this week?",
            "I need to know my {account} balance before I go shopping.",
        ],
        "test": [
            "How much have I got in my {account}?",
            "Give me the current figure in my {account}.",
            "Am I overdrawn?",
            "What funds are available in my {account}?",
            "Tell me what's sitting in my {account} today.",
            "Pull up how much money my {account} holds.",
            "Is my {account} running low? How much is in it?",
            "What's the remaining amount on my {account}?",
            "Do I still have money left in my {account}?",
            "Report the amount in my {account}.",
            "How's my {account} doing, money-wise?",
            "Could you look up the funds in my {account}?",
        ],
    },
}

INTENT_SLOTS = {
    "train": {
        "city": [
            "Chicago",
            "Denver",
            "Lisbon",
            "Tokyo",
            "Nairobi",
            "Toronto",
            "Madrid",
            "Seattle",
            "Dublin",
            "Mumbai",
            "Atlanta",
            "Vienna",
        ],
        "date": [
            "next Friday",
            "on the 14th",
            "this weekend",
            "on March 3rd",
            "tomorrow morning",
            "the day after tomorrow",
            "next Tuesday",
            "on New Year's Eve",
        ],
        "genre": [
            "jazz",
            "classic rock",
            "lo-fi beats",
            "country",
            "reggae",
            "k-pop",
            "blues",
            "90s hip hop",
            "classical piano",
        ],
        "artist": ["Nina Vale", "The Paper Lanterns", "DJ Corvo", "Marco Bell", "Ruby and the Tides", "Silver Fern"],
        "song": ["Golden Hour Drive", "Paper Planes in the Rain", "Northern Lights", "Slow Dance in July"],
        "playlist": ["Chill Vibes", "Road Trip", "Sunday Morning", "Workout", "Throwbacks"],
        "food": [
            "a large pepperoni pizza",
            "pad thai",
            "two cheeseburgers",
            "sushi",
            "a chicken burrito",
            "some tacos",
            "a Greek salad",
            "chicken wings",
            "a bowl of ramen",
        ],
        "restaurant": ["Luigi's", "the Thai place on Elm", "Burger Barn", "Golden Dragon", "Taco Town", "Sakura Sushi"],
        "account": ["checking account", "savings account", "savings", "checking", "main account"],
    },
    "test": {
        "city": ["Boston", "Oslo", "Lima", "Sydney", "Cairo", "Prague", "Austin", "Seoul"],
        "date": ["on Sunday", "in two weeks", "on June 20th", "early next month", "this Thursday"],
        "genre": ["bossa nova", "synthwave", "bluegrass", "punk", "ambient", "salsa"],
        "artist": ["Juniper Skye", "The Low Tides", "Kid Meridian", "Lola Brandt"],
        "song": ["Harbor Lights", "Midnight Orchard", "Tin Roof Serenade"],
        "playlist": ["Focus", "Late Night", "Dinner Party"],
        "food": ["a poke bowl", "some dumplings", "green curry", "a falafel wrap", "a meatball sub", "fried chicken"],
        "restaurant": ["Casa Verde", "the noodle bar downstairs", "Pita Palace", "Mama Rosa's"],
        "account": ["joint account", "business account", "current account", "emergency fund"],
    },
}

INTENT_WRAPS = {
    "train": {
        "pre": ["Hey, ", "Hi there, ", "Okay, ", "Assistant, ", "Hey assistant, ", "So, "],
        "post": [" Thanks!", " Thank you.", " Thanks a lot.", " Thanks so much."],
    },
    "test": {
        "pre": ["Yo, ", "Excuse me, ", "Um, ", "Hello, "],
        "post": [" Cheers.", " Appreciate it.", " Much obliged."],
    },
}


def _intent_time(rng, split):
    h = rng.choice([5, 6, 6, 7, 7, 8, 9, 10, 11, 1, 2, 3, 4])
    m = rng.choice([0, 0, 15, 30, 30, 45, 10, 20, 40, 50])
    half = "am" if h >= 5 and h != 12 else "pm"
    if split == "train":
        style = rng.randrange(3)
        if style == 0:
            return f"{h}:{m:02d} {half}"
        if style == 1:
            return f"{h} {half}" if m == 0 else f"{h}:{m:02d}"
        return f"{h}:{m:02d}"
    style = rng.randrange(3)
    if style == 0:
        return f"{h}:{m:02d} in the {'morning' if half == 'am' else 'afternoon'}"
    if style == 1:
        return f"{h}:{m:02d} {half.upper()}"
    if m in (0, 15, 30):
        return {0: f"{h} o'clock", 15: f"quarter past {h}", 30: f"half past {h}"}[m]
    if m == 45:
        return f"quarter to {h % 12 + 1}"
    return f"{h}:{m:02d} {half}"


def _intent_maker(templates, slots, wraps, split):
    def make(rng):
        f = {k: rng.choice(v) for k, v in slots.items()}
        f["city2"] = rng.choice([c for c in slots["city"] if c != f["city"]])
        f["Food"] = cap(f["food"])
        f["time"] = _intent_time(rng, split)
        f["minutes"] = rng.choice([10, 15, 20, 25, 30, 40, 45, 90])
        text = rng.choice(templates).format(**f)
        casual = text[:1].islower()  # templates written in lower case stay that way, unwrapped
        if not casual:
            if rng.random() < 0.25:
                text = rng.choice(wraps["pre"]) + lcfirst(text)
            if rng.random() < 0.15:
                text += rng.choice(wraps["post"])
            if rng.random() < 0.12:  # typed quickly: lower case, no final punctuation
                text = text.lower().rstrip(".!?")
        return text

    return make


def build_intent(rng, n_train, n_test):
    seen: set[str] = set()
    out = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for label in INTENT_LABELS:
            make = _intent_maker(INTENT_TEMPLATES[label][split], INTENT_SLOTS[split], INTENT_WRAPS[split], split)
            out[split] += [
                {"text": t, "label": label} for t in draw_unique(rng, make, n, seen, f"intent/{split}/{label}")
            ]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# chat: short helpful-assistant exchanges; every number in an answer is computed here
# ---------------------------------------------------------------------------------------------------------------------

CHAT_SYSTEM = [
    "You are a helpful assistant.",
    "You are a concise, helpful assistant.",
    "You are a friendly assistant. Keep your answers brief.",
    "You are a patient tutor who explains things simply.",
    "Answer clearly and concisely.",
    "Be helpful and keep replies to a sentence or two.",
    "You are a helpful assistant that gives short, accurate answers.",
    "You are a polite assistant. Keep it short.",
]

CHAT_THANKS = {
    "user": [
        "Thanks!",
        "Great, thank you.",
        "Perfect, thanks.",
        "Got it, thanks!",
        "Thank you so much.",
        "Cool, thanks.",
    ],
    "assistant": [
        "You're welcome!",
        "Happy to help!",
        "Anytime! Let me know if you need anything else.",
        "Glad I could help.",
        "No problem at all.",
        "You're very welcome.",
    ],
}

# (country as used in a sentence, capital, optional note)
CAPITALS = [
    ("France", "Paris", ""),
    ("Japan", "Tokyo", ""),
    ("Canada", "Ottawa", "not Toronto, as many people guess"),
    ("Australia", "Canberra", "not Sydney"),
    ("Brazil", "Brasília", "which replaced Rio de Janeiro as capital in 1960"),
    ("Kenya", "Nairobi", ""),
    ("Egypt", "Cairo", ""),
    ("Italy", "Rome", ""),
    ("Germany", "Berlin", ""),
    ("Spain", "Madrid", ""),
    ("Norway", "Oslo", ""),
    ("Argentina", "Buenos Aires", ""),
    ("India", "New Delhi", ""),
    ("South Korea", "Seoul", ""),
    ("Mexico", "Mexico City", ""),
    ("Peru", "Lima", ""),
    ("Portugal", "Lisbon", ""),
    ("Turkey", "Ankara", "not Istanbul"),
    ("New Zealand", "Wellington", ""),
    ("Ireland", "Dublin", ""),
    ("Greece", "Athens", ""),
    ("Thailand", "Bangkok", ""),
    ("Poland", "Warsaw", ""),
    ("Sweden", "Stockholm", ""),
    ("Finland", "Helsinki", ""),
    ("Vietnam", "Hanoi", ""),
    ("Chile", "Santiago", ""),
    ("Morocco", "Rabat", ""),
    ("Nigeria", "Abuja", "which took over from Lagos in 1991"),
    ("Austria", "Vienna", ""),
    ("Hungary", "Budapest", ""),
    ("the Czech Republic", "Prague", ""),
    ("Denmark", "Copenhagen", ""),
    ("China", "Beijing", ""),
    ("Colombia", "Bogotá", ""),
    ("Ghana", "Accra", ""),
    ("Ethiopia", "Addis Ababa", ""),
    ("Iceland", "Reykjavík", ""),
    ("Cuba", "Havana", ""),
    ("the Philippines", "Manila", ""),
    ("Pakistan", "Islamabad", ""),
    ("Saudi Arabia", "Riyadh", ""),
    ("Belgium", "Brussels", ""),
    ("Jamaica", "Kingston", ""),
]
CAPITAL_Q = {
    "train": [
        "What is the capital of {c}?",
        "What's the capital city of {c}?",
        "capital of {c}?",
        "Which city is the capital of {c}?",
    ],
    "test": ["Can you tell me {c}'s capital?", "Name the capital of {c}, please."],
}
CAPITAL_FOLLOW = {"train": ["And {c}?", "What about {c}?"], "test": ["How about {c}?"]}

FACTS = [
    (
        "How many continents are there?",
        "There are seven continents: Africa, Antarctica, Asia, Australia, Europe, North America and South America.",
    ),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    (
        "Which planet is known as the Red Planet?",
        "Mars is called the Red Planet because of the iron oxide dust covering its surface.",
    ),
    ("How many planets are in the solar system?", "There are eight planets in the solar system."),
    ("At what temperature does water boil at sea level?", "At sea level, water boils at 100 °C, which is 212 °F."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 °F, which is 0 °C."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au, from the Latin word aurum."),
    ("What is the chemical symbol for iron?", "Iron's chemical symbol is Fe, from the Latin ferrum."),
    ("What's the chemical symbol for sodium?", "Sodium's symbol is Na, from its Latin name, natrium."),
    ("What is the chemical formula for water?", "Water is H2O: two hydrogen atoms bonded to one oxygen atom."),
    ("What is table salt made of?", "Table salt is mostly sodium chloride, whose chemical formula is NaCl."),
    (
        "What gas do plants absorb from the air?",
        "Plants take in carbon dioxide from the air and use it in photosynthesis.",
    ),
    ("What is the atomic number of carbon?", "Carbon has an atomic number of 6."),
    ("Which element has atomic number 1?", "Hydrogen is element number 1, the lightest element."),
    ("How many bones are in the adult human body?", "An adult human skeleton typically has 206 bones."),
    ("How many hearts does an octopus have?", "An octopus has three hearts."),
    ("How many legs does a spider have?", "Spiders have eight legs."),
    ("How many legs do insects have?", "All adult insects have six legs."),
    (
        "What is the largest mammal?",
        "The blue whale is the largest mammal, and the largest animal known to have ever lived.",
    ),
    (
        "What is the fastest land animal?",
        "The cheetah is the fastest land animal; it can sprint at around 100 km/h in short bursts.",
    ),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest and deepest ocean on Earth."),
    (
        "What is the tallest mountain above sea level?",
        "Mount Everest is the tallest mountain above sea level, at about 8,849 meters.",
    ),
    ("Who wrote Pride and Prejudice?", "Jane Austen wrote Pride and Prejudice, first published in 1813."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("Who wrote the novel 1984?", "George Orwell wrote 1984, which was published in 1949."),
    (
        "Who came up with the theory of relativity?",
        "Albert Einstein developed the theory of relativity in the early 20th century.",
    ),
    (
        "Who was the first person to walk on the Moon?",
        "Neil Armstrong was the first person to walk on the Moon, during the Apollo 11 mission in 1969.",
    ),
    ("In what year did World War II end?", "World War II ended in 1945."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("How many sides does an octagon have?", "An octagon has eight sides, like a stop sign."),
    ("What do the angles of a triangle add up to?", "The interior angles of a triangle always add up to 180 degrees."),
    ("What is the smallest prime number?", "The smallest prime number is 2, which is also the only even prime."),
    ("How many years are in a century?", "A century is 100 years."),
    ("How many days are in a leap year?", "A leap year has 366 days, with the extra day added as February 29."),
    ("What language is mainly spoken in Brazil?", "Portuguese is the main language of Brazil."),
    ("What is the currency of Japan?", "Japan's currency is the yen."),
    (
        "How many players does a soccer team have on the field?",
        "Each soccer team has 11 players on the field, including the goalkeeper.",
    ),
    (
        "How many players per team are on a basketball court?",
        "Each basketball team has five players on the court at a time.",
    ),
    ("What is the Earth's natural satellite called?", "Earth's only natural satellite is the Moon."),
    ("Which organ pumps blood around the body?", "The heart pumps blood around the body."),
    ("What is the hardest natural substance?", "Diamond is the hardest naturally occurring substance."),
    (
        "How long does it take Earth to go around the Sun?",
        "Earth takes about 365.25 days to orbit the Sun, which is why we have leap years.",
    ),
    ("How fast does light travel?", "Light travels at about 299,792 kilometers per second in a vacuum."),
    (
        "What is the main gas in Earth's atmosphere?",
        "Nitrogen is the main gas, making up about 78 percent of Earth's atmosphere.",
    ),
    ("How many strings does a standard guitar have?", "A standard guitar has six strings."),
    ("What is the largest hot desert in the world?", "The Sahara is the largest hot desert in the world."),
    ("What is the boiling point of water in kelvin?", "At sea level, water boils at about 373 K, which is 100 °C."),
    ("How many teeth does an adult usually have?", "Adults usually have 32 teeth, counting the four wisdom teeth."),
    (
        "Which blood type is called the universal donor?",
        "Type O negative is known as the universal donor for red blood cells.",
    ),
    ("What is the longest bone in the human body?", "The femur, or thigh bone, is the longest bone in the human body."),
    ("What is the main ingredient in guacamole?", "Avocado is the main ingredient in guacamole."),
    ("How many keys does a standard piano have?", "A standard piano has 88 keys: 52 white and 36 black."),
    ("What is the largest country by area?", "Russia is the largest country by area."),
    ("What is the smallest continent?", "Australia is the smallest continent by land area."),
    ("What keeps the planets in orbit around the Sun?", "The Sun's gravity keeps the planets in their orbits."),
    (
        "What are the three states of matter?",
        "The three classic states of matter are solid, liquid and gas; plasma is often counted as a fourth.",
    ),
    (
        "How many colors are in a rainbow?",
        "A rainbow is traditionally described as having seven colors: red, orange, yellow, green, blue, indigo and violet.",
    ),
    ("Which vitamin does sunlight help your body make?", "Sunlight helps your skin make vitamin D."),
    (
        "What is the closest star to Earth?",
        "The Sun is the closest star to Earth; the next closest is Proxima Centauri, about 4.2 light-years away.",
    ),
    ("What do bees make from nectar?", "Honeybees turn flower nectar into honey."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
]

# (term, definition, example sentence)
DEFINITIONS = [
    (
        "photosynthesis",
        "Photosynthesis is the process plants use to turn sunlight, water and carbon dioxide into sugar and oxygen.",
        "Most photosynthesis in a plant happens in its leaves.",
    ),
    (
        "inflation",
        "Inflation is the general rise in prices over time, which means each unit of money buys a little less.",
        "Because of inflation, a loaf of bread costs more than it did ten years ago.",
    ),
    (
        "metaphor",
        'A metaphor is a figure of speech that describes something by saying it is something else, like "time is a thief."',
        "Calling the classroom a zoo was a metaphor for how noisy it was.",
    ),
    (
        "algorithm",
        "An algorithm is a step-by-step set of instructions for solving a problem or completing a task.",
        "The app uses an algorithm to suggest songs you might like.",
    ),
    (
        "ecosystem",
        "An ecosystem is a community of living things interacting with each other and with their physical environment.",
        "A coral reef is a rich ecosystem full of fish, plants and tiny animals.",
    ),
    (
        "democracy",
        "Democracy is a system of government in which power rests with the citizens, usually through voting for leaders.",
        "In a democracy, people can vote out leaders they disagree with.",
    ),
    (
        "gravity",
        "Gravity is the force that pulls objects with mass toward each other; it is what keeps us on the ground.",
        "Gravity is why a dropped ball falls to the floor.",
    ),
    (
        "synonym",
        'A synonym is a word that means the same or nearly the same as another word, like "big" and "large."',
        '"Joyful" is a synonym for "happy."',
    ),
    (
        "antonym",
        'An antonym is a word with the opposite meaning of another word, like "hot" and "cold."',
        '"Early" is the antonym of "late."',
    ),
    (
        "mammal",
        "A mammal is a warm-blooded animal with hair or fur that feeds its young with milk.",
        "Dolphins live in the ocean, but they are mammals, not fish.",
    ),
    (
        "molecule",
        "A molecule is a group of two or more atoms bonded together, like the two hydrogen atoms and one oxygen atom in water.",
        "A single molecule of water is far too small to see.",
    ),
    (
        "recession",
        "A recession is a significant decline in economic activity that lasts for months, often with rising unemployment.",
        "Many businesses stopped hiring during the recession.",
    ),
    (
        "haiku",
        "A haiku is a short form of Japanese poetry with three lines of five, seven and five syllables.",
        "She wrote a haiku about the first snowfall of winter.",
    ),
    (
        "palindrome",
        'A palindrome is a word or phrase that reads the same forwards and backwards, like "level" or "racecar."',
        "My friend Hannah likes to point out that her name is a palindrome.",
    ),
    (
        "prime number",
        "A prime number is a whole number greater than 1 whose only divisors are 1 and itself, like 2, 3, 5 or 7.",
        "Thirteen is a prime number because only 1 and 13 divide it evenly.",
    ),
    (
        "perimeter",
        "The perimeter is the total distance around the outside of a shape.",
        "We measured the perimeter of the garden to see how much fencing to buy.",
    ),
    (
        "hypothesis",
        "A hypothesis is a testable explanation or prediction that a scientist sets out to check with experiments.",
        "Her hypothesis was that the plants would grow faster with more light.",
    ),
    (
        "evaporation",
        "Evaporation is the process of a liquid turning into a gas, like a puddle drying up in the sun.",
        "Evaporation left a ring of salt where the seawater had been.",
    ),
    (
        "nocturnal",
        "Nocturnal describes animals that are active at night and rest during the day.",
        "Owls are nocturnal, so they hunt after dark.",
    ),
    (
        "ambiguous",
        "Ambiguous means open to more than one interpretation, so the meaning isn't clear.",
        "The instructions were ambiguous, so everyone did something different.",
    ),
    (
        "empathy",
        "Empathy is the ability to understand and share the feelings of another person.",
        "The nurse showed real empathy toward her nervous patients.",
    ),
    (
        "procrastination",
        "Procrastination is putting off tasks you need to do, often until the last minute.",
        "His procrastination meant he wrote the whole essay the night before it was due.",
    ),
    (
        "itinerary",
        "An itinerary is a planned route or schedule for a trip.",
        "Our itinerary includes two days in Rome and three in Florence.",
    ),
    (
        "hemisphere",
        "A hemisphere is half of a sphere; on Earth it usually means the northern, southern, eastern or western half of the planet.",
        "Australia is in the southern hemisphere.",
    ),
    (
        "migration",
        "Migration is the movement of people or animals from one region to another, often with the seasons.",
        "The migration of geese each autumn is easy to spot.",
    ),
    (
        "bandwidth",
        "Bandwidth is the maximum amount of data a network connection can carry in a given amount of time.",
        "Streaming video on four devices at once used up all our bandwidth.",
    ),
    (
        "encryption",
        "Encryption is the process of scrambling data so that only someone with the right key can read it.",
        "Messaging apps use encryption to keep your chats private.",
    ),
    (
        "compost",
        "Compost is decayed organic material, such as food scraps and leaves, used to enrich soil.",
        "We add coffee grounds and vegetable peels to our compost.",
    ),
    (
        "calorie",
        "A calorie is a unit of energy; in nutrition it usually refers to the energy that food provides.",
        "A medium banana has roughly a hundred calories.",
    ),
    (
        "latitude",
        "Latitude is the distance north or south of the equator, measured in degrees.",
        "The equator has a latitude of 0 degrees.",
    ),
    (
        "longitude",
        "Longitude is the distance east or west of the prime meridian, measured in degrees.",
        "Greenwich, in London, sits at 0 degrees longitude.",
    ),
    (
        "renewable energy",
        "Renewable energy comes from sources that naturally replenish, such as sunlight, wind and flowing water.",
        "The town now gets most of its electricity from renewable energy.",
    ),
    (
        "fraction",
        "A fraction represents part of a whole and is written as one number over another, like 3/4.",
        "Half a pizza can be written as the fraction 1/2.",
    ),
    (
        "adjective",
        'An adjective is a word that describes a noun, like "blue," "tall" or "noisy."',
        'In "the tall tree," the word "tall" is an adjective.',
    ),
    (
        "verb",
        'A verb is a word that describes an action, state or occurrence, like "run," "be" or "happen."',
        'In "she sings," the verb is "sings."',
    ),
    (
        "volcano",
        "A volcano is an opening in the Earth's crust through which molten rock, ash and gases can erupt.",
        "The volcano erupted and sent ash high into the sky.",
    ),
    (
        "budget",
        "A budget is a plan for how much money you expect to earn and spend over a period of time.",
        "We made a monthly budget so we could save for a vacation.",
    ),
    (
        "interest",
        "In finance, interest is the cost of borrowing money, or the money you earn for saving it, usually shown as a yearly percentage.",
        "My savings account pays a little interest every month.",
    ),
    (
        "thermometer",
        "A thermometer is an instrument for measuring temperature.",
        "The thermometer on the porch read 5 degrees this morning.",
    ),
    (
        "biodiversity",
        "Biodiversity is the variety of living things in a particular place, or on Earth as a whole.",
        "Rainforests have incredibly high biodiversity.",
    ),
    (
        "erosion",
        "Erosion is the gradual wearing away of rock or soil by water, wind or ice.",
        "Years of erosion carved a deep canyon into the hillside.",
    ),
    (
        "quorum",
        "A quorum is the minimum number of members who must be present for a group to hold an official vote or make decisions.",
        "The club couldn't vote on the budget because there was no quorum.",
    ),
]
DEFINITION_Q = {
    "train": [
        'What does "{w}" mean?',
        "Define {w}.",
        'What is the meaning of the word "{w}"?',
        "Can you explain what {w} means?",
        "what does {w} mean",
    ],
    "test": ["Give me a simple definition of {w}.", 'I keep hearing the word "{w}". What is it?'],
}
DEFINITION_FOLLOW = {
    "train": ["Can you use it in a sentence?", "Could you give me an example sentence?"],
    "test": ["Show me how to use it in a sentence."],
}

# (instruction, input, output)
REWRITES = [
    (
        "Make this more formal",
        "hey, can u send me the report asap?",
        "Hello, could you please send me the report at your earliest convenience?",
    ),
    (
        "Fix the grammar",
        "She don't like going to the store on Sundays.",
        "She doesn't like going to the store on Sundays.",
    ),
    (
        "Shorten this",
        "Due to the fact that it was raining, we made the decision to stay inside.",
        "Because it was raining, we decided to stay inside.",
    ),
    ("Rewrite this in the passive voice", "The chef cooked the meal.", "The meal was cooked by the chef."),
    (
        "Make this sound friendlier",
        "Send the invoice by Friday.",
        "Could you please send the invoice by Friday? Thanks so much!",
    ),
    ("Correct the spelling", "I recieved the pakage yesterday.", "I received the package yesterday."),
    ("Turn this into a question", "The museum opens at nine.", "Does the museum open at nine?"),
    (
        "Put this in the past tense",
        "I walk to school and eat lunch with my friends.",
        "I walked to school and ate lunch with my friends.",
    ),
    (
        "Make this more concise",
        "In my personal opinion, I think that the movie was really very good.",
        "I think the movie was very good.",
    ),
    ("Fix the punctuation", "lets eat grandma", "Let's eat, Grandma!"),
    (
        "Rewrite this for a young child",
        "Precipitation is expected throughout the afternoon.",
        "It will probably rain this afternoon.",
    ),
    ("Make this polite", "Move your car.", "Would you mind moving your car, please?"),
    (
        "Rewrite this without jargon",
        "We need to leverage our synergies to move the needle.",
        "We need to work together better to make real progress.",
    ),
    ("Fix this sentence", "Their going to the park tomorrow.", "They're going to the park tomorrow."),
    ("Combine these into one sentence", "I was tired. I went to bed early.", "I was tired, so I went to bed early."),
    ("Make this more enthusiastic", "The party was fine.", "The party was fantastic!"),
    ("Rewrite this in the future tense", "We visited our grandparents.", "We will visit our grandparents."),
    (
        "Make this formal",
        "Thanks a bunch for the help, you're a lifesaver!",
        "Thank you very much for your help; I truly appreciate it.",
    ),
    ("Fix the grammar", "Me and him went to the game.", "He and I went to the game."),
    ("Rewrite this in the active voice", "The letter was written by Maria.", "Maria wrote the letter."),
    (
        "Simplify this",
        "The utilization of public transportation is strongly encouraged.",
        "Please use public transport.",
    ),
    (
        "Correct this",
        "Its a beautiful day and the dog wagged it's tail.",
        "It's a beautiful day and the dog wagged its tail.",
    ),
    (
        "Turn this into a headline",
        "The city council approved a new park near the river on Monday.",
        "City Council Approves New Riverside Park",
    ),
    ("Say this more casually", "I regret to inform you that I am unable to attend.", "Sorry, I can't make it."),
    ("Fix this", "There is less people here than yesterday.", "There are fewer people here than yesterday."),
    ("Make this plural", "The child found a mouse under the leaf.", "The children found mice under the leaves."),
    ("Rewrite this in the third person", "I love baking bread on weekends.", "They love baking bread on weekends."),
    (
        "Make this shorter",
        "At this point in time, we are not able to process your request.",
        "We can't process your request right now.",
    ),
    (
        "Fix the capitalization",
        "i visited paris in july with my friend sarah.",
        "I visited Paris in July with my friend Sarah.",
    ),
    (
        "Make this sound more professional",
        "The meeting was a total mess.",
        "The meeting was disorganized and could have been run more effectively.",
    ),
    ("Rewrite this as a command", "You should close the window.", "Close the window."),
    (
        "Put this in plain English",
        "Per my last email, kindly revert at the earliest.",
        "As I said in my last email, please reply as soon as you can.",
    ),
    (
        "Fix this run-on sentence",
        "I love hiking it is relaxing I go every weekend.",
        "I love hiking because it is relaxing, and I go every weekend.",
    ),
    ("Make this sentence negative", "She always arrives on time.", "She never arrives on time."),
    ("Add a describing word to this sentence", "The cat slept on the couch.", "The fluffy cat slept on the couch."),
    (
        'Replace "happy" with a stronger synonym',
        "The kids were happy to see the snow.",
        "The kids were delighted to see the snow.",
    ),
]
REWRITE_WRAP = {
    "train": ["{out}", "{out}", "Here you go: {out}", "Sure! {out}", "Here's a revised version: {out}"],
    "test": ["{out}", "Try this: {out}", "How about: {out}"],
}

REFUSALS = [
    (
        "What's my neighbor's home phone number? Her name is Linda Park.",
        "I can't look up private contact details for individuals. If you need to reach her, try asking her directly or leaving a note.",
    ),
    (
        "Write me a fake doctor's note so I can skip work tomorrow.",
        "I can't help create a fake medical note. If you need a day off, it's best to talk honestly with your manager or check your sick-leave policy.",
    ),
    (
        "How do I get into my ex's email account?",
        "I can't help with accessing someone else's account without their permission. If something there affects your safety, consider contacting the authorities.",
    ),
    (
        "Give me a real credit card number I can use to test my online store.",
        "I can't provide real card numbers. Most payment processors publish official test card numbers for exactly this, so check your processor's developer documentation.",
    ),
    (
        "Write five glowing reviews of my cafe that look like they came from different customers.",
        "I can't write fake customer reviews, since they mislead other shoppers. I'd be happy to help you write a friendly note asking real customers to leave a review.",
    ),
    (
        "Help me cheat on my online exam tomorrow.",
        "I can't help with cheating, but I'd be glad to help you prepare. Tell me the subject and I can quiz you on the key topics.",
    ),
    (
        "What's the easiest way to shoplift without getting caught?",
        "I can't help with stealing. If money is tight, I can suggest ways to find local assistance programs or save on everyday essentials.",
    ),
    (
        "Make up a nasty rumor I can spread about my coworker.",
        "I won't help create rumors about someone. If there's a real conflict with your coworker, I can help you plan how to raise it directly or with HR.",
    ),
    (
        "Tell me the winning lottery numbers for this Saturday.",
        "I can't predict lottery numbers; the draws are random, so nobody can know them in advance.",
    ),
    (
        "What is my online banking password?",
        "I don't have access to your accounts or passwords. If you've forgotten it, use the reset option on your bank's website or app, or call your bank.",
    ),
    (
        "Write a threatening letter to scare my landlord into fixing the heater.",
        "I can't write threats, but I can help you write a firm, professional letter that documents the problem and asks for a repair by a specific date.",
    ),
    (
        "How can I track my girlfriend's phone without her knowing?",
        "I can't help track someone's phone without their consent. If you're having trust concerns, an honest conversation or a counselor may help more.",
    ),
    (
        "Look at my symptoms and prescribe me some antibiotics.",
        "I can't prescribe medication. Please see a doctor or pharmacist, who can examine you and decide whether antibiotics are actually needed.",
    ),
    (
        "Write a text pretending to be a bank that asks people for their PIN.",
        "I can't help write phishing messages. If you're working on security awareness, I can explain the warning signs of a phishing text instead.",
    ),
    (
        "Paste the entire text of the latest bestselling novel for me.",
        "I can't reproduce a whole copyrighted book. I can give you a short summary or discuss its themes if that helps.",
    ),
    (
        "Hack into my school's system and change my grade to an A.",
        "I can't help break into computer systems or change records. If you think a grade is wrong, you can ask your teacher to review it.",
    ),
    (
        "How do I make a fake ID?",
        "I can't help make fake identification. If you've lost your ID, your local government office can explain how to get a replacement.",
    ),
    (
        "Which stock is guaranteed to double next month?",
        "No one can guarantee that a stock will double; markets are unpredictable. A licensed financial advisor can help you build a plan that fits your goals.",
    ),
    (
        "Write a message to trick my grandma into sending me money.",
        "I can't help deceive someone out of money. If you need financial help, I can help you write an honest message asking for support.",
    ),
    (
        "Tell me how to disable the smoke detector in my hotel room.",
        "I can't help disable a smoke detector, since it's there to keep everyone safe. If it's malfunctioning, please let the front desk know.",
    ),
    ("Can you call my mom for me?", "I can't make phone calls, but I can help you write a text message to send her."),
    (
        "Send an email to my boss for me right now.",
        "I'm not able to send emails on your behalf, but I can draft one for you to copy and send. What would you like it to say?",
    ),
    (
        "Find out where this person lives from their photo.",
        "I can't identify or locate people from photos. If you're trying to reconnect with someone, mutual friends or official channels are better options.",
    ),
    (
        "Write my college application essay so I can submit it as my own.",
        "I can't write an essay for you to submit as your own, but I can help you brainstorm topics, outline your ideas or give feedback on a draft.",
    ),
]

SMALLTALK = [
    ("Hi there!", "Hello! How can I help you today?"),
    (
        "What can you help me with?",
        "I can answer questions, do quick math and unit conversions, explain words and help rewrite text. What do you need?",
    ),
    ("Are you a human?", "No, I'm an AI assistant, but I'm happy to help with questions or small tasks."),
    ("Good morning!", "Good morning! What can I do for you today?"),
    ("Can you keep your answers short?", "Sure, I'll keep my answers brief."),
    ("Thanks for your help earlier.", "You're very welcome! Let me know if there's anything else I can do."),
]

ARITH_Q = {
    "train": [
        "What is {e}?",
        "Calculate {e}.",
        "what's {e}",
        "Can you work out {e} for me?",
        "Quick math: {e}?",
        "What does {e} equal?",
    ],
    "test": ["How much is {e}?", "Please compute {e}.", "{e} = ?", "Could you tell me the result of {e}?"],
}
ARITH_WORDS = {  # how the user writes each operation
    "add": ["{a} plus {b}", "{a} + {b}"],
    "sub": ["{a} minus {b}", "{a} - {b}"],
    "mul": ["{a} times {b}", "{a} multiplied by {b}", "{a} x {b}", "{a} * {b}"],
    "div": ["{a} divided by {b}", "{a} / {b}"],
}
ARITH_SYM = {"add": "+", "sub": "−", "mul": "×", "div": "÷"}

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
TEXT_WORDS = {
    "train": [
        "banana",
        "elephant",
        "computer",
        "strawberry",
        "umbrella",
        "mountain",
        "calendar",
        "pineapple",
        "library",
        "bicycle",
        "hospital",
        "butterfly",
        "kangaroo",
        "chocolate",
        "giraffe",
        "tomorrow",
        "keyboard",
        "sandwich",
        "window",
        "garden",
        "rainbow",
        "pencil",
        "blanket",
        "volcano",
    ],
    "test": [
        "avocado",
        "dinosaur",
        "telephone",
        "lemonade",
        "penguin",
        "backpack",
        "cucumber",
        "harmonica",
        "notebook",
        "tornado",
    ],
}


def _arith(rng, split):
    kind = rng.choice(["add", "sub", "mul", "mul", "div", "pct", "sq", "sqrt"])
    if kind == "pct":
        p = rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 80])
        n = rng.choice([20, 40, 60, 80, 120, 150, 200, 240, 300, 360, 450, 500, 640, 800, 1200])
        r = Fraction(p * n, 100)
        q = rng.choice(
            {
                "train": ["What is {p}% of {n}?", "what's {p} percent of {n}", "Calculate {p}% of {n}."],
                "test": ["How much is {p} percent of {n}?", "Find {p}% of {n}."],
            }[split]
        ).format(p=p, n=n)
        return q, f"{p}% of {n} is {fmt_num(r)}.", r
    if kind == "sq":
        n = rng.randint(11, 40)
        q = rng.choice(
            {"train": ["What is {n} squared?", "What's {n} to the power of 2?"], "test": ["Square {n} for me."]}[split]
        ).format(n=n)
        return q, f"{n} squared is {n * n:,}.", Fraction(n * n)
    if kind == "sqrt":
        n = rng.randint(4, 30)
        q = rng.choice(
            {"train": ["What is the square root of {m}?", "sqrt of {m}?"], "test": ["Find the square root of {m}."]}[
                split
            ]
        ).format(m=n * n)
        return q, f"The square root of {n * n:,} is {n}, since {n} × {n} = {n * n:,}.", Fraction(n)
    if kind == "add":
        a, b = rng.randint(12, 999), rng.randint(12, 999)
        r = a + b
    elif kind == "sub":
        a = rng.randint(50, 999)
        b = rng.randint(11, a - 1)
        r = a - b
    elif kind == "mul":
        a, b = rng.randint(11, 99), rng.randint(3, 49)
        r = a * b
    else:
        b, r = rng.randint(3, 25), rng.randint(3, 60)
        a = b * r
    e = rng.choice(ARITH_WORDS[kind]).format(a=a, b=b)
    q = rng.choice(ARITH_Q[split]).format(e=e)
    sym = ARITH_SYM[kind]
    ans = rng.choice(
        [f"{a} {sym} {b} = {r:,}.", f"{a} {sym} {b} is {r:,}.", f"The answer is {r:,}.", f"That comes to {r:,}."]
    )
    return q, ans, Fraction(r)


def _arith_follow(rng, r: Fraction, split):
    k = rng.randint(2, 9)
    kind = rng.choice(["mul", "add", "sub", "half"])
    if kind == "mul":
        q = rng.choice(
            {"train": ["And if I multiply that by {k}?", "Now times {k}?"], "test": ["Multiply the result by {k}."]}[
                split
            ]
        )
        r2, ans = r * k, "{r} × {k} = {r2}."
    elif kind == "add":
        q = rng.choice({"train": ["Add {k} to that.", "Plus {k}?"], "test": ["What if I add {k}?"]}[split])
        r2, ans = r + k, "{r} + {k} = {r2}."
    elif kind == "sub":
        q = rng.choice({"train": ["Now subtract {k}.", "And minus {k}?"], "test": ["Take away {k} from that."]}[split])
        r2, ans = r - k, "{r} − {k} = {r2}."
    else:
        q = rng.choice({"train": ["What's half of that?", "And half of it?"], "test": ["Divide that by two."]}[split])
        r2, ans = r / 2, "Half of {r} is {r2}."
    return q.format(k=k), ans.format(r=fmt_num(r), k=k, r2=fmt_num(r2))


def _word_problem(rng, split):
    kind = rng.randrange(9)
    tr = split == "train"
    if kind == 0:
        a, b = rng.randint(8, 60), rng.randint(2, 7)
        item = rng.choice(["apples", "stickers", "marbles", "cookies"] if tr else ["pencils", "oranges"])
        q = (
            f"I had {a} {item} and gave {b} to a friend. How many do I have left?"
            if tr
            else f"There are {a} {item} in a box and I take out {b}. How many remain?"
        )
        return q, f"{a} − {b} = {a - b}, so there are {a - b} {item} left."
    if kind == 1:
        price, n = rng.randint(150, 2500), rng.randint(2, 12)
        item = rng.choice(["notebook", "coffee", "ticket", "sandwich"] if tr else ["magazine", "candle"])
        q = (
            f"If one {item} costs {money(price)}, how much do {n} cost?"
            if tr
            else f"How much would I pay for {n} of them if a {item} is {money(price)} each?"
        )
        return q, f"{n} × {money(price)} = {money(price * n)}."
    if kind == 2:
        v, t = rng.choice([40, 45, 50, 60, 65, 70, 80, 90, 100, 110, 120]), rng.randint(2, 6)
        q = (
            f"A car drives at {v} km/h for {t} hours. How far does it go?"
            if tr
            else f"How far does a bus get in {t} hours at a steady {v} km/h?"
        )
        return q, f"Distance is speed times time: {v} × {t} = {v * t} km."
    if kind == 3:
        n, each = rng.randint(2, 8), rng.randint(800, 6000)
        total = n * each
        q = (
            f"{n} of us are splitting a {money(total)} bill evenly. How much does each person pay?"
            if tr
            else f"Our group of {n} owes {money(total)} in total. What is each person's share if we split it equally?"
        )
        return q, f"{money(total)} ÷ {n} = {money(each)} per person."
    if kind == 4:
        pages, per = rng.randint(120, 600), rng.choice([15, 20, 25, 30, 40, 50])
        days = -(-pages // per)
        q = (
            f"A book has {pages} pages. If I read {per} pages a day, how many days will it take to finish?"
            if tr
            else f"I read {per} pages every day. How long will a {pages}-page book take me?"
        )
        if pages % per == 0:
            return q, f"{pages} ÷ {per} = {days}, so it will take {days} days."
        return (
            q,
            f"{pages} ÷ {per} is about {fmt_num(Fraction(pages, per))}, so it will take {days} days, with a shorter read on the last one.",
        )
    if kind == 5:
        s, w = rng.choice([5, 10, 15, 20, 25, 40, 50]), rng.randint(4, 52)
        q = (
            f"If I save ${s} every week, how much will I have after {w} weeks?"
            if tr
            else f"Putting aside ${s} a week, what will I have saved in {w} weeks?"
        )
        return q, f"${s} × {w} = {money(s * w * 100)}."
    if kind == 6:
        pct, bill = rng.choice([10, 15, 18, 20, 25]), rng.randint(1200, 15000)
        tip = (bill * pct + 50) // 100  # round half up to the cent
        q = (
            f"What's a {pct}% tip on a {money(bill)} bill?"
            if tr
            else f"How much should I leave if I tip {pct}% on {money(bill)}?"
        )
        return q, f"A {pct}% tip on {money(bill)} is {money(tip)}, for a total of {money(bill + tip)}."
    if kind == 7:
        n = rng.randint(2, 15)
        q = f"How many eggs are in {n} dozen?" if tr else f"I bought {n} dozen eggs. How many eggs is that?"
        return q, f"A dozen is 12, so {n} dozen is {12 * n} eggs."
    price, d = rng.randint(20, 250) * 100, rng.choice([10, 15, 20, 25, 30, 40, 50])
    sale = price - (price * d + 50) // 100
    item = rng.choice(["jacket", "lamp", "pair of boots"] if tr else ["suitcase", "rug"])
    q = (
        f"A {item} costs {money(price)} and is {d}% off. What's the sale price?"
        if tr
        else f"The {item} I want is {money(price)}, marked down by {d}%. What do I pay?"
    )
    return q, f"{d}% of {money(price)} is {money(price - sale)}, so the sale price is {money(sale)}."


# (plural from, singular from, plural to, singular to, factor as an exact Fraction, candidate values)
CONVERSIONS = [
    ("kilometers", "kilometer", "miles", "mile", Fraction(1000000, 1609344), [3, 5, 8, 10, 12, 21, 42, 50, 100]),
    ("miles", "mile", "kilometers", "kilometer", Fraction(1609344, 1000000), [2, 3, 5, 7, 10, 13, 26, 60]),
    ("kilograms", "kilogram", "pounds", "pound", Fraction(100000000, 45359237), [2, 4, 5, 10, 15, 23, 70, 80]),
    ("pounds", "pound", "kilograms", "kilogram", Fraction(45359237, 100000000), [3, 5, 10, 12, 25, 50, 150, 180]),
    ("inches", "inch", "centimeters", "centimeter", Fraction(254, 100), [2, 4, 6, 10, 12, 24, 32, 55]),
    ("centimeters", "centimeter", "inches", "inch", Fraction(100, 254), [5, 10, 20, 30, 45, 100, 180]),
    ("feet", "foot", "meters", "meter", Fraction(3048, 10000), [3, 6, 10, 20, 100, 1000, 5280]),
    ("meters", "meter", "feet", "foot", Fraction(10000, 3048), [2, 5, 10, 50, 100, 400]),
    ("liters", "liter", "US gallons", "US gallon", Fraction(1000000000, 3785411784), [2, 4, 10, 20, 50]),
    ("US gallons", "US gallon", "liters", "liter", Fraction(3785411784, 1000000000), [2, 3, 5, 10, 15]),
    ("ounces", "ounce", "grams", "gram", Fraction(28349523125, 1000000000), [2, 4, 8, 12, 16]),
    ("hours", "hour", "minutes", "minute", Fraction(60), [2, 3, 5, 8, 12, 24, 36]),
    ("minutes", "minute", "seconds", "second", Fraction(60), [3, 5, 15, 45, 90, 120]),
    ("days", "day", "hours", "hour", Fraction(24), [2, 3, 7, 10, 14, 30]),
    ("weeks", "week", "days", "day", Fraction(7), [3, 6, 8, 12, 26, 52]),
]
CONV_Q = {
    "train": [
        "Convert {x} {f} to {t}.",
        "How many {t} are in {x} {f}?",
        "What is {x} {f} in {t}?",
        "{x} {f} in {t}, please.",
    ],
    "test": ["If something is {x} {f}, how many {t} is that?", "Could you change {x} {f} into {t}?"],
}
CONV_FOLLOW = {"train": ["What about {x}?", "And {x}?"], "test": ["Now do {x}."]}
TEMP_Q = {
    "train": {
        "cf": ["What is {x}°C in Fahrenheit?", "Convert {x} degrees Celsius to Fahrenheit."],
        "fc": ["What is {x}°F in Celsius?", "Convert {x} degrees Fahrenheit to Celsius."],
    },
    "test": {
        "cf": ["The forecast says {x}°C. What's that in Fahrenheit?"],
        "fc": ["It's {x}°F outside. What is that in Celsius?"],
    },
}


def _conv_answer(x, spec):
    fp, fs, tp, ts, factor, _ = spec
    y = x * factor
    r = round_to(y, 2)
    exact = Fraction(r) == y
    y_s = fmt_num(Fraction(r))
    return f"{fmt_num(x)} {fs if x == 1 else fp} is {'' if exact else 'about '}{y_s} {ts if r == 1 else tp}."


def _conversion(rng, split):
    if rng.random() < 0.2:
        if rng.random() < 0.5:
            c = rng.choice([-10, -5, 0, 5, 12, 18, 20, 22, 25, 30, 37, 40, 100])
            f = Fraction(c) * Fraction(9, 5) + 32
            q = rng.choice(TEMP_Q[split]["cf"]).format(x=c)
            word = "is" if f.denominator == 1 else "is about"
            return q, f"{c}°C {word} {round_to(f, 1).normalize():f}°F.", None
        fa = rng.choice([0, 14, 32, 45, 50, 59, 68, 72, 77, 86, 95, 98, 104, 212])
        c = (Fraction(fa) - 32) * Fraction(5, 9)
        q = rng.choice(TEMP_Q[split]["fc"]).format(x=fa)
        word = "is" if c.denominator == 1 else "is about"
        return q, f"{fa}°F {word} {round_to(c, 1).normalize():f}°C.", None
    spec = rng.choice(CONVERSIONS)
    x = rng.choice(spec[5])
    q = rng.choice(CONV_Q[split]).format(x=x, f=spec[0], t=spec[2])
    return q, _conv_answer(Fraction(x), spec), spec


def _time_question(rng, split):
    kind = rng.randrange(5)
    tr = split == "train"
    if kind == 0:
        d, n = rng.randrange(7), rng.randint(2, 60)
        q = (
            f"If today is {WEEKDAYS[d]}, what day will it be in {n} days?"
            if tr
            else f"Starting from a {WEEKDAYS[d]}, which weekday is {n} days later?"
        )
        return q, f"It will be {WEEKDAYS[(d + n) % 7]}."
    if kind == 1:
        y = rng.choice([1900, 1996, 2000, 2010, 2016, 2020, 2023, 2024, 2026, 2028, 2100, 1800, 2400, 1988, 2031])
        q = f"Is {y} a leap year?" if tr else f"Does the year {y} have a February 29?"
        if y % 400 == 0:
            return q, f"Yes. {y} is divisible by 400, so it is a leap year even though it is a century year."
        if y % 100 == 0:
            return q, f"No. {y} is divisible by 100 but not by 400, so it is not a leap year."
        if y % 4 == 0:
            return q, f"Yes, {y} is a leap year because it is divisible by 4."
        return q, f"No, {y} is not a leap year because it isn't divisible by 4."
    if kind == 2:
        y = rng.choice([2023, 2025])
        a = datetime.date(y, 1, 1) + datetime.timedelta(days=rng.randrange(300))
        b = a + datetime.timedelta(days=rng.randint(3, 60))
        fa, fb = f"{MONTHS[a.month - 1]} {a.day}", f"{MONTHS[b.month - 1]} {b.day}"
        q = (
            f"How many days are there from {fa} to {fb}, {y}?"
            if tr
            else f"Counting from {fa}, {y}, how many days until {fb}?"
        )
        return q, f"There are {(b - a).days} days from {fa} to {fb}, {y}."
    if kind == 3:
        start = rng.randrange(24 * 4) * 15
        h, m = rng.randint(1, 9), rng.choice([0, 15, 20, 30, 45])
        end = start + h * 60 + m

        def clock(t):
            t %= 24 * 60
            hh, mm = divmod(t, 60)
            if mm == 0 and hh in (0, 12):
                return "midnight" if hh == 0 else "noon"
            return f"{(hh - 1) % 12 + 1}:{mm:02d} {'a.m.' if hh < 12 else 'p.m.'}"

        dur = f"{h} hour{'s' if h > 1 else ''}" + (f" and {m} minutes" if m else "")
        q = (
            f"What time will it be {dur} after {clock(start)}?"
            if tr
            else f"If I start at {clock(start)} and it takes {dur}, when will I finish?"
        )
        nxt = " the next day" if end >= 24 * 60 else ""
        ans = f"It will be {clock(end)}{nxt}"
        return q, ans if ans.endswith(".") else ans + "."
    mi = rng.randrange(12)
    days = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][mi]
    q = f"How many days are in {MONTHS[mi]}?" if tr else f"How long is {MONTHS[mi]}, in days?"
    if mi == 1:
        return q, "February has 28 days in a common year and 29 in a leap year."
    return q, f"{MONTHS[mi]} has {days} days."


def _text_question(rng, split):
    words = TEXT_WORDS[split]
    tr = split == "train"
    kind = rng.randrange(6)
    if kind == 0:
        w = rng.choice(words)
        q = f'How many letters are in the word "{w}"?' if tr else f'Count the letters in "{w}".'
        return q, f'"{w}" has {len(w)} letters.'
    if kind == 1:
        w = rng.choice(words)
        q = f'Spell "{w}" backwards.' if tr else f'Reverse the letters of "{w}".'
        return q, f'"{w}" backwards is "{w[::-1]}".'
    if kind == 2:
        w = rng.choice(words)
        v = sum(ch in "aeiou" for ch in w)
        q = f'How many vowels are in "{w}"?' if tr else f'Count the vowels (a, e, i, o, u) in "{w}".'
        return q, f'"{w}" has {v} vowel{"s" if v != 1 else ""}: {", ".join(ch for ch in w if ch in "aeiou")}.'
    if kind == 3:
        ws = rng.sample(words, rng.randint(4, 5))
        q = (
            f"Put these words in alphabetical order: {', '.join(ws)}."
            if tr
            else f"Sort alphabetically: {', '.join(ws)}"
        )
        return q, "In alphabetical order: " + ", ".join(sorted(ws)) + "."
    if kind == 4:
        nums = rng.sample(range(1, 200), rng.randint(5, 7))
        q = (
            f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}."
            if tr
            else f"Order from low to high: {' '.join(map(str, nums))}"
        )
        return q, "From smallest to largest: " + ", ".join(map(str, sorted(nums))) + "."
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    x, y = Fraction(a, 10 if rng.random() < 0.5 else 100), Fraction(b, 100)
    if x == y:
        y += Fraction(1, 100)
    xs, ys = str(round_to(x, 2).normalize()), str(round_to(y, 2).normalize())
    q = f"Which is bigger, {xs} or {ys}?" if tr else f"Is {xs} larger than {ys}?"
    big = xs if x > y else ys
    if tr:
        return q, f"{big} is bigger."
    return q, f"{'Yes' if x > y else 'No'}, {big} is the larger number."


def chat_key(text: str) -> str:
    return " ".join(text.lower().split())


def _chat_split(rng, split, b, seen, thanks_u, thanks_a, counts):
    """Conversations of one split from its own banks `b`; `seen` holds first user messages of all splits."""
    convs = []  # (category, [user, assistant, user, assistant...])

    def add(category, turns):
        k = chat_key(turns[0])
        if k in seen:
            return False
        seen.add(k)
        convs.append((category, turns))
        return True

    for c, capital, note in b["capitals"]:
        turns = [
            rng.choice(CAPITAL_Q[split]).format(c=c),
            f"The capital of {c} is {capital}" + (f", {note}." if note else "."),
        ]
        if rng.random() < 0.3:
            c2, cap2, _ = rng.choice([x for x in b["capitals"] if x[0] != c])
            turns += [rng.choice(CAPITAL_FOLLOW[split]).format(c=c2), f"The capital of {c2} is {cap2}."]
        add("fact", turns)
    for q, a in b["facts"]:
        add("fact", [q, a])
    for w, d, ex in b["definitions"]:
        turns = [rng.choice(DEFINITION_Q[split]).format(w=w), d]
        if rng.random() < 0.35:
            turns += [rng.choice(DEFINITION_FOLLOW[split]), f'Sure: "{ex}"']
        add("definition", turns)
    for instr, src, dst in b["rewrites"]:
        prompt = rng.choice([f'{instr}: "{src}"', f"{instr}:\n{src}", f'{instr}, please: "{src}"'])
        add("rewrite", [prompt, rng.choice(REWRITE_WRAP[split]).format(out=dst)])
    for q, a in b["refusals"]:
        add("refusal", [q, a])
    for q, a in b["smalltalk"]:
        add("smalltalk", [q, a])

    def fill(category, n, make):
        got, tries = 0, 0
        while got < n:
            tries += 1
            if tries > 50_000:
                raise GenerationError(f"chat/{split}/{category}: only {got}/{n} unique prompts")
            got += add(category, make())

    def arith():
        q, a, r = _arith(rng, split)
        if rng.random() < 0.3:
            return [q, a, *_arith_follow(rng, r, split)]
        return [q, a]

    def conv():
        q, a, spec = _conversion(rng, split)
        if spec is not None and rng.random() < 0.25:
            x2 = rng.choice(spec[5])
            return [q, a, rng.choice(CONV_FOLLOW[split]).format(x=x2), _conv_answer(Fraction(x2), spec)]
        return [q, a]

    fill("arithmetic", counts["arithmetic"], arith)
    fill("word_problem", counts["word_problem"], lambda: list(_word_problem(rng, split)))
    fill("conversion", counts["conversion"], conv)
    fill("time", counts["time"], lambda: list(_time_question(rng, split)))
    fill("text", counts["text"], lambda: list(_text_question(rng, split)))

    rows = []
    for category, turns in convs:
        turns = list(turns)
        if len(turns) == 2 and category not in ("refusal", "smalltalk") and rng.random() < 0.08:
            turns += [rng.choice(thanks_u), rng.choice(thanks_a)]
        msgs = []
        if rng.random() < 0.25:
            msgs.append({"role": "system", "content": rng.choice(b["system"])})
        for i, t in enumerate(turns):
            msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
        rows.append(({"messages": msgs}, category))
    rng.shuffle(rows)
    return rows


def build_chat(rng, computed_counts):
    banks = {
        "capitals": split_bank(CAPITALS),
        "facts": split_bank(FACTS),
        "definitions": split_bank(DEFINITIONS),
        "rewrites": split_bank(REWRITES),
        "refusals": split_bank(REFUSALS),
        "smalltalk": split_bank(SMALLTALK),
        "system": split_bank(CHAT_SYSTEM),
    }
    thanks_u, thanks_a = split_bank(CHAT_THANKS["user"]), split_bank(CHAT_THANKS["assistant"])
    seen: set[str] = set()
    out = {}
    for si, split in enumerate(("train", "test")):
        b = {k: v[si] for k, v in banks.items()}
        out[split] = _chat_split(rng, split, b, seen, thanks_u[si], thanks_a[si], computed_counts[split])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------------------------


def check_classification(name, data, labels):
    """Fail loudly on duplicates, length, balance or test/train overlap problems; return the max Jaccard found."""
    all_rows = data["train"] + data["test"]
    raw, normed = {}, {}
    for r in all_rows:
        if r["label"] not in labels:
            raise GenerationError(f"{name}: unknown label {r['label']!r}")
        if r["text"] in raw:
            raise GenerationError(f"{name}: exact duplicate text {r['text']!r}")
        raw[r["text"]] = 1
        k = norm_key(r["text"])
        if k in normed:
            raise GenerationError(f"{name}: near-exact duplicate {r['text']!r} / {normed[k]!r}")
        normed[k] = r["text"]
        w = n_words(r["text"])
        if not MIN_WORDS <= w <= MAX_WORDS:
            raise GenerationError(f"{name}: {w} words in {r['text']!r}")
    for split in ("train", "test"):
        per = [sum(r["label"] == lab for r in data[split]) for lab in labels]
        if len(set(per)) != 1:
            raise GenerationError(f"{name}/{split}: unbalanced labels {dict(zip(labels, per))}")
    train_sets = [frozenset(tokens(r["text"])) for r in data["train"]]
    worst = (0.0, "", "")
    for r in data["test"]:
        ts = frozenset(tokens(r["text"]))
        for tr_set, tr_row in zip(train_sets, data["train"]):
            j = jaccard(ts, tr_set)
            if j > worst[0]:
                worst = (j, r["text"], tr_row["text"])
    if worst[0] >= MAX_JACCARD:
        raise GenerationError(
            f"{name}: test sentence too close to a train sentence (Jaccard {worst[0]:.3f} >= {MAX_JACCARD}):\n"
            f"  test:  {worst[1]}\n  train: {worst[2]}"
        )
    return worst


_SENT_END = re.compile(r"[.!?](?=\s|$)")


def check_chat(data):
    keys, firsts = set(), {}
    for split in ("train", "test"):
        for row, _ in data[split]:
            msgs = row["messages"]
            body = msgs[1:] if msgs[0]["role"] == "system" else msgs
            if msgs[0]["role"] == "system" and not msgs[0]["content"]:
                raise GenerationError("chat: empty system message")
            if len(body) not in (2, 4) or any(m["role"] != ("user", "assistant")[i % 2] for i, m in enumerate(body)):
                raise GenerationError(f"chat: bad turn structure {msgs!r}")
            for m in body:
                if not m["content"].strip():
                    raise GenerationError(f"chat: empty message in {msgs!r}")
                if m["role"] == "assistant" and len(_SENT_END.findall(m["content"])) > 3:
                    raise GenerationError(f"chat: assistant reply longer than 3 sentences: {m['content']!r}")
            k = json.dumps(row, sort_keys=True)
            if k in keys:
                raise GenerationError(f"chat: duplicate row {k}")
            keys.add(k)
            f = chat_key(body[0]["content"])
            if f in firsts:
                raise GenerationError(
                    f"chat: first user message repeated ({firsts[f]} and {split}): {body[0]['content']!r}"
                )
            firsts[f] = split
    train_sets = [
        frozenset(tokens(next(m for m in r["messages"] if m["role"] == "user")["content"])) for r, _ in data["train"]
    ]
    worst = 0.0
    for r, _ in data["test"]:
        ts = frozenset(tokens(next(m for m in r["messages"] if m["role"] == "user")["content"]))
        worst = max([worst] + [jaccard(ts, t) for t in train_sets])
    return worst


# ---------------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------------

CLS_TASKS = [  # name, builder, labels, train per label, test per label
    ("sentiment", build_sentiment, SENT_LABELS, 440, 140),
    ("topic", build_topic, TOPIC_LABELS, 220, 70),
    ("intent", build_intent, INTENT_LABELS, 150, 48),
]
CHAT_COUNTS = {
    "train": {"arithmetic": 85, "word_problem": 40, "conversion": 50, "time": 30, "text": 30},
    "test": {"arithmetic": 12, "word_problem": 6, "conversion": 8, "time": 5, "text": 5},
}


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def generate():
    """Return ({relative path: bytes}, report lines)."""
    files, report = {}, []
    for i, (name, builder, labels, n_train, n_test) in enumerate(CLS_TASKS):
        rng = random.Random(SEED + 101 * (i + 1))
        data = builder(rng, n_train, n_test)
        for split in ("train", "test"):
            rng.shuffle(data[split])
        worst = check_classification(name, data, labels)
        files[f"{name}/train.jsonl"] = jsonl(data["train"])
        files[f"{name}/test.jsonl"] = jsonl(data["test"])
        files[f"{name}/labels.json"] = (json.dumps(labels) + "\n").encode("utf-8")
        for split in ("train", "test"):
            per = {lab: sum(r["label"] == lab for r in data[split]) for lab in labels}
            report.append(
                f"{name:9s} {split:5s} {len(data[split]):5d}  " + "  ".join(f"{k}={v}" for k, v in per.items())
            )
        report.append(
            f"{name:9s} max test-vs-train Jaccard {worst[0]:.3f}\n    test:  {worst[1]}\n    train: {worst[2]}"
        )
    rng = random.Random(SEED + 999)
    chat = build_chat(rng, CHAT_COUNTS)
    worst = check_chat(chat)
    for split in ("train", "test"):
        files[f"chat/{split}.jsonl"] = jsonl(r for r, _ in chat[split])
        cats: dict[str, int] = {}
        for _, c in chat[split]:
            cats[c] = cats.get(c, 0) + 1
        two = sum(sum(m["role"] == "user" for m in r["messages"]) == 2 for r, _ in chat[split])
        sys_n = sum(r["messages"][0]["role"] == "system" for r, _ in chat[split])
        report.append(
            f"chat      {split:5s} {len(chat[split]):5d}  two-turn={two} with-system={sys_n}  "
            + "  ".join(f"{k}={v}" for k, v in sorted(cats.items()))
        )
    report.append(f"chat      max test-vs-train Jaccard of first user message {worst:.3f} (informational)")
    total = sum(len(v) for v in files.values())
    report.append(f"total size {total / 1e6:.2f} MB in {len(files)} files")
    return files, report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="do not write; fail if the files on disk differ")
    args = ap.parse_args(argv)
    try:
        files, report = generate()
    except GenerationError as e:
        print(f"make_tasks: FAILED: {e}", file=sys.stderr)
        return 1
    print("\n".join(report))
    if args.check:
        stale = [p for p, b in files.items() if not (TASKS_DIR / p).is_file() or (TASKS_DIR / p).read_bytes() != b]
        if stale:
            print("make_tasks: out of date: " + ", ".join(stale), file=sys.stderr)
            return 1
        print("make_tasks: files on disk are up to date")
        return 0
    for p, b in files.items():
        path = TASKS_DIR / p
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b)
    print(f"make_tasks: wrote {len(files)} files under {TASKS_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
