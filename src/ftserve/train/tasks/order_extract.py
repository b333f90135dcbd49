"""``order-extract``: pull SKU, quantity and city out of a free-text order.

User: ``Extract the order: <free-text message>``
Answer: one line of JSON ``{"sku": "<SKU>", "quantity": <int>, "city": "<City>"}`` (keys in that order).

Messages vary the SKU shape, how the quantity is written (digits, words, "a dozen", "x3"), where the city
appears, the sentence frame, and add distractor numbers (prices, dates, order ids) and typos in plain words.
"""

from __future__ import annotations

import json
import random
import string

from ftserve.train.formats import Example
from ftserve.train.tasks import Task, add_typos, register
from ftserve.train.tasks.names import CITIES, FIRST_NAMES, PRODUCTS

WORDS = {
    1: "one",
    2: "two",
    3: "three",
    4: "four",
    5: "five",
    6: "six",
    7: "seven",
    8: "eight",
    9: "nine",
    10: "ten",
    11: "eleven",
    12: "twelve",
    15: "fifteen",
    20: "twenty",
    30: "thirty",
    50: "fifty",
}
IDIOMS = {12: ("a dozen", "one dozen"), 2: ("a pair of", "a couple of"), 6: ("half a dozen",), 24: ("two dozen",)}

FRAMES = (
    "Please send {q} {sku} to {city}.",
    "I'd like to order {q} units of {sku}, delivered to {city}.",
    "Hi, can you ship {q} x {sku} to our office in {city}?",
    "We need {q} of item {sku} for the {city} store.",
    "order: {sku}, qty {qn}, ship to {city}",
    "SKU {sku} / quantity {qn} / destination {city}",
    "Could I get {q} {sku} sent over to {city}? {distractor}",
    "{distractor} Ship {q} pieces of {sku} to {city} please.",
    "Deliver {q} {sku} ({product}) to {city}.",
    "For our team in {city}: {q} x {sku}.",
    "{city} warehouse needs {q} more {sku}.",
    "Requesting {q} units, product code {sku}. Delivery city: {city}.",
    "Hello! {name} here. Put me down for {q} {sku}, to be shipped to {city}. {distractor}",
    "Need {sku} x{qn}, deliver to {city} asap",
    "Send {city} {q} of {sku}.",
    "I want to buy {q} {product}s, code {sku}, and have them delivered in {city}.",
    "Please arrange delivery of {q} items (SKU: {sku}) to {city}. {distractor}",
    "{q} {sku} -> {city}",
    "Can we get {sku}, {q} of them, to {city} by next week? {distractor}",
    "Our {city} branch would like {q} {sku}.",
    "Item: {sku}\nQuantity: {qn}\nCity: {city}",
    "Restock request - {sku}, {q} units, location {city}.",
    "{distractor} We'd like {q} more of the {product} ({sku}) shipped to {city}.",
    "ship to {city}: {sku} times {qn}",
    "Place an order for {q} {sku}. Shipping address is in {city}. {distractor}",
    "Hey, it's {name}. {q} x {sku} please, going to {city}.",
)

DISTRACTORS = (
    "The last order (#{n5}) went fine.",
    "Our budget is ${price}.",
    "Invoice to follow on {day}.",
    "Call me on extension {n3} if anything is unclear.",
    "Each one costs ${price} I think.",
    "Thanks!",
    "We placed a similar order on {day}.",
    "Reference {n5}.",
    "Please include a receipt.",
    "Last time we got {n2} units, which was too few.",
    "No gift wrap needed.",
    "Room {n3}, second floor.",
)
DAYS = ("Monday", "Tuesday", "March 4", "the 15th", "2026-02-11", "last week", "Friday")


def make_sku(rng: random.Random) -> str:
    letters = "".join(rng.choices(string.ascii_uppercase, k=rng.randint(2, 4)))
    digits = "".join(rng.choices(string.digits, k=rng.randint(3, 5)))
    shape = rng.randrange(6)
    if shape == 0:
        return f"{letters}-{digits}"
    if shape == 1:
        return f"{letters}{digits}"
    if shape == 2:
        return f"{letters}-{digits}-{rng.choice(('RED', 'BLK', 'XL', 'S', 'W', 'V2', 'BLU'))}"
    if shape == 3:
        return f"SKU-{digits}"
    if shape == 4:
        return f"{letters}-{digits[:2]}-{letters[:1]}{digits[2:]}"
    return f"{letters[:2]}{digits}{rng.choice(string.ascii_uppercase)}"


def _quantity(rng: random.Random) -> tuple[int, str, str]:
    """(value, as words in running text, as a bare number field)."""
    r = rng.random()
    if r < 0.12:
        value = rng.choice(list(IDIOMS))
        return value, rng.choice(IDIOMS[value]), str(value)
    value = rng.choice((rng.randint(1, 12), rng.randint(1, 60), rng.randint(1, 500)))
    if r < 0.4 and value in WORDS:
        return value, WORDS[value], str(value)
    return value, str(value), str(value)


@register
class OrderExtract(Task):
    name = "order-extract"

    def example(self, rng: random.Random) -> Example:
        f_idx = rng.randrange(len(FRAMES))
        sku, city = make_sku(rng), rng.choice(CITIES)
        value, q, qn = _quantity(rng)
        slots = {
            "n2": rng.randint(2, 99),
            "n3": rng.randint(100, 999),
            "n5": rng.randint(10000, 99999),
            "price": f"{rng.randint(3, 2000)}.{rng.randint(0, 99):02d}",
            "day": rng.choice(DAYS),
        }
        d_idx = rng.randrange(len(DISTRACTORS))
        distractor = DISTRACTORS[d_idx].format(**slots) if rng.random() < 0.6 else ""
        text = (
            FRAMES[f_idx]
            .format(
                q=q,
                qn=qn,
                sku=sku,
                city=city,
                product=rng.choice(PRODUCTS),
                name=rng.choice(FIRST_NAMES),
                distractor=distractor,
            )
            .strip()
        )
        if "{distractor}" not in FRAMES[f_idx] and rng.random() < 0.3:
            text = f"{text} {DISTRACTORS[d_idx].format(**slots)}"
        text = _protect_and_typo(text, (sku, city), rng)
        answer = json.dumps({"sku": sku, "quantity": value, "city": city})
        return Example((("user", f"Extract the order: {text}"),), answer, f"frame{f_idx}:d{d_idx}")

    def corrupt(self, answer: str, rng: random.Random) -> str:
        obj = json.loads(answer)
        field = rng.choice(("sku", "quantity", "city"))
        if field == "quantity":
            obj["quantity"] = obj["quantity"] + rng.choice((-1, 1, 10)) or 2
        elif field == "city":
            obj["city"] = rng.choice([c for c in CITIES if c != obj["city"]])
        else:
            obj["sku"] = obj["sku"][:-1] + rng.choice([c for c in "0123456789" if c != obj["sku"][-1]])
        return json.dumps(obj)


def _protect_and_typo(text: str, keep: tuple[str, ...], rng: random.Random) -> str:
    """Typos in plain words only: the SKU and city must stay exactly as the answer spells them."""
    marks = {f"\x00{i}\x00": value for i, value in enumerate(keep)}
    for mark, value in marks.items():
        text = text.replace(value, mark)
    text = add_typos(text, rng, rate=rng.choice((0.0, 0.0, 0.05, 0.1)))
    for mark, value in marks.items():
        text = text.replace(mark, value)
    return text
